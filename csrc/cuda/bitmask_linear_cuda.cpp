// The CUDA implementation of losa::bitmask_linear (the op is defined with its CPU kernel in
// csrc/cpu/bitmask_linear.cpp). Compiled only in CUDA builds (setup.py); the Python dispatcher sends it
// decode-sized inputs (kernels/dispatch.py), but it is correct for any input:
//   * bf16 / fp16 x with values of the same dtype: a warp-per-row decode kernel, up to 16 tokens per
//     launch (N:M weights arrive here through their bitmask view, formats/gpu.py);
//   * anything else (fp32, mixed dtypes): the weight is decompressed and torch's dense linear runs.
// `isa` picks the kernel here (the CPU op reads it as the instruction set):
//   "auto" (or "")     at one token with at least 20% of the weights kept, the positions kernel
//                      (bitmask_gemv_positions.cu); otherwise the value-group kernel
//                      (bitmask_gemv_groups.cu) where it fits, else the row walk;
//                      $LOSA_CUDA_KERNEL (read once) replaces "auto" by one of the names below;
//   "rows"             the row-walk kernel (bitmask_gemv.cu);
//   "groups[:W[:P[:window]]]"  the value-group kernel with W warps per block (default 16), P groups per
//                      lane in flight (default 2; 4 up to 2 tokens) and, with "window", its branch-free
//                      mask walk (up to 2 tokens); an error where it does not fit.
//   "positions[:W[:R]]"  the positions kernel (bitmask_gemv_positions.cu) with W warps per block
//                      (default 16) and about R rows per warp (default 1: as many blocks as fit): one
//                      token per launch, so several tokens take several launches; an error where it does
//                      not fit.
// `panel_tokens` is a CPU tuning knob and is ignored here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/bitmask_gemv.h"
#include "cuda/decode_call.h"

namespace {

constexpr const char* kOp = "bitmask_linear (CUDA)";

struct Kernel {
  bool groups = true, forced = false;
  int warps = 16, depth = 2;  // the fastest setting over the suite's shapes on an H200 (RESULTS.md)
  bool window = false;
  bool positions = false;
  int rows_per_warp = 1;
  bool automatic = false;  // "auto" with no $LOSA_CUDA_KERNEL: one token may take the positions kernel
};

// "auto" at one token runs the positions kernel where at least this fraction of the weights is kept: its
// cost follows the columns, the value-group kernel's the kept weights (H200 crossover: RESULTS.md).
constexpr double kPositionsMinKept = 0.2;

// A whole decimal number up to 1024 (the ranges are checked after, with their own message).
bool parse_int(const std::string& text, int& out) { return losa::cuda::parse_int(text, 0, 1024, out); }

Kernel parse_name(const std::string& name) {
  if (name.empty() || name == "auto") {
    Kernel k;
    k.automatic = true;
    return k;
  }
  if (name == "rows") return Kernel{false, true};
  if (name == "positions" || name.rfind("positions:", 0) == 0) {
    Kernel k{false, true, 16};
    k.positions = true;
    const std::string rest = name.size() > 9 ? name.substr(10) : "";
    const size_t colon = rest.find(':');
    const bool ok = name.size() == 9 || (parse_int(rest.substr(0, colon), k.warps) &&
                                         (colon == std::string::npos || parse_int(rest.substr(colon + 1), k.rows_per_warp)));
    LOSA_CHECK(ok && k.warps >= 1 && k.warps <= 16 && k.rows_per_warp >= 1, kOp, ": kernel '", name,
               "' needs 1-16 warps and at least 1 row per warp (positions[:warps[:rows]])");
    return k;
  }
  const std::vector<std::string> parts = losa::cuda::split_colons(name);
  Kernel k{true, true};
  const bool ok = parts[0] == "groups" && parts.size() <= 4 && (parts.size() < 2 || parse_int(parts[1], k.warps)) &&
                  (parts.size() < 3 || parse_int(parts[2], k.depth)) && (parts.size() < 4 || parts[3] == "window");
  LOSA_CHECK(ok, kOp, ": unknown kernel '", name,
             "' (choose auto, rows, groups[:warps[:depth[:window]]] or positions[:warps[:rows]])");
  k.window = parts.size() == 4;
  LOSA_CHECK(k.warps >= 1 && k.warps <= 16 && (k.depth == 2 || k.depth == 4), kOp, ": kernel '", name,
             "' needs 1-16 warps and depth 2 or 4");
  return k;
}

// The kernel for `isa`; "auto" takes $LOSA_CUDA_KERNEL's choice, as a preference (no error where the
// value-group kernel does not fit).
Kernel parse_kernel(c10::string_view isa) {
  static const std::string env = [] {
    const char* v = std::getenv("LOSA_CUDA_KERNEL");
    return std::string(v ? v : "");
  }();
  const std::string name(isa);
  if (!name.empty() && name != "auto") return parse_name(name);
  Kernel k = parse_name(env);
  k.forced = false;
  return k;
}

// Tokens per launch: 16, or for "auto" the largest power of two whose x still fits the value-group
// kernel's shared memory, so a wide layer at 9-16 tokens runs two value-group launches of 8 rather than
// one row-walk launch (4096x11008 on an H200: 74 µs per 8-token value-group launch at 70% against 203 µs
// for the row walk at 16 tokens). 16 when even one token does not fit (the row walk runs).
int64_t tokens_per_launch(losa::cuda::BitmaskGemvArgs args, const Kernel& kernel) {
  if (kernel.positions) return 1;
  if (!kernel.groups || kernel.forced) return losa::cuda::kMaxTokens;
  for (int t = losa::cuda::kMaxTokens; t >= 1; t /= 2) {
    args.tokens = t;
    if (losa::cuda::bitmask_gemv_groups_fits(args, kernel.warps)) return t;
  }
  return losa::cuda::kMaxTokens;
}

at::Tensor dense_weight(const at::Tensor& values, const at::Tensor& mask, int64_t cols) {
  const auto shifts = at::arange(32, mask.options());
  const auto bits = mask.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1).to(at::kBool);
  const auto keep = bits.reshape({mask.size(0), -1}).narrow(1, 0, cols);
  return at::zeros({mask.size(0), cols}, values.options()).masked_scatter_(keep, values);
}

