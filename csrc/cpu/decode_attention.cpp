// Attention of a few new query rows against a KV cache, on the CPU: the decode step of our runtime
// (losa_deploy/kernels/attention.py sends transformers' decode calls here).
//
//   out[b, i, h, :] = Σ_j softmax_j(scale · q[b, h, i] · k[b, g, j] + mask[b, h, i, j]) · v[b, g, j]
//   with g = h / (H / Hkv), i < Tq new rows, j < Tk cached positions (the new ones included).
//
// Why our own: a decode step reads the whole cache once and does about two FLOPs per byte, so it should
// run at memory speed, but PyTorch's CPU flash kernel tiles it like a prefill and takes 10-20x the time
// of that read (batch 8, 32 heads of 128, 160 positions, bf16: about 20 ms per call on one core, where
// reading the 21 MB of cache takes under 2 ms; benchmarks/attention_cpu.py). Here one thread owns one
// (batch, kv head), and the R = (H / Hkv) · Tq query rows that share its keys go through the cache
// together, each key and value row converted to fp32 in registers as it is read:
//   1. scores: one dot product per visible (row, key), two accumulators across the head dimension;
//   2. the mask: without one, row i sees keys j <= Tk - Tq + i (the new rows are the cache's last Tq
//      positions); with one, only the mask decides: bool (true: attend) or additive fp32, broadcast
//      over [B|1, H|1, Tq|1, Tk];
//   3. an exact softmax per row in fp32; a row that sees no key gives zeros, as SDPA's CPU kernels do;
//   4. values: up to four rows and 64-128 columns of the head at a time in registers, so a value row is
//      read once for up to four query rows.
// With grouped heads (several rows per key) the work per byte of cache is several times plain multi-head
// attention's, so the walks prefetch the rows they will read a few keys ahead in software: without that,
// perf put most of the time on the loads of the cache.
// q, k and v share one dtype (fp32, bf16 or fp16); the output is [B, Tq, H, D] in that dtype (the layout
// transformers' attention functions return), rounded once from the fp32 result.

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own AVX-512 headers (GCC bug 105593)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <immintrin.h>

#include "check.h"
#include "cpu/cpu_features.h"
#include "cpu/exp_approx.h"
#include "cpu/vec512.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kLanes = 16;  // fp32 lanes of an AVX-512 register
constexpr int kRowTile = 4;     // value pass: query rows per register tile
constexpr int64_t kPrefetchRows = 8;  // value pass: how many cache rows ahead to prefetch

// One (batch, kv head): its query rows (row r = hh * tq + i for head hh of the group), its cache, its mask.
template <typename T>
struct Item {
  const T* q;  // head hh, row i at q + hh * q_head + i * q_row
  int64_t q_head, q_row;
  const T* k;  // key j at k + j * k_row
  const T* v;
  int64_t k_row, v_row;
  const bool* mask_bool;  // [hh, i, j] at + hh * m_head + i * m_row + j; both null: no mask
  const float* mask_add;
  int64_t m_head, m_row;
  T* out;  // head hh, row i at out + hh * dim + i * out_row
  int64_t out_row;
};

struct Shape {
  int64_t group, tq, tk, dim;
  float scale;
  int64_t rows() const { return group * tq; }
};

struct Scratch {
  std::vector<float> q;    // [rows][dim]: the scaled queries in fp32
  std::vector<float> keys;  // [16][dim rounded up to 16]: a block of keys in fp32 (grouped rows)
  std::vector<float> p;    // [rows rounded up to kRowTile][tk]: scores, then probabilities
  std::vector<float> out;  // [rows][dim]: the normalised result in fp32
  std::vector<float> inv;  // [rows]: 1 / row sum, 0 for a row that sees no key
  std::vector<const bool*> mask_bool;  // [rows]: each row's mask (null when not that kind)
  std::vector<const float*> mask_add;
  std::vector<int64_t> last;  // [rows]: without a mask, the last key each row sees
  std::vector<int64_t> begin, end;  // [rows]: the keys [begin, end) hold every non-zero probability
};

