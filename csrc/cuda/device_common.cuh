// What the CUDA decode kernels share besides their math: asynchronous global -> shared copies and the
// device limits a launcher sizes its grid and shared memory by.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <unordered_map>
#include <utility>

namespace losa::cuda {

__host__ __device__ constexpr int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Asynchronous global -> shared copies (sm_80+): no registers held while they fly. Compiled for an older
// architecture they are plain copies, so the extension still builds there; the launchers do not run the
// kernels that use them below compute capability 8.0.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
__device__ __forceinline__ void copy_async4(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void copy_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void copy_async_wait_pending() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void copy_async4(void* dst, const void* src) {
  *static_cast<uint32_t*>(dst) = *static_cast<const uint32_t*>(src);
}
__device__ __forceinline__ void copy_async16(void* dst, const void* src) {
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
}
__device__ __forceinline__ void copy_async_commit() {}
__device__ __forceinline__ void copy_async_wait() {}
template <int N>
__device__ __forceinline__ void copy_async_wait_pending() {}
#endif

// Per device: its index, SM count, compute capability and opt-in shared memory per block, read once.
struct DeviceLimits {
  int device = 0, sms = 0, major = 0, smem_optin = 0;
};

inline cudaError_t device_limits(DeviceLimits& out) {
  static std::mutex lock;
  static std::unordered_map<int, DeviceLimits> cache;
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> guard(lock);
  auto it = cache.find(device);
  if (it == cache.end()) {
    DeviceLimits d;
    d.device = device;
    cudaError_t err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    it = cache.emplace(device, d).first;
  }
  out = it->second;
  return cudaSuccess;
}

// Resident blocks per SM of `kernel` at `threads` threads and `bytes` of dynamic shared memory on `dev`.
// The kernel first opts into the device's full shared memory (the attribute is the current device's).
// Both are done once per kernel and device, and the count is kept per launch shape: the query is slow.
template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, int threads, int64_t bytes, const DeviceLimits& dev, int& per_sm) {
  static std::mutex lock;
  static std::set<std::pair<const void*, int>> configured;
  static std::map<std::tuple<const void*, int, int, int64_t>, int> resident;
  const void* fn = reinterpret_cast<const void*>(kernel);
  const std::lock_guard<std::mutex> guard(lock);
  if (!configured.count({fn, dev.device})) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.smem_optin);
    if (err != cudaSuccess) return err;
    configured.insert({fn, dev.device});
  }
  const auto key = std::make_tuple(fn, dev.device, threads, bytes);
  if (const auto it = resident.find(key); it != resident.end()) {
    per_sm = it->second;
    return cudaSuccess;
  }
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, static_cast<size_t>(bytes));
  if (err == cudaSuccess) resident.emplace(key, per_sm);
  return err;
}

}  // namespace losa::cuda
