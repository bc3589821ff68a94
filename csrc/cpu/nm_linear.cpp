// y = x · Wᵀ (+ bias) for an N:M weight in the kernel's load-time layout (built by
// losa_deploy/kernels/formats/nm.py from the canonical nm_* arrays):
//   * mask: per row, the 32-column keep words of the *filled* group masks: every full group marks
//     exactly N positions (groups with fewer non-zeros also mark zero-valued positions), the tail group
//     of width t marks ceil(N·t/M);
//   * values: rows back to back; a row of block b holds (in/M)·N_b + ceil(N_b·t/M) values;
//   * block_n: N of each block of rows_per_block rows.
// So a row's start follows from its block (no row offsets), and when M divides 32 every full chunk holds
// exactly 32·N/M values: the value cursor advances by a constant, with no popcount.
#include <torch/library.h>

#include <vector>

#include "cpu/sparse_linear.h"

namespace {

constexpr const char* kOp = "nm_linear";

at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask, const at::Tensor& block_n,
                     int64_t in_features, int64_t m, int64_t rows_per_block, const std::optional<at::Tensor>& bias,
                     c10::string_view isa, int64_t panel_tokens) {
  losa::cpu::check_values(values, kOp);
  losa::cpu::check_mask(mask, in_features, kOp);
  TORCH_CHECK(m >= 2 && m <= 16, kOp, ": M must be in 2..16, got ", m);
  TORCH_CHECK(rows_per_block >= 1, kOp, ": rows_per_block must be positive, got ", rows_per_block);
  const int64_t rows = mask.size(0), blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(block_n.device().is_cpu() && block_n.scalar_type() == at::kInt && block_n.dim() == 1 &&
                  block_n.is_contiguous() && block_n.size(0) == blocks,
              kOp, ": block_n must be a contiguous int32 CPU tensor of ", blocks, " entries");

  const int32_t* ns = block_n.data_ptr<int32_t>();
  const int64_t full = in_features / m, tail = in_features % m;
  std::vector<int64_t> start(blocks + 1, 0), stride(blocks);
  std::vector<int32_t> chunk(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n = ns[b];
    TORCH_CHECK(n >= 0 && n < m, kOp, ": block ", b, " has N = ", n, ", which must be in 0..", m - 1);
    stride[b] = full * n + (n * tail + m - 1) / m;  // the tail group keeps ceil(N·t/M)
    chunk[b] = 32 % m == 0 ? static_cast<int32_t>(32 / m * n) : 0;
    start[b + 1] = start[b] + stride[b] * std::min(rows_per_block, rows - b * rows_per_block);
  }
  TORCH_CHECK(start[blocks] == values.numel(), kOp, ": ", values.numel(), " values given, the N:M layout holds ",
              start[blocks]);

  losa::cpu::SparseRows w;
  w.rows = rows;
  w.cols = in_features;
  w.words = mask.size(1);
  w.mask = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  w.values = values.data_ptr();
  w.dtype = values.scalar_type();
  w.num_values = values.numel();
  w.rows_per_block = rows_per_block;
  w.block_start = start.data();
  w.block_stride = stride.data();
  w.block_chunk = chunk.data();
  return losa::cpu::sparse_linear_cpu(w, x, bias, std::string(isa), panel_tokens, kOp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def(
      "nm_linear(Tensor x, Tensor values, Tensor mask, Tensor block_n, int in_features, int m, "
      "int rows_per_block, Tensor? bias=None, str isa='auto', int panel_tokens=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) { m.impl("nm_linear", &nm_linear); }