template <typename T>
void prepare(const Item<T>& it, const Shape& s, Scratch& w) {
  const int64_t rows = s.rows(), padded = (rows + kRowTile - 1) / kRowTile * kRowTile;
  w.q.resize(rows * s.dim);
  w.p.assign(padded * s.tk, 0.0f);  // the padding rows stay zero: the value tiles add nothing for them
  w.out.resize(rows * s.dim);
  w.inv.resize(rows);
  w.mask_bool.assign(rows, nullptr);
  w.mask_add.assign(rows, nullptr);
  w.last.resize(rows);
  w.begin.assign(rows, 0);
  w.end.assign(rows, 0);
  for (int64_t hh = 0; hh < s.group; ++hh)
    for (int64_t i = 0; i < s.tq; ++i) {
      const int64_t r = hh * s.tq + i, m = hh * it.m_head + i * it.m_row;
      const T* src = it.q + hh * it.q_head + i * it.q_row;
      float* dst = w.q.data() + r * s.dim;
      for (int64_t d = 0; d < s.dim; ++d) dst[d] = static_cast<float>(src[d]) * s.scale;
      if (it.mask_bool != nullptr) w.mask_bool[r] = it.mask_bool + m;
      if (it.mask_add != nullptr) w.mask_add[r] = it.mask_add + m;
      w.last[r] = s.tk - s.tq + i;
    }
}

// The additive mask of row r at key j (0 or -inf for a bool mask); the causal rule when there is none.
inline float mask_at(const Scratch& w, int64_t r, int64_t j) {
  if (w.mask_bool[r] != nullptr) return w.mask_bool[r][j] ? 0.0f : kNegInf;
  if (w.mask_add[r] != nullptr) return w.mask_add[r][j];
  return j <= w.last[r] ? 0.0f : kNegInf;
}

// The keys [begin, end) that hold row r's non-zero probabilities: the value pass walks only these (a
// static cache's unused tail and left padding are masked).
inline void record_span(const Shape& s, Scratch& w, int64_t r) {
  const float* p = w.p.data() + r * s.tk;
  int64_t begin = 0, end = s.tk;
  while (begin < end && p[begin] == 0.0f) ++begin;  // the row's maximum has probability 1
  while (end > begin && p[end - 1] == 0.0f) --end;
  w.begin[r] = begin;
  w.end[r] = end;
}

// Softmax of every row of w.p in place, exact in fp32; -inf entries become exact zeros.
void softmax_rows(const Shape& s, Scratch& w) {
  for (int64_t r = 0; r < s.rows(); ++r) {
    float* p = w.p.data() + r * s.tk;
    float top = kNegInf;
    for (int64_t j = 0; j < s.tk; ++j) top = std::max(top, p[j]);
    if (top == kNegInf) {  // sees no key
      std::fill(p, p + s.tk, 0.0f);
      w.inv[r] = 0.0f;
      continue;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < s.tk; ++j) {
      p[j] = p[j] == kNegInf ? 0.0f : losa::cpu::exp_nonpositive(p[j] - top);
      sum += p[j];
    }
    w.inv[r] = 1.0f / sum;
    record_span(s, w, r);
  }
}

template <typename T>
void store_out(const Item<T>& it, const Shape& s, const Scratch& w) {
  for (int64_t hh = 0; hh < s.group; ++hh)
    for (int64_t i = 0; i < s.tq; ++i) {
      const float* src = w.out.data() + (hh * s.tq + i) * s.dim;
      T* dst = it.out + hh * s.dim + i * it.out_row;
      for (int64_t d = 0; d < s.dim; ++d) dst[d] = static_cast<T>(src[d]);
    }
}

// ---- portable variant: the same steps as plain loops, the sums in fp64 (it is the fallback for CPUs
// without AVX-512, where speed is SDPA's anyway, and the tests' tightest check of the steps) ----

