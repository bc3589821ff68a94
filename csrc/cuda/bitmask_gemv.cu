// Bitmask sparse GEMV / small GEMM for decode (1-16 tokens), kernels.md §5.1: one warp per output row,
// eight rows per block.
//
// A warp step covers 32·W mask words (W = 2 words per lane up to 4 tokens, else 1); lane l owns words
// W·l .. W·l+W-1 of the step.
//   1. Each lane counts its words' kept columns (__popc); an inclusive warp scan (shuffles) gives each
//      lane its first value, and lane 31's sum the step's value count. No offset tables are needed.
//   2. The warp stages the step's values, one contiguous range, in shared memory with coalesced 16-byte
//      loads from the 16-byte boundary below the range (the last vector falls back to 2-byte loads at the
//      end of the array, so nothing past it is read). The block stages the step's slice of x, transposed
//      to [column][token] so one lane reads all tokens of a column with one or two vector loads. (Reading
//      x from global memory instead costs a cache line per lane and load: lanes own columns 32 apart.)
//   3. Each lane walks the set bits of its words (__ffs): one shared load of the value, one of x, and
//      NT fp32 FMAs per kept weight. Work scales with the kept weights, not the columns.
// The next step's mask words are loaded before the current step's arithmetic. A warp reduction gives the
// row's result; lane 0 adds the bias and writes it. Rows past the end keep the block's barriers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/bitmask_gemv.h"
#include "cuda/half_math.cuh"

namespace losa::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kVec = 8;  // 16-bit values per 16-byte load
constexpr unsigned kFull = 0xffffffffu;

template <int NT>
__host__ __device__ constexpr int words_per_lane() { return NT <= 4 ? 2 : 1; }
template <int NT>
__host__ __device__ constexpr int step_cols() { return 32 * 32 * words_per_lane<NT>(); }  // = values a step can hold
template <int NT>
__host__ __device__ constexpr int stage_values() { return step_cols<NT>() + 2 * kVec; }

template <int NT>
__host__ __device__ constexpr size_t smem_bytes() {
  return (static_cast<size_t>(step_cols<NT>()) * NT + static_cast<size_t>(kWarps) * stage_values<NT>()) * 2;
}

template <int W>
__device__ __forceinline__ void load_words(const uint32_t* mrow, int64_t first, int64_t words, bool active,
                                           uint32_t (&m)[W]) {
#pragma unroll
  for (int k = 0; k < W; ++k) m[k] = active && first + k < words ? __ldg(mrow + first + k) : 0u;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kWarps * 32) bitmask_gemv_kernel(BitmaskGemvArgs a) {
  constexpr int W = words_per_lane<NT>();
  constexpr int kStepWords = 32 * W;
  constexpr int kStepCols = step_cols<NT>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);  // [kStepCols][NT]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* buf = xs + kStepCols * NT + warp * stage_values<NT>();  // this warp's staged values
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = row < a.rows;
  const T* values = static_cast<const T*>(a.values);
  const T* x = static_cast<const T*>(a.x);
  const uint32_t* mrow = a.mask + (active ? row : 0) * a.words;

  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  int64_t cursor = active ? a.row_ptr[row] : 0;
  uint32_t m[W], next[W];
  load_words<W>(mrow, lane * W, a.words, active, m);

  for (int64_t w0 = 0; w0 < a.words; w0 += kStepWords) {
    // x[:, c0 : c0 + kStepCols] -> xs[column][token], zero past the last column and the last token
    const int64_t c0 = w0 * 32;
    for (int i = threadIdx.x; i < kStepCols * NT; i += kWarps * 32) {
      const int t = i / kStepCols, c = i % kStepCols;
      xs[c * NT + t] = t < a.tokens && c0 + c < a.cols ? x[t * a.cols + c0 + c] : from_float<T>(0.f);
    }

    int count = 0;
#pragma unroll
    for (int k = 0; k < W; ++k) count += __popc(m[k]);
    int incl = count;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += n;
    }
    const int total = __shfl_sync(kFull, incl, 31);
    const int64_t first = cursor & ~static_cast<int64_t>(kVec - 1);
    const int64_t end = cursor + total;
    const int vecs = total ? static_cast<int>((end - first + kVec - 1) / kVec) : 0;
    for (int v = lane; v < vecs; v += 32) {
      const int64_t e = first + static_cast<int64_t>(v) * kVec;
      if (e + kVec <= a.nnz) {
        *reinterpret_cast<uint4*>(buf + v * kVec) = __ldg(reinterpret_cast<const uint4*>(values + e));
      } else {
        for (int i = 0; i < kVec && e + i < a.nnz; ++i) buf[v * kVec + i] = values[e + i];
      }
    }
    load_words<W>(mrow, w0 + kStepWords + lane * W, a.words, active, next);  // in flight during the math
    __syncthreads();

    int idx = static_cast<int>(cursor - first) + incl - count;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      uint32_t bits = m[k];
      const T* xcol = xs + (lane * W + k) * 32 * NT;
      while (bits) {
        const int b = __ffs(bits) - 1;
        bits &= bits - 1;
        const float v = to_float(buf[idx++]);
        float xv[NT];
        load_column<T, NT>(xcol + b * NT, xv);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = fmaf(v, xv[t], acc[t]);
      }
    }
    __syncthreads();  // xs and the staged values are refilled next step
#pragma unroll
    for (int k = 0; k < W; ++k) m[k] = next[k];
    cursor = end;
  }

#pragma unroll
  for (int t = 0; t < NT; ++t) {
    float s = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
    acc[t] = s;
  }
  if (active && lane == 0) {
    const float b = a.bias ? to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
    T* y = static_cast<T*>(a.y);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t < a.tokens) y[t * a.rows + row] = from_float<T>(acc[t] + b);
    }
  }
}

template <typename T, int NT>
cudaError_t launch_nt(const BitmaskGemvArgs& a, cudaStream_t stream) {
  constexpr size_t bytes = smem_bytes<NT>();
  static const cudaError_t configured =
      cudaFuncSetAttribute(bitmask_gemv_kernel<T, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (configured != cudaSuccess) return configured;
  const dim3 grid(static_cast<unsigned>((a.rows + kWarps - 1) / kWarps));
  bitmask_gemv_kernel<T, NT><<<grid, kWarps * 32, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const BitmaskGemvArgs& a, cudaStream_t stream) {
  // Token counts run on the next instantiated width; the kernel ignores the padding tokens.
  if (a.tokens <= 1) return launch_nt<T, 1>(a, stream);
  if (a.tokens <= 2) return launch_nt<T, 2>(a, stream);
  if (a.tokens <= 4) return launch_nt<T, 4>(a, stream);
  if (a.tokens <= 8) return launch_nt<T, 8>(a, stream);
  return launch_nt<T, 16>(a, stream);
}

}  // namespace

cudaError_t bitmask_gemv(const BitmaskGemvArgs& args, cudaStream_t stream) {
  if (args.tokens < 1 || args.tokens > kMaxTokens) return cudaErrorInvalidValue;
  if (args.rows == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(args.values) % 16 != 0) return cudaErrorMisalignedAddress;
  return args.dtype == Half16::kBFloat16 ? launch<__nv_bfloat16>(args, stream) : launch<__half>(args, stream);
}

}  // namespace losa::cuda
