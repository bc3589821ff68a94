// Causal self-attention forward on the CPU, for passes that need no gradient (calibration, evaluation).
//
//   out[b, i, h, :] = Σ_{j ≤ i} softmax_j(scale · q[b, h, i] · k[b, g, j]) · v[b, g, j],  g = h / (H / Hkv)
//
// Why our own: pruning, RMI and LoSA's phases run every decoder block over 128 windows several times, and
// PyTorch's CPU flash kernel cuts each head into small GEMM calls whose fixed cost dominates at small
// head sizes (stories260K: head size 8, 13 GFLOP/s, half of a calibration pass's time). Here one thread
// owns one (batch, head) pair: it transposes that head's keys and values once (columns of 16 positions
// per vector), then takes the query rows four at a time: scores by FMAs across positions, an exact
// softmax over the row (max, exp, sum in fp32; positions past the diagonal never enter), and the value
// sum as dot products over positions. Nothing of size S×S is written.
//
// fp32 only, no mask beyond the causal one, no dropout: the Python side (kernels/attention.py) sends
// everything else to torch's SDPA, and uses this op only where the AVX-512 variant runs. The portable
// variant (plain loops, same steps) keeps the op correct on every CPU but is slower than SDPA there; the
// variant is chosen at run time, capped by LOSA_CPU_ISA as for the other CPU kernels.

// GCC 12 flags the deliberately undefined pass-through operands inside its own AVX-512 intrinsics
// (GCC bug 105593, fixed in 13): a warning about the compiler header, not this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include <immintrin.h>

#include "check.h"
#include "cpu_features.h"
#include "exp_approx.h"