template <typename T>
void attend_default(const Item<T>& it, const Shape& s, Scratch& w) {
  prepare(it, s, w);
  for (int64_t j = 0; j < s.tk; ++j) {
    const T* kj = it.k + j * it.k_row;
    for (int64_t r = 0; r < s.rows(); ++r) {
      const float add = mask_at(w, r, j);
      double acc = 0.0;
      if (add != kNegInf)
        for (int64_t d = 0; d < s.dim; ++d) acc += double(w.q[r * s.dim + d]) * static_cast<float>(kj[d]);
      w.p[r * s.tk + j] = static_cast<float>(acc) + add;
    }
  }
  softmax_rows(s, w);
  std::vector<double> out(s.rows() * s.dim, 0.0);
  for (int64_t j = 0; j < s.tk; ++j) {
    const T* vj = it.v + j * it.v_row;
    for (int64_t r = 0; r < s.rows(); ++r) {
      const double pj = w.p[r * s.tk + j];
      if (pj != 0.0)
        for (int64_t d = 0; d < s.dim; ++d) out[r * s.dim + d] += pj * static_cast<float>(vj[d]);
    }
  }
  for (int64_t r = 0; r < s.rows(); ++r)
    for (int64_t d = 0; d < s.dim; ++d) w.out[r * s.dim + d] = static_cast<float>(out[r * s.dim + d] * w.inv[r]);
  store_out(it, s, w);
}

// ---- AVX-512 variant ----

#define LOSA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

using losa::cpu::load16;
using losa::cpu::tail_mask;

// Scores of every row against key j: q_r · k_j over the head in two accumulators, plus the mask.
template <typename T>
LOSA_AVX512 void scores_avx512(const Item<T>& it, const Shape& s, Scratch& w) {
  const int64_t chunks = (s.dim + kLanes - 1) / kLanes;
  for (int64_t j = 0; j < s.tk; ++j) {
    const T* kj = it.k + j * it.k_row;
    for (int64_t r = 0; r < s.rows(); ++r) {
      const float add = mask_at(w, r, j);
      float* p = w.p.data() + r * s.tk + j;
      if (add == kNegInf) {
        *p = kNegInf;
        continue;
      }
      const float* qr = w.q.data() + r * s.dim;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t c = 0;
      for (; c + 1 < chunks; c += 2) {
        const __mmask16 m1 = tail_mask(s.dim - (c + 1) * kLanes);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + c * kLanes), load16(kj + c * kLanes, 0xFFFF), a0);
        a1 = _mm512_fmadd_ps(load16(qr + (c + 1) * kLanes, m1), load16(kj + (c + 1) * kLanes, m1), a1);
      }
      if (c < chunks) {
        const __mmask16 m0 = tail_mask(s.dim - c * kLanes);
        a0 = _mm512_fmadd_ps(load16(qr + c * kLanes, m0), load16(kj + c * kLanes, m0), a0);
      }
      *p = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + add;
    }
  }
}

