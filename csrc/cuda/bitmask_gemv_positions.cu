// Bitmask sparse GEMV, "positions" variant, one token (kernels.md §5.1): one warp per output row, each
// lane owning one 32-column mask word per step and visiting all 32 of its positions.
//
// Why a third kernel: the row walk and the value-group kernel spend their instructions per kept weight
// finding its column (find the next set bit, clear it, step to the next word: about 19 instructions per
// kept weight with divergence, ncu on an H200, RESULTS.md), so they are instruction-bound below 90%
// sparsity. Here a lane's loop has a fixed shape: for every position one shared load, one predicated FMA
// and one predicated increment, no bit search and no branch, so the cost is per position (4.6
// instructions in the SASS) whatever the sparsity. On an H200 that beat the value-group kernel at 50%,
// 70% and 2:4 on every LLaMA shape (1.1-1.6x) and at 90% on two of three; `auto` takes it from 20% kept.
//
// Per row, in steps of 32 mask words (one per lane):
//   1. Each lane counts its word's kept columns (__popc); a warp scan gives each word's first value.
//   2. The warp copies the step's values, one contiguous range from the 8-aligned index below it, into its
//      shared buffer with asynchronous 16-byte copies. Two buffers: step s+1's copies fly while step s is
//      computed, and the mask words are loaded two steps ahead. Steps continue from one row to the next
//      (a warp's rows are a stride apart), so a row's first step is prefetched like any other.
//   3. Lane l visits its 32 positions starting at column rot = l & 28 (wrapping to 0), reading x as
//      float4s and its values one 16-bit shared load per position. The rotation spreads the lanes' value
//      reads over the shared-memory banks: without it, at 50% the lanes' reads sit 16 values (8 banks)
//      apart, an 8-way conflict; with it, lane l's first read is about rot/2 values further on.
// x is staged once per block, as fp32, word by word at a stride of 36 floats (a bank-conflict-free float4
// per lane), each word's 32 columns already rotated as its lane reads them. A warp reduction ends a row;
// lane 0 adds the bias and writes y[row].
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/bitmask_gemv.h"
#include "cuda/device_common.cuh"
#include "cuda/half_math.cuh"

namespace losa::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxWarps = 16;
constexpr int kStepWords = 32;              // one mask word per lane
constexpr int kXStride = 36;                // floats per word in xs: 32 columns + 4 of padding
constexpr int kBufValues = 32 * 32 + 16;    // a step's values + the 8-aligned start before them + 1 read past

// Shared memory: xs (words rounded up to a whole step, so every lane's x reads stay inside it), then two
// value buffers per warp.
struct Plan {
  int words_padded = 0;
  int64_t x_bytes = 0;
  int64_t bytes(int warps) const { return x_bytes + static_cast<int64_t>(warps) * 2 * kBufValues * 2; }
};

Plan make_plan(int64_t words) {
  Plan p;
  p.words_padded = static_cast<int>(round_up(std::max<int64_t>(words, 1), kStepWords));
  p.x_bytes = static_cast<int64_t>(p.words_padded) * kXStride * 4;
  return p;
}

// The kernel's sizes in 32 bits (fits() keeps rows · words, nnz and the padded columns below 2^31).
struct Sizes {
  int rows = 0, cols = 0, words = 0, steps = 0, nnz = 0;
};

// The first column a lane visits in its word (lane = word % 32), a multiple of 4 so the rotated x stays
// in float4s.
__host__ __device__ constexpr int rotation(int word) { return word & 28; }

// x -> xs: xs[w·36 + j] = x[32w + (j + rotation(w)) % 32], zero past the last column. Eight columns per
// thread and step (one 16-byte load, two float4 stores: a multiple of 8 rotated by a multiple of 4 stays
// in two aligned runs of 4) where x allows it, else one.
template <typename T>
__device__ void stage_x(const T* x, int cols, float* xs, int words_padded) {
  const int padded = words_padded * 32;
  if (cols % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    for (int c0 = 8 * threadIdx.x; c0 < padded; c0 += 8 * blockDim.x) {
      float v[8];
      if (c0 < cols) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + c0));
        const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
      const int w = c0 >> 5;
      const int j0 = ((c0 & 31) - rotation(w)) & 31, j1 = (j0 + 4) & 31;
      *reinterpret_cast<float4*>(xs + w * kXStride + j0) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(xs + w * kXStride + j1) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
    for (int i = threadIdx.x; i < padded; i += blockDim.x) {
      const int w = i >> 5, j = i & 31;
      const int c = w * 32 + ((j + rotation(w)) & 31);
      xs[w * kXStride + j] = c < cols ? to_float(x[c]) : 0.f;
    }
  }
}