namespace {

using losa::cpu::exp_nonpositive;
using losa::cpu::exp_nonpositive16;

constexpr int64_t kLanes = 16;  // positions per vector step (one AVX-512 register of fp32)
constexpr int kRows = 4;  // query rows per group: each key/value load feeds four rows

// Lanes [0, remaining) of a 16-lane step.
inline uint32_t tail(int64_t remaining) {
  return remaining >= kLanes ? 0xFFFFu : (1u << std::max<int64_t>(remaining, 0)) - 1u;
}

struct Head {
  const float* q;  // row i at q + i * ldq, head_dim contiguous
  const float* k;
  const float* v;
  float* out;  // row i at out + i * ldo
  int64_t ldq, ldk, ldv, ldo;
};

struct Scratch {
  std::vector<float> kt, vt, scores, qs;  // [D][Sp], [D][Sp], [kRows][Sp], [kRows][D]
};

// One (batch, head): S query rows against S keys. Sp = S rounded up to whole vectors.
// Sizes the scratch for one head, zeroes it and fills K^T and V^T [D][Sp] (positions past S stay 0);
// returns Sp.
inline int64_t prepare_head(const Head& h, int64_t seq, int64_t dim, Scratch& s) {
  const int64_t sp = (seq + kLanes - 1) / kLanes * kLanes;
  s.kt.assign(dim * sp, 0.0f);
  s.vt.assign(dim * sp, 0.0f);
  s.scores.assign(kRows * sp, 0.0f);
  s.qs.assign(kRows * dim, 0.0f);
  for (int64_t j = 0; j < seq; ++j)
    for (int64_t d = 0; d < dim; ++d) {
      s.kt[d * sp + j] = h.k[j * h.ldk + d];
      s.vt[d * sp + j] = h.v[j * h.ldv + d];
    }
  return sp;
}

// Query rows [i0, i0 + rows) times the scale into s.qs [kRows][D]; rows past `rows` are zero.
inline void load_queries(const Head& h, int64_t i0, int rows, int64_t dim, float scale, Scratch& s) {
  for (int r = 0; r < kRows; ++r)
    for (int64_t d = 0; d < dim; ++d) s.qs[r * dim + d] = r < rows ? h.q[(i0 + r) * h.ldq + d] * scale : 0.0f;
}

[[gnu::always_inline]] inline void attend_head(const Head& h, int64_t seq, int64_t dim, float scale, Scratch& s) {
  const int64_t sp = prepare_head(h, seq, dim, s);
  const float* kt = s.kt.data();
  const float* vt = s.vt.data();
  const float* qs = s.qs.data();
  for (int64_t i0 = 0; i0 < seq; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, seq - i0));
    const int64_t keys = i0 + rows;  // the last row of the group sees keys [0, keys)
    const int64_t steps = (keys + kLanes - 1) / kLanes;
    load_queries(h, i0, rows, dim, scale, s);
    // Scores: for each block of 16 keys, sum over the head dimension with the accumulators in registers.
    for (int64_t t = 0; t < steps; ++t) {
      float acc[kRows][kLanes] = {};
      const float* kcol = kt + t * kLanes;
      for (int64_t d = 0; d < dim; ++d)
        for (int r = 0; r < kRows; ++r)
          for (int l = 0; l < kLanes; ++l) acc[r][l] += qs[r * dim + d] * kcol[d * sp + l];
      for (int r = 0; r < kRows; ++r)
        for (int l = 0; l < kLanes; ++l) s.scores[r * sp + t * kLanes + l] = acc[r][l];
    }
    // Exact softmax per row over its keys [0, i]; later positions become 0 so the value sum can run
    // over whole vectors.
    float inv[kRows];
    for (int r = 0; r < kRows; ++r) {
      float* __restrict p = s.scores.data() + r * sp;
      const int64_t n = std::min(i0 + r + 1, keys);
      float m = p[0];
      for (int64_t j = 1; j < n; ++j) m = std::max(m, p[j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = exp_nonpositive(p[j] - m);
        sum += p[j];
      }
      for (int64_t j = n; j < steps * kLanes; ++j) p[j] = 0.0f;
      inv[r] = 1.0f / sum;
    }
    // Values: out[r, d] = Σ_j p[r, j] · v[j, d], a dot product over positions per (row, d).
    for (int64_t d = 0; d < dim; ++d) {
      float acc[kRows][kLanes] = {};
      const float* vrow = vt + d * sp;
      for (int64_t t = 0; t < steps; ++t)
        for (int r = 0; r < kRows; ++r)
          for (int l = 0; l < kLanes; ++l) acc[r][l] += s.scores[r * sp + t * kLanes + l] * vrow[t * kLanes + l];
      for (int r = 0; r < rows; ++r) {
        float total = 0.0f;
        for (int l = 0; l < kLanes; ++l) total += acc[r][l];
        h.out[(i0 + r) * h.ldo + d] = total * inv[r];
      }
    }
  }
}

void attend_default(const Head& h, int64_t seq, int64_t dim, float scale, Scratch& s) {
  attend_head(h, seq, dim, scale, s);
}

// ---- AVX-512: the same steps with the four rows' accumulators held in registers ----

#define LOSA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