// The 16 sums of a[0..15] (each a sum over its 16 lanes), in lane order: a transposing tree of adds
// (about 3 instructions per sum instead of a horizontal reduction's 8).
LOSA_AVX512 inline __m512 sum16(const __m512 (&a)[16]) {
  __m512 u[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* x = a + 4 * g;
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [sum a, sum b, sum c, sum d].
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    u[g] = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // u[g] holds, in each 128-bit lane L, the lane-L sums of keys 4g..4g+3: add the four lanes across.
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// Row r's mask over keys [j0, j0 + n) as 16 additive lanes (0 or -inf for a bool mask and for the causal
// rule; lanes from n on are -inf): mask_at for a block of keys.
LOSA_AVX512 inline __m512 block_mask(const Scratch& w, int64_t r, int64_t j0, int64_t n) {
  const __mmask16 valid = tail_mask(n);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf), zero = _mm512_setzero_ps();
  if (w.mask_bool[r] != nullptr) {
    const __m128i bytes = _mm_maskz_loadu_epi8(valid, w.mask_bool[r] + j0);
    return _mm512_mask_mov_ps(neg_inf, _mm_test_epi8_mask(bytes, bytes), zero);
  }
  if (w.mask_add[r] != nullptr) return _mm512_mask_loadu_ps(neg_inf, valid, w.mask_add[r] + j0);
  return _mm512_mask_mov_ps(neg_inf, tail_mask(std::min(n, w.last[r] - j0 + 1)), zero);
}

// scores_avx512 for several rows per key (grouped heads, several new positions): each block of 16 keys
// is converted to fp32 once for all rows, each row's 16 dot products are summed together (sum16), and
// the mask is applied to the 16 at once.
template <typename T>
LOSA_AVX512 void scores_grouped_avx512(const Item<T>& it, const Shape& s, Scratch& w) {
  const int64_t chunks = (s.dim + kLanes - 1) / kLanes, stride = chunks * kLanes;
  const bool masked = w.mask_bool[0] != nullptr || w.mask_add[0] != nullptr;
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  // Locals, so the stores into the key block do not make the compiler reload them from `it` and `w`.
  const T* const k = it.k;
  const int64_t k_row = it.k_row;
  w.keys.assign(kLanes * stride, 0.0f);  // keys past the cache (the last block) stay zero
  float* const keys = w.keys.data();
  for (int64_t j0 = 0; j0 < s.tk; j0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, s.tk - j0);
    for (int64_t jj = 0; jj < n; ++jj) {
      const T* kj = k + (j0 + jj) * k_row;
      for (int64_t b = 0; b < int64_t(s.dim * sizeof(T)); b += 64)  // the next block's key, as for values
        _mm_prefetch(reinterpret_cast<const char*>(kj + kLanes * k_row) + b, _MM_HINT_T0);
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(keys + jj * stride + c * kLanes, load16(kj + c * kLanes, tail_mask(s.dim - c * kLanes)));
    }
    for (int64_t r = 0; r < s.rows(); ++r) {
      float* p = w.p.data() + r * s.tk + j0;
      if (!masked && j0 > w.last[r]) {  // the whole block is past this row's position
        _mm512_mask_storeu_ps(p, tail_mask(n), neg_inf);
        continue;
      }
      __m512 acc[kLanes];
      for (int jj = 0; jj < kLanes; ++jj) acc[jj] = _mm512_setzero_ps();
      const float* qr = w.q.data() + r * s.dim;
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 qc = load16(qr + c * kLanes, tail_mask(s.dim - c * kLanes));
        for (int jj = 0; jj < kLanes; ++jj)
          acc[jj] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(keys + jj * stride + c * kLanes), acc[jj]);
      }
      // A hidden key is -inf whatever its score: a static cache's unused positions may hold NaN.
      const __m512 add = block_mask(w, r, j0, n);
      const __mmask16 hidden = _mm512_cmp_ps_mask(add, neg_inf, _CMP_EQ_OQ);
      _mm512_mask_storeu_ps(p, tail_mask(n), _mm512_mask_mov_ps(_mm512_add_ps(sum16(acc), add), hidden, neg_inf));
    }
  }
}

