// The CPU sparse-linear engine (see sparse_linear.h for the layout and the choice of paths).
//
// Four kernels, one per instruction set, behind one interface (a "kernel" struct with row<TB>() for a
// block of TB tokens and decompress() for the panel path):
//   Avx512Bf16  bf16 values x bf16 activations: vpexpandw + vdpbf16ps (Zen 4, Sapphire Rapids)
//   Avx512      any values: vpexpandw / vexpandps, widen to fp32, FMA against fp32 activations
//   Avx2        any values: 8 columns at a time, a 256-entry permutation table + vpermps, FMA
//   Portable    scalar: walk the set bits of each mask word
// Every kernel accumulates in fp32; products of bf16/fp16 values with bf16/fp16 activations are exact in
// fp32, so the ISAs differ only in summation order.

// GCC 12 flags the deliberately undefined pass-through operands inside its own AVX-512 intrinsics
// (_mm512_reduce_add_ps; GCC bug 105593, fixed in 13): a warning about the compiler's header, not this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu/sparse_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "check.h"
#include "cpu/cpu_features.h"

#define LOSA_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c")))
#define LOSA_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx2,fma,bmi,bmi2,popcnt,f16c")))
#define LOSA_AVX512BF16                                                                                   \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,avx2,fma,bmi,bmi2," \
                        "popcnt,f16c")))
#define LOSA_INLINE inline __attribute__((always_inline))

namespace losa::cpu {

// ---------------------------------------------------------------------------------------------------
// Instruction-set choice

namespace {

bool detect(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return true;
    case Isa::kAvx2:
      return has_feature("avx2") && has_feature("fma") && has_feature("bmi2") && has_feature("f16c") &&
             has_feature("popcnt");
    case Isa::kAvx512:
      return detect(Isa::kAvx2) && has_feature("avx512f") && has_feature("avx512bw") &&
             has_feature("avx512vl") && has_feature("avx512vbmi2");
    case Isa::kAvx512Bf16:
      return detect(Isa::kAvx512) && has_feature("avx512bf16");
    case Isa::kAmx:
      return detect(Isa::kAvx512Bf16) && amx_usable();
  }
  return false;
}

bool supports(Isa isa) {
  static const std::array<bool, 5> known = {detect(Isa::kPortable), detect(Isa::kAvx2), detect(Isa::kAvx512),
                                            detect(Isa::kAvx512Bf16), detect(Isa::kAmx)};
  return known[static_cast<int>(isa)];
}

constexpr std::array<Isa, 5> kAllIsas = {Isa::kAmx, Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2, Isa::kPortable};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return "portable";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAmx:
      return "amx";
  }
  return "?";
}

Isa resolve_isa(const std::string& requested) {
  const std::string name = requested.empty() ? "auto" : requested;
  if (name == "auto") {
    for (Isa isa : kAllIsas)
      if (supports(isa)) return isa;
  }
  for (Isa isa : kAllIsas) {
    if (name == isa_name(isa)) {
      LOSA_CHECK(supports(isa), "losa: this CPU does not support the '", name, "' kernels");
      return isa;
    }
  }
  LOSA_CHECK(false, "losa: unknown CPU kernel '", name, "' (auto, amx, avx512_bf16, avx512, avx2, portable)");
}

// ---------------------------------------------------------------------------------------------------
// Value types: raw storage and scalar conversion

