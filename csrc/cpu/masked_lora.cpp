// Fused masked-LoRA training kernels for the CPU (design: shared/design/kernels.md §6 and §4.7).
//
// The effective weight of a masked-LoRA linear is W_eff = M ⊙ (W + s·B·A), with W [d, k] frozen,
// M the keep-mask (losa-bitmask words, formats/bitmask.py), A [r, k], B [d, r]. The reference code
// builds the d×k delta at every step and keeps it for backward; these kernels never do. Each thread
// builds one *panel* of W_eff (a band of rows, or of columns) into a buffer that stays in its cache,
// hands the panel to the GEMM, and reuses the buffer for its next panel:
//
//   masked_lora_mm      y  = x · W_effᵀ        [T, d]   row panels      (forward)
//   masked_lora_mm_t    dX = dY · W_eff        [T, k]   column panels   (backward, input gradient)
//   masked_lora_grad_ab dA = s·Bᵀ·G_M, dB = s·G_M·Aᵀ with G_M = (dYᵀ·X) ⊙ M, one column panel of G
//                       at a time (an SDDMM fused with both contractions; G is never whole)
//
// `weight` may be absent (W = 0: the adapter-only product of the dropout path) and `scale` may be 0
// (no adapter: the masked base product). The GEMMs on panels are ATen's (MKL / oneDNN), called from
// inside our parallel loop so each runs single-threaded on its own panel; the panel build and the masked
// contraction are ours, vectorised, with the instruction set chosen at run time.

// GCC 12 flags the deliberately undefined pass-through operands inside its own AVX-512 intrinsics
// (GCC bug 105593, fixed in 13): a warning about the compiler's header, not this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "check.h"
#include "cpu_features.h"
#include "vec512.h"

