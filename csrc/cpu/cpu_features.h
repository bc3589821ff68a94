// Run-time CPU feature detection. Kernels compile several instruction-set variants (with
// __attribute__((target(...)))) and pick one at run time, so one binary serves every x86-64 CPU.
#pragma once

#include <map>
#include <string>

namespace losa::cpu {

inline std::map<std::string, bool> detect_features() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["fma"] = __builtin_cpu_supports("fma");
  f["bmi2"] = __builtin_cpu_supports("bmi2");
  f["f16c"] = __builtin_cpu_supports("f16c");
  f["popcnt"] = __builtin_cpu_supports("popcnt");
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512bw"] = __builtin_cpu_supports("avx512bw");
  f["avx512vl"] = __builtin_cpu_supports("avx512vl");
  f["avx512vnni"] = __builtin_cpu_supports("avx512vnni");
  f["avx512bf16"] = __builtin_cpu_supports("avx512bf16");
  f["avx512vbmi2"] = __builtin_cpu_supports("avx512vbmi2");
  f["avx512vpopcntdq"] = __builtin_cpu_supports("avx512vpopcntdq");
#endif
  return f;
}

// True when every listed feature is present; used by kernels to choose a code path.
inline bool has_feature(const std::string& name) {
  static const auto features = detect_features();
  auto it = features.find(name);
  return it != features.end() && it->second;
}

}  // namespace losa::cpu