namespace {

struct Bf16 {
  using raw = uint16_t;
  static float to_float(raw v) { return c10::BFloat16(v, c10::BFloat16::from_bits()); }
};
struct Fp16 {
  using raw = uint16_t;
  static float to_float(raw v) { return c10::Half(v, c10::Half::from_bits()); }
};
struct F32 {
  using raw = float;
  static float to_float(raw v) { return v; }
};

constexpr int kMaxTokenBlock = 8;

// Software prefetch for the row kernels: each row's value stream is prefetched kPrefetchBytes ahead, once
// per loop step, so the loads find their lines in L1. Ahead of a short row's end the prefetches run into
// the next row group, which the hardware prefetcher does not foresee: on the reference machine (two
// threads, one token, weights in DRAM) 4 KiB moved 14-22% more bytes per second than 1 KiB on
// 4096-column rows and the same on 11008-column rows; 2 KiB was in between, 8 KiB no better, and 3 KiB was
// within the noise at one token but 2-6% slower at two. Eight tokens are bound by the dot products, yet
// the prefetch made them 1.13-1.22x faster on 4096-column rows at 50%, 70% and 2:4 and 1.05-1.10x on
// 11008-column rows (1.01-1.04x at 90%; A/B, 7B shapes, 31 interleaved pairs).
//
// A one-token step (four chunks) of a row more than 40% dense consumes about two lines, so such rows
// prefetch two lines per step (`StreamHints::two_lines`). With one, a 2:4 row (exactly 128 bytes per
// step) had every other line prefetched, always the same ones, and ran slower than with two lines
// and slower than a random 50% row of the same bytes. A/B, one token, 2 threads, weights cold, 41-81
// interleaved pairs: 2:4 1.13-1.27x faster with two lines, random 50% 1.00-1.13x, 60% 0.98-1.06x.
#ifndef LOSA_PREFETCH_BYTES
#define LOSA_PREFETCH_BYTES 4096
#endif
constexpr int64_t kPrefetchBytes = LOSA_PREFETCH_BYTES;

// How a group of rows streams its values through the decode kernels (computed per row group).
struct StreamHints {
  int narrow = 0;      // chunks almost always hold at most 16 values (expand_epi16_narrow)
  int two_lines = 0;   // prefetch two lines per loop step instead of one
  int long_rows = 0;   // the activation row outgrows L1's share: near and far prefetch (kLongRowBytes)
};

// Rows whose activations take more than kLongRowBytes (11008 bf16 columns: 22 KiB of the 32 KiB L1) prefetch
// differently: lines prefetched 4 KiB ahead into L1 pushed the activations out, so such rows prefetch
// into L1 only 2 KiB ahead and, further ahead (16 KiB), into L2. A/B on 4096x11008 (41 interleaved pairs):
// one token 1.14-1.24x at 50%, 70% and 2:4 (0.98x at 90%), two tokens 1.08-1.27x, eight 1.03-1.14x. On
// 4096-column rows the same scheme lost 0-15%, so they keep the single L1 prefetch.
constexpr int64_t kLongRowBytes = 16 << 10;
constexpr int64_t kNearPrefetchBytes = 2048, kFarPrefetchBytes = 16384;

// Prefetch through inline asm that takes the address in a register. With the intrinsic, or with the line
// passed as a memory operand (a char lvalue, which may alias anything), GCC 12 stores the accumulator
// arrays back to the stack on every iteration. The branches sit in the asm for the reason given at
// expand_epi16_narrow; both are taken the same way for a whole row group.
LOSA_INLINE void prefetch_ahead(const void* p, int two_lines, int long_rows) {
  asm volatile(
      "testl %[long_rows], %[long_rows]\n\t"
      "jnz 3f\n\t"
      "prefetcht0 %c[ahead](%[p])\n\t"
      "testl %[two], %[two]\n\t"
      "jz 9f\n\t"
      "prefetcht0 %c[ahead]+64(%[p])\n\t"
      "jmp 9f\n"
      "3:\n\t"
      "prefetcht0 %c[near](%[p])\n\t"
      "prefetcht2 %c[far](%[p])\n\t"
      "testl %[two], %[two]\n\t"
      "jz 9f\n\t"
      "prefetcht0 %c[near]+64(%[p])\n\t"
      "prefetcht2 %c[far]+64(%[p])\n"
      "9:"
      :
      : [p] "r"(p), [ahead] "i"(kPrefetchBytes), [near] "i"(kNearPrefetchBytes), [far] "i"(kFarPrefetchBytes),
        [two] "r"(two_lines), [long_rows] "r"(long_rows)
      : "cc");
}

// ---------------------------------------------------------------------------------------------------
// Portable kernel

template <typename V>
struct Portable {
  using raw = typename V::raw;
  using xraw = float;
  static constexpr int row_block(int) { return 1; }

  template <int TB, int R>
  static void rows(const raw* const* vp, const uint32_t* mask, int64_t words, int fixed, const StreamHints&,
                   const float* x, int64_t ld, float* out) {
    for (int j = 0; j < R; ++j) row<TB>(vp[j], mask + j * words, words, fixed, x, ld, out + j * TB);
  }

  template <int TB>
  static void row(const raw* v, const uint32_t* mask, int64_t words, int /*fixed*/, const float* x, int64_t ld,
                  float* out) {
    float acc[TB] = {};
    for (int64_t w = 0; w < words; ++w) {
      const float* xc = x + 32 * w;
      for (uint32_t m = mask[w]; m; m &= m - 1) {
        const int bit = __builtin_ctz(m);
        const float value = V::to_float(*v++);
        for (int t = 0; t < TB; ++t) acc[t] += value * xc[t * ld + bit];
      }
    }
    for (int t = 0; t < TB; ++t) out[t] = acc[t];
  }

  static void decompress(const raw* v, const uint32_t* mask, int64_t words, int64_t cols, int /*fixed*/,
                         float* out) {
    std::fill(out, out + cols, 0.0f);
    for (int64_t w = 0; w < words; ++w)
      for (uint32_t m = mask[w]; m; m &= m - 1) out[32 * w + __builtin_ctz(m)] = V::to_float(*v++);
  }
};

// ---------------------------------------------------------------------------------------------------
// AVX2 kernel: no expand instruction, so 8 columns at a time through a permutation table.

struct Avx2Table {
  alignas(32) int32_t index[256][8];  // lane j of byte b takes packed element (rank of bit j in b)
  Avx2Table() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) index[b][j] = (b >> j) & 1 ? rank++ : 0;
    }
  }
};
const Avx2Table& avx2_table() {
  static const Avx2Table table;
  return table;
}

LOSA_AVX2 LOSA_INLINE __m256 avx2_load8(const uint16_t* p, Bf16) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
LOSA_AVX2 LOSA_INLINE __m256 avx2_load8(const uint16_t* p, Fp16) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
LOSA_AVX2 LOSA_INLINE __m256 avx2_load8(const float* p, F32) { return _mm256_loadu_ps(p); }

// The 8 columns of mask byte b as fp32, zero where the bit is clear; reads 8 values at v.
template <typename V>
LOSA_AVX2 LOSA_INLINE __m256 avx2_expand8(const typename V::raw* v, uint32_t b, const Avx2Table& table) {
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.index[b]));
  const __m256 lanes = _mm256_permutevar8x32_ps(avx2_load8(v, V{}), index);
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b), bits), bits);
  return _mm256_and_ps(lanes, _mm256_castsi256_ps(keep));
}

