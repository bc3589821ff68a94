// Packing of a boolean keep-mask into the losa-bitmask word layout and back.
//
// Layout (described once, in losa_deploy/kernels/formats/bitmask.py): per output row, one 32-bit word
// per 32 input columns; bit b of word w is set when column 32*w + b is kept. Bits past the row width
// are zero. Words are carried as int32 in memory (same bits as the on-disk uint32).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "check.h"

namespace {

at::Tensor pack_mask(const at::Tensor& mask) {
  LOSA_CHECK(mask.dim() == 2, "pack_mask: mask must be 2-D [out, in], got ", mask.dim(), "-D");
  LOSA_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be bool, got ", mask.scalar_type());
  LOSA_CHECK(mask.device().is_cpu(), "pack_mask: mask must be on the CPU");
  const auto m = mask.contiguous();
  const int64_t rows = m.size(0), cols = m.size(1), words = (cols + 31) / 32;
  auto out = at::empty({rows, words}, m.options().dtype(at::kInt));
  const bool* src = m.data_ptr<bool>();
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool* row = src + r * cols;
      for (int64_t w = 0; w < words; ++w) {
        const int64_t c0 = w * 32, c1 = std::min<int64_t>(c0 + 32, cols);
        uint32_t word = 0;
        for (int64_t c = c0; c < c1; ++c) word |= static_cast<uint32_t>(row[c]) << (c - c0);
        dst[r * words + w] = word;
      }
    }
  });
  return out;
}

at::Tensor unpack_mask(const at::Tensor& words, int64_t cols) {
  LOSA_CHECK(words.dim() == 2, "unpack_mask: words must be 2-D [out, ceil(in/32)]");
  LOSA_CHECK(words.scalar_type() == at::kInt, "unpack_mask: words must be int32, got ", words.scalar_type());
  LOSA_CHECK(words.device().is_cpu(), "unpack_mask: words must be on the CPU");
  LOSA_CHECK(cols >= 0 && (cols + 31) / 32 == words.size(1), "unpack_mask: ", words.size(1),
             " words per row cannot hold ", cols, " columns");
  const auto w = words.contiguous();
  const int64_t rows = w.size(0), nwords = w.size(1);
  auto out = at::empty({rows, cols}, w.options().dtype(at::kBool));
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = (src[r * nwords + c / 32] >> (c % 32)) & 1u;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor words, int cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) {
  m.impl("pack_mask", &pack_mask);
  m.impl("unpack_mask", &unpack_mask);
}
