// Bitmask sparse GEMV / small GEMM for decode, "value groups" variant (kernels.md §5.1): one warp per
// output row; each lane reads the row's stored values 8 at a time with aligned 16-byte loads.
//
// Why a second kernel: the row-walk kernel (bitmask_gemv.cu) gives each lane a range of columns, so the
// lanes' loops differ in length, the values pass through shared memory in steps fenced by block barriers,
// and every kept weight waits on a chain of two shared loads. On an H200 it streamed 10-18% of HBM
// bandwidth at 1 token. Here the lanes share a row's values evenly, the values go from global memory
// straight into registers, and a warp never waits for another warp once x is staged.
//
// Per row (one warp; the row's values are values[row_ptr[r] .. row_ptr[r+1]), in column order):
//   1. Groups: values[base + 8g, base + 8g + 8), from the 8-aligned index `base` at or below the row's
//      first value. Lane l takes the G = ceil(groups / 32) consecutive groups from l·G, and issues the
//      loads of its first P groups at once.
//   2. The row's mask words are in the warp's shared slice (copied while the previous row was finishing).
//      A warp scan over their popcounts gives each word's first in-row rank; the lane that owns the word
//      holding a lane's first value writes that value's column (a select of the n-th set bit). One start
//      per lane per row: after it, a lane's walk just continues from group to group.
//   3. For each group a lane finds its 8 columns by walking the mask (__ffs; the next word when the
//      current one empties), then reads x at those columns from shared memory and does NT FMAs per value.
//      Groups that straddle the row's ends (the first and the last) take a guarded path.
//   4. A warp reduction; lane 0 adds the bias and writes y[:, row].
// The block stages x once ([column][token]); its warps then loop over rows (grid-stride), so one copy of x
// serves many rows. Limits: compute capability 8.0+ (cp.async), and x plus the warps' slices must fit in
// shared memory (the op's "auto" falls back to the row-walk kernel otherwise; a forced choice is an
// error). The weight must be consistent (each row's mask bits count its values), as everywhere.
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
constexpr int kGroup = 8;  // 16-bit values per 16-byte load
constexpr int kMaxWarps = 16;

// Value i (0-7, a constant after unrolling) of a 16-byte group, as a float. bf16 is the top half of an
// fp32, so one shift or mask does it.
template <typename T>
__device__ __forceinline__ float value_at(const uint4& raw, int i) {
  const uint32_t w = i < 2 ? raw.x : i < 4 ? raw.y : i < 6 ? raw.z : raw.w;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(i % 2 ? (w & 0xffff0000u) : (w << 16));
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(i % 2 ? w >> 16 : w & 0xffffu)));
  }
}

// Shared-memory plan of one block: x as [column][NT] with padding after every 128 columns (see x_index), then
// one slice per warp: two buffers of mask words (the row being computed and the next row, copied
// asynchronously), each with a sentinel word after the row's words so a walk needs no bound check, and
// the 32 lanes' start columns.
template <int NT>
constexpr int kPad = NT < 2 ? 2 : NT;  // 16-bit elements of padding per 128 columns (4-byte aligned)

struct Plan {
  int64_t x_bytes = 0, warp_bytes = 0, words_padded = 0;
  int64_t bytes(int warps) const { return x_bytes + warps * warp_bytes; }
};

template <int NT>
__host__ __device__ inline Plan make_plan(int64_t cols, int64_t words) {
  Plan p;
  p.x_bytes = round_up((cols * NT + (cols / 128 + 1) * kPad<NT>) * 2, 16);
  p.words_padded = round_up(words + 1, 4);
  p.warp_bytes = (2 * p.words_padded + 32) * 4;
  return p;
}

// Where column c's NT activations start in xs. The padding breaks power-of-two strides: with a regular
// pattern (2:4) the lanes' walks sit 128·k columns apart, which without it is one shared-memory bank.
template <int NT>
__device__ __forceinline__ int x_index(int c) { return c * NT + (c >> 7) * kPad<NT>; }