namespace {

// Panel buffers are sized to at most about this many bytes, so a panel stays in the L2/L3 cache of the
// core that built it while the GEMM streams the activations past it.
constexpr int64_t kPanelBytes = int64_t{4} << 20;
constexpr int64_t kWordBits = 32;
// Fixed groups of column panels in the dA/dB backward, each with its own partial dB ([d, r] fp32): the
// most workers that kernel keeps busy, and the partial buffers it sums (32 x 11008 x 64 x 4 B = 90 MB at
// most for LLaMA-7B shapes at rank 64).
constexpr int64_t kDbGroups = 32;

// Where a panel of W_eff comes from. A and B are always in the accumulation type (fp32, or fp64 for
// gradcheck), so a bf16 model keeps full-precision adapters.
template <typename T, typename Acc>
struct Source {
  const T* w;  // [d, k] row-major, or nullptr for W = 0
  const uint32_t* words;  // [d, ceil(k/32)]
  const Acc* a;  // [r, k]
  const Acc* b;  // [d, r]
  int64_t k, words_per_row, rank;
  Acc scale;
  // bf16 panels on AVX512-BF16 CPUs: the rank in pairs for vdpbf16ps, each 32-bit word two bf16. Word j
  // of pair p of a_pairs is (A[2p, j], A[2p+1, j]); word p of row i of b_pairs is s·(B[i, 2p], B[i, 2p+1]).
  const uint32_t* a_pairs = nullptr;  // [ceil(r/2), k]
  const uint32_t* b_pairs = nullptr;  // [d, ceil(r/2)]
  int64_t pairs = 0;
};

inline bool kept(const uint32_t* row_words, int64_t col) {
  return (row_words[col / kWordBits] >> (col % kWordBits)) & 1u;
}

// ---- portable kernels: plain loops the compiler vectorises for whichever target includes them ----

constexpr int64_t kChunk = 64;

// out[i - i0, j - j0] = M[i, j] ? W[i, j] + s·(B[i, :]·A[:, j]) : 0 for i in [i0, i1), j in [j0, j1).
template <typename T, typename Acc>
[[gnu::always_inline]] inline void build_panel_portable(const Source<T, Acc>& src, int64_t i0, int64_t i1,
                                                        int64_t j0, int64_t j1, T* out, int64_t ldo) {
  std::array<Acc, kChunk> acc;
  for (int64_t i = i0; i < i1; ++i) {
    const Acc* brow = src.b + i * src.rank;
    const uint32_t* mrow = src.words + i * src.words_per_row;
    T* orow = out + (i - i0) * ldo - j0;
    for (int64_t jc = j0; jc < j1; jc += kChunk) {
      const int64_t n = std::min(kChunk, j1 - jc);
      std::fill(acc.begin(), acc.end(), Acc(0));
      if (src.scale != Acc(0)) {
        for (int64_t c = 0; c < src.rank; ++c) {
          const Acc bc = brow[c] * src.scale;
          const Acc* arow = src.a + c * src.k + jc;
          for (int64_t j = 0; j < n; ++j) acc[j] += bc * arow[j];
        }
      }
      if (src.w != nullptr) {
        const T* wrow = src.w + i * src.k + jc;
        for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<Acc>(wrow[j]);
      }
      for (int64_t j = 0; j < n; ++j) orow[jc + j] = kept(mrow, jc + j) ? static_cast<T>(acc[j]) : T(0);
    }
  }
}

// One column panel [j0, j1) of G = dYᵀ·X (all d rows, row stride ldg) is masked and contracted at once:
//   dA[:, j0:j1] += s·Bᵀ·G_M        dB += s·G_M·A[:, j0:j1]ᵀ        (G_M = G ⊙ M)
// The masked row is widened into `row` (j1 - j0 accumulation-type values), G_M itself is never stored.
template <typename T, typename Acc>
struct Contraction {
  const uint32_t* words;
  const Acc* a;  // [r, k]
  const Acc* b;  // [d, r]
  Acc* da;       // [r, k], this worker's columns only
  Acc* db;       // [d, r], this worker's partial sum
  int64_t d, k, words_per_row, rank;
  Acc scale;
};

template <typename T, typename Acc>
[[gnu::always_inline]] inline void contract_panel_portable(const Contraction<T, Acc>& c, const T* g, int64_t ldg,
                                                           int64_t j0, int64_t j1, Acc* row) {
  const int64_t n = j1 - j0;
  for (int64_t i = 0; i < c.d; ++i) {
    const uint32_t* mrow = c.words + i * c.words_per_row;
    const T* grow = g + i * ldg;
    for (int64_t j = 0; j < n; ++j) row[j] = kept(mrow, j0 + j) ? c.scale * static_cast<Acc>(grow[j]) : Acc(0);
    for (int64_t q = 0; q < c.rank; ++q) {
      const Acc bq = c.b[i * c.rank + q];
      const Acc* arow = c.a + q * c.k + j0;
      Acc* darow = c.da + q * c.k + j0;
      Acc sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        darow[j] += bq * row[j];
        sum += row[j] * arow[j];
      }
      c.db[i * c.rank + q] += sum;
    }
  }
}

template <typename T, typename Acc>
void build_panel_default(const Source<T, Acc>& s, int64_t i0, int64_t i1, int64_t j0, int64_t j1, T* out,
                         int64_t ldo) {
  build_panel_portable(s, i0, i1, j0, j1, out, ldo);
}

template <typename T, typename Acc>
__attribute__((target("avx2,fma"))) void build_panel_avx2(const Source<T, Acc>& s, int64_t i0, int64_t i1,
                                                          int64_t j0, int64_t j1, T* out, int64_t ldo) {
  build_panel_portable(s, i0, i1, j0, j1, out, ldo);
}

template <typename T, typename Acc>
void contract_panel_default(const Contraction<T, Acc>& c, const T* g, int64_t ldg, int64_t j0, int64_t j1,
                            Acc* row) {
  contract_panel_portable(c, g, ldg, j0, j1, row);
}

template <typename T, typename Acc>
__attribute__((target("avx2,fma"))) void contract_panel_avx2(const Contraction<T, Acc>& c, const T* g, int64_t ldg,
                                                             int64_t j0, int64_t j1, Acc* row) {
  contract_panel_portable(c, g, ldg, j0, j1, row);
}

// ---- AVX-512 kernels (fp32 and bf16 storage, fp32 arithmetic) ----
//
// 16 columns per vector. The 16 keep bits of a vector are one half of a mask word (panels start at a
// multiple of 32 columns), so masking is a single zero-masking move. Column tails use masked loads and
// stores.

