// Packed weights on transparent huge pages (2 MiB), for the decode kernels.
//
// Decode reads every packed weight once per token. On 4 KiB pages a 7B-shaped layer spans thousands of
// pages, more than the second-level TLB holds, so every page costs a page walk, and the hardware
// prefetchers stop at each page boundary. On 2 MiB pages neither happens: on the reference machine (Zen 4,
// 2 threads, one token, weights cold) the bitmask kernel moved 10-20% more bytes per second.
//
// Linux only (madvise(MADV_HUGEPAGE), which works in the kernel's default "madvise" THP mode); elsewhere,
// and for tensors under one huge page, the op returns a plain copy. The memory is released by the
// tensor's deleter. Allocation rounds up to whole huge pages, so small tensors are left alone.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "check.h"

namespace {

constexpr int64_t kHugePage = int64_t{2} << 20;

at::Tensor huge_page_copy(const at::Tensor& tensor) {
  LOSA_CHECK(tensor.device().is_cpu(), "huge_page_copy: need a CPU tensor, got ", tensor.device());
  const at::Tensor src = tensor.contiguous();
  const int64_t nbytes = static_cast<int64_t>(src.nbytes());
#ifdef __linux__
  if (nbytes >= kHugePage) {
    const int64_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, size);
    LOSA_CHECK(data != nullptr, "huge_page_copy: out of memory allocating ", size, " bytes");
    madvise(data, size, MADV_HUGEPAGE);  // advice before the first touch; ignored when THP is off
    std::memcpy(data, src.data_ptr(), nbytes);
    return at::from_blob(data, src.sizes(), [](void* p) { std::free(p); }, src.options());
  }
#endif
  return src.clone();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) { m.def("huge_page_copy(Tensor tensor) -> Tensor"); }

TORCH_LIBRARY_IMPL(losa, CPU, m) { m.impl("huge_page_copy", &huge_page_copy); }