template <typename V>
struct Avx2 {
  using raw = typename V::raw;
  using xraw = float;
  static constexpr int row_block(int) { return 1; }

  template <int TB, int R>
  static void rows(const raw* const* vp, const uint32_t* mask, int64_t words, int fixed, const StreamHints&,
                   const float* x, int64_t ld, float* out) {
    for (int j = 0; j < R; ++j) row<TB>(vp[j], mask + j * words, words, fixed, x, ld, out + j * TB);
  }

  template <int TB>
  LOSA_AVX2 static void row(const raw* v, const uint32_t* mask, int64_t words, int /*fixed*/, const float* x,
                            int64_t ld, float* out) {
    const Avx2Table& table = avx2_table();
    __m256 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t m = mask[w];
      if (m == 0) continue;  // cheap here (no vector work is saved otherwise) and common at high sparsity
      for (int q = 0; q < 4; ++q) {
        const uint32_t b = (m >> (8 * q)) & 0xFFu;
        const __m256 e = avx2_expand8<V>(v, b, table);
        v += _mm_popcnt_u32(b);
        const float* xc = x + 32 * w + 8 * q;
        for (int t = 0; t < TB; ++t) acc[t] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xc + t * ld), acc[t]);
      }
    }
    for (int t = 0; t < TB; ++t) {
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
      const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
      out[t] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    }
  }

  LOSA_AVX2 static void decompress(const raw* v, const uint32_t* mask, int64_t words, int64_t cols,
                                   int /*fixed*/, float* out) {
    const Avx2Table& table = avx2_table();
    const int64_t full = cols / 8;
    for (int64_t g = 0; g < full; ++g) {
      const uint32_t b = (mask[g / 4] >> (8 * (g % 4))) & 0xFFu;
      _mm256_storeu_ps(out + 8 * g, avx2_expand8<V>(v, b, table));
      v += _mm_popcnt_u32(b);
    }
    for (int64_t c = 8 * full; c < cols; ++c)
      out[c] = (mask[c / 32] >> (c % 32)) & 1u ? V::to_float(*v++) : 0.0f;
  }
};

// ---------------------------------------------------------------------------------------------------
// AVX-512 kernels

// Expand 16-bit values packed at the start of src to the set positions of m, zeros elsewhere. Merge-masking
// into a freshly zeroed register: the zero-masking form has a false dependency on its destination on
// Zen 4 (llvm-project #206849), which would chain every expand in the loop.
LOSA_AVX512 LOSA_INLINE __m512i expand_words(__m512i src, uint32_t m) {
  __m512i dst = _mm512_setzero_si512();
  const __mmask32 k = _cvtu32_mask32(m);
  asm("vpexpandw %[src], %[dst]%{%[k]%}" : [dst] "+v"(dst) : [src] "v"(src), [k] "Yk"(k));
  return dst;
}

// The same, read from p with a 512-bit load.
LOSA_AVX512 LOSA_INLINE __m512i expand_epi16(const uint16_t* p, uint32_t m) {
  return expand_words(_mm512_loadu_si512(p), m);
}

// The same, where the chunk holds at most 16 values (almost always, in rows at most 35% dense; always in
// N:M rows with at most 16 values per chunk), from a 256-bit load. A 512-bit load at a packed value's
// (2-byte aligned) address almost always spans two cache lines and costs Zen 4 two load slots: 256-bit
// loads took the one-token loop from 3.8 to 3.3 cycles per chunk at 70% sparsity with the data in L2
// (an earlier micro-benchmark). A wider chunk takes a 512-bit load placed out of line (.pushsection), so
// the common path has no taken branch. In a stand-alone copy of the loop (one thread, 64 rows x 4096
// columns in L2, 31 repetitions) an in-line `jmp` over the wide load cost 3.68 cycles per chunk at 70%
// sparsity and 3.62 at 80%; out of line, 3.54 and 3.46. The stubs carry no symbol: a profiler credits
// their (rare) samples to the function placed before them.
//
// The branch and both loads sit inside asm. Written in C++, the branch made GCC keep the accumulators on
// the stack across the loop. The asm takes the address in a register and names no memory operand: with
// the values as a (char) memory operand GCC stored the accumulators to the stack after every dot product
// (one token: 1.01-1.02x at 50-70%, 1.05-1.11x at 90% without those stores, A/B). Nothing can write the
// values while it runs: the row kernels only read them, and they carry their own target attributes, so
// they are never inlined into a caller that writes (row_values' scratch copy). Denser rows, with no
// branch, use expand_epi16 above: its intrinsic load gives the same loop, with no stack traffic (objdump).
LOSA_AVX512 LOSA_INLINE __m512i expand_epi16_narrow(const uint16_t* p, uint32_t m, int count) {
  __m512i src;
  asm("cmpl $16, %[count]\n\t"
      "jg 3f\n\t"
      "vmovdqu16 (%[p]), %t[src]\n"  // a 256-bit load zeroes the upper half
      "2:\n\t"
      ".pushsection .text.unlikely.losa_wide_chunk,\"ax\",@progbits\n"
      "3:\n\t"
      "vmovdqu16 (%[p]), %[src]\n\t"
      "jmp 2b\n\t"
      ".popsection"
      : [src] "=v"(src)
      : [p] "r"(p), [count] "r"(count)
      : "cc");
  return expand_words(src, m);
}

