// Run-time CPU feature detection. Kernels compile several instruction-set variants (with
// __attribute__((target(...)))) and pick one at run time, so one binary serves every x86-64 CPU.
#pragma once

#include <cstdlib>
#include <map>
#include <string>

#include "check.h"

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
  f["amx_tile"] = __builtin_cpu_supports("amx-tile");  // the CPU's; the OS must also grant the tile state
  f["amx_bf16"] = __builtin_cpu_supports("amx-bf16");
#endif
  return f;
}

// True when every listed feature is present; used by kernels to choose a code path.
inline bool has_feature(const std::string& name) {
  static const auto features = detect_features();
  auto it = features.find(name);
  return it != features.end() && it->second;
}

// LOSA_CPU_ISA (default | avx2 | avx512 | avx512_bf16) caps the instruction set of the masked-LoRA and
// attention CPU kernels, so tests can cover each variant on one machine. As a level: 0 default, 1 avx2,
// 2 avx512, 3 avx512_bf16; 3 (no cap) when unset. The one parser of it.
inline int isa_cap_level() {
  const char* cap = std::getenv("LOSA_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return 3;
  const std::string c(cap);
  const char* names[] = {"default", "avx2", "avx512", "avx512_bf16"};
  for (int level = 0; level < 4; ++level)
    if (c == names[level]) return level;
  LOSA_CHECK(false, "LOSA_CPU_ISA must be default, avx2, avx512 or avx512_bf16, got '", c, "'");
  return 0;
}

// Whether an AVX-512 (F, BW, VL) variant may run: the CPU has it and LOSA_CPU_ISA allows it.
inline bool avx512_allowed() {
  return has_feature("avx512f") && has_feature("avx512bw") && has_feature("avx512vl") && isa_cap_level() >= 2;
}

}  // namespace losa::cpu
