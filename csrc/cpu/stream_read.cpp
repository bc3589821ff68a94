// A memory read-bandwidth probe: stream through a large buffer with wide loads on every thread and
// return a checksum (so the reads cannot be optimised away). The kernel benchmarks divide bytes moved by
// this reference, measured in the same run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>

#include "check.h"
#include "cpu/cpu_features.h"

namespace {

__attribute__((target("avx512f"))) uint64_t sum_lines_avx512(const uint8_t* p, int64_t lines) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 <= lines; i += 4) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + 64 * i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + 64 * i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + 64 * i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + 64 * i + 192));
  }
  for (; i < lines; ++i) a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + 64 * i));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}

uint64_t sum_lines_portable(const uint8_t* p, int64_t lines) {
  uint64_t s = 0;
  for (int64_t i = 0; i < lines * 8; ++i) {
    uint64_t word;
    std::memcpy(&word, p + 8 * i, 8);
    s += word;
  }
  return s;
}

at::Tensor stream_read(const at::Tensor& buffer) {
  LOSA_CHECK(buffer.device().is_cpu() && buffer.is_contiguous(), "stream_read: need a contiguous CPU tensor");
  const auto* p = static_cast<const uint8_t*>(buffer.data_ptr());
  LOSA_CHECK(reinterpret_cast<uintptr_t>(p) % 64 == 0, "stream_read: the buffer must be 64-byte aligned");
  const int64_t lines = static_cast<int64_t>(buffer.nbytes()) / 64;
  const bool avx512 = losa::cpu::has_feature("avx512f");
  const uint64_t total = at::parallel_reduce(
      0, lines, 1 << 14, uint64_t{0},
      [&](int64_t b, int64_t e, uint64_t acc) {
        const uint8_t* q = p + 64 * b;
        return acc + (avx512 ? sum_lines_avx512(q, e - b) : sum_lines_portable(q, e - b));
      },
      [](uint64_t a, uint64_t b) { return a + b; });
  return at::scalar_tensor(static_cast<int64_t>(total), at::kLong);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) { m.def("stream_read(Tensor buffer) -> Tensor"); }

TORCH_LIBRARY_IMPL(losa, CPU, m) { m.impl("stream_read", &stream_read); }