// Position of the n-th (0-based) set bit of w; n < popc(w). Five popcount halvings, no loop.
__device__ __forceinline__ int nth_set_bit(uint32_t w, int n) {
  int pos = 0;
#pragma unroll
  for (int half = 16; half > 0; half >>= 1) {
    const int low = __popc(w & ((1u << half) - 1u));
    if (n >= low) {
      n -= low;
      w >>= half;
      pos += half;
    }
  }
  return pos;
}

// One token: x -> xs by asynchronous 4-byte copies (column pairs; the padding keeps pairs aligned).
template <typename T>
__device__ void stage_x_async(const BitmaskGemvArgs& a, T* xs) {
  const T* x = static_cast<const T*>(a.x);
  const int cols = static_cast<int>(a.cols);
  if (reinterpret_cast<uintptr_t>(x) % 4 == 0) {
    for (int c = 2 * threadIdx.x; c + 1 < cols; c += 2 * blockDim.x) copy_async4(xs + x_index<1>(c), x + c);
    if (cols % 2 && threadIdx.x == 0) xs[x_index<1>(cols - 1)] = x[cols - 1];
  } else {
    for (int c = threadIdx.x; c < cols; c += blockDim.x) xs[x_index<1>(c)] = x[c];
  }
}

// More tokens: x[:tokens] -> xs[column][NT] through registers (a transpose), zero for the padding
// tokens. Four 16-byte loads in flight per thread; neighbouring threads take the tokens of one chunk, so
// their 2-byte stores fall in neighbouring words rather than one bank.
template <typename T, int NT>
__device__ void stage_x_transposed(const BitmaskGemvArgs& a, T* xs) {
  const T* x = static_cast<const T*>(a.x);
  const int cols = static_cast<int>(a.cols);
  if (cols % kGroup == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    constexpr int kBatch = 4;
    const int items = cols / kGroup * NT;
    for (int i0 = threadIdx.x; i0 < items; i0 += kBatch * blockDim.x) {
      uint4 raw[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = i0 + k * blockDim.x, t = i % NT;
        raw[k] = i < items && t < a.tokens ? __ldg(reinterpret_cast<const uint4*>(x + t * a.cols + i / NT * kGroup))
                                           : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = i0 + k * blockDim.x, t = i % NT, c = i / NT * kGroup;
        if (i >= items) break;
        const T* h = reinterpret_cast<const T*>(&raw[k]);
#pragma unroll
        for (int j = 0; j < kGroup; ++j) xs[x_index<NT>(c + j) + t] = h[j];
      }
    }
  } else {
    for (int i = threadIdx.x; i < cols * NT; i += blockDim.x) {
      const int t = i / cols, c = i % cols;
      xs[x_index<NT>(c) + t] = t < a.tokens ? x[t * a.cols + c] : from_float<T>(0.f);
    }
  }
}

// A row's mask words -> a word buffer of the warp's slice, asynchronously (16-byte copies where the row is
// 16-byte aligned), and the sentinel after them.
__device__ __forceinline__ void copy_words_async(const uint32_t* mrow, int nwords, int lane, uint32_t* out) {
  int w = 0;
  if (reinterpret_cast<uintptr_t>(mrow) % 16 == 0) {
    const int quads = nwords / 4;
    for (int q = lane; q < quads; q += 32) copy_async16(out + 4 * q, mrow + 4 * q);
    w = 4 * quads;
  }
  for (int i = w + lane; i < nwords; i += 32) copy_async4(out + i, mrow + i);
  if (lane == 0) out[nwords] = kFull;
}

// Value group g of a row: 8 values from the 8-aligned index base + 8g (zeros past the array's end).
template <typename T>
__device__ __forceinline__ uint4 load_group(const BitmaskGemvArgs& a, int64_t base, int g) {
  const T* values = static_cast<const T*>(a.values);
  const int64_t e = base + static_cast<int64_t>(g) * kGroup;
  if (e + kGroup <= a.nnz) return __ldg(reinterpret_cast<const uint4*>(values + e));
  uint4 raw = make_uint4(0, 0, 0, 0);
  T* h = reinterpret_cast<T*>(&raw);
  for (int i = 0; i < kGroup && e + i < a.nnz; ++i) h[i] = values[e + i];
  return raw;
}

