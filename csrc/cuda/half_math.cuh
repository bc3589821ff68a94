// Device helpers shared by the CUDA decode kernels: 16-bit <-> fp32 conversions and the load of one
// column's NT activations from shared memory ([column][token] layout).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace losa::cuda {

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// The NT 16-bit activations of one column, stored contiguously in shared memory (8-, 4- or 2-element
// aligned for NT = 8k, 4, 2), as floats: one vector load for up to 8 tokens.
template <typename T, int NT>
__device__ __forceinline__ void load_column(const T* p, float (&out)[NT]) {
  if constexpr (NT % 8 == 0) {
#pragma unroll
    for (int v = 0; v < NT / 8; ++v) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[v];
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[8 * v + i] = to_float(h[i]);
    }
  } else if constexpr (NT == 4) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = to_float(h[i]);
  } else if constexpr (NT == 2) {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
    out[0] = to_float(h[0]);
    out[1] = to_float(h[1]);
  } else {
#pragma unroll
    for (int i = 0; i < NT; ++i) out[i] = to_float(p[i]);
  }
}

}  // namespace losa::cuda
