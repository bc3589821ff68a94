// Packing of a boolean keep-mask into the losa-bitmask word layout and back.
//
// Layout (described once, in losa_deploy/kernels/formats/bitmask.py): per output row, one 32-bit word
// per 32 input columns; bit b of word w is set when column 32*w + b is kept. Bits past the row width
// are zero. Words are carried as int32 in memory (same bits as the on-disk uint32).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu/value_bits.h"

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

// A whole BitmaskWeight in two passes over the rows (PyTorch's boolean indexing and row sums took 0.76 s
// on a 7B-sized layer, this 0.06-0.08 s): the words and each row's count, then the kept values of
// ``source`` (the weight already in its packed dtype, moved as raw bits) at the positions ``keep`` marks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bitmask_encode(const at::Tensor& keep_in, const at::Tensor& source_in) {
  LOSA_CHECK(keep_in.dim() == 2 && keep_in.scalar_type() == at::kBool && keep_in.device().is_cpu(),
             "bitmask_encode: keep must be a 2-D bool CPU tensor");
  LOSA_CHECK(source_in.sizes() == keep_in.sizes() && source_in.device().is_cpu() &&
                 (source_in.element_size() == 2 || source_in.element_size() == 4),
             "bitmask_encode: source must be a 16- or 32-bit CPU tensor shaped like keep");
  const auto keep = keep_in.contiguous();
  const auto source = source_in.contiguous();
  const int64_t rows = keep.size(0), cols = keep.size(1);
  const auto words = pack_mask(keep);
  auto row_ptr = at::zeros({rows + 1}, keep.options().dtype(at::kLong));
  int64_t* ptr = row_ptr.data_ptr<int64_t>();
  const auto* wd = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const int64_t nwords = words.size(1);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t count = 0;
      for (int64_t w = 0; w < nwords; ++w) count += __builtin_popcount(wd[r * nwords + w]);
      ptr[r + 1] = count;
    }
  });
  for (int64_t r = 0; r < rows; ++r) ptr[r + 1] += ptr[r];
  auto values = at::empty({ptr[rows]}, source.options());
  const bool* kp = keep.data_ptr<bool>();
  auto run = [&](const auto* src, auto* dst) {
    using Bits = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      // Branch-free compaction into a row of scratch (every value is written, the cursor moves only past
      // kept ones: half the positions of a 50% mask would mispredict a branch), then one copy out.
      std::vector<Bits> row(cols + 1);
      for (int64_t r = begin; r < end; ++r) {
        int64_t at = 0;
        for (int64_t c = 0; c < cols; ++c) {
          row[at] = src[r * cols + c];
          at += kp[r * cols + c];
        }
        std::copy(row.begin(), row.begin() + at, dst + ptr[r]);
      }
    });
  };
  losa::cpu::with_value_bits(source, values, run);
  return {values, words, row_ptr};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor words, int cols) -> Tensor");
  m.def("bitmask_encode(Tensor keep, Tensor source) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) {
  m.impl("pack_mask", &pack_mask);
  m.impl("unpack_mask", &unpack_mask);
  m.impl("bitmask_encode", &bitmask_encode);
}