LOSA_AVX512 LOSA_INLINE __m512 expand_ps(const float* p, uint32_t m16) {
  const __m512 src = _mm512_loadu_ps(p);
  __m512 dst = _mm512_setzero_ps();
  const __mmask16 k = _cvtu32_mask16(m16);
  asm("vexpandps %[src], %[dst]%{%[k]%}" : [dst] "+v"(dst) : [src] "v"(src), [k] "Yk"(k));
  return dst;
}

// A 32-column chunk as two fp32 vectors (columns 0-15, 16-31).
LOSA_AVX512 LOSA_INLINE void expand32(const uint16_t* v, uint32_t m, Bf16, __m512& lo, __m512& hi) {
  const __m512i e = expand_epi16(v, m);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e, 1)), 16));
}
LOSA_AVX512 LOSA_INLINE void expand32(const uint16_t* v, uint32_t m, Fp16, __m512& lo, __m512& hi) {
  const __m512i e = expand_epi16(v, m);
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(e));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(e, 1));
}
LOSA_AVX512 LOSA_INLINE void expand32(const float* v, uint32_t m, F32, __m512& lo, __m512& hi) {
  lo = expand_ps(v, m & 0xFFFFu);
  hi = expand_ps(v + _mm_popcnt_u32(m & 0xFFFFu), m >> 16);
}

// Register blocking for a block of TB tokens: R rows share every activation load (the activations of
// several tokens outgrow L1, so each load should feed several rows), and U chunks per loop iteration
// give enough independent accumulator chains to hide the dot-product latency. Two rows measured best
// for 2-8 tokens (three rows spill accumulators at 8 tokens; four were slower). One token is bound by
// memory, not by loads: there one row at a time (one value stream per thread, four chunks per
// iteration) moved 20-30% more bytes per second than two rows (weights cold, 2 threads, on huge pages).
constexpr int rows_for(int tokens) { return tokens == 1 ? 1 : 2; }
constexpr int unroll_for(int tokens, int rows) { return tokens * rows >= 4 ? 1 : 4 / (tokens * rows); }

// Value offsets of U consecutive chunks of each of R rows, computed before any load so the loads do not
// wait on a chain of popcounts. Full chunks of an N:M row hold `fixed` values.
template <int R, int U>
LOSA_AVX512 LOSA_INLINE void chunk_offsets(const uint32_t* mask, int64_t words, int64_t w, int fixed,
                                          int (&off)[R][U + 1]) {
  for (int j = 0; j < R; ++j) {
    off[j][0] = 0;
    for (int u = 0; u < U; ++u)
      off[j][u + 1] = off[j][u] + (fixed ? fixed : static_cast<int>(_mm_popcnt_u32(mask[j * words + w + u])));
  }
}

template <typename V>
struct Avx512 {
  using raw = typename V::raw;
  using xraw = float;
  static constexpr int row_block(int tokens) { return rows_for(tokens); }

  // Rows j < R start at v[j]; their masks are `words` apart. out[j * TB + t] = row j · token t.
  template <int TB, int R>
  LOSA_AVX512 static void rows(const raw* const* vp, const uint32_t* mask, int64_t words, int fixed,
                               const StreamHints& hints, const float* x, int64_t ld, float* out) {
    constexpr int U = unroll_for(TB, R);
    __m512 acc[U][R][TB];
    for (auto& a : acc)
      for (auto& b : a)
        for (auto& c : b) c = _mm512_setzero_ps();
    const raw* v[R];
    for (int j = 0; j < R; ++j) v[j] = vp[j];
    int64_t w = 0;
    // The last chunk (possibly partial) always goes through the counted loop below.
    for (; w + U < words; w += U) {
      int off[R][U + 1];
      chunk_offsets<R, U>(mask, words, w, fixed, off);
      for (int j = 0; j < R; ++j) prefetch_ahead(v[j] + off[j][U], hints.two_lines, hints.long_rows);
      for (int u = 0; u < U; ++u) {
        __m512 lo[R], hi[R];
        for (int j = 0; j < R; ++j) expand32(v[j] + off[j][u], mask[j * words + w + u], V{}, lo[j], hi[j]);
        for (int t = 0; t < TB; ++t) {
          const __m512 x0 = _mm512_loadu_ps(x + t * ld + 32 * (w + u));
          const __m512 x1 = _mm512_loadu_ps(x + t * ld + 32 * (w + u) + 16);
          for (int j = 0; j < R; ++j)
            acc[u][j][t] = _mm512_fmadd_ps(hi[j], x1, _mm512_fmadd_ps(lo[j], x0, acc[u][j][t]));
        }
      }
      for (int j = 0; j < R; ++j) v[j] += off[j][U];
    }
    for (; w < words; ++w) {
      __m512 lo[R], hi[R];
      for (int j = 0; j < R; ++j) {
        const uint32_t m = mask[j * words + w];
        expand32(v[j], m, V{}, lo[j], hi[j]);
        v[j] += _mm_popcnt_u32(m);
      }
      for (int t = 0; t < TB; ++t) {
        const __m512 x0 = _mm512_loadu_ps(x + t * ld + 32 * w);
        const __m512 x1 = _mm512_loadu_ps(x + t * ld + 32 * w + 16);
        for (int j = 0; j < R; ++j)
          acc[0][j][t] = _mm512_fmadd_ps(hi[j], x1, _mm512_fmadd_ps(lo[j], x0, acc[0][j][t]));
      }
    }
    for (int j = 0; j < R; ++j)
      for (int t = 0; t < TB; ++t) {
        __m512 s = acc[0][j][t];
        for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][j][t]);
        out[j * TB + t] = _mm512_reduce_add_ps(s);
      }
  }

  LOSA_AVX512 static void decompress(const raw* v, const uint32_t* mask, int64_t words, int64_t cols,
                                     int /*fixed*/, float* out) {
    for (int64_t w = 0; w < words; ++w) {
      __m512 lo, hi;
      expand32(v, mask[w], V{}, lo, hi);
      v += _mm_popcnt_u32(mask[w]);
      const int64_t n = std::min<int64_t>(32, cols - 32 * w);
      if (n == 32) {
        _mm512_storeu_ps(out + 32 * w, lo);
        _mm512_storeu_ps(out + 32 * w + 16, hi);
      } else {
        const uint32_t keep = (1u << n) - 1;
        _mm512_mask_storeu_ps(out + 32 * w, _cvtu32_mask16(keep & 0xFFFFu), lo);
        _mm512_mask_storeu_ps(out + 32 * w + 16, _cvtu32_mask16(keep >> 16), hi);
      }
    }
  }
};