// How a row's values split into groups and over the lanes: lane l takes groups [first, end).
struct RowSplit {
  int64_t p0 = 0, p1 = 0, base = 0;
  int off = 0, groups = 0, per_lane = 0, first = 0, end = 0;
};

__device__ __forceinline__ RowSplit split_row(int64_t p0, int64_t p1, int lane) {
  RowSplit r;
  r.p0 = p0;
  r.p1 = p1;
  r.base = p0 & ~static_cast<int64_t>(kGroup - 1);
  r.off = static_cast<int>(p0 - r.base);
  r.groups = p1 > p0 ? static_cast<int>((p1 - r.base + kGroup - 1) / kGroup) : 0;
  r.per_lane = (r.groups + 31) / 32;
  r.first = min(r.groups, lane * r.per_lane);
  r.end = min(r.groups, r.first + r.per_lane);
  return r;
}

// Groups first .. first + P - 1 of this lane's range (those before `end`).
template <typename T, int P>
__device__ __forceinline__ void load_batch(const BitmaskGemvArgs& a, int64_t base, int first, int end,
                                           uint4 (&out)[P]) {
#pragma unroll
  for (int k = 0; k < P; ++k) out[k] = first + k < end ? load_group<T>(a, base, first + k) : make_uint4(0, 0, 0, 0);
}

// Step 2: the column of every lane's first value. Lane L >= 1 starts at in-row rank 8·L·G - off, lane 0 at
// rank 0 (the slots of its first group before `off` belong to the previous row). Lanes with no groups
// get nothing. A pass covers 128 words, 4 per lane (one 16-byte shared load), so a 4096-column row
// takes one warp scan.
__device__ __forceinline__ void lane_starts(const uint32_t* words, int nwords, int words_padded, const RowSplit& r,
                                            int lane, int* starts) {
  const int span = kGroup * r.per_lane;  // ranks per lane
  const int lanes = r.per_lane ? (r.groups + r.per_lane - 1) / r.per_lane : 0;
  int carry = 0;  // values in the words before this pass
  for (int w0 = 0; w0 < nwords; w0 += 128) {
    const int w = w0 + 4 * lane;
    uint4 q = w < words_padded ? *reinterpret_cast<const uint4*>(words + w) : make_uint4(0, 0, 0, 0);
    const uint32_t word[4] = {w < nwords ? q.x : 0u, w + 1 < nwords ? q.y : 0u, w + 2 < nwords ? q.z : 0u,
                              w + 3 < nwords ? q.w : 0u};
    int count[4], total = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) total += count[k] = __popc(word[k]);
    int incl = total;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += n;
    }
    int first = carry + incl - total;  // in-row rank of this lane's first word's first value
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (count[k]) {
        if (first == 0) starts[0] = (w + k) * 32 + __ffs(word[k]) - 1;
        const int end = min(lanes, (first + count[k] + r.off + span - 1) / span);
        for (int l = max(1, (first + r.off + span - 1) / span); l < end; ++l) {
          starts[l] = (w + k) * 32 + nth_set_bit(word[k], span * l - r.off - first);
        }
      }
      first += count[k];
    }
    carry += __shfl_sync(kFull, incl, 31);
  }
}

// The walk over a row's set bits from a lane's start column: next() gives the next kept column. Two ways
// to step to the next mask word when the current one is used up:
// BitWalk loads it then: the lanes that need it wait for a shared load while the others idle at the
// branch, and with random masks some lane needs one at almost every step.
struct BitWalk {
  const uint32_t* words;
  int wi;
  uint32_t bits;
  __device__ __forceinline__ BitWalk(const uint32_t* w, int start)
      : words(w), wi(start >> 5), bits(w[start >> 5] & (kFull << (start & 31))) {}
  __device__ __forceinline__ int next() {
    while (bits == 0) bits = words[++wi];  // ends at the latest at the sentinel
    const int c = (wi << 5) | (__ffs(bits) - 1);
    bits &= bits - 1;
    return c;
  }
};

