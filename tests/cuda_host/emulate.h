// A CUDA device-code emulator for tests: runs a kernel body on the CPU with one std::thread per CUDA
// thread, so kernels whose GPU run is not available here can still be checked against a reference.
//
// What it provides: threadIdx / blockIdx / blockDim / gridDim (thread-local), __syncthreads (a block
// barrier), the full-warp shuffles (__shfl_sync, __shfl_up_sync, __shfl_xor_sync: every lane of the warp
// must take part, as the kernels under test guarantee; a partial mask aborts), __ldg, the float/int bit
// casts and __launch_bounds__. The 16-bit conversions come from CUDA's own headers, which run on the host.
// Blocks run one after another; dynamic shared memory is a 16-byte aligned buffer per block, passed to the
// body as a pointer and filled with 0xFF bytes (NaN as floats), so a read of anything the kernel did not
// write shows in its output. A 16-byte __ldg from an address that is not 16-byte aligned aborts, as the
// GPU would fault.
#pragma once

#include <cuda_runtime.h>
#include <vector_functions.h>

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __launch_bounds__(...)

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emulate {

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32] = {};
};

struct Block {
  explicit Block(int threads) : bar(threads), warps(static_cast<size_t>(threads) / 32) {}
  std::barrier<> bar;
  std::vector<Warp> warps;
};

inline thread_local Block* current = nullptr;

inline void require_full(unsigned mask) {
  if (mask != 0xffffffffu) std::abort();  // the emulator models converged, full warps only
}

// Every lane publishes v, then reads lane `src`'s value.
template <typename V>
V exchange(V v, int src) {
  static_assert(sizeof(V) <= sizeof(uint64_t));
  Warp& w = current->warps[threadIdx.x / 32];
  std::memcpy(&w.slot[threadIdx.x % 32], &v, sizeof(V));
  w.bar.arrive_and_wait();
  V out;
  std::memcpy(&out, &w.slot[src], sizeof(V));
  w.bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return out;
}

// Runs body(shared) for every thread of grid x threads, blocks in order.
template <typename Body>
void launch(unsigned grid, unsigned threads, size_t shared_bytes, Body body) {
  if (threads % 32 != 0) std::abort();
  for (unsigned b = 0; b < grid; ++b) {
    Block block(static_cast<int>(threads));
    std::vector<float4> shared((shared_bytes + sizeof(float4) - 1) / sizeof(float4) + 1);  // 16-byte aligned
    std::memset(shared.data(), 0xFF, shared.size() * sizeof(float4));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = make_uint3(t, 0, 0);
        blockIdx = make_uint3(b, 0, 0);
        blockDim = dim3(threads);
        gridDim = dim3(grid);
        current = &block;
        body(shared.data());
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace emulate

inline void __syncthreads() { emulate::current->bar.arrive_and_wait(); }

template <typename V>
V __shfl_sync(unsigned mask, V v, int src) {
  emulate::require_full(mask);
  return emulate::exchange(v, src & 31);
}
template <typename V>
V __shfl_up_sync(unsigned mask, V v, unsigned delta) {
  emulate::require_full(mask);
  const int lane = static_cast<int>(threadIdx.x % 32);
  return emulate::exchange(v, lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  emulate::require_full(mask);
  return emulate::exchange(v, static_cast<int>(threadIdx.x % 32) ^ (lane_mask & 31));
}

template <typename V>
V __ldg(const V* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) std::abort();  // a misaligned vector load faults
  return *p;
}

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
