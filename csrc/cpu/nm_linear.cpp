// y = x · Wᵀ (+ bias) for an N:M weight in the kernel's load-time layout (built by
// losa_deploy/kernels/formats/nm.py from the canonical nm_* arrays):
//   * mask: per row, the 32-column keep words of the *filled* group masks: every full group marks
//     exactly N positions (groups with fewer non-zeros also mark zero-valued positions), the tail group
//     of width t marks ceil(N·t/M);
//   * values: rows back to back; a row of block b holds (in/M)·N_b + ceil(N_b·t/M) values;
//   * block_n: N of each block of rows_per_block rows.
// So a row's start follows from its block (no row offsets), and when M divides 32 every full chunk holds
// exactly 32·N/M values: the value cursor advances by a constant, with no popcount.
// Autograd: gradients for x and the bias; the packed weight is frozen.
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "check.h"
#include "cpu/sparse_linear.h"

namespace {

constexpr const char* kOp = "nm_linear";

// The kernel's view of the arrays, with the per-block tables it points into.
class NmRows {
 public:
  NmRows(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& block_n, int64_t in_features, int64_t m,
         int64_t rows_per_block) {
    losa::cpu::check_values(values, kOp);
    losa::cpu::check_mask(mask, in_features, kOp);
    LOSA_CHECK(m >= 2 && m <= 16, kOp, ": M must be in 2..16, got ", m);
    LOSA_CHECK(rows_per_block >= 1, kOp, ": rows_per_block must be positive, got ", rows_per_block);
    const int64_t rows = mask.size(0), blocks = (rows + rows_per_block - 1) / rows_per_block;
    LOSA_CHECK(block_n.device().is_cpu() && block_n.scalar_type() == at::kInt && block_n.dim() == 1 &&
                    block_n.is_contiguous() && block_n.size(0) == blocks,
               kOp, ": block_n must be a contiguous int32 CPU tensor of ", blocks, " entries");
    const int32_t* ns = block_n.data_ptr<int32_t>();
    const int64_t full = in_features / m, tail = in_features % m;
    start_.assign(blocks + 1, 0);
    stride_.resize(blocks);
    chunk_.resize(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n = ns[b];
      LOSA_CHECK(n >= 0 && n < m, kOp, ": block ", b, " has N = ", n, ", which must be in 0..", m - 1);
      stride_[b] = full * n + (n * tail + m - 1) / m;  // the tail group keeps ceil(N·t/M)
      chunk_[b] = 32 % m == 0 ? static_cast<int32_t>(32 / m * n) : 0;
      start_[b + 1] = start_[b] + stride_[b] * std::min(rows_per_block, rows - b * rows_per_block);
    }
    LOSA_CHECK(start_[blocks] == values.numel(), kOp, ": ", values.numel(), " values given, the N:M layout holds ",
               start_[blocks]);
    w_.rows = rows;
    w_.cols = in_features;
    w_.words = mask.size(1);
    w_.mask = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
    w_.values = values.data_ptr();
    w_.dtype = values.scalar_type();
    w_.num_values = values.numel();
    w_.rows_per_block = rows_per_block;
    w_.block_start = start_.data();
    w_.block_stride = stride_.data();
    w_.block_chunk = chunk_.data();
  }
  NmRows(const NmRows&) = delete;
  NmRows& operator=(const NmRows&) = delete;

  const losa::cpu::SparseRows& rows() const { return w_; }

 private:
  std::vector<int64_t> start_, stride_;
  std::vector<int32_t> chunk_;
  losa::cpu::SparseRows w_;
};

at::Tensor nm_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                         const at::Tensor& block_n, int64_t in_features, int64_t m, int64_t rows_per_block,
                         const std::optional<at::Tensor>& bias, c10::string_view isa, int64_t panel_tokens) {
  const NmRows w(values, mask, block_n, in_features, m, rows_per_block);
  return losa::cpu::sparse_linear_cpu(w.rows(), x, bias, std::string(isa), panel_tokens, kOp);
}

at::Tensor nm_to_dense_cpu(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& block_n,
                           int64_t in_features, int64_t m, int64_t rows_per_block) {
  const NmRows w(values, mask, block_n, in_features, m, rows_per_block);
  return losa::cpu::sparse_to_dense(w.rows());
}

class NmLinear : public torch::autograd::Function<NmLinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& mask, const at::Tensor& block_n, int64_t in_features, int64_t m,
                            int64_t rows_per_block, const std::optional<at::Tensor>& bias, c10::string_view isa,
                            int64_t panel_tokens) {
    LOSA_CHECK(!values.requires_grad(), kOp, ": the packed weight is frozen, its values cannot require grad");
    ctx->save_for_backward({values, mask, block_n});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["m"] = m;
    ctx->saved_data["rows_per_block"] = rows_per_block;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["bias_dtype"] = bias ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("losa::nm_linear", "").typed<decltype(nm_linear_cpu)>();
    return op.call(x, values, mask, block_n, in_features, m, rows_per_block, bias, isa, panel_tokens);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    LOSA_CHECK(saved[0].device().is_cpu(), kOp, ": the backward pass runs on the CPU only");
    // needs_input_grad counts tensor inputs only: x, values, mask, row table, then the bias (index 4).
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    // Through the dispatcher (not a direct call), so torch.compile traces the backward with its fake op.
    static auto to_dense =
        c10::Dispatcher::singleton().findSchemaOrThrow("losa::nm_to_dense", "").typed<decltype(nm_to_dense_cpu)>();
    const at::Tensor dense = need_x ? to_dense.call(saved[0], saved[1], saved[2], ctx->saved_data["in_features"].toInt(),
                                                    ctx->saved_data["m"].toInt(),
                                                    ctx->saved_data["rows_per_block"].toInt())
                                    : at::Tensor();
    auto [grad_x, grad_bias] = losa::cpu::sparse_linear_backward(
        dense, grads[0], static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt()), need_x,
        bias_dtype >= 0 && ctx->needs_input_grad(4) ? std::optional(static_cast<at::ScalarType>(bias_dtype))
                                                     : std::nullopt);
    return {grad_x, {}, {}, {}, {}, {}, {}, grad_bias, {}, {}};
  }
};

at::Tensor nm_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                              const at::Tensor& block_n, int64_t in_features, int64_t m, int64_t rows_per_block,
                              const std::optional<at::Tensor>& bias, c10::string_view isa, int64_t panel_tokens) {
  return NmLinear::apply(x, values, mask, block_n, in_features, m, rows_per_block, bias, isa, panel_tokens);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def(
      "nm_linear(Tensor x, Tensor values, Tensor mask, Tensor block_n, int in_features, int m, "
      "int rows_per_block, Tensor? bias=None, str isa='auto', int panel_tokens=0) -> Tensor");
  m.def("nm_to_dense(Tensor values, Tensor mask, Tensor block_n, int in_features, int m, int rows_per_block) -> Tensor");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) {
  m.impl("nm_linear", &nm_linear_cpu);
  m.impl("nm_to_dense", &nm_to_dense_cpu);
}

TORCH_LIBRARY_IMPL(losa, Autograd, m) { m.impl("nm_linear", &nm_linear_autograd); }
