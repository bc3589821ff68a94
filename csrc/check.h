// LOSA_CHECK(cond, parts...): TORCH_CHECK with its message built here, numbers through std::to_string.
//
// Why: on the lent H200 machine (torch 2.11.0+cu130, extension built there) a TORCH_CHECK whose message
// streamed an integer crashed the process (segfault while formatting) instead of raising, in the CPU ops
// and the CUDA op alike; messages made of strings raised as they should. So every part is turned into
// text without an ostream: strings as they are, numbers with std::to_string, dtypes by name, shapes as
// "[a, b]". The result is one std::string, which TORCH_CHECK passes through untouched.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <type_traits>

namespace losa::check_detail {

inline void append(std::string& out, const char* part) { out += part; }
inline void append(std::string& out, const std::string& part) { out += part; }
inline void append(std::string& out, c10::string_view part) { out.append(part.data(), part.size()); }
inline void append(std::string& out, c10::ScalarType part) { out += c10::toString(part); }
inline void append(std::string& out, const c10::Device& part) { out += part.str(); }
inline void append(std::string& out, c10::IntArrayRef part) {
  out += '[';
  for (size_t i = 0; i < part.size(); ++i) out += (i ? ", " : "") + std::to_string(part[i]);
  out += ']';
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& out, T part) {
  if constexpr (std::is_same_v<T, bool>) {
    out += part ? "true" : "false";
  } else if constexpr (std::is_same_v<T, char>) {
    out += part;
  } else {
    out += std::to_string(part);
  }
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

}  // namespace losa::check_detail

#define LOSA_CHECK(cond, ...) TORCH_CHECK(cond, ::losa::check_detail::message(__VA_ARGS__))