struct Avx512Bf16 {
  using raw = uint16_t;
  using xraw = uint16_t;  // bf16 activations
  static constexpr int row_block(int tokens) { return rows_for(tokens); }

  template <int TB, int R>
  LOSA_AVX512BF16 static void rows(const raw* const* vp, const uint32_t* mask, int64_t words, int fixed,
                                   const StreamHints& hints, const uint16_t* x, int64_t ld, float* out) {
    // The narrow loads are for decode only: more tokens are bound by the dot products, not by loads.
    if constexpr (TB <= 2)
      if (hints.narrow) return rows_with<TB, R, true>(vp, mask, words, fixed, hints, x, ld, out);
    rows_with<TB, R, false>(vp, mask, words, fixed, hints, x, ld, out);
  }

  template <int TB, int R, bool kNarrow>
  LOSA_AVX512BF16 static void rows_with(const raw* const* vp, const uint32_t* mask, int64_t words, int fixed,
                                        const StreamHints& hints, const uint16_t* x, int64_t ld, float* out) {
    constexpr int U = unroll_for(TB, R);
    __m512 acc[U][R][TB];
    for (auto& a : acc)
      for (auto& b : a)
        for (auto& c : b) c = _mm512_setzero_ps();
    const raw* v[R];
    for (int j = 0; j < R; ++j) v[j] = vp[j];
    int64_t w = 0;
    for (; w + U < words; w += U) {
      int off[R][U + 1];
      chunk_offsets<R, U>(mask, words, w, fixed, off);
      for (int j = 0; j < R; ++j) prefetch_ahead(v[j] + off[j][U], hints.two_lines, hints.long_rows);
      for (int u = 0; u < U; ++u) {
        __m512i e[R];
        for (int j = 0; j < R; ++j) {
          const uint16_t* p = v[j] + off[j][u];
          const uint32_t m = mask[j * words + w + u];
          if constexpr (kNarrow)
            e[j] = expand_epi16_narrow(p, m, off[j][u + 1] - off[j][u]);
          else
            e[j] = expand_epi16(p, m);
        }
        for (int t = 0; t < TB; ++t) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * ld + 32 * (w + u));
          for (int j = 0; j < R; ++j) acc[u][j][t] = _mm512_dpbf16_ps(acc[u][j][t], (__m512bh)e[j], xv);
        }
      }
      for (int j = 0; j < R; ++j) v[j] += off[j][U];
    }
    for (; w < words; ++w) {
      __m512i e[R];
      for (int j = 0; j < R; ++j) {
        const uint32_t m = mask[j * words + w];
        e[j] = expand_epi16(v[j], m);
        v[j] += _mm_popcnt_u32(m);
      }
      for (int t = 0; t < TB; ++t) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * ld + 32 * w);
        for (int j = 0; j < R; ++j) acc[0][j][t] = _mm512_dpbf16_ps(acc[0][j][t], (__m512bh)e[j], xv);
      }
    }
    for (int j = 0; j < R; ++j)
      for (int t = 0; t < TB; ++t) {
        __m512 s = acc[0][j][t];
        for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][j][t]);
        out[j * TB + t] = _mm512_reduce_add_ps(s);
      }
  }

  LOSA_AVX512BF16 static void decompress(const raw* v, const uint32_t* mask, int64_t words, int64_t cols,
                                         int /*fixed*/, uint16_t* out) {
    for (int64_t w = 0; w < words; ++w) {
      const __m512i e = expand_epi16(v, mask[w]);
      v += _mm_popcnt_u32(mask[w]);
      const int64_t n = std::min<int64_t>(32, cols - 32 * w);
      const uint32_t keep = n >= 32 ? ~0u : (1u << n) - 1;
      _mm512_mask_storeu_epi16(out + 32 * w, _cvtu32_mask32(keep), e);
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Row loop shared by every kernel

// Rows whose wide loads could run past the end of the value buffer are copied into a padded scratch
// row first; everything else reads the packed values in place.
template <typename raw>
const raw* row_values(const SparseRows& w, int64_t r, std::vector<raw>& scratch) {
  constexpr int64_t kPad = 64 / sizeof(raw);
  const raw* values = static_cast<const raw*>(w.values);
  const int64_t begin = w.row_begin(r), end = w.row_end(r);
  if (end + kPad <= w.num_values) return values + begin;
  scratch.assign(end - begin + kPad, raw{0});
  std::copy(values + begin, values + end, scratch.begin());
  return scratch.data();
}

struct Activations {
  const void* data;
  int64_t tokens, ld;  // ld >= 32 * words; columns past cols are zero
};

// Whether any of `rows` rows from r holds more than `percent`% of its columns.
bool rows_denser_than(const SparseRows& w, int64_t r, int rows, int percent) {
  const int fixed = w.chunk_values(r);
  if (fixed) return fixed * 100 > 32 * percent;
  for (int j = 0; j < rows; ++j)
    if ((w.row_end(r + j) - w.row_begin(r + j)) * 100 > w.cols * percent) return true;
  return false;
}

// narrow: whether the AVX-512 bf16 kernel loads values 256 bits wide (expand_epi16_narrow): for N:M rows
// with at most 16 values per chunk (the wide branch is never taken) and for bitmask rows at most 35%
// dense (a 32-column chunk then holds more than 16 values with probability about 2%, 0.3% at 30%).
// Measured A/B (one token, 2 threads, weights cold, 7B shapes): 1.01-1.12x at 30% density, 1.12-1.15x at
// 20%, 1.20-1.23x at 10%, 0.97-1.0x at 40% (mispredicted branches eat the gain); neutral on 2:4
// (benchmarks/RESULTS.md, CPU sparse kernels).
// two_lines: one token (four chunks per step), and rows more than 40% dense (see kPrefetchBytes) or long
// rows (4096x11008, 65-75% sparse: 1.04-1.07x, 81 interleaved pairs; 80-90% neutral).
// long_rows: see kLongRowBytes.
StreamHints stream_hints(const SparseRows& w, int64_t r, int rows, int tokens, int64_t x_row_bytes) {
  StreamHints hints;
  const int fixed = w.chunk_values(r);
  if (fixed)
    hints.narrow = fixed <= 16;
  else
    hints.narrow = !rows_denser_than(w, r, rows, 35);
  hints.long_rows = x_row_bytes > kLongRowBytes;
  hints.two_lines = tokens == 1 && (hints.long_rows || rows_denser_than(w, r, rows, 40));
  return hints;
}

// R rows starting at r, tokens [t0, t0 + TB).
template <class K, int R, int TB>
void row_group(const SparseRows& w, const Activations& a, int64_t r, int64_t t0,
               std::vector<typename K::raw> (&scratch)[2], float* y) {
  using raw = typename K::raw;
  const raw* v[R];
  for (int j = 0; j < R; ++j) v[j] = row_values(w, r + j, scratch[j]);
  float out[R * TB];
  const StreamHints hints = stream_hints(w, r, R, TB, a.ld * int64_t{sizeof(typename K::xraw)});
  K::template rows<TB, R>(v, w.mask + r * w.words, w.words, w.chunk_values(r), hints,
                          static_cast<const typename K::xraw*>(a.data) + t0 * a.ld, a.ld, out);
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < TB; ++t) y[(t0 + t) * w.rows + r + j] = out[j * TB + t];
}

template <class K, int R>
using GroupFn = void (*)(const SparseRows&, const Activations&, int64_t, int64_t,
                         std::vector<typename K::raw> (&)[2], float*);

template <class K, int R, std::size_t... I>
constexpr std::array<GroupFn<K, R>, sizeof...(I)> group_table(std::index_sequence<I...>) {
  return {row_group<K, R, static_cast<int>(I) + 1>...};
}

// Rows [r0, r1) for every token. Rows go in groups of K::row_block(first token block) (single rows where
// a group would cross the range end or an N:M row-block boundary); each group runs all token blocks of up
// to 8 tokens while its values are still in L1, so the weight streams from memory once.
template <class K>
void run_rows(const SparseRows& w, const Activations& a, int64_t r0, int64_t r1, float* y) {
  static constexpr auto kOne = group_table<K, 1>(std::make_index_sequence<kMaxTokenBlock>{});
  static constexpr auto kTwo = group_table<K, 2>(std::make_index_sequence<kMaxTokenBlock>{});
  std::vector<typename K::raw> scratch[2];
  const int group = K::row_block(static_cast<int>(std::min<int64_t>(kMaxTokenBlock, a.tokens)));
  for (int64_t r = r0; r < r1;) {
    const bool whole = r + group <= r1 && (w.row_ptr || r / w.rows_per_block == (r + group - 1) / w.rows_per_block);
    const int rows = whole ? group : 1;
    for (int64_t t0 = 0; t0 < a.tokens; t0 += kMaxTokenBlock) {
      const int tb = static_cast<int>(std::min<int64_t>(kMaxTokenBlock, a.tokens - t0));
      (rows == 2 ? kTwo : kOne)[tb - 1](w, a, r, t0, scratch, y);
    }
    r += rows;
  }
}

template <class K>
void decompress_rows(const SparseRows& w, int64_t r0, int64_t r1, typename K::xraw* panel) {
  std::vector<typename K::raw> scratch;
  for (int64_t r = r0; r < r1; ++r)
    K::decompress(row_values(w, r, scratch), w.mask + r * w.words, w.words, w.cols, w.chunk_values(r),
                  panel + (r - r0) * w.cols);
}

// ---------------------------------------------------------------------------------------------------
// Driver

// Runs fn(r0, r1) over [0, rows) in blocks that the threads take in turn as they finish. On a shared VM
// the cores do not run at the same speed from one call to the next (one core's neighbour is busy, the
// other's is not): with one fixed half per thread the slower one set the time. A/B (one token, 7B
// shapes, 2 threads, weights cold, 41 interleaved pairs): 1.03-1.17x faster at 70% while the machine was
// noisy, blocks of 64 to 256 rows alike; 0.96-1.01x (neutral) while it was quiet.
// The blocks shrink as the rows run out ("guided": a claim takes the remaining rows / (2 x threads),
// rounded up to 16, at least 16), so the threads also finish together: at the end one waits for at most
// a small block instead of one eighth of its share. Stand-alone copy of the one-token loop, 2 threads,
// weights cold, 31-61 interleaved pairs: 4096x4096 and 4096x11008 at 70% 1.04-1.07x, 11008x4096 and 2:4
// neutral.
// A nested call (inside another parallel region) runs every block on the calling thread.
template <class Fn>
void parallel_row_blocks(int64_t rows, const Fn& fn) {
  const int threads = at::get_num_threads();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t r0 = next.load(std::memory_order_relaxed);
    while (r0 < rows) {
      const int64_t block = std::max<int64_t>(16, ((rows - r0) / (2 * threads) + 15) / 16 * 16);
      if (next.compare_exchange_weak(r0, r0 + block, std::memory_order_relaxed)) {
        fn(r0, std::min(rows, r0 + block));
        r0 = next.load(std::memory_order_relaxed);
      }  // else r0 now holds the current value: try again from there
    }
  });
}

