// The delta-layout decode kernel (kernels.md §1.1, after MACKO): device code only, so that
// tests/cuda_host/ can run it on the CPU as well as nvcc compiling it.
//
// One warp per output row (rows a grid stride apart). Per step, lane l takes group g0 + l (and, at depth
// D, g0 + 32k + l): one 16-byte load of its 8 values, one 4-byte load of their deltas, issued one step
// ahead where AHEAD (the next step's loads, possibly the next row's, fly while this one is computed).
// Then:
//   1. the lane's 8 deltas are summed with two masks and one multiply (nibble_sum);
//   2. an inclusive warp scan of those sums gives the column before the lane's first entry, and lane 31's
//      sum moves the row's column cursor past the step;
//   3. the lane walks its 8 entries: add the delta, read x at that column from shared memory, FMA.
// Every lane does exactly 8 entries per group: no divergence, no bit search, and a warp's loads are one
// contiguous 512-byte run of values plus 128 bytes of deltas. Lanes past the row's last group load nothing
// and add zeros at a valid column (the cursor). x is staged once per block, [column][token] with the
// tokens padded to 1, 2, 4, 8 or 16 (fp32 up to 4; from 8 x's 16-bit type, in planes of 8 tokens), so one
// vector load per 4 or 8 tokens reads a column. A warp reduction ends a row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/delta_gemv.h"
#include "cuda/half_math.cuh"

namespace losa::cuda::delta {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxWarps = 16;

// Tokens per column in the staged x: the token count rounded up to a power of two (1-16).
__host__ __device__ constexpr int token_stride(int tokens) {
  return tokens <= 1 ? 1 : tokens == 2 ? 2 : tokens <= 4 ? 4 : tokens <= 8 ? 8 : 16;
}

// Bytes per staged activation: fp32 up to 4 tokens (no conversion per read), x's own 16-bit type from 8
// (exact, and half the shared memory: 16 tokens of 4096 columns take 128 KB).
__host__ __device__ constexpr int staged_bytes(int ts) { return ts >= 8 ? 2 : 4; }

// Shared memory for the staged x of `tokens` tokens (at least one column's worth).
__host__ __device__ constexpr int64_t staged_x_bytes(int64_t cols, int tokens) {
  return (cols > 0 ? cols : 1) * token_stride(tokens) * staged_bytes(token_stride(tokens));
}

// The sum of d's 8 nibbles. Adjacent nibbles are added into 4 bytes (each at most 30), and the multiply
// gathers the 4 bytes into the top one (at most 120: no carry reaches it).
__device__ __forceinline__ uint32_t nibble_sum(uint32_t d) {
  const uint32_t pairs = (d & 0x0F0F0F0Fu) + ((d >> 4) & 0x0F0F0F0Fu);
  return (pairs * 0x01010101u) >> 24;
}

// Two 16-bit values packed in a word (entry 2i in the low half) as floats.
template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // a bf16 is the top half of an fp32
    return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xFFFF0000u));
  } else {
    __half2 h;
    static_assert(sizeof(h) == sizeof(bits));
    memcpy(&h, &bits, sizeof(bits));
    return __half22float2(h);
  }
}

// Where x[col, t] is staged, in elements of the staged type: [col][TS] up to 4 tokens; from 8, planes of 8
// tokens, [t / 8][col][8] (16 bytes per column and plane: a 16-byte load per 8 tokens, and lanes reading
// different columns spread over all the banks, where 32-byte columns would use half of them).
template <int TS>
__device__ __forceinline__ uint32_t staged_index(uint32_t col, uint32_t t, uint32_t cols) {
  if constexpr (TS >= 8) return (t >> 3) * cols * 8 + col * 8 + (t & 7);
  else return col * TS + t;
}