// WindowWalk keeps the following word in a register: stepping is a select, and the load of the word
// after it is issued (predicated, no branch) long before it is needed. Only an empty word (rare below
// 90% sparsity) takes the slow loop.
struct WindowWalk {
  const uint32_t* words;
  int wi;
  uint32_t bits, ahead;
  __device__ __forceinline__ WindowWalk(const uint32_t* w, int start)
      : words(w), wi(start >> 5), bits(w[start >> 5] & (kFull << (start & 31))), ahead(w[(start >> 5) + 1]) {}
  __device__ __forceinline__ int next() {
    const bool used_up = bits == 0;
    bits = used_up ? ahead : bits;
    wi += used_up;
    if (used_up) ahead = words[wi + 1];
    if (bits == 0) {  // the word after was empty too
      do {
        bits = words[++wi];
      } while (bits == 0);
      ahead = words[wi + 1];
    }
    const int c = (wi << 5) | (__ffs(bits) - 1);
    bits &= bits - 1;
    return c;
  }
};

// Step 3 for a group whose 8 slots all belong to the row: the 8 columns first (a chain through the mask
// only), then the loads of x and the FMAs, free to overlap (two partial sums at one token, to halve the
// FMA chain).
template <typename T, int NT, typename Walk>
__device__ __forceinline__ void group_fma(const uint4& raw, Walk& walk, const T* xs, float (&acc)[NT]) {
  int col[kGroup];
#pragma unroll
  for (int i = 0; i < kGroup; ++i) col[i] = walk.next();
  if constexpr (NT == 1) {
    float even = 0.f, odd = 0.f;
#pragma unroll
    for (int i = 0; i < kGroup; i += 2) {
      even = fmaf(value_at<T>(raw, i), to_float(xs[x_index<1>(col[i])]), even);
      odd = fmaf(value_at<T>(raw, i + 1), to_float(xs[x_index<1>(col[i + 1])]), odd);
    }
    acc[0] += even + odd;
  } else {
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      float xv[NT];
      load_column<T, NT>(xs + x_index<NT>(col[i]), xv);
      const float v = value_at<T>(raw, i);
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t] = fmaf(v, xv[t], acc[t]);
    }
  }
}

// Step 3 for the row's first and last groups: only slots [i0, i1) are the row's.
template <typename T, int NT, typename Walk>
__device__ __forceinline__ void edge_group_fma(const uint4& raw, int i0, int i1, Walk& walk, const T* xs,
                                               float (&acc)[NT]) {
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i >= i0 && i < i1) {
      float xv[NT];
      load_column<T, NT>(xs + x_index<NT>(walk.next()), xv);
      const float v = value_at<T>(raw, i);
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t] = fmaf(v, xv[t], acc[t]);
    }
  }
}

// Step 3 for the lane's groups of one row; cur holds its first P groups, already requested.
template <typename T, int NT, int P, typename Walk>
__device__ __forceinline__ void row_fma(const BitmaskGemvArgs& a, const RowSplit& r, uint4 (&cur)[P],
                                        const uint32_t* words, int start, const T* xs, float (&acc)[NT]) {
  Walk walk(words, start);
  for (int g0 = r.first; g0 < r.end; g0 += P) {
    uint4 next[P];
    if (g0 + P < r.end) load_batch<T, P>(a, r.base, g0 + P, r.end, next);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int g = g0 + k;
      if (g < r.end) {
        const int64_t e = r.base + static_cast<int64_t>(g) * kGroup;
        if (e >= r.p0 && e + kGroup <= r.p1) {
          group_fma<T, NT>(cur[k], walk, xs, acc);
        } else {
          const int i0 = static_cast<int>(max(int64_t{0}, r.p0 - e));
          const int i1 = static_cast<int>(min(int64_t{kGroup}, r.p1 - e));
          edge_group_fma<T, NT>(cur[k], i0, i1, walk, xs, acc);
        }
      }
    }
    if (g0 + P < r.end) {
#pragma unroll
      for (int k = 0; k < P; ++k) cur[k] = next[k];
    }
  }
}