LOSA_AVX512 void attend_avx512(const Head& h, int64_t seq, int64_t dim, float scale, Scratch& s) {
  const int64_t sp = prepare_head(h, seq, dim, s);
  const float* kt = s.kt.data();
  const float* vt = s.vt.data();
  const float* qs = s.qs.data();
  float* sc = s.scores.data();
  for (int64_t i0 = 0; i0 < seq; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, seq - i0));
    const int64_t keys = i0 + rows;
    const int64_t steps = (keys + kLanes - 1) / kLanes;
    load_queries(h, i0, rows, dim, scale, s);
    for (int64_t t = 0; t < steps; ++t) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* kcol = kt + t * kLanes;
      for (int64_t d = 0; d < dim; ++d) {
        const __m512 kv = _mm512_loadu_ps(kcol + d * sp);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(qs[d]), kv, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(qs[dim + d]), kv, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(qs[2 * dim + d]), kv, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(qs[3 * dim + d]), kv, a3);
      }
      _mm512_storeu_ps(sc + t * kLanes, a0);
      _mm512_storeu_ps(sc + sp + t * kLanes, a1);
      _mm512_storeu_ps(sc + 2 * sp + t * kLanes, a2);
      _mm512_storeu_ps(sc + 3 * sp + t * kLanes, a3);
    }
    float inv[kRows] = {};
    for (int r = 0; r < rows; ++r) {
      float* p = sc + r * sp;
      const int64_t n = i0 + r + 1;  // keys [0, n) are visible to this row
      __m512 m = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < n; j += kLanes)
        m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, static_cast<__mmask16>(tail(n - j)), p + j));
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < steps * kLanes; j += kLanes) {
        const __m512 e = _mm512_maskz_mov_ps(static_cast<__mmask16>(tail(n - j)),
                                             exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(p + j), mx)));
        _mm512_storeu_ps(p + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    for (int64_t d = 0; d < dim; ++d) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* vrow = vt + d * sp;
      for (int64_t j = 0; j < steps * kLanes; j += kLanes) {
        const __m512 vv = _mm512_loadu_ps(vrow + j);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + j), vv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + sp + j), vv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 2 * sp + j), vv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 3 * sp + j), vv, a3);
      }
      const float total[kRows] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                  _mm512_reduce_add_ps(a3)};
      for (int r = 0; r < rows; ++r) h.out[(i0 + r) * h.ldo + d] = total[r] * inv[r];
    }
  }
}

using AttendFn = void (*)(const Head&, int64_t, int64_t, float, Scratch&);

// The best variant this CPU runs (LOSA_CPU_ISA caps it, as for the other CPU kernels).
std::pair<AttendFn, const char*> chosen_variant() {
  if (losa::cpu::avx512_allowed()) return {attend_avx512, "avx512"};
  return {attend_default, "default"};
}

// query [B, H, S, D], key and value [B, Hkv, S, D] (any strides with D contiguous); returns [B, S, H, D].
at::Tensor causal_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            double scale) {
  LOSA_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
             "causal_attention: query, key and value must be [batch, heads, seq, head_dim]");
  LOSA_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
             "causal_attention: CPU tensors only");
  LOSA_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat &&
                  value.scalar_type() == at::kFloat,
             "causal_attention: float32 only, got ", query.scalar_type());
  const int64_t batch = query.size(0), heads = query.size(1), seq = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1);
  LOSA_CHECK(key.sizes() == value.sizes(), "causal_attention: key ", key.sizes(), " and value ", value.sizes(),
             " differ");
  LOSA_CHECK(key.size(0) == batch && key.size(2) == seq && key.size(3) == dim,
             "causal_attention: key ", key.sizes(), " does not match query ", query.sizes());
  LOSA_CHECK(kv_heads > 0 && heads % kv_heads == 0, "causal_attention: ", heads,
             " query heads are not a multiple of ", kv_heads, " key/value heads");
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 ? value : value.contiguous();
  at::Tensor out = at::empty({batch, seq, heads, dim}, query.options());
  if (out.numel() == 0) return out;
  const AttendFn attend = chosen_variant().first;
  const int64_t group = heads / kv_heads;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, hq = item % heads, hk = hq / group;
      const Head head{qp + b * q.stride(0) + hq * q.stride(1), kp + b * k.stride(0) + hk * k.stride(1),
                      vp + b * v.stride(0) + hk * v.stride(1), op + (b * seq * heads + hq) * dim,
                      q.stride(2), k.stride(2), v.stride(2), heads * dim};
      attend(head, seq, dim, static_cast<float>(scale), scratch);
    }
  });
  return out;
}

std::string causal_attention_isa() { return chosen_variant().second; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def("causal_attention(Tensor query, Tensor key, Tensor value, float scale) -> Tensor");
  m.def("causal_attention_isa() -> str", &causal_attention_isa);
}

TORCH_LIBRARY_IMPL(losa, CPU, m) { m.impl("causal_attention", &causal_attention); }
