// Bitmask sparse GEMV for decode (1-4 tokens), kernels.md §5.1: one warp per output row.
//
// A warp step covers 64 mask words (2048 columns); lane l owns words 2l and 2l+1 of the step.
//   1. Each lane counts its words' kept columns (__popc); an inclusive warp scan (shuffles) gives each
//      lane its first value, and lane 31's sum the step's value count. No offset tables are needed.
//   2. The warp stages the step's values, one contiguous range, in shared memory with coalesced 16-byte
//      loads from the 16-byte boundary below the range (the last vector falls back to 2-byte loads at the
//      end of the array, so nothing past it is read).
//   3. Each lane walks the set bits of its words (__ffs), multiplying each value with x at its column
//      (x is small and stays in L1), fp32 accumulation per token.
// The next step's mask words are loaded before the current step's arithmetic, so their latency overlaps
// it. A warp reduction gives the row's result; lane 0 adds the bias and writes it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/bitmask_gemv.h"

namespace losa::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kWordsPerLane = 2;
constexpr int kStepWords = 32 * kWordsPerLane;
constexpr int kStepValues = kStepWords * 32;
constexpr int kVec = 8;  // 16-bit values per 16-byte load
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ void load_words(const uint32_t* mrow, int64_t first, int64_t words, uint32_t (&m)[kWordsPerLane]) {
#pragma unroll
  for (int k = 0; k < kWordsPerLane; ++k) m[k] = first + k < words ? __ldg(mrow + first + k) : 0u;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) bitmask_gemv_kernel(BitmaskGemvArgs a) {
  __shared__ __align__(16) T stage[kWarpsPerBlock][kStepValues + 2 * kVec];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= a.rows) return;  // the whole warp leaves; nothing below synchronises the block
  const T* values = static_cast<const T*>(a.values);
  const T* x = static_cast<const T*>(a.x);
  const uint32_t* mrow = a.mask + row * a.words;
  T* buf = stage[warp];

  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  int64_t cursor = a.row_ptr[row];
  uint32_t m[kWordsPerLane], next[kWordsPerLane];
  load_words(mrow, lane * kWordsPerLane, a.words, m);

  for (int64_t w0 = 0; w0 < a.words; w0 += kStepWords) {
    int count = 0;
#pragma unroll
    for (int k = 0; k < kWordsPerLane; ++k) count += __popc(m[k]);
    int incl = count;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += n;
    }
    const int total = __shfl_sync(kFull, incl, 31);

    const int64_t first = cursor & ~static_cast<int64_t>(kVec - 1);
    const int64_t end = cursor + total;
    const int vecs = static_cast<int>((end - first + kVec - 1) / kVec);
    for (int v = lane; v < vecs; v += 32) {
      const int64_t e = first + static_cast<int64_t>(v) * kVec;
      if (e + kVec <= a.nnz) {
        *reinterpret_cast<uint4*>(buf + v * kVec) = __ldg(reinterpret_cast<const uint4*>(values + e));
      } else {
        for (int i = 0; i < kVec && e + i < a.nnz; ++i) buf[v * kVec + i] = values[e + i];
      }
    }
    const int64_t lane_word = w0 + lane * kWordsPerLane;
    load_words(mrow, lane_word + kStepWords, a.words, next);  // in flight during the arithmetic below
    __syncwarp();

    int idx = static_cast<int>(cursor - first) + incl - count;
#pragma unroll
    for (int k = 0; k < kWordsPerLane; ++k) {
      uint32_t bits = m[k];
      const int64_t col0 = (lane_word + k) * 32;
      while (bits) {
        const int b = __ffs(bits) - 1;
        bits &= bits - 1;
        const float v = to_float(buf[idx++]);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] += v * to_float(__ldg(x + t * a.cols + col0 + b));
      }
    }
    __syncwarp();  // the buffer is refilled next step
#pragma unroll
    for (int k = 0; k < kWordsPerLane; ++k) m[k] = next[k];
    cursor = end;
  }

#pragma unroll
  for (int t = 0; t < NT; ++t) {
    float s = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
    acc[t] = s;
  }
  if (lane == 0) {
    const float b = a.bias ? to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
    T* y = static_cast<T*>(a.y);
#pragma unroll
    for (int t = 0; t < NT; ++t) y[t * a.rows + row] = from_float<T>(acc[t] + b);
  }
}

template <typename T>
cudaError_t launch(const BitmaskGemvArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  switch (a.tokens) {
    case 1: bitmask_gemv_kernel<T, 1><<<grid, block, 0, stream>>>(a); break;
    case 2: bitmask_gemv_kernel<T, 2><<<grid, block, 0, stream>>>(a); break;
    case 3: bitmask_gemv_kernel<T, 3><<<grid, block, 0, stream>>>(a); break;
    case 4: bitmask_gemv_kernel<T, 4><<<grid, block, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bitmask_gemv(const BitmaskGemvArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(args.values) % 16 != 0) return cudaErrorMisalignedAddress;
  return args.dtype == Half16::kBFloat16 ? launch<__nv_bfloat16>(args, stream) : launch<__half>(args, stream);
}

}  // namespace losa::cuda