// P: groups per lane per batch (two batches in registers). Up to 2 tokens with P = 2, at most 64
// registers, so 32 warps fit on an SM and a 4096-row layer runs in one pass on 132 SMs; P = 4 (more
// loads in flight, fewer warps) needs about 90. Above 2 tokens the accumulators need more, and shared
// memory (x) limits the warps anyway.
template <int NT, int P>
constexpr int kMaxRegisters = NT > 2 ? 128 : P > 2 ? 96 : 64;

#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1204)
#define LOSA_MAX_REGISTERS(n) __maxnreg__(n)
#else  // before CUDA 12.4: the compiler's choice
#define LOSA_MAX_REGISTERS(n)
#endif

// The latency chain of a row is what bounds decode: a warp has one or a few rows, so every round trip to
// memory it waits on shows in the kernel's time. So: the first row's offsets, mask words and x are all
// requested before anything waits; its values as soon as its offsets arrive; while a row is computed,
// the next row's offsets and mask words are on their way, and its values are requested right after.
template <typename T, int NT, int P, typename Walk>
__global__ void __launch_bounds__(kMaxWarps * 32) LOSA_MAX_REGISTERS((kMaxRegisters<NT, P>))
    bitmask_gemv_groups_kernel(BitmaskGemvArgs a, Plan plan) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nwords = static_cast<int>(a.words), words_padded = static_cast<int>(plan.words_padded);
  T* xs = reinterpret_cast<T*>(smem);
  uint32_t* slice = reinterpret_cast<uint32_t*>(smem + plan.x_bytes + warp * plan.warp_bytes);
  int* starts = reinterpret_cast<int*>(slice + 2 * words_padded);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;

  int64_t p0 = 0, p1 = 0;
  if (row < a.rows) {
    p0 = a.row_ptr[row];
    p1 = a.row_ptr[row + 1];
    copy_words_async(a.mask + row * a.words, nwords, lane, slice);
  }
  if constexpr (NT == 1) stage_x_async<T>(a, xs);
  copy_async_commit();
  RowSplit r = split_row(p0, p1, lane);
  uint4 cur[P];
  load_batch<T, P>(a, r.base, r.first, r.end, cur);
  if constexpr (NT > 1) stage_x_transposed<T, NT>(a, xs);
  copy_async_wait();
  __syncthreads();

  for (int buf = 0; row < a.rows; row += stride, buf ^= 1) {
    const uint32_t* words = slice + buf * words_padded;
    lane_starts(words, nwords, words_padded, r, lane, starts);
    __syncwarp();
    const int64_t next_row = row + stride;
    int64_t n0 = 0, n1 = 0;
    if (next_row < a.rows) {
      n0 = a.row_ptr[next_row];
      n1 = a.row_ptr[next_row + 1];
      copy_words_async(a.mask + next_row * a.words, nwords, lane, slice + (buf ^ 1) * words_padded);
    }
    copy_async_commit();

    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.f;
    if (r.first < r.end) row_fma<T, NT, P, Walk>(a, r, cur, words, starts[lane], xs, acc);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(kFull, acc[t], o);
    }
    if (lane == 0) {
      const float b = a.bias ? to_float(static_cast<const T*>(a.bias)[row]) : 0.f;
      T* y = static_cast<T*>(a.y);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t < a.tokens) y[t * a.rows + row] = from_float<T>(acc[t] + b);
      }
    }

    if (next_row < a.rows) {
      r = split_row(n0, n1, lane);
      load_batch<T, P>(a, r.base, r.first, r.end, cur);
    }
    copy_async_wait();
    __syncwarp();  // the next row's words (every lane's copies) and starts table are free / visible
  }
}

