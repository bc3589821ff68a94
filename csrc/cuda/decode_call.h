// What the CUDA decode ops (bitmask_linear_cuda.cpp, delta_linear_cuda.cpp) share around their kernels:
// x as contiguous [tokens, in], y [tokens, rows] in x's dtype, the values at a 16-byte aligned base (the
// kernels' vector loads), the bias contiguous in x's dtype, and where a launch's token range starts; and
// the reading of their kernel-config strings ("groups:16:2", "8:2:1").
#pragma once

#include <ATen/ATen.h>

#include <cctype>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace losa::cuda {

// The parts of `text` between colons ("a::b" -> "a", "", "b").
inline std::vector<std::string> split_colons(const std::string& text) {
  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    const size_t colon = text.find(':', start);
    parts.push_back(text.substr(start, colon == std::string::npos ? std::string::npos : colon - start));
    if (colon == std::string::npos) return parts;
    start = colon + 1;
  }
}

// A whole decimal number of 1-4 digits (nothing else: no sign, no space) within [lo, hi].
inline bool parse_int(const std::string& text, int lo, int hi, int& out) {
  if (text.empty() || text.size() > 4) return false;
  for (const char ch : text) {
    if (!std::isdigit(static_cast<unsigned char>(ch))) return false;
  }
  const int v = std::stoi(text);
  if (v < lo || v > hi) return false;
  out = v;
  return true;
}

struct DecodeCall {
  at::Tensor x2, y, values;
  std::optional<at::Tensor> bias;
  int64_t tokens = 0, in_features = 0, rows = 0;

  const void* x_at(int64_t token) const {
    return static_cast<const char*>(x2.data_ptr()) + token * in_features * x2.element_size();
  }
  void* y_at(int64_t token) const { return static_cast<char*>(y.data_ptr()) + token * rows * y.element_size(); }
  const void* bias_ptr() const { return bias ? bias->data_ptr() : nullptr; }
  // y in x's shape with the last dimension `rows`.
  at::Tensor result(const at::Tensor& x) const {
    auto shape = x.sizes().vec();
    shape.back() = rows;
    return y.view(shape);
  }
};

inline DecodeCall decode_call(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                              int64_t in_features, int64_t rows) {
  DecodeCall c;
  c.x2 = x.reshape({-1, in_features}).contiguous();
  c.tokens = c.x2.size(0);
  c.in_features = in_features;
  c.rows = rows;
  c.y = at::empty({c.tokens, rows}, x.options());
  // fresh allocations are aligned (the caching allocator aligns to 512 B); a view into another tensor may not be
  c.values = reinterpret_cast<uintptr_t>(values.data_ptr()) % 16 == 0 ? values : values.clone();
  if (bias) c.bias = bias->to(x.scalar_type()).contiguous();
  return c;
}

}  // namespace losa::cuda