#define LOSA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define LOSA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

using losa::cpu::load16;
using losa::cpu::tail_mask;

LOSA_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
LOSA_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(u));
}

LOSA_AVX512 inline __mmask16 keep_bits(const uint32_t* row_words, int64_t col) {
  return __mmask16(row_words[col / kWordBits] >> (col % kWordBits));  // col % 32 is 0 or 16
}

// Rows [i, i + kRows) of columns [j, j + 64) of a panel: acc (+ W), masked and stored.
template <typename T, int kRows>
LOSA_AVX512 inline void store_block_avx512(const Source<T, float>& src, __m512 (&acc)[kRows][4],
                                           const __mmask16 (&m)[4], int64_t i, int64_t i0, int64_t j, T* out,
                                           int64_t ldo, int64_t j0) {
  for (int row = 0; row < kRows; ++row) {
    const uint32_t* mrow = src.words + (i + row) * src.words_per_row;
    T* orow = out + (i + row - i0) * ldo - j0;
    for (int v = 0; v < 4 && m[v] != 0; ++v) {
      const int64_t col = j + 16 * v;
      __m512 value = acc[row][v];
      if (src.w != nullptr) value = _mm512_add_ps(value, load16(src.w + (i + row) * src.k + col, m[v]));
      store16(orow + col, _mm512_maskz_mov_ps(keep_bits(mrow, col), value), m[v]);
    }
  }
}

// Rows [i, i + kRows), columns [j, j + 64): s·B[rows, :]·A[:, cols] (+ W), masked and stored. Four rows
// per block, so each load of A feeds sixteen FMAs.
template <typename T, int kRows>
LOSA_AVX512 inline void build_block_avx512(const Source<T, float>& src, int64_t i, int64_t i0, int64_t j,
                                           int64_t jend, T* out, int64_t ldo, int64_t j0) {
  __mmask16 m[4];
  __m512 acc[kRows][4];
  for (int v = 0; v < 4; ++v) m[v] = tail_mask(jend - j - 16 * v);
  for (int row = 0; row < kRows; ++row)
    for (int v = 0; v < 4; ++v) acc[row][v] = _mm512_setzero_ps();
  const float* a = src.a + j;
  const float* b = src.b + i * src.rank;
  for (int64_t c = 0; c < src.rank; ++c) {
    __m512 av[4];
    for (int v = 0; v < 4; ++v) av[v] = load16(a + c * src.k + 16 * v, m[v]);
    for (int row = 0; row < kRows; ++row) {
      const __m512 bc = _mm512_set1_ps(b[row * src.rank + c] * src.scale);
      for (int v = 0; v < 4; ++v) acc[row][v] = _mm512_fmadd_ps(bc, av[v], acc[row][v]);
    }
  }
  store_block_avx512<T, kRows>(src, acc, m, i, i0, j, out, ldo, j0);
}

// The same block for bf16 panels with vdpbf16ps: two ranks per instruction, from bf16 copies of A and
// s·B (the panel is rounded to bf16 anyway; bf16 autocast multiplies B·A in bf16 too).
template <int kRows>
LOSA_AVX512_BF16 inline void build_block_avx512_bf16(const Source<c10::BFloat16, float>& src, int64_t i,
                                                     int64_t i0, int64_t j, int64_t jend, c10::BFloat16* out,
                                                     int64_t ldo, int64_t j0) {
  __mmask16 m[4];
  __m512 acc[kRows][4];
  for (int v = 0; v < 4; ++v) m[v] = tail_mask(jend - j - 16 * v);
  for (int row = 0; row < kRows; ++row)
    for (int v = 0; v < 4; ++v) acc[row][v] = _mm512_setzero_ps();
  const uint32_t* a = src.a_pairs + j;
  const uint32_t* b = src.b_pairs + i * src.pairs;
  for (int64_t p = 0; p < src.pairs; ++p) {
    __m512bh av[4];
    for (int v = 0; v < 4; ++v) av[v] = (__m512bh)_mm512_maskz_loadu_epi32(m[v], a + p * src.k + 16 * v);
    for (int row = 0; row < kRows; ++row) {
      const __m512bh bc = (__m512bh)_mm512_set1_epi32(static_cast<int>(b[row * src.pairs + p]));
      for (int v = 0; v < 4; ++v) acc[row][v] = _mm512_dpbf16_ps(acc[row][v], av[v], bc);
    }
  }
  store_block_avx512<c10::BFloat16, kRows>(src, acc, m, i, i0, j, out, ldo, j0);
}