template <class K>
at::Tensor run(const SparseRows& w, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
               at::ScalarType xdtype, int64_t panel_tokens) {
  const int64_t tokens = x2.size(0);
  auto y = at::empty({tokens, w.rows}, x2.options().dtype(at::kFloat));
  if (tokens == 0 || w.rows == 0) return y;
  if (tokens < panel_tokens) {
    // Activations in the kernel's dtype, rows padded with zeros to whole 32-column chunks.
    const int64_t ld = 32 * w.words;
    at::Tensor xk = x2;
    if (x2.scalar_type() != xdtype || !x2.is_contiguous() || ld != w.cols) {
      xk = at::zeros({tokens, ld}, x2.options().dtype(xdtype));
      xk.narrow(1, 0, w.cols).copy_(x2);
    }
    const Activations a{xk.data_ptr(), tokens, ld};
    float* out = y.data_ptr<float>();
    parallel_row_blocks(w.rows, [&](int64_t r0, int64_t r1) { run_rows<K>(w, a, r0, r1, out); });
    if (bias) y.add_(bias->to(at::kFloat));
    return y;
  }
  // Panel path: about 2 MiB of dense rows at a time (at least 256 rows: narrower GEMMs lose more than the
  // cache saves; measured 0.65x -> 0.99x of dense at 4096x11008, 32 tokens). The bias goes into the GEMM
  // (addmm), so a bf16 GEMM rounds its output once, not before the bias is added.
  const at::Tensor xk = x2.to(xdtype).contiguous();
  const std::optional<at::Tensor> bk = bias ? std::optional<at::Tensor>(bias->to(xdtype)) : std::nullopt;
  const int64_t bytes_per_row = std::max<int64_t>(1, w.cols) * at::elementSize(xdtype);
  const int64_t panel_rows = std::min<int64_t>(std::max<int64_t>((int64_t{2} << 20) / bytes_per_row / 16 * 16, 256), w.rows);
  auto panel = at::empty({panel_rows, w.cols}, x2.options().dtype(xdtype));
  auto* panel_ptr = static_cast<typename K::xraw*>(panel.data_ptr());
  for (int64_t r0 = 0; r0 < w.rows; r0 += panel_rows) {
    const int64_t n = std::min(panel_rows, w.rows - r0);
    at::parallel_for(r0, r0 + n, 8, [&](int64_t b, int64_t e) {
      decompress_rows<K>(w, b, e, panel_ptr + (b - r0) * w.cols);
    });
    const at::Tensor wt = panel.narrow(0, 0, n).t();
    y.narrow(1, r0, n).copy_(bk ? at::addmm(bk->narrow(0, r0, n), xk, wt) : at::mm(xk, wt));
  }
  return y;
}

