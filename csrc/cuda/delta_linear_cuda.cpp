// losa::delta_linear: y = x · Wᵀ (+ bias) for a weight in the delta layout (formats/delta.py), CUDA only.
// bf16 / fp16 x with values of the same dtype; up to 16 tokens per launch (more run as several launches).
// `config`: "auto" (8 warps per block, or 16 where only one block fits an SM; 2 groups per lane per step,
// loaded a step ahead) or "W:D[:A]" (see parse_config). The Python dispatcher sends it decode-sized inputs only where a layer holds this layout.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/decode_call.h"
#include "cuda/delta_gemv.h"

namespace {

constexpr const char* kOp = "delta_linear (CUDA)";

struct Config {
  int warps = 0, depth = 2;  // warps 0: delta_gemv_auto_warps decides per launch
  bool ahead = true;
};

// "auto", or "W:D[:A]": W warps per block (1-16), D groups per lane per step (1, 2 or 4), A 1 (default) to
// load each step one step ahead, 0 just before its arithmetic.
Config parse_config(c10::string_view text) {
  const std::string name(text);
  Config c;
  if (name.empty() || name == "auto") return c;
  using losa::cuda::parse_int;
  const std::vector<std::string> parts = losa::cuda::split_colons(name);
  int ahead = 1;
  const bool ok = (parts.size() == 2 || parts.size() == 3) && parse_int(parts[0], 1, 16, c.warps) &&
                  parse_int(parts[1], 1, 4, c.depth) && c.depth != 3 &&
                  (parts.size() == 2 || parse_int(parts[2], 0, 1, ahead));
  LOSA_CHECK(ok, kOp, ": unknown kernel config '", name,
             "' (auto, or warps:depth[:ahead] with 1-16 warps, depth 1, 2 or 4, ahead 0 or 1)");
  c.ahead = ahead == 1;
  return c;
}

at::Tensor delta_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& deltas,
                             const at::Tensor& row_ptr, int64_t in_features, const std::optional<at::Tensor>& bias,
                             c10::string_view config) {
  const Config cfg = parse_config(config);
  LOSA_CHECK(x.is_cuda() && values.is_cuda() && deltas.is_cuda() && row_ptr.is_cuda(), kOp,
             ": x, values, deltas and row_ptr must be CUDA tensors");
  LOSA_CHECK(values.get_device() == x.get_device() && deltas.get_device() == x.get_device() &&
                 row_ptr.get_device() == x.get_device() && (!bias || bias->device() == x.device()),
             kOp, ": all tensors must be on one device");
  LOSA_CHECK(x.dim() >= 1 && x.size(-1) == in_features, kOp, ": x must have ", in_features,
             " features in its last dimension");
  const auto dtype = x.scalar_type();
  LOSA_CHECK((dtype == at::kBFloat16 || dtype == at::kHalf) && values.scalar_type() == dtype, kOp,
             ": x and values must both be bf16 or both fp16");
  LOSA_CHECK(deltas.scalar_type() == at::kInt && deltas.dim() == 1 && deltas.is_contiguous(), kOp,
             ": deltas must be contiguous int32 [groups]");
  const int64_t groups = deltas.numel();
  LOSA_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() == 8 * groups, kOp,
             ": values must be contiguous [", 8 * groups, "] (8 per group)");
  LOSA_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) >= 1 &&
                 row_ptr.is_contiguous(),
             kOp, ": row_ptr must be contiguous int64 [rows + 1]");
  const int64_t rows = row_ptr.size(0) - 1;
  if (bias) {
    LOSA_CHECK(bias->dim() == 1 && bias->size(0) == rows, kOp, ": bias must be [", rows, "]");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto call = losa::cuda::decode_call(x, values, bias, in_features, rows);
  losa::cuda::DeltaGemvArgs args;
  args.values = call.values.data_ptr();
  args.deltas = reinterpret_cast<const uint32_t*>(deltas.data_ptr<int32_t>());
  args.row_ptr = row_ptr.data_ptr<int64_t>();
  args.bias = call.bias_ptr();
  args.rows = rows;
  args.cols = in_features;
  args.groups = groups;
  args.bfloat16 = dtype == at::kBFloat16;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Tokens per launch: 16, or fewer where 16 tokens of staged x do not fit shared memory (11008 columns:
  // 352 KB at 16 tokens, 176 KB at 8 or 4, 44 KB at 1; an H100 has 227 KB per block).
  const int check_warps = cfg.warps ? cfg.warps : 8;  // the fit does not depend on the warps (1-16)
  int per_launch = losa::cuda::kDeltaMaxTokens;
  args.tokens = per_launch;
  while (per_launch > 1 && losa::cuda::delta_gemv_misfit(args, check_warps)) {
    per_launch /= 2;
    args.tokens = per_launch;
  }
  for (int64_t t0 = 0; t0 < call.tokens; t0 += per_launch) {
    args.tokens = static_cast<int>(std::min<int64_t>(per_launch, call.tokens - t0));
    args.x = call.x_at(t0);
    args.y = call.y_at(t0);
    const int warps = cfg.warps ? cfg.warps : losa::cuda::delta_gemv_auto_warps(args);
    const char* why = losa::cuda::delta_gemv_misfit(args, warps);
    LOSA_CHECK(why == nullptr, kOp, ": ", in_features, " columns, ", rows, " rows at ", args.tokens,
               " tokens: the kernel ", why ? why : "");
    const cudaError_t err = losa::cuda::delta_gemv(args, warps, cfg.depth, cfg.ahead, stream);
    LOSA_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  }
  return call.result(x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def(
      "delta_linear(Tensor x, Tensor values, Tensor deltas, Tensor row_ptr, int in_features, Tensor? bias=None, "
      "str config='auto') -> Tensor");
}

TORCH_LIBRARY_IMPL(losa, CUDA, m) { m.impl("delta_linear", &delta_linear_cuda); }