// Walk the columns in chunks whose slice of A (16 KiB) stays in L1 across the rows of the panel.
inline int64_t a_chunk(int64_t a_rows) {
  constexpr int64_t kStep = 64;
  return std::max<int64_t>(kStep, (4096 / std::max<int64_t>(a_rows, 1)) / kStep * kStep);
}

template <typename T>
LOSA_AVX512 void build_panel_avx512(const Source<T, float>& src, int64_t i0, int64_t i1, int64_t j0,
                                    int64_t j1, T* out, int64_t ldo) {
  Source<T, float> s = src;
  if (s.scale == 0.0f) s.rank = 0;  // no adapter: W only
  const int64_t chunk = a_chunk(s.rank);
  for (int64_t jc = j0; jc < j1; jc += chunk) {
    const int64_t jend = std::min(jc + chunk, j1);
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4)
      for (int64_t j = jc; j < jend; j += 64) build_block_avx512<T, 4>(s, i, i0, j, jend, out, ldo, j0);
    for (; i < i1; ++i)
      for (int64_t j = jc; j < jend; j += 64) build_block_avx512<T, 1>(s, i, i0, j, jend, out, ldo, j0);
  }
}

LOSA_AVX512_BF16 void build_panel_avx512_bf16(const Source<c10::BFloat16, float>& s, int64_t i0, int64_t i1,
                                              int64_t j0, int64_t j1, c10::BFloat16* out, int64_t ldo) {
  const int64_t chunk = a_chunk(2 * s.pairs);
  for (int64_t jc = j0; jc < j1; jc += chunk) {
    const int64_t jend = std::min(jc + chunk, j1);
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4)
      for (int64_t j = jc; j < jend; j += 64) build_block_avx512_bf16<4>(s, i, i0, j, jend, out, ldo, j0);
    for (; i < i1; ++i)
      for (int64_t j = jc; j < jend; j += 64) build_block_avx512_bf16<1>(s, i, i0, j, jend, out, ldo, j0);
  }
}

// out = s·G[i, :] ⊙ M[i, j0:j0+n], zero-padded to a multiple of 16.
template <typename T>
LOSA_AVX512 inline void widen_row_avx512(const Contraction<T, float>& c, const T* grow, int64_t i, int64_t j0,
                                         int64_t n, __m512 scale, float* out) {
  const uint32_t* mrow = c.words + i * c.words_per_row;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = _mm512_mul_ps(scale, load16(grow + j, m));
    _mm512_storeu_ps(out + j, _mm512_maskz_mov_ps(keep_bits(mrow, j0 + j) & m, v));
  }
}

// Rows [i, i + kRows) of the widened G panel (`rows`) into dA[:, j0:j0+n] and dB[i:i+kRows, :]. With two
// rows, each load and store of dA and each load of A serves both.
template <typename T, int kRows>
LOSA_AVX512 inline void contract_rows_avx512(const Contraction<T, float>& c, int64_t i, int64_t j0, int64_t n,
                                             float* const* rows) {
  for (int64_t q = 0; q < c.rank; ++q) {
    const float* arow = c.a + q * c.k + j0;
    float* darow = c.da + q * c.k + j0;
    __m512 bq[kRows], dot[kRows];
    for (int r = 0; r < kRows; ++r) {
      bq[r] = _mm512_set1_ps(c.b[(i + r) * c.rank + q]);
      dot[r] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      const __m512 av = _mm512_maskz_loadu_ps(m, arow + j);
      __m512 da = _mm512_maskz_loadu_ps(m, darow + j);
      for (int r = 0; r < kRows; ++r) {
        const __m512 g = _mm512_loadu_ps(rows[r] + j);  // zero past n
        dot[r] = _mm512_fmadd_ps(g, av, dot[r]);
        da = _mm512_fmadd_ps(bq[r], g, da);
      }
      _mm512_mask_storeu_ps(darow + j, m, da);
    }
    for (int r = 0; r < kRows; ++r) c.db[(i + r) * c.rank + q] += _mm512_reduce_add_ps(dot[r]);
  }
}

