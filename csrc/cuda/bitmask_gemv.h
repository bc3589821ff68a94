// The CUDA bitmask decode kernels' interface (csrc/cuda/bitmask_gemv*.cu), in plain C++ so the kernels
// compile with nvcc alone (tests/test_gpu_kernels.py builds them for sm_80 and sm_90 without torch).
//
// y[t, r] = sum_c x[t, c] · W[r, c] (+ bias[r]) for 1-16 tokens, W in the losa-bitmask layout exactly as
// stored (losa_deploy/kernels/formats/bitmask.py): mask words [rows, words], row_ptr [rows + 1], values
// [nnz]. No derived tables: a warp takes one row and finds its value offsets with a warp scan.
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

// The row-walk kernel (bitmask_gemv.cu): a warp walks one row's set bits lane by lane. Launches on
// `stream`; returns the launch error (cudaSuccess when it was queued).
cudaError_t bitmask_gemv(const BitmaskGemvArgs& args, cudaStream_t stream);

// The value-group kernel (bitmask_gemv_groups.cu): lanes take 8 stored values per 16-byte load. `warps`
// per block (1-16); `depth` groups per lane per load batch (2, or 4 up to 2 tokens without `window`; two
// batches are in flight); `window`: up to 2 tokens, step through the mask with the next word held in a
// register (no branch) instead of loading it when needed. It needs compute capability 8.0+ and x plus
// per-warp tables in shared memory: `fits` says whether this device can run it for these arguments.
bool bitmask_gemv_groups_fits(const BitmaskGemvArgs& args, int warps);
cudaError_t bitmask_gemv_groups(const BitmaskGemvArgs& args, int warps, int depth, bool window, cudaStream_t stream);

// The positions kernel (bitmask_gemv_positions.cu), one token only: lanes visit every position of their
// mask words with a fixed, branch-free loop, so its cost follows the columns, not the kept weights.
// `warps` per block (1-16); the grid gives each warp about `rows_per_warp` rows (fewer blocks, each warp's
// rows pipelined) where that is fewer blocks than fit at once. Compute capability 8.0+, x (fp32) plus
// per-warp value buffers in shared memory, and sizes below 2^31: `fits` says whether this device runs it
// for these arguments (tokens must be 1).
bool bitmask_gemv_positions_fits(const BitmaskGemvArgs& args, int warps);
cudaError_t bitmask_gemv_positions(const BitmaskGemvArgs& args, int warps, int rows_per_warp, cudaStream_t stream);

}  // namespace losa::cuda
