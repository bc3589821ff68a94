// Packed values move between layouts as raw bits: every value dtype (bf16, fp16, fp32) is 16 or 32 bits,
// and its +0.0 is all zero bits, so no conversion code is needed per dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace losa::cpu {

// run(const Bits* src, Bits* dst) with Bits the unsigned integer as wide as src's elements (2 or 4 bytes;
// dst has the same element size).
template <typename F>
void with_value_bits(const at::Tensor& src, const at::Tensor& dst, F&& run) {
  if (src.element_size() == 2) {
    run(reinterpret_cast<const uint16_t*>(src.data_ptr()), reinterpret_cast<uint16_t*>(dst.data_ptr()));
  } else {
    run(reinterpret_cast<const uint32_t*>(src.data_ptr()), reinterpret_cast<uint32_t*>(dst.data_ptr()));
  }
}

}  // namespace losa::cpu