template <typename T>
LOSA_AVX512 void contract_panel_avx512(const Contraction<T, float>& c, const T* g, int64_t ldg, int64_t j0,
                                       int64_t j1, float* row) {
  const int64_t n = j1 - j0;
  const __m512 scale = _mm512_set1_ps(c.scale);
  const int64_t stride = (n + 15) / 16 * 16;
  float* const rows[4] = {row, row + stride, row + 2 * stride, row + 3 * stride};
  int64_t i = 0;
  for (; i + 4 <= c.d; i += 4) {
    for (int r = 0; r < 4; ++r) widen_row_avx512(c, g + (i + r) * ldg, i + r, j0, n, scale, rows[r]);
    contract_rows_avx512<T, 4>(c, i, j0, n, rows);
  }
  for (; i < c.d; ++i) {
    widen_row_avx512(c, g + i * ldg, i, j0, n, scale, rows[0]);
    contract_rows_avx512<T, 1>(c, i, j0, n, rows);
  }
}

// ---- run-time choice of instruction set ----

enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };  // the levels of isa_cap_level()

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

// The best the CPU supports, capped by LOSA_CPU_ISA (cpu_features.h) so tests can cover every variant on
// one machine.
Isa chosen_isa() {
  Isa best = Isa::kDefault;
  if (losa::cpu::has_feature("avx2") && losa::cpu::has_feature("fma")) best = Isa::kAvx2;
  if (losa::cpu::has_feature("avx512f") && losa::cpu::has_feature("avx512bw") &&
      losa::cpu::has_feature("avx512vl")) {
    best = losa::cpu::has_feature("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  }
  return std::min(best, static_cast<Isa>(losa::cpu::isa_cap_level()));  // the levels are Isa's order
}

template <typename T, typename Acc>
void build_panel(const Source<T, Acc>& s, int64_t i0, int64_t i1, int64_t j0, int64_t j1, T* out,
                 int64_t ldo, Isa isa) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (s.pairs > 0) return build_panel_avx512_bf16(s, i0, i1, j0, j1, out, ldo);
  }
  if constexpr (std::is_same_v<Acc, float>) {
    if (isa >= Isa::kAvx512) return build_panel_avx512<T>(s, i0, i1, j0, j1, out, ldo);
  }
  if (isa != Isa::kDefault) return build_panel_avx2(s, i0, i1, j0, j1, out, ldo);
  build_panel_default(s, i0, i1, j0, j1, out, ldo);
}

template <typename T, typename Acc>
void contract_panel(const Contraction<T, Acc>& c, const T* g, int64_t ldg, int64_t j0, int64_t j1, Acc* row,
                    Isa isa) {
  if constexpr (std::is_same_v<Acc, float>) {
    if (isa >= Isa::kAvx512) return contract_panel_avx512<T>(c, g, ldg, j0, j1, row);
  }
  if (isa != Isa::kDefault) return contract_panel_avx2(c, g, ldg, j0, j1, row);
  contract_panel_default(c, g, ldg, j0, j1, row);
}

