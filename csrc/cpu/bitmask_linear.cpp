// y = x · Wᵀ (+ bias) for a weight in the losa-bitmask layout (losa_deploy/kernels/formats/bitmask.py):
// per output row, one 32-bit keep-mask word per 32 input columns and the row's kept values packed in
// column order, starting at row_ptr[row]. The canonical on-disk arrays are the kernel's input as they are.
// Autograd: gradients for x and the bias; the packed weight is frozen.
#include <torch/autograd.h>
#include <torch/library.h>

#include "check.h"
#include "cpu/sparse_linear.h"

namespace {

constexpr const char* kOp = "bitmask_linear";

losa::cpu::SparseRows bitmask_rows(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& row_ptr,
                                   int64_t in_features) {
  losa::cpu::check_values(values, kOp);
  losa::cpu::check_mask(mask, in_features, kOp);
  const int64_t rows = mask.size(0);
  LOSA_CHECK(row_ptr.device().is_cpu() && row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 &&
                  row_ptr.is_contiguous(),
             kOp, ": row_ptr must be a contiguous 1-D int64 CPU tensor");
  LOSA_CHECK(row_ptr.size(0) == rows + 1, kOp, ": row_ptr has ", row_ptr.size(0), " entries, ", rows,
             " rows need ", rows + 1);
  // Cheap structural checks (O(rows)); that each row's mask bits match its value count is checked once,
  // when the packed weight is built (BitmaskWeight), not on every call.
  const int64_t* ptr = row_ptr.data_ptr<int64_t>();
  LOSA_CHECK(ptr[0] == 0 && ptr[rows] == values.numel(), kOp, ": row_ptr must run from 0 to the ",
             values.numel(), " values, got ", ptr[0], "..", ptr[rows]);
  for (int64_t r = 0; r < rows; ++r) LOSA_CHECK(ptr[r] <= ptr[r + 1], kOp, ": row_ptr decreases at row ", r);

  losa::cpu::SparseRows w;
  w.rows = rows;
  w.cols = in_features;
  w.words = mask.size(1);
  w.mask = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  w.values = values.data_ptr();
  w.dtype = values.scalar_type();
  w.num_values = values.numel();
  w.row_ptr = ptr;
  return w;
}

at::Tensor bitmask_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                              const at::Tensor& row_ptr, int64_t in_features, const std::optional<at::Tensor>& bias,
                              c10::string_view isa, int64_t panel_tokens) {
  return losa::cpu::sparse_linear_cpu(bitmask_rows(values, mask, row_ptr, in_features), x, bias, std::string(isa),
                                      panel_tokens, kOp);
}

at::Tensor bitmask_to_dense_cpu(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& row_ptr,
                                int64_t in_features) {
  return losa::cpu::sparse_to_dense(bitmask_rows(values, mask, row_ptr, in_features));
}

class BitmaskLinear : public torch::autograd::Function<BitmaskLinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& mask, const at::Tensor& row_ptr, int64_t in_features,
                            const std::optional<at::Tensor>& bias, c10::string_view isa, int64_t panel_tokens) {
    LOSA_CHECK(!values.requires_grad(), kOp, ": the packed weight is frozen, its values cannot require grad");
    ctx->save_for_backward({values, mask, row_ptr});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["bias_dtype"] = bias ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("losa::bitmask_linear", "")
                         .typed<decltype(bitmask_linear_cpu)>();
    return op.call(x, values, mask, row_ptr, in_features, bias, isa, panel_tokens);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    LOSA_CHECK(saved[0].device().is_cpu(), kOp, ": the backward pass runs on the CPU only");
    // needs_input_grad counts tensor inputs only: x, values, mask, row table, then the bias (index 4).
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    // Through the dispatcher (not a direct call), so torch.compile traces the backward with its fake op.
    static auto to_dense = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("losa::bitmask_to_dense", "")
                               .typed<decltype(bitmask_to_dense_cpu)>();
    const at::Tensor dense =
        need_x ? to_dense.call(saved[0], saved[1], saved[2], ctx->saved_data["in_features"].toInt()) : at::Tensor();
    auto [grad_x, grad_bias] = losa::cpu::sparse_linear_backward(
        dense, grads[0], static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt()), need_x,
        bias_dtype >= 0 && ctx->needs_input_grad(4) ? std::optional(static_cast<at::ScalarType>(bias_dtype))
                                                     : std::nullopt);
    return {grad_x, {}, {}, {}, {}, grad_bias, {}, {}};
  }
};

at::Tensor bitmask_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                                   const at::Tensor& row_ptr, int64_t in_features,
                                   const std::optional<at::Tensor>& bias, c10::string_view isa, int64_t panel_tokens) {
  return BitmaskLinear::apply(x, values, mask, row_ptr, in_features, bias, isa, panel_tokens);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def(
      "bitmask_linear(Tensor x, Tensor values, Tensor mask, Tensor row_ptr, int in_features, "
      "Tensor? bias=None, str isa='auto', int panel_tokens=0) -> Tensor");
  m.def("bitmask_to_dense(Tensor values, Tensor mask, Tensor row_ptr, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) {
  m.impl("bitmask_linear", &bitmask_linear_cpu);
  m.impl("bitmask_to_dense", &bitmask_to_dense_cpu);
}

TORCH_LIBRARY_IMPL(losa, Autograd, m) { m.impl("bitmask_linear", &bitmask_linear_autograd); }