// softmax_rows with the exponentials 16 at a time.
LOSA_AVX512 void softmax_rows_avx512(const Shape& s, Scratch& w) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t r = 0; r < s.rows(); ++r) {
    float* p = w.p.data() + r * s.tk;
    __m512 top16 = neg_inf;
    for (int64_t j = 0; j < s.tk; j += kLanes)
      top16 = _mm512_max_ps(top16, _mm512_mask_loadu_ps(neg_inf, tail_mask(s.tk - j), p + j));
    const float top = _mm512_reduce_max_ps(top16);
    if (top == kNegInf) {  // sees no key
      std::fill(p, p + s.tk, 0.0f);
      w.inv[r] = 0.0f;
      w.begin[r] = w.end[r] = 0;
      continue;
    }
    const __m512 top_v = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < s.tk; j += kLanes) {
      const __mmask16 m = tail_mask(s.tk - j);
      const __m512 x = _mm512_maskz_loadu_ps(m, p + j);
      // -inf (hidden keys) gives exactly 0, as in softmax_rows.
      const __mmask16 seen = _mm512_mask_cmp_ps_mask(m, x, neg_inf, _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(seen, losa::cpu::exp_nonpositive16(_mm512_sub_ps(x, top_v)));
      _mm512_mask_storeu_ps(p + j, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    w.inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    record_span(s, w, r);
  }
}

// Rows [r0, r0 + RR) times columns [c0 * 16, (c0 + CC) * 16) of the head: Σ_j p[r][j] · v_j, the
// accumulators in registers for the whole walk over the cache. Every index of acc is a compile-time
// constant and the walk reads only locals: otherwise GCC keeps acc on the stack and stores all of it back
// once per key (seen in perf: 16 stores per key at four rows).
template <typename T, int RR, int CC>
LOSA_AVX512 void values_tile(const Item<T>& it, const Shape& s, Scratch& w, int64_t r0, int64_t c0) {
  __mmask16 m[CC];
  __m512 acc[RR * CC];
  for (int c = 0; c < CC; ++c) m[c] = tail_mask(s.dim - (c0 + c) * kLanes);
  for (int a = 0; a < RR * CC; ++a) acc[a] = _mm512_setzero_ps();
  const int64_t rows = std::min<int64_t>(RR, s.rows() - r0);
  int64_t begin = s.tk, end = 0;
  for (int64_t r = 0; r < rows; ++r) {
    begin = std::min(begin, w.begin[r0 + r]);
    end = std::max(end, w.end[r0 + r]);
  }
  // Rows past `rows` are padding rows of p, all zero: they run and are not stored.
  const float* const p = w.p.data() + r0 * s.tk;
  const int64_t tk = s.tk, v_row = it.v_row;
  const T* const v0 = it.v + c0 * kLanes;
  for (int64_t j = begin; j < end; ++j) {
    const T* vj = v0 + j * v_row;
    // The tile reads part of each value row, a stride the hardware prefetcher follows late (perf: the
    // value loads held most of the walk's stalls).
    for (int64_t b = 0; b < int64_t(CC * kLanes * sizeof(T)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(vj + kPrefetchRows * v_row) + b, _MM_HINT_T0);
    __m512 v[CC];
    for (int c = 0; c < CC; ++c) v[c] = load16(vj + c * kLanes, m[c]);
    for (int r = 0; r < RR; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r * tk + j]);
      for (int c = 0; c < CC; ++c) acc[r * CC + c] = _mm512_fmadd_ps(pj, v[c], acc[r * CC + c]);
    }
  }
  for (int r = 0; r < RR; ++r) {
    if (r >= rows) continue;
    const __m512 inv = _mm512_set1_ps(w.inv[r0 + r]);
    float* out = w.out.data() + (r0 + r) * s.dim + c0 * kLanes;
    for (int c = 0; c < CC; ++c) _mm512_mask_storeu_ps(out + c * kLanes, m[c], _mm512_mul_ps(acc[r * CC + c], inv));
  }
}

// values_tile with CC = n, for n in [1, CC].
template <typename T, int RR, int CC>
LOSA_AVX512 void values_tile_n(int64_t n, const Item<T>& it, const Shape& s, Scratch& w, int64_t r0, int64_t c0) {
  if constexpr (CC > 1) {
    if (n < CC) return values_tile_n<T, RR, CC - 1>(n, it, s, w, r0, c0);
  }
  values_tile<T, RR, CC>(it, s, w, r0, c0);
}

// Rows [r0, r0 + RR) over the whole head, CC chunks at a time (RR · CC <= 16 accumulators, so a one-row
// group, plain multi-head attention at one token, reads each value row once, whole).
template <typename T, int RR, int CC>
LOSA_AVX512 void values_rows(const Item<T>& it, const Shape& s, Scratch& w, int64_t r0) {
  const int64_t chunks = (s.dim + kLanes - 1) / kLanes;
  for (int64_t c0 = 0; c0 < chunks; c0 += CC) values_tile_n<T, RR, CC>(chunks - c0, it, s, w, r0, c0);
}

template <typename T>
LOSA_AVX512 void attend_avx512(const Item<T>& it, const Shape& s, Scratch& w) {
  prepare(it, s, w);
  if (s.rows() > 1) scores_grouped_avx512(it, s, w);
  else scores_avx512(it, s, w);
  softmax_rows_avx512(s, w);
  for (int64_t r0 = 0; r0 < s.rows(); r0 += kRowTile) {
    const int64_t rows = s.rows() - r0;
    if (rows == 1) values_rows<T, 1, 8>(it, s, w, r0);
    else if (rows == 2) values_rows<T, 2, 6>(it, s, w, r0);
    else values_rows<T, kRowTile, 4>(it, s, w, r0);  // three rows run as four, the fourth all zero
  }
  store_out(it, s, w);
}

// ---- the op ----

