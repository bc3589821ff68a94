// 16-lane AVX-512 helpers shared by the CPU kernels that compute in fp32 from fp32 / bf16 / fp16 storage
// (masked_lora.cpp, decode_attention.cpp): the lanes of a tail, and masked loads widened to fp32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include <immintrin.h>

namespace losa::cpu {

#define LOSA_VEC512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// Lanes [0, remaining) of a 16-lane step.
LOSA_VEC512 inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(remaining, 0)) - 1u);
}

LOSA_VEC512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// bf16 is the top half of an fp32: widen by a 16-bit shift.
LOSA_VEC512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

LOSA_VEC512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

#undef LOSA_VEC512

}  // namespace losa::cpu