// ---- checks and panel geometry ----

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_operands(const char* op, const at::Tensor& act, const std::optional<at::Tensor>& weight,
                    const at::Tensor& words, const at::Tensor& a, const at::Tensor& b) {
  LOSA_CHECK(act.dim() == 2, op, ": activations must be 2-D, got ", act.dim(), "-D");
  const auto dt = act.scalar_type();
  LOSA_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, op,
             ": activations must be float32, float64 or bfloat16, got ", dt);
  LOSA_CHECK(a.dim() == 2 && b.dim() == 2, op, ": lora_A and lora_B must be 2-D");
  const int64_t d = b.size(0), r = b.size(1), k = a.size(1);
  LOSA_CHECK(a.size(0) == r, op, ": rank mismatch, lora_A has ", a.size(0), " rows, lora_B ", r, " columns");
  LOSA_CHECK(a.scalar_type() == acc_type(dt) && b.scalar_type() == acc_type(dt), op, ": lora_A and lora_B must be ",
             acc_type(dt), " for ", dt, " activations");
  LOSA_CHECK(words.scalar_type() == at::kInt && words.dim() == 2 && words.size(0) == d &&
                  words.size(1) == (k + kWordBits - 1) / kWordBits,
             op, ": mask words must be int32 [", d, ", ", (k + kWordBits - 1) / kWordBits, "], got ",
             words.scalar_type(), " ", words.sizes());
  if (weight.has_value()) {
    LOSA_CHECK(weight->dim() == 2 && weight->size(0) == d && weight->size(1) == k, op, ": weight must be [", d,
               ", ", k, "], got ", weight->sizes());
    LOSA_CHECK(weight->scalar_type() == dt, op, ": weight dtype ", weight->scalar_type(),
               " differs from the activations' ", dt);
  }
  for (const at::Tensor* t : {&act, &words, &a, &b})
    LOSA_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU");
}

// Width of a panel: 64-256 rows or columns (a multiple of 32, so a column band starts on a mask word),
// fewer when a panel of `other` elements per row/column would pass kPanelBytes. Narrower panels make
// the GEMMs on them slower; wider ones fall out of the cache.
int64_t band(int64_t other, int64_t elem_size, int64_t total) {
  constexpr int64_t kMin = 64, kMax = 256;
  const int64_t fit = kPanelBytes / std::max<int64_t>(other * elem_size, 1) / kWordBits * kWordBits;
  // (at least one word: an empty dimension has no panels, and the panel count divides by the width)
  return std::max(kWordBits, std::min(std::clamp(fit, kMin, kMax), (total + kWordBits - 1) / kWordBits * kWordBits));
}

// The rank pairs of Source (bf16 words, two per rank pair), or two undefined tensors when the panel is
// not bf16, the CPU has no AVX512-BF16 or there is no adapter.
std::pair<at::Tensor, at::Tensor> rank_pairs(const at::Tensor& a, const at::Tensor& b, double scale,
                                             at::ScalarType panel, Isa isa) {
  if (panel != at::kBFloat16 || isa != Isa::kAvx512Bf16 || scale == 0.0 || a.size(0) == 0) return {};
  const int64_t pad = a.size(0) % 2;
  const auto a2 = at::constant_pad_nd(a, {0, 0, 0, pad}).to(at::kBFloat16);  // [r + pad, k]
  const auto b2 = at::constant_pad_nd(b * scale, {0, pad}).to(at::kBFloat16);  // [d, r + pad]
  const int64_t pairs = a2.size(0) / 2, k = a.size(1);
  // Interleave the two ranks of a pair along the last axis, then read each (lo, hi) bf16 pair as a word.
  // Flattened to [pairs, 2k] first: at k = 1 the transposed view already counts as contiguous, and its
  // size-1 axis keeps a stride of 1, which a dtype view rejects.
  return {a2.view({pairs, 2, k}).transpose(1, 2).contiguous().view({pairs, 2 * k}).view(at::kInt),
          b2.contiguous().view(at::kInt)};
}

template <typename T, typename Acc>
Source<T, Acc> source(const std::optional<at::Tensor>& weight, const at::Tensor& words, const at::Tensor& a,
                      const at::Tensor& b, double scale, const std::pair<at::Tensor, at::Tensor>& pairs) {
  Source<T, Acc> s{weight.has_value() ? weight->data_ptr<T>() : nullptr,
                   reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()),
                   a.data_ptr<Acc>(),
                   b.data_ptr<Acc>(),
                   a.size(1),
                   words.size(1),
                   a.size(0),
                   static_cast<Acc>(scale)};
  if (pairs.first.defined()) {
    s.a_pairs = reinterpret_cast<const uint32_t*>(pairs.first.data_ptr<int32_t>());
    s.b_pairs = reinterpret_cast<const uint32_t*>(pairs.second.data_ptr<int32_t>());
    s.pairs = pairs.first.size(0);
  }
  return s;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
}