// acc[t] += w · x[col, t] for the column's TS staged tokens: floats up to 4 tokens (one 4·TS-byte
// aligned vector load), 16-bit values of type T from 8 (one 16-byte load per plane of 8 tokens).
template <typename T, int TS>
__device__ __forceinline__ void fma_column(float (&acc)[TS], float w, const void* xs, uint32_t col, uint32_t cols) {
  if constexpr (TS >= 8) {
#pragma unroll
    for (int q = 0; q < TS / 8; ++q) {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(xs) + staged_index<TS>(col, 8 * q, cols));
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = unpack_pair<T>(words[i]);
        acc[8 * q + 2 * i] += w * f.x;
        acc[8 * q + 2 * i + 1] += w * f.y;
      }
    }
  } else if constexpr (TS == 4) {
    const float4 v = reinterpret_cast<const float4*>(xs)[col];
    acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
  } else if constexpr (TS == 2) {
    const float2 v = reinterpret_cast<const float2*>(xs)[col];
    acc[0] += w * v.x; acc[1] += w * v.y;
  } else {
    acc[0] += w * static_cast<const float*>(xs)[col];
  }
}

// x [tokens, cols] -> the staged x (staged_index, staged_bytes(TS) each), zero for the padding tokens.
// Where x's rows are 16-byte aligned runs of whole 8-column groups, each thread loads 8 columns of one
// token with one 16-byte load (coalesced across the warp) and spreads them; else one element at a time. A
// block stages all of x before its first row.
template <typename T, int TS>
__device__ void stage_x(const T* x, int tokens, int cols, void* xs) {
  const bool vector = cols % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if constexpr (TS >= 8) {
    T* out = static_cast<T*>(xs);
    const T zero = from_float<T>(0.f);
    if (vector) {
      const int runs = cols / 8;
#pragma unroll 2
      for (int i = threadIdx.x; i < TS * runs; i += blockDim.x) {
        const int t = i / runs, c0 = 8 * (i % runs);
        T v[8];
        if (t < tokens) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(t) * cols + c0));
          memcpy(v, &raw, sizeof(raw));
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k) v[k] = zero;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) out[staged_index<TS>(c0 + k, t, cols)] = v[k];
      }
      return;
    }
#pragma unroll 4
    for (int i = threadIdx.x; i < cols * TS; i += blockDim.x) {
      const int t = i / cols, c = i % cols;  // consecutive threads: consecutive columns of one token
      out[staged_index<TS>(c, t, cols)] = t < tokens ? x[static_cast<int64_t>(t) * cols + c] : zero;
    }
  } else {
    float* out = static_cast<float*>(xs);
    if (TS == 1 && vector) {
#pragma unroll 2
      for (int c = 8 * threadIdx.x; c < cols; c += 8 * blockDim.x) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + c));
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
        float2 p[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = unpack_pair<T>(words[i]);
        *reinterpret_cast<float4*>(out + c) = make_float4(p[0].x, p[0].y, p[1].x, p[1].y);
        *reinterpret_cast<float4*>(out + c + 4) = make_float4(p[2].x, p[2].y, p[3].x, p[3].y);
      }
      return;
    }
#pragma unroll 4
    for (int i = threadIdx.x; i < cols * TS; i += blockDim.x) {
      const int c = i / TS, t = i % TS;
      out[i] = t < tokens ? to_float(x[static_cast<int64_t>(t) * cols + c]) : 0.f;
    }
  }
}

// Inclusive warp scan of v (a sum over lanes 0..lane).
__device__ __forceinline__ uint32_t warp_scan(uint32_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// One group's 8 entries: col is the column before its first entry.
template <typename T, int TS>
__device__ __forceinline__ void group(const uint4& v, uint32_t d, uint32_t col, const void* xs, uint32_t cols,
                                      float (&acc)[TS]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    col += (d >> (4 * j)) & 15u;
    const float2 pair = unpack_pair<T>(words[j / 2]);
    fma_column<T, TS>(acc, (j & 1) ? pair.y : pair.x, xs, col, cols);
  }
}

