// y = x · Wᵀ (+ bias) for a weight in the losa-bitmask layout (losa_deploy/kernels/formats/bitmask.py):
// per output row, one 32-bit keep-mask word per 32 input columns and the row's kept values packed in
// column order, starting at row_ptr[row]. The canonical on-disk arrays are the kernel's input as they are.
#include <torch/library.h>

#include "cpu/sparse_linear.h"

namespace {

constexpr const char* kOp = "bitmask_linear";

at::Tensor bitmask_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                          const at::Tensor& row_ptr, int64_t in_features, const std::optional<at::Tensor>& bias,
                          c10::string_view isa, int64_t panel_tokens) {
  losa::cpu::check_values(values, kOp);
  losa::cpu::check_mask(mask, in_features, kOp);
  const int64_t rows = mask.size(0);
  TORCH_CHECK(row_ptr.device().is_cpu() && row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 &&
                  row_ptr.is_contiguous(),
              kOp, ": row_ptr must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(row_ptr.size(0) == rows + 1, kOp, ": row_ptr has ", row_ptr.size(0), " entries, ", rows,
              " rows need ", rows + 1);
  // Cheap structural checks (O(rows)); that each row's mask bits match its value count is checked once,
  // when the packed weight is built (BitmaskWeight), not on every call.
  const int64_t* ptr = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(ptr[0] == 0 && ptr[rows] == values.numel(), kOp, ": row_ptr must run from 0 to the ",
              values.numel(), " values, got ", ptr[0], "..", ptr[rows]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(ptr[r] <= ptr[r + 1], kOp, ": row_ptr decreases at row ", r);

  losa::cpu::SparseRows w;
  w.rows = rows;
  w.cols = in_features;
  w.words = mask.size(1);
  w.mask = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  w.values = values.data_ptr();
  w.dtype = values.scalar_type();
  w.num_values = values.numel();
  w.row_ptr = ptr;
  return losa::cpu::sparse_linear_cpu(w, x, bias, std::string(isa), panel_tokens, kOp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def(
      "bitmask_linear(Tensor x, Tensor values, Tensor mask, Tensor row_ptr, int in_features, "
      "Tensor? bias=None, str isa='auto', int panel_tokens=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) { m.impl("bitmask_linear", &bitmask_linear); }