struct Scan {
  int excl = 0, total = 0;  // values before this lane's word in the step; values in the whole step
};

__device__ __forceinline__ Scan scan(uint32_t m, int lane) {
  const int n = __popc(m);
  int incl = n;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  return {incl - n, __shfl_sync(kFull, incl, 31)};
}

// values[cursor, cursor + total) -> buf, from the 8-aligned index at or below cursor; the vector that
// would run past the array's end is copied value by value.
template <typename T>
__device__ __forceinline__ void stage_values(const T* values, int nnz, int cursor, int total, T* buf, int lane) {
  const int first = cursor & ~7;
  const int vecs = total ? (cursor + total - first + 7) >> 3 : 0;
  for (int v = lane; v < vecs; v += 32) {
    const int e = first + 8 * v;
    if (e + 8 <= nnz) {
      copy_async16(buf + 8 * v, values + e);
    } else {  // at most once per weight: kept small
#pragma unroll 1
      for (int i = 0; i < 8 && e + i < nnz; ++i) buf[8 * v + i] = values[e + i];
    }
  }
}

// A 16-bit load from a shared-memory address (the value's bits as a float: bf16 is the top half of an fp32).
template <typename T>
__device__ __forceinline__ float shared_value(uint32_t addr) {
  unsigned short bits;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(bits) : "r"(addr));
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// acc += v · x and addr += 2 where `kept` is non-zero, both in place under one predicate. (Written as C++
// `if`, nvcc computes each into a scratch register and moves it back under the predicate: twice the
// instructions in the loop that dominates this kernel.)
__device__ __forceinline__ void fma_if_kept(uint32_t kept, float v, float x, float& acc, uint32_t& addr) {
  asm("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %2, 0;\n\t@p fma.rn.f32 %0, %3, %4, %0;\n\t@p add.u32 %1, %1, 2;\n\t}"
      : "+f"(acc), "+r"(addr)
      : "r"(kept), "f"(v), "f"(x));
}

// One lane's word: sum over its kept columns of value · x. `base` is the shared address of the word's
// first value in the staged buffer, `xw` its 32 rotated activations; `rot` is rotation(word). The value
// address moves by one value per kept position; the one read at a dropped position is a neighbour's (or
// the buffer's slack) and goes unused.
template <typename T>
__device__ __forceinline__ float word_dot(uint32_t m, int rot, uint32_t base, const float* xw) {
  const uint32_t rb = __funnelshift_r(m, m, rot);        // bit j: column (j + rot) % 32
  const int wrap = rot ? 32 - rot : 32;                    // the visit index of column 0
  uint32_t addr = base + 2u * __popc(m & ((1u << rot) - 1u));  // values before column rot
  float acc[2] = {0.f, 0.f};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    if (4 * q == wrap) addr = base;
    const float4 xv = reinterpret_cast<const float4*>(xw)[q];
    const float xq[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) fma_if_kept(rb & (1u << (4 * q + j)), shared_value<T>(addr), xq[j], acc[j % 2], addr);
  }
  return acc[0] + acc[1];
}