// The entries of one step of DEPTH groups per lane, added into acc; `cursor` is the row's column before
// the step and moves past it. Groups are scanned in pairs, one sum per 16-bit half (a lane's 8 deltas sum
// to at most 120, a warp's to 3840: no carry between the halves), so a pair costs one scan, not two.
template <typename T, int TS, int DEPTH>
__device__ __forceinline__ void step(const uint4 (&v)[DEPTH], const uint32_t (&d)[DEPTH], const void* xs,
                                     uint32_t cols, int lane, uint32_t& cursor, float (&acc)[TS]) {
  if constexpr (DEPTH == 1) {
    const uint32_t n = nibble_sum(d[0]);
    const uint32_t incl = warp_scan(n, lane);
    group<T, TS>(v[0], d[0], cursor + incl - n, xs, cols, acc);
    cursor += __shfl_sync(kFull, incl, 31);
  } else {
    static_assert(DEPTH % 2 == 0);
#pragma unroll
    for (int k = 0; k < DEPTH; k += 2) {
      const uint32_t n = nibble_sum(d[k]) | nibble_sum(d[k + 1]) << 16;
      const uint32_t incl = warp_scan(n, lane), total = __shfl_sync(kFull, incl, 31);
      const uint32_t before = incl - n;  // both halves: the sums of the lanes below
      group<T, TS>(v[k], d[k], cursor + (before & 0xFFFFu), xs, cols, acc);
      cursor += total & 0xFFFFu;
      group<T, TS>(v[k + 1], d[k + 1], cursor + (before >> 16), xs, cols, acc);
      cursor += total >> 16;
    }
  }
}

// The warp's sums of v[0..TS), scattered: lane l returns the sum of v[l / (32 / TS)] over all 32
// lanes. Each halving step sends half of the lane's values to the partner lane and keeps the other half
// (TS - 1 shuffles in all), then plain butterflies finish: TS + 4 - log2(TS) shuffles instead of 5 · TS
// (16 tokens: 16 instead of 80).
template <int TS>
__device__ __forceinline__ float reduce_scatter(float (&v)[TS], int lane) {  // v is consumed
  constexpr int kHalvings = TS >= 16 ? 4 : TS >= 8 ? 3 : TS >= 4 ? 2 : TS >= 2 ? 1 : 0;  // log2(TS)
#pragma unroll
  for (int h = 0; h < kHalvings; ++h) {  // keep the upper half where lane & m, else the lower
    const int n = TS >> (h + 1), m = 16 >> h;
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const float send = upper ? v[i] : v[n + i];
      const float keep = upper ? v[n + i] : v[i];
      v[i] = keep + __shfl_xor_sync(kFull, send, m);
    }
  }
#pragma unroll
  for (int m = 16 >> kHalvings; m >= 1; m /= 2) v[0] += __shfl_xor_sync(kFull, v[0], m);
  return v[0];
}

// One step's loads: DEPTH groups per lane (values and deltas), zeros for groups past the row's end.
template <int DEPTH>
struct Step {
  uint4 v[DEPTH];
  uint32_t d[DEPTH];
};

template <int DEPTH>
__device__ __forceinline__ void load_step(const uint4* values, const uint32_t* deltas, int g, int end, Step<DEPTH>& s) {
#pragma unroll
  for (int k = 0; k < DEPTH; ++k) {
    const bool live = g + 32 * k < end;
    s.v[k] = live ? __ldg(values + g + 32 * k) : make_uint4(0u, 0u, 0u, 0u);
    s.d[k] = live ? __ldg(deltas + g + 32 * k) : 0u;
  }
}

// The warp's steps in order, rows first_row, first_row + stride, ... (empty rows have none), one step
// ahead of the arithmetic: `next` is in flight while the current step is computed, and the first step's
// loads fly while the block stages x. Group indices are 32-bit (the launcher checks that they fit).
struct Prefetch {
  int row, stride, rows, g, end;  // g: the step's first group (the same in every lane)

  __device__ __forceinline__ void skip_done(const int64_t* row_ptr) {
    while (row < rows && g >= end) {
      row += stride;
      if (row < rows) {
        g = static_cast<int>(__ldg(row_ptr + row));
        end = static_cast<int>(__ldg(row_ptr + row + 1));
      }
    }
  }
};

