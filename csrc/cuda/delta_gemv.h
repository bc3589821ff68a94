// The delta-layout decode kernel's interface (csrc/cuda/delta_gemv.cu), in plain C++ so the kernel compiles
// with nvcc alone and its device code runs in the host emulation of tests/cuda_host/.
//
// y[t, r] = sum_c x[t, c] · W[r, c] (+ bias[r]) for 1-16 tokens per launch, W in the delta layout
// (losa_deploy/kernels/formats/delta.py): groups of 8 entries, each a 16-bit value and a 4-bit column
// delta; row r's groups are row_ptr[r] .. row_ptr[r + 1].
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace losa::cuda {

struct DeltaGemvArgs {
  const void* x = nullptr;           // [tokens, cols], 16-bit
  const void* values = nullptr;      // [groups * 8], 16-bit, 16-byte aligned
  const uint32_t* deltas = nullptr;  // [groups]: entry j's delta in bits 4j .. 4j + 3
  const int64_t* row_ptr = nullptr;  // [rows + 1], in groups
  const void* bias = nullptr;        // [rows] or nullptr
  void* y = nullptr;                 // [tokens, rows]
  int64_t rows = 0, cols = 0, groups = 0;
  int tokens = 1;                    // 1..kDeltaMaxTokens (x staged in shared memory: fewer may fit)
  bool bfloat16 = true;              // x, values, bias and y: bf16, else fp16
};

constexpr int kDeltaMaxTokens = 16;

// Why this device cannot run `args` with `warps` warps per block, or nullptr when it can: compute
// capability 7.0+, 1-16 warps, 1-16 tokens, the staged x (fp32 up to 4 tokens, 16-bit from 8) within
// one block's shared memory, sizes below 2^31.
const char* delta_gemv_misfit(const DeltaGemvArgs& args, int warps);
// The default warps per block for `args`: 8, or 16 where the staged x leaves room for one block per SM
// only (so that 16 warps rather than 8 share the SM).
int delta_gemv_auto_warps(const DeltaGemvArgs& args);
// `depth` groups per lane per step (1, 2 or 4; 4 runs as 2 at 9-16 tokens); `ahead`: each step's loads are
// issued one step ahead.
// Launches on `stream`; returns the launch error.
cudaError_t delta_gemv(const DeltaGemvArgs& args, int warps, int depth, bool ahead, cudaStream_t stream);

}  // namespace losa::cuda
