// The delta-layout kernel's device code (csrc/cuda/delta_gemv_kernel.cuh) on the CPU, through emulate.h:
// tests/test_delta_layout.py builds this as a shared library and calls it with ctypes.
#include "emulate.h"

#include "cuda/delta_gemv_kernel.cuh"

namespace {

using losa::cuda::DeltaGemvArgs;

// Runs one instantiation on the emulator (delta::visit_instance picks it, as in the launcher).
struct Run {
  const DeltaGemvArgs& a;
  unsigned blocks, warps;

  template <typename T, int TS, int DEPTH, bool AHEAD>
  int operator()() const {
    const auto bytes = static_cast<size_t>(losa::cuda::delta::staged_x_bytes(a.cols, a.tokens));
    emulate::launch(blocks, warps * 32, bytes, [&](void* shared) {
      losa::cuda::delta::delta_gemv_rows<T, TS, DEPTH, AHEAD>(a, shared);
    });
    return 0;
  }
};

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
  const Run run{a, blocks, warps};
  return losa::cuda::delta::visit_instance(a, depth, ahead != 0, 1, run);
}
