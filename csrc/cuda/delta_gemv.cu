// Launcher of the delta-layout decode kernel (device code: delta_gemv_kernel.cuh).
#include "cuda/delta_gemv.h"

#include <algorithm>

#include "cuda/delta_gemv_kernel.cuh"
#include "cuda/device_common.cuh"

namespace losa::cuda {
namespace {

template <typename T, int TS, int DEPTH, bool AHEAD>
__global__ void __launch_bounds__(delta::kMaxWarps * 32) delta_gemv_kernel(DeltaGemvArgs a) {
  extern __shared__ __align__(16) unsigned char xs[];
  delta::delta_gemv_rows<T, TS, DEPTH, AHEAD>(a, xs);
}

int64_t smem_bytes(const DeltaGemvArgs& a) { return delta::staged_x_bytes(a.cols, a.tokens); }

const char* misfit(const DeltaGemvArgs& a, int warps, const DeviceLimits& dev) {
  constexpr int64_t kInt = int64_t{1} << 31;
  if (dev.major < 7) return "needs compute capability 7.0 or newer";
  if (warps < 1 || warps > delta::kMaxWarps) return "needs 1-16 warps per block";
  if (a.tokens < 1 || a.tokens > kDeltaMaxTokens) return "takes 1-16 tokens per launch";
  // group indices + 32 · depth + 31 stay below 2^31 (the kernel counts groups in int)
  if (a.rows >= kInt || a.cols * 4 >= kInt || a.groups + 4 * 32 + 32 >= kInt) return "needs sizes below 2^31";
  if (smem_bytes(a) > dev.smem_optin) return "needs the staged x to fit one block's shared memory";
  return nullptr;
}

// Launches one instantiation (delta::visit_instance picks it).
struct Launch {
  const DeltaGemvArgs& a;
  int warps;
  const DeviceLimits& dev;
  cudaStream_t stream;

  template <typename T, int TS, int DEPTH, bool AHEAD>
  cudaError_t operator()() const {
    auto kernel = delta_gemv_kernel<T, TS, DEPTH, AHEAD>;
    const int64_t bytes = smem_bytes(a);
    int per_sm = 0;
    if (const cudaError_t err = resident_blocks(kernel, warps * 32, bytes, dev, per_sm); err != cudaSuccess) {
      return err;
    }
    if (per_sm < 1) return cudaErrorInvalidConfiguration;
    // A warp per row; no more blocks than are resident at once (each block stages x once, then its warps
    // stride over the rows).
    const int64_t blocks = std::min<int64_t>((a.rows + warps - 1) / warps, static_cast<int64_t>(per_sm) * dev.sms);
    kernel<<<dim3(static_cast<unsigned>(blocks)), warps * 32, static_cast<size_t>(bytes), stream>>>(a);
    return cudaGetLastError();
  }
};

}  // namespace

const char* delta_gemv_misfit(const DeltaGemvArgs& args, int warps) {
  DeviceLimits dev;
  if (device_limits(dev) != cudaSuccess) return "could not read the device's limits";
  return misfit(args, warps, dev);
}

int delta_gemv_auto_warps(const DeltaGemvArgs& args) {
  DeviceLimits dev;
  if (device_limits(dev) != cudaSuccess) return 8;
  return 2 * smem_bytes(args) > dev.smem_optin ? 16 : 8;
}

cudaError_t delta_gemv(const DeltaGemvArgs& a, int warps, int depth, bool ahead, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(a.values) % 16 != 0) return cudaErrorMisalignedAddress;
  DeviceLimits dev;
  if (const cudaError_t err = device_limits(dev); err != cudaSuccess) return err;
  if (misfit(a, warps, dev)) return cudaErrorInvalidValue;
  const Launch launch{a, warps, dev, stream};
  return delta::visit_instance(a, depth, ahead, cudaErrorInvalidValue, launch);
}

}  // namespace losa::cuda