// The mask as [B, H, Tq, Tk] strides over bool or fp32 data (a float mask of another dtype is converted).
at::Tensor prepare_mask(const at::Tensor& mask, int64_t batch, int64_t heads, int64_t tq, int64_t tk) {
  LOSA_CHECK(mask.dim() == 4 && mask.size(3) == tk && (mask.size(0) == 1 || mask.size(0) == batch) &&
                 (mask.size(1) == 1 || mask.size(1) == heads) && (mask.size(2) == 1 || mask.size(2) == tq),
             "decode_attention: mask ", mask.sizes(), " does not broadcast to [", batch, ", ", heads, ", ", tq,
             ", ", tk, "]");
  LOSA_CHECK(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()),
             "decode_attention: mask must be bool or floating, got ", mask.scalar_type());
  at::Tensor m = mask.scalar_type() == at::kBool ? mask : mask.to(at::kFloat);
  m = m.expand({batch, heads, tq, tk});
  return m.stride(3) == 1 ? m : m.contiguous();
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out,
         const Shape& s, bool avx512) {
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool* mb = mask.defined() && mask.scalar_type() == at::kBool ? mask.data_ptr<bool>() : nullptr;
  const float* mf = mask.defined() && mb == nullptr ? mask.data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, g = item % kv_heads, h0 = g * s.group;
      const int64_t m_off = mask.defined() ? b * mask.stride(0) + h0 * mask.stride(1) : 0;
      const Item<T> it{qp + b * q.stride(0) + h0 * q.stride(1), q.stride(1), q.stride(2),
                       kp + b * k.stride(0) + g * k.stride(1), vp + b * v.stride(0) + g * v.stride(1),
                       k.stride(2), v.stride(2),
                       mb != nullptr ? mb + m_off : nullptr, mf != nullptr ? mf + m_off : nullptr,
                       mask.defined() ? mask.stride(1) : 0, mask.defined() ? mask.stride(2) : 0,
                       op + (b * s.tq * heads + h0) * s.dim, heads * s.dim};
      if (avx512) attend_avx512(it, s, w);
      else attend_default(it, s, w);
    }
  });
}

// query [B, H, Tq, D], key and value [B, Hkv, Tk, D] (any strides with D contiguous), mask as above;
// returns [B, Tq, H, D].
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  LOSA_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
             "decode_attention: query, key and value must be [batch, heads, seq, head_dim]");
  LOSA_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
             "decode_attention: CPU tensors only");
  const auto dtype = query.scalar_type();
  LOSA_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
             "decode_attention: query must be float32, bfloat16 or float16, got ", dtype);
  LOSA_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype, "decode_attention: key ",
             key.scalar_type(), " and value ", value.scalar_type(), " must be ", dtype, " as the query is");
  const int64_t batch = query.size(0), heads = query.size(1), tq = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1), tk = key.size(2);
  LOSA_CHECK(key.sizes() == value.sizes(), "decode_attention: key ", key.sizes(), " and value ",
             value.sizes(), " differ");
  LOSA_CHECK(key.size(0) == batch && key.size(3) == dim, "decode_attention: key ", key.sizes(),
             " does not match query ", query.sizes());
  LOSA_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode_attention: ", heads,
             " query heads are not a multiple of ", kv_heads, " key/value heads");
  const bool masked = mask.has_value() && mask->defined();
  LOSA_CHECK(masked || tk >= tq, "decode_attention: ", tq, " query rows against ", tk,
             " keys: without a mask the queries must be the last keys' positions");
  const at::Tensor m = masked ? prepare_mask(*mask, batch, heads, tq, tk) : at::Tensor();
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 ? value : value.contiguous();
  at::Tensor out = at::empty({batch, tq, heads, dim}, query.options());
  if (out.numel() == 0) return out;
  if (tk == 0) return out.zero_();
  const Shape s{heads / kv_heads, tq, tk, dim, static_cast<float>(scale)};
  const bool avx512 = losa::cpu::avx512_allowed();
  if (dtype == at::kFloat) run<float>(q, k, v, m, out, s, avx512);
  else if (dtype == at::kBFloat16) run<c10::BFloat16>(q, k, v, m, out, s, avx512);
  else run<c10::Half>(q, k, v, m, out, s, avx512);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) { m.impl("decode_attention", &decode_attention); }