template <template <typename> class K>
at::Tensor run_fp32(const SparseRows& w, const at::Tensor& x2, const std::optional<at::Tensor>& bias,
                    int64_t panel_tokens) {
  switch (w.dtype) {
    case at::kBFloat16:
      return run<K<Bf16>>(w, x2, bias, at::kFloat, panel_tokens);
    case at::kHalf:
      return run<K<Fp16>>(w, x2, bias, at::kFloat, panel_tokens);
    default:
      return run<K<F32>>(w, x2, bias, at::kFloat, panel_tokens);
  }
}

}  // namespace

at::Tensor sparse_to_dense(const SparseRows& w) {
  LOSA_CHECK(w.cols >= 0 && w.rows >= 0, "sparse_to_dense: bad shape");
  auto dense = at::empty({w.rows, w.cols}, at::TensorOptions().dtype(at::kFloat));
  float* out = dense.data_ptr<float>();
  const auto fill = [&](auto kernel) {
    using K = decltype(kernel);
    at::parallel_for(0, w.rows, 16, [&](int64_t r0, int64_t r1) { decompress_rows<K>(w, r0, r1, out + r0 * w.cols); });
  };
  const auto by_isa = [&](auto value_type) {
    using V = decltype(value_type);
    if (supports(Isa::kAvx512))
      fill(Avx512<V>{});
    else if (supports(Isa::kAvx2))
      fill(Avx2<V>{});
    else
      fill(Portable<V>{});
  };
  if (w.dtype == at::kBFloat16)
    by_isa(Bf16{});
  else if (w.dtype == at::kHalf)
    by_isa(Fp16{});
  else
    by_isa(F32{});
  return dense;
}

