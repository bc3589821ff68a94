// The delta-layout kernel's device code (csrc/cuda/delta_gemv_kernel.cuh) on the CPU, through emulate.h:
// tests/test_delta_layout.py builds this as a shared library and calls it with ctypes.
#include "emulate.h"

#include "cuda/delta_gemv_kernel.cuh"

namespace {

using losa::cuda::DeltaGemvArgs;

template <typename T, int TS, int DEPTH, bool AHEAD>
void run(const DeltaGemvArgs& a, unsigned blocks, unsigned warps) {
  const size_t bytes = static_cast<size_t>(a.cols > 0 ? a.cols : 1) * TS * losa::cuda::delta::staged_bytes(TS);
  emulate::launch(blocks, warps * 32, bytes, [&](void* shared) {
    losa::cuda::delta::delta_gemv_rows<T, TS, DEPTH, AHEAD>(a, shared);
  });
}

template <typename T, int TS, bool AHEAD>
int run_depth(const DeltaGemvArgs& a, unsigned blocks, unsigned warps, int depth) {
  switch (depth) {
    case 1: run<T, TS, 1, AHEAD>(a, blocks, warps); return 0;
    case 2: run<T, TS, 2, AHEAD>(a, blocks, warps); return 0;
    case 4:  // as the launcher: 4 groups per lane run as 2 at 16 staged tokens
      if constexpr (TS == 16) run<T, TS, 2, AHEAD>(a, blocks, warps);
      else run<T, TS, 4, AHEAD>(a, blocks, warps);
      return 0;
    default: return 1;
  }
}

template <typename T, bool AHEAD>
int run_tokens(const DeltaGemvArgs& a, unsigned blocks, unsigned warps, int depth) {
  switch (losa::cuda::delta::token_stride(a.tokens)) {
    case 1: return run_depth<T, 1, AHEAD>(a, blocks, warps, depth);
    case 2: return run_depth<T, 2, AHEAD>(a, blocks, warps, depth);
    case 4: return run_depth<T, 4, AHEAD>(a, blocks, warps, depth);
    case 8: return run_depth<T, 8, AHEAD>(a, blocks, warps, depth);
    default: return run_depth<T, 16, AHEAD>(a, blocks, warps, depth);
  }
}

template <typename T>
int run_dtype(const DeltaGemvArgs& a, unsigned blocks, unsigned warps, int depth, int ahead) {
  return ahead ? run_tokens<T, true>(a, blocks, warps, depth) : run_tokens<T, false>(a, blocks, warps, depth);
}

}  // namespace

// Returns 0 on success, 1 for a depth or token count the kernel is not instantiated for.
extern "C" int delta_gemv_host(const void* x, const void* values, const uint32_t* deltas, const int64_t* row_ptr,
                               const void* bias, void* y, int64_t rows, int64_t cols, int64_t groups, int tokens,
                               int bfloat16, unsigned blocks, unsigned warps, int depth, int ahead) {
  if (tokens < 1 || tokens > losa::cuda::kDeltaMaxTokens) return 1;
  DeltaGemvArgs a;
  a.x = x;
  a.values = values;
  a.deltas = deltas;
  a.row_ptr = row_ptr;
  a.bias = bias;
  a.y = y;
  a.rows = rows;
  a.cols = cols;
  a.groups = groups;
  a.tokens = tokens;
  a.bfloat16 = bfloat16 != 0;
  return a.bfloat16 ? run_dtype<__nv_bfloat16>(a, blocks, warps, depth, ahead)
                    : run_dtype<__half>(a, blocks, warps, depth, ahead);
}