// ---- the three ops ----

// Runs work(worker, claim) on up to one worker per thread; `claim()` hands out the panels [0, panels) one
// at a time and then -1. Claiming (instead of a fixed split) keeps a worker that the OS preempts (the
// machines are shared) or a slow panel from holding the others back. One panel, or one thread, runs on
// the calling thread without starting the thread team.
template <typename Work>
void parallel_panels(int64_t panels, const Work& work) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), panels));
  std::atomic<int64_t> next{0};
  const auto claim = [&] {
    const int64_t p = next.fetch_add(1);
    return p < panels ? p : int64_t{-1};
  };
  // The panels are scratch outside any autograd graph, and worker threads do not inherit the caller's
  // grad mode: every worker dispatches its ATen calls below autograd itself.
  const auto run = [&](int64_t worker) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    work(worker, claim);
  };
  if (workers == 1) return run(0);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) run(w);
  });
}

int64_t count(int64_t total, int64_t per) { return (total + per - 1) / per; }

at::Tensor masked_lora_mm(const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
                          const at::Tensor& words_in, const at::Tensor& a_in, const at::Tensor& b_in,
                          double scale) {
  check_operands("masked_lora_mm", x_in, weight_in, words_in, a_in, b_in);
  LOSA_CHECK(x_in.size(1) == a_in.size(1), "masked_lora_mm: x has ", x_in.size(1), " features, lora_A ",
             a_in.size(1));
  const auto x = x_in.contiguous(), words = words_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const auto weight = contiguous(weight_in);
  const int64_t tokens = x.size(0), d = b.size(0), k = a.size(1);
  auto y = at::empty({tokens, d}, x.options());
  const int64_t rows = band(k, x.element_size(), d);
  const Isa isa = chosen_isa();
  const auto pairs = rank_pairs(a, b, scale, x.scalar_type(), isa);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "masked_lora_mm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto src = source<scalar_t, acc_t>(weight, words, a, b, scale, pairs);
    parallel_panels(count(d, rows), [&](int64_t, const auto& claim) {
      auto panel = at::empty({rows, k}, x.options());
      for (int64_t p; (p = claim()) >= 0;) {
        const int64_t i0 = p * rows, n = std::min(rows, d - i0);
        build_panel(src, i0, i0 + n, 0, k, panel.data_ptr<scalar_t>(), k, isa);
        auto out = y.narrow(1, i0, n);
        at::mm_out(out, x, panel.narrow(0, 0, n).t());
      }
    });
  });
  return y;
}