std::pair<at::Tensor, at::Tensor> sparse_linear_backward(const at::Tensor& dense_weight, const at::Tensor& grad_y,
                                                         at::ScalarType x_dtype, bool need_x,
                                                         std::optional<at::ScalarType> bias_dtype) {
  const at::Tensor grad = grad_y.reshape({-1, grad_y.size(-1)}).to(at::kFloat);
  at::Tensor grad_x, grad_bias;
  if (need_x) {
    auto shape = grad_y.sizes().vec();
    shape.back() = dense_weight.size(1);
    grad_x = grad.mm(dense_weight).to(x_dtype).view(shape);
  }
  if (bias_dtype) grad_bias = grad.sum(0).to(*bias_dtype);
  return {grad_x, grad_bias};
}

void check_values(const at::Tensor& values, const char* op) {
  LOSA_CHECK(values.device().is_cpu(), op, ": values must be on the CPU, got ", values.device());
  LOSA_CHECK(values.dim() == 1, op, ": values must be 1-D, got ", values.dim(), "-D");
  LOSA_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  const auto dt = values.scalar_type();
  LOSA_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, op,
             ": values must be bfloat16, float16 or float32, got ", dt);
}

void check_mask(const at::Tensor& mask, int64_t cols, const char* op) {
  LOSA_CHECK(mask.device().is_cpu(), op, ": mask must be on the CPU, got ", mask.device());
  LOSA_CHECK(mask.scalar_type() == at::kInt, op, ": mask words must be int32, got ", mask.scalar_type());
  LOSA_CHECK(mask.dim() == 2 && mask.is_contiguous(), op, ": mask must be a contiguous 2-D [out, words]");
  LOSA_CHECK(cols >= 0 && mask.size(1) == (cols + 31) / 32, op, ": mask has ", mask.size(1),
             " words per row, ", cols, " input features need ", (cols + 31) / 32);
  // A bit past the last column would make every kernel read x (and write a decompressed row) out of
  // bounds. Only a ragged last word can hold one, so this reads one word per row, and only then.
  const int64_t rows = mask.size(0), words = mask.size(1);
  if (cols % 32 != 0 && words > 0) {
    const uint32_t beyond = ~((uint32_t{1} << (cols % 32)) - 1);
    const auto* bits = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
    for (int64_t r = 0; r < rows; ++r)
      LOSA_CHECK((bits[r * words + words - 1] & beyond) == 0, op, ": row ", r, " keeps a column past the ", cols,
                 " input features");
  }
}

at::Tensor sparse_linear_cpu(const SparseRows& w, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                             const std::string& isa_request, int64_t panel_tokens, const char* op) {
  LOSA_CHECK(x.device().is_cpu(), op, ": x must be on the CPU, got ", x.device());
  const auto xdt = x.scalar_type();
  LOSA_CHECK(xdt == at::kBFloat16 || xdt == at::kHalf || xdt == at::kFloat, op,
             ": x must be bfloat16, float16 or float32, got ", xdt);
  LOSA_CHECK(x.dim() >= 1 && x.size(-1) == w.cols, op, ": x has ", x.dim() ? x.size(-1) : 0,
             " features, the weight has ", w.cols, " input features");
  if (bias) {
    LOSA_CHECK(bias->device().is_cpu(), op, ": bias must be on the CPU, got ", bias->device());
    LOSA_CHECK(bias->dim() == 1 && bias->size(0) == w.rows, op, ": bias must be [", w.rows, "], got ",
               bias->sizes());
    LOSA_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point");
  }
  const Isa isa = resolve_isa(isa_request);
  const at::Tensor x2 = x.reshape({-1, w.cols});
  const bool bf16 = xdt == at::kBFloat16 && w.dtype == at::kBFloat16;
  // The tiles take bf16 x bf16 calls from kAmxMinTokens on, so for those the panel path runs only when
  // panel_tokens asks for it; every other call of the amx backend is an avx512_bf16 call, threshold included.
  const bool tiles = isa == Isa::kAmx && bf16;
  if (panel_tokens <= 0) panel_tokens = tiles ? std::numeric_limits<int64_t>::max() : kDefaultPanelTokens;
  const Isa kernels = isa == Isa::kAmx ? Isa::kAvx512Bf16 : isa;
  const int64_t tokens = x2.size(0);

  at::Tensor y;
  if (tiles && tokens >= kAmxMinTokens && tokens < panel_tokens && w.rows > 0) {
    y = amx_sparse_linear(w, x2, bias);
  } else if (kernels == Isa::kAvx512Bf16 && bf16)
    y = run<Avx512Bf16>(w, x2, bias, at::kBFloat16, panel_tokens);
  else if (kernels == Isa::kAvx512 || kernels == Isa::kAvx512Bf16)
    y = run_fp32<Avx512>(w, x2, bias, panel_tokens);
  else if (kernels == Isa::kAvx2)
    y = run_fp32<Avx2>(w, x2, bias, panel_tokens);
  else
    y = run_fp32<Portable>(w, x2, bias, panel_tokens);

  auto out_shape = x.sizes().vec();
  out_shape.back() = w.rows;
  return y.to(xdt).view(out_shape);
}

}  // namespace losa::cpu