// Grid-stride over rows, one warp per row; TS: staged tokens per column (token_stride), DEPTH: groups per
// lane per step; AHEAD: load each step one step ahead (Prefetch) rather than just before its arithmetic
// (fewer instructions per step, latency hidden only by other warps). `xs` holds x: cols · TS ·
// staged_bytes(TS) bytes of shared memory, 16-byte aligned.
template <typename T, int TS, int DEPTH, bool AHEAD>
__device__ void delta_gemv_rows(const DeltaGemvArgs& a, void* xs) {
  const int rows = static_cast<int>(a.rows), cols = static_cast<int>(a.cols);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int first_row = blockIdx.x * warps + warp, stride = gridDim.x * warps;
  const uint4* values = static_cast<const uint4*>(a.values);

  Prefetch pf{first_row, stride, rows, 0, 0};
  Step<DEPTH> next;
  if constexpr (AHEAD) {
    if (first_row < rows) {
      pf.g = static_cast<int>(__ldg(a.row_ptr + first_row));
      pf.end = static_cast<int>(__ldg(a.row_ptr + first_row + 1));
    }
    pf.skip_done(a.row_ptr);
    if (pf.row < rows) load_step(values, a.deltas, pf.g + lane, pf.end, next);
  }

  stage_x<T, TS>(static_cast<const T*>(a.x), a.tokens, cols, xs);
  __syncthreads();

  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  for (int row = first_row; row < rows; row += stride) {
    const int end = static_cast<int>(__ldg(a.row_ptr + row + 1));
    float acc[TS] = {};
    uint32_t cursor = 0;
    for (int g = static_cast<int>(__ldg(a.row_ptr + row)); g < end; g += 32 * DEPTH) {
      Step<DEPTH> current;
      if constexpr (AHEAD) {
        current = next;
        pf.g += 32 * DEPTH;
        pf.skip_done(a.row_ptr);
        if (pf.row < rows) load_step(values, a.deltas, pf.g + lane, pf.end, next);
      } else {
        load_step(values, a.deltas, g + lane, end, current);
      }
      step<T, TS, DEPTH>(current.v, current.d, xs, cols, lane, cursor, acc);
    }
    const float sum = reduce_scatter<TS>(acc, lane);  // lane l: token (l / (32 / TS)) summed over the warp
    const int t = lane / (32 / TS);
    if (lane % (32 / TS) == 0 && t < a.tokens) {
      const float b = bias ? to_float(bias[row]) : 0.f;
      y[static_cast<int64_t>(t) * rows + row] = from_float<T>(sum + b);
    }
  }
}

// Which instantiation serves a call: `f.template operator()<T, TS, DEPTH, AHEAD>()` for x's 16-bit type,
// the staged token count (token_stride), the depth and the load order, returning its result; `bad_depth`
// for a depth other than 1, 2 or 4. At 16 staged tokens a depth of 4 runs as 2: with 16 sums and 4 groups'
// loads live, ptxas spilled there (sm_90), and a pair of groups already carries 16 · 16 FMAs per lane.
// The launcher (delta_gemv.cu) and the CPU emulation (tests/cuda_host) both choose through this.
template <typename T, int TS, bool AHEAD, typename R, typename F>
R visit_depth(int depth, R bad_depth, F& f) {
  switch (depth) {
    case 1: return f.template operator()<T, TS, 1, AHEAD>();
    case 2: return f.template operator()<T, TS, 2, AHEAD>();
    case 4: return f.template operator()<T, TS, TS == 16 ? 2 : 4, AHEAD>();
    default: return bad_depth;
  }
}

template <typename T, bool AHEAD, typename R, typename F>
R visit_tokens(int tokens, int depth, R bad_depth, F& f) {
  switch (token_stride(tokens)) {
    case 1: return visit_depth<T, 1, AHEAD>(depth, bad_depth, f);
    case 2: return visit_depth<T, 2, AHEAD>(depth, bad_depth, f);
    case 4: return visit_depth<T, 4, AHEAD>(depth, bad_depth, f);
    case 8: return visit_depth<T, 8, AHEAD>(depth, bad_depth, f);
    default: return visit_depth<T, 16, AHEAD>(depth, bad_depth, f);
  }
}

template <typename R, typename F>
R visit_instance(const DeltaGemvArgs& a, int depth, bool ahead, R bad_depth, F& f) {
  if (a.bfloat16) {
    return ahead ? visit_tokens<__nv_bfloat16, true>(a.tokens, depth, bad_depth, f)
                 : visit_tokens<__nv_bfloat16, false>(a.tokens, depth, bad_depth, f);
  }
  return ahead ? visit_tokens<__half, true>(a.tokens, depth, bad_depth, f)
               : visit_tokens<__half, false>(a.tokens, depth, bad_depth, f);
}

}  // namespace losa::cuda::delta