at::Tensor masked_lora_mm_t(const at::Tensor& grad_in, const std::optional<at::Tensor>& weight_in,
                            const at::Tensor& words_in, const at::Tensor& a_in, const at::Tensor& b_in,
                            double scale) {
  check_operands("masked_lora_mm_t", grad_in, weight_in, words_in, a_in, b_in);
  LOSA_CHECK(grad_in.size(1) == b_in.size(0), "masked_lora_mm_t: grad has ", grad_in.size(1),
             " features, lora_B ", b_in.size(0), " rows");
  const auto grad = grad_in.contiguous(), words = words_in.contiguous(), a = a_in.contiguous(),
             b = b_in.contiguous();
  const auto weight = contiguous(weight_in);
  const int64_t tokens = grad.size(0), d = b.size(0), k = a.size(1);
  auto dx = at::empty({tokens, k}, grad.options());
  const int64_t cols = band(d, grad.element_size(), k);
  const Isa isa = chosen_isa();
  const auto pairs = rank_pairs(a, b, scale, grad.scalar_type(), isa);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "masked_lora_mm_t", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto src = source<scalar_t, acc_t>(weight, words, a, b, scale, pairs);
    parallel_panels(count(k, cols), [&](int64_t, const auto& claim) {
      auto panel = at::empty({d, cols}, grad.options());
      for (int64_t p; (p = claim()) >= 0;) {
        const int64_t j0 = p * cols, n = std::min(cols, k - j0);
        auto view = panel.narrow(1, 0, n);
        build_panel(src, 0, d, j0, j0 + n, panel.data_ptr<scalar_t>(), cols, isa);
        auto out = dx.narrow(1, j0, n);
        at::mm_out(out, grad, view);
      }
    });
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> masked_lora_grad_ab(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                       const at::Tensor& words_in, const at::Tensor& a_in,
                                                       const at::Tensor& b_in, double scale) {
  check_operands("masked_lora_grad_ab", grad_in, std::nullopt, words_in, a_in, b_in);
  LOSA_CHECK(x_in.scalar_type() == grad_in.scalar_type() && x_in.dim() == 2 && x_in.size(0) == grad_in.size(0) &&
                  x_in.size(1) == a_in.size(1) && grad_in.size(1) == b_in.size(0),
             "masked_lora_grad_ab: grad ", grad_in.sizes(), " and x ", x_in.sizes(), " do not match lora_B ",
             b_in.sizes(), " and lora_A ", a_in.sizes());
  const auto grad = grad_in.contiguous(), x = x_in.contiguous(), words = words_in.contiguous(),
             a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t d = b.size(0), r = b.size(1), k = a.size(1);
  const auto acc_opts = a.options();
  auto da = at::zeros({r, k}, acc_opts);
  const int64_t cols = band(d, x.element_size(), k);
  const int64_t panels = count(k, cols);
  // Panels are disjoint columns of dA; dB sums over every panel. The panels are split into fixed groups,
  // each with its own partial dB summed in group order at the end: which worker claims a group depends on
  // timing, the sum must not (a partial dB per worker made training differ from run to run). The groups
  // depend on the shape only, not on the thread count, so 1, 2 or N threads (and data-parallel processes
  // at one thread each) give the same bits; at most kDbGroups workers share the dB work.
  const int64_t groups = std::clamp<int64_t>(panels, 1, kDbGroups);
  const int64_t per_group = std::max<int64_t>(1, count(panels, groups));
  auto db_parts = at::zeros({groups, d, r}, acc_opts);
  const Isa isa = chosen_isa();
  const auto grad_t = grad.t();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "masked_lora_grad_ab", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    parallel_panels(count(panels, per_group), [&](int64_t, const auto& claim) {
      auto g = at::empty({d, cols}, grad.options());
      std::vector<acc_t> row(4 * (cols + 16));
      for (int64_t group; (group = claim()) >= 0;) {
        const Contraction<scalar_t, acc_t> c{reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()),
                                             a.data_ptr<acc_t>(),
                                             b.data_ptr<acc_t>(),
                                             da.data_ptr<acc_t>(),
                                             db_parts[group].data_ptr<acc_t>(),
                                             d,
                                             k,
                                             words.size(1),
                                             r,
                                             static_cast<acc_t>(scale)};
        for (int64_t p = group * per_group; p < std::min(panels, (group + 1) * per_group); ++p) {
          const int64_t j0 = p * cols, n = std::min(cols, k - j0);
          auto g_view = g.narrow(1, 0, n);
          at::mm_out(g_view, grad_t, x.narrow(1, j0, n));  // the G panel: dYᵀ·X[:, j0:j0+n]
          contract_panel(c, g.data_ptr<scalar_t>(), cols, j0, j0 + n, row.data(), isa);
        }
      }
    });
  });
  return {da, db_parts.sum(0)};
}

std::string masked_lora_isa() { return isa_name(chosen_isa()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def("masked_lora_mm(Tensor x, Tensor? weight, Tensor mask_words, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  m.def("masked_lora_mm_t(Tensor grad, Tensor? weight, Tensor mask_words, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  m.def("masked_lora_grad_ab(Tensor grad, Tensor x, Tensor mask_words, Tensor lora_A, Tensor lora_B, float scale) -> (Tensor, Tensor)");
  m.def("masked_lora_isa() -> str", &masked_lora_isa);
}

TORCH_LIBRARY_IMPL(losa, CPU, m) {
  m.impl("masked_lora_mm", &masked_lora_mm);
  m.impl("masked_lora_mm_t", &masked_lora_mm_t);
  m.impl("masked_lora_grad_ab", &masked_lora_grad_ab);
}