at::Tensor bitmask_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                               const at::Tensor& row_ptr, int64_t in_features, const std::optional<at::Tensor>& bias,
                               c10::string_view isa, int64_t /*panel_tokens*/) {
  const int64_t rows = mask.size(0), words = (in_features + 31) / 32;
  LOSA_CHECK(x.is_cuda() && values.is_cuda() && mask.is_cuda() && row_ptr.is_cuda(), kOp,
             ": x, values, mask and row_ptr must be CUDA tensors");
  LOSA_CHECK(values.get_device() == x.get_device() && mask.get_device() == x.get_device() &&
                  row_ptr.get_device() == x.get_device(),
             kOp, ": all tensors must be on one device");
  LOSA_CHECK(x.dim() >= 1 && x.size(-1) == in_features, kOp, ": x has ", x.size(-1), " features, the weight ",
             in_features);
  LOSA_CHECK(values.dim() == 1 && values.is_contiguous(), kOp, ": values must be contiguous 1-D");
  LOSA_CHECK(mask.scalar_type() == at::kInt && mask.dim() == 2 && mask.size(1) == words && mask.is_contiguous(), kOp,
             ": mask must be contiguous int32 [rows, ", words, "]");
  LOSA_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) == rows + 1 &&
                  row_ptr.is_contiguous(),
             kOp, ": row_ptr must be contiguous int64 [", rows + 1, "]");
  if (bias) {
    LOSA_CHECK(bias->is_cuda() && bias->dim() == 1 && bias->size(0) == rows, kOp, ": bias must be a CUDA [", rows,
               "] tensor");
  }
  const Kernel kernel = parse_kernel(isa);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const bool half16 = (dtype == at::kBFloat16 || dtype == at::kHalf) && values.scalar_type() == dtype;
  if (!half16) {
    const auto y = at::linear(x.to(at::kFloat), dense_weight(values, mask, in_features).to(at::kFloat),
                              bias ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt);
    return y.to(dtype);
  }

  const auto call = losa::cuda::decode_call(x, values, bias, in_features, rows);
  const int64_t tokens = call.tokens;
  losa::cuda::BitmaskGemvArgs args;
  args.values = call.values.data_ptr();
  args.mask = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  args.row_ptr = row_ptr.data_ptr<int64_t>();
  args.bias = call.bias_ptr();
  args.rows = rows;
  args.cols = in_features;
  args.words = words;
  args.nnz = values.numel();
  args.dtype = dtype == at::kBFloat16 ? losa::cuda::Half16::kBFloat16 : losa::cuda::Half16::kFloat16;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  Kernel chosen = kernel;
  if (kernel.automatic && tokens == 1 &&
      static_cast<double>(values.numel()) >= kPositionsMinKept * static_cast<double>(rows) * in_features) {
    chosen = Kernel{false, false, 16};
    chosen.positions = true;
  }
  if (chosen.positions) {  // one token per launch; a preferred one that does not fit gives way to the default
    args.tokens = 1;
    const bool fits = losa::cuda::bitmask_gemv_positions_fits(args, chosen.warps);
    LOSA_CHECK(fits || !chosen.forced, kOp, ": the positions kernel does not fit ", in_features, " columns with ",
               chosen.warps, " warps on this device (use rows)");
    if (!fits) chosen = Kernel{};
  }
  const int64_t per_launch = tokens_per_launch(args, chosen);
  for (int64_t t0 = 0; t0 < tokens; t0 += per_launch) {
    args.tokens = static_cast<int>(std::min<int64_t>(per_launch, tokens - t0));
    args.x = call.x_at(t0);
    args.y = call.y_at(t0);
    const bool groups = chosen.groups && losa::cuda::bitmask_gemv_groups_fits(args, chosen.warps);
    LOSA_CHECK(groups || !chosen.forced || !chosen.groups, kOp, ": the value-group kernel does not fit ",
               in_features, " columns at ", args.tokens, " tokens on this device (use rows)");
    const cudaError_t err =
        chosen.positions ? losa::cuda::bitmask_gemv_positions(args, chosen.warps, chosen.rows_per_warp, stream)
        : groups         ? losa::cuda::bitmask_gemv_groups(args, chosen.warps, chosen.depth, chosen.window, stream)
                         : losa::cuda::bitmask_gemv(args, stream);
    LOSA_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  }
  return call.result(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(losa, CUDA, m) { m.impl("bitmask_linear", &bitmask_linear_cuda); }
