// The CUDA bitmask decode kernel's interface (csrc/cuda/bitmask_gemv.cu), in plain C++ so the kernel
// compiles with nvcc alone (tests/test_gpu_kernels.py builds it for sm_80 and sm_90 without torch).
//
// y[t, r] = sum_c x[t, c] · W[r, c] (+ bias[r]) for 1-16 tokens, W in the losa-bitmask layout exactly as
// stored (losa_deploy/kernels/formats/bitmask.py): mask words [rows, words], row_ptr [rows + 1], values
// [nnz]. No derived tables: a warp walks one row and finds its value offsets with a warp scan.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace losa::cuda {

enum class Half16 { kBFloat16 = 0, kFloat16 = 1 };  // x, values, bias and y share this 16-bit type

struct BitmaskGemvArgs {
  const void* x = nullptr;           // [tokens, cols]
  const void* values = nullptr;      // [nnz], 16-byte aligned
  const uint32_t* mask = nullptr;    // [rows, words]
  const int64_t* row_ptr = nullptr;  // [rows + 1]
  const void* bias = nullptr;        // [rows] or nullptr
  void* y = nullptr;                 // [tokens, rows]
  int64_t rows = 0, cols = 0, words = 0, nnz = 0;
  int tokens = 1;                    // 1..kMaxTokens
  Half16 dtype = Half16::kBFloat16;
};

constexpr int kMaxTokens = 16;

// Launches the kernel on `stream`; returns the launch error (cudaSuccess when it was queued).
cudaError_t bitmask_gemv(const BitmaskGemvArgs& args, cudaStream_t stream);

}  // namespace losa::cuda