// Grid-stride over rows: warp k of the grid takes rows k, k + stride, ...; its (row, step) items form one
// stream, so the next row's first step is prefetched like any other.
template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32)
    bitmask_gemv_positions_kernel(BitmaskGemvArgs a, Plan plan, Sizes n) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* xs = reinterpret_cast<float*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  T* bufs = reinterpret_cast<T*>(smem + plan.x_bytes) + warp * 2 * kBufValues;
  stage_x<T>(static_cast<const T*>(a.x), n.cols, xs, plan.words_padded);
  __syncthreads();

  const int stride = static_cast<int>(gridDim.x) * warps;
  const int first_row = static_cast<int>(blockIdx.x) * warps + warp;
  if (first_row >= n.rows) return;
  const T* values = static_cast<const T*>(a.values);
  const int rot = rotation(lane);
  const uint32_t buf_addr = static_cast<uint32_t>(__cvta_generic_to_shared(bufs));

  // The prefetch cursor walks the warp's (row, step) items: each one's mask word, and where its row's
  // values start (row_ptr) for a row's first step, -1 otherwise.
  int pf_row = first_row, pf_step = 0;
  const uint32_t* pf_words = a.mask + static_cast<int64_t>(first_row) * n.words;
  auto fetch = [&](uint32_t& m, int& start) {
    m = 0u;
    start = -1;
    if (pf_row < n.rows) {
      const int w = pf_step * kStepWords + lane;
      if (w < n.words) m = __ldg(pf_words + w);
      if (pf_step == 0) start = static_cast<int>(__ldg(a.row_ptr + pf_row));
    }
    if (++pf_step == n.steps) {
      pf_step = 0;
      pf_row += stride;
      pf_words += static_cast<int64_t>(stride) * n.words;
    }
  };

  uint32_t m0, m1, m2;
  int s0, s1, s2;
  fetch(m0, s0);
  fetch(m1, s1);
  int cursor = s0;
  Scan sc = scan(m0, lane);
  stage_values<T>(values, n.nnz, cursor, sc.total, bufs, lane);
  copy_async_commit();

  int row = first_row, step = 0, parity = 0;
  float acc = 0.f;
  for (;;) {
    fetch(m2, s2);  // two items ahead: a whole item's arithmetic to arrive
    const bool more = step + 1 < n.steps || row + stride < n.rows;
    int next_cursor = 0;
    Scan next{};
    if (more) {
      next_cursor = s1 >= 0 ? s1 : cursor + sc.total;
      next = scan(m1, lane);
      stage_values<T>(values, n.nnz, next_cursor, next.total, bufs + (parity ^ 1) * kBufValues, lane);
      copy_async_commit();
      copy_async_wait_pending<1>();
    } else {
      copy_async_wait_pending<0>();
    }
    __syncwarp();  // every lane's copies of this step are visible
    const uint32_t base = buf_addr + 2u * static_cast<uint32_t>(parity * kBufValues + (cursor & 7) + sc.excl);
    acc += word_dot<T>(m0, rot, base, xs + (step * kStepWords + lane) * kXStride);
    __syncwarp();  // this buffer is refilled two steps on

    if (++step == n.steps) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
      if (lane == 0) {
        const float b = a.bias ? to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
        static_cast<T*>(a.y)[row] = from_float<T>(acc + b);
      }
      acc = 0.f;
      step = 0;
      row += stride;
    }
    if (!more) break;
    m0 = m1;
    m1 = m2;
    s1 = s2;
    sc = next;
    cursor = next_cursor;
    parity ^= 1;
  }
}

template <typename T>
cudaError_t launch(const BitmaskGemvArgs& a, int warps, int rows_per_warp, const DeviceLimits& dev,
                   cudaStream_t stream) {
  auto kernel = bitmask_gemv_positions_kernel<T>;
  const Plan plan = make_plan(a.words);
  const int64_t bytes = plan.bytes(warps);
  int per_sm = 0;
  if (const cudaError_t err = resident_blocks(kernel, warps * 32, bytes, dev, per_sm); err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  // Blocks: enough for every row at `rows_per_warp` rows per warp, at most what is resident at once.
  const int64_t rows_per_block = static_cast<int64_t>(warps) * rows_per_warp;
  const int64_t blocks = std::min<int64_t>((a.rows + rows_per_block - 1) / rows_per_block,
                                           static_cast<int64_t>(per_sm) * dev.sms);
  Sizes n;
  n.rows = static_cast<int>(a.rows);
  n.cols = static_cast<int>(a.cols);
  n.words = static_cast<int>(a.words);
  n.steps = static_cast<int>((a.words + kStepWords - 1) / kStepWords);
  n.nnz = static_cast<int>(a.nnz);
  kernel<<<dim3(static_cast<unsigned>(blocks)), warps * 32, static_cast<size_t>(bytes), stream>>>(a, plan, n);
  return cudaGetLastError();
}

bool fits(const BitmaskGemvArgs& args, int warps, const DeviceLimits& dev) {
  constexpr int64_t kInt = int64_t{1} << 31;
  if (args.tokens != 1 || warps < 1 || warps > kMaxWarps || dev.major < 8) return false;
  if (args.rows * std::max<int64_t>(args.words, 1) >= kInt || args.nnz >= kInt || args.words * 32 + 1024 >= kInt) {
    return false;
  }
  return make_plan(args.words).bytes(warps) <= dev.smem_optin;
}

}  // namespace

bool bitmask_gemv_positions_fits(const BitmaskGemvArgs& args, int warps) {
  DeviceLimits dev;
  return device_limits(dev) == cudaSuccess && fits(args, warps, dev);
}

cudaError_t bitmask_gemv_positions(const BitmaskGemvArgs& a, int warps, int rows_per_warp, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(a.values) % 16 != 0) return cudaErrorMisalignedAddress;
  DeviceLimits dev;
  if (const cudaError_t err = device_limits(dev); err != cudaSuccess) return err;
  if (!fits(a, warps, dev) || rows_per_warp < 1) return cudaErrorInvalidValue;
  return a.dtype == Half16::kBFloat16 ? launch<__nv_bfloat16>(a, warps, rows_per_warp, dev, stream)
                                       : launch<__half>(a, warps, rows_per_warp, dev, stream);
}

}  // namespace losa::cuda