template <typename T, int NT, int P, typename Walk = BitWalk>
cudaError_t launch_nt(const BitmaskGemvArgs& a, int warps, const DeviceLimits& dev, cudaStream_t stream) {
  auto kernel = bitmask_gemv_groups_kernel<T, NT, P, Walk>;
  const Plan plan = make_plan<NT>(a.cols, a.words);
  const int64_t bytes = plan.bytes(warps);
  int per_sm = 0;
  if (const cudaError_t err = resident_blocks(kernel, warps * 32, bytes, dev, per_sm); err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int64_t needed = (a.rows + warps - 1) / warps;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(needed, static_cast<int64_t>(per_sm) * dev.sms)));
  kernel<<<grid, warps * 32, static_cast<size_t>(bytes), stream>>>(a, plan);
  return cudaGetLastError();
}

int padded_tokens(int tokens) { return tokens <= 1 ? 1 : tokens <= 2 ? 2 : tokens <= 4 ? 4 : tokens <= 8 ? 8 : 16; }

template <typename T>
cudaError_t launch(const BitmaskGemvArgs& a, int warps, int depth, bool window, const DeviceLimits& dev,
                   cudaStream_t stream) {
  switch (padded_tokens(a.tokens)) {
    case 1:
      if (window) return launch_nt<T, 1, 2, WindowWalk>(a, warps, dev, stream);
      return depth > 2 ? launch_nt<T, 1, 4>(a, warps, dev, stream) : launch_nt<T, 1, 2>(a, warps, dev, stream);
    case 2:
      if (window) return launch_nt<T, 2, 2, WindowWalk>(a, warps, dev, stream);
      return depth > 2 ? launch_nt<T, 2, 4>(a, warps, dev, stream) : launch_nt<T, 2, 2>(a, warps, dev, stream);
    case 4: return launch_nt<T, 4, 2>(a, warps, dev, stream);
    case 8: return launch_nt<T, 8, 2>(a, warps, dev, stream);
    default: return launch_nt<T, 16, 2>(a, warps, dev, stream);
  }
}

// Whether the kernel runs on `dev` for these arguments: compute capability 8.0+, and x plus the warps'
// slices in one block's shared memory.
bool fits(const BitmaskGemvArgs& args, int warps, const DeviceLimits& dev) {
  if (args.words >= (int64_t{1} << 26) || warps < 1 || warps > kMaxWarps || dev.major < 8) return false;
  Plan plan;
  switch (padded_tokens(args.tokens)) {
    case 1: plan = make_plan<1>(args.cols, args.words); break;
    case 2: plan = make_plan<2>(args.cols, args.words); break;
    case 4: plan = make_plan<4>(args.cols, args.words); break;
    case 8: plan = make_plan<8>(args.cols, args.words); break;
    default: plan = make_plan<16>(args.cols, args.words); break;
  }
  return plan.bytes(warps) <= dev.smem_optin;
}

}  // namespace

bool bitmask_gemv_groups_fits(const BitmaskGemvArgs& args, int warps) {
  DeviceLimits dev;
  return device_limits(dev) == cudaSuccess && fits(args, warps, dev);
}

cudaError_t bitmask_gemv_groups(const BitmaskGemvArgs& a, int warps, int depth, bool window, cudaStream_t stream) {
  if (a.tokens < 1 || a.tokens > kMaxTokens) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(a.values) % 16 != 0) return cudaErrorMisalignedAddress;
  DeviceLimits dev;
  if (const cudaError_t err = device_limits(dev); err != cudaSuccess) return err;
  if (!fits(a, warps, dev)) return cudaErrorInvalidValue;
  return a.dtype == Half16::kBFloat16 ? launch<__nv_bfloat16>(a, warps, depth, window, dev, stream)
                                       : launch<__half>(a, warps, depth, window, dev, stream);
}

}  // namespace losa::cuda
