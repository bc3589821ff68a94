// Packed weights on transparent huge pages (2 MiB), for the decode kernels.
//
// Decode reads every packed weight once per token. On 4 KiB pages a 7B-shaped layer spans thousands of
// pages, more than the second-level TLB holds, so every page costs a page walk, and the hardware
// prefetchers stop at each page boundary. On 2 MiB pages neither happens (benchmarks/huge_pages.py).
//
// Linux only (madvise(MADV_HUGEPAGE), which works in the kernel's default "madvise" THP mode); elsewhere,
// and for tensors under one huge page, the op returns a plain copy. The memory is released by the
// tensor's deleter. Allocation rounds up to whole huge pages, so small tensors are left alone.
//
// The memory is a fresh anonymous mapping, not malloc's: the advice only takes effect when a page is first
// touched, and malloc hands back memory it has touched before (after a free, glibc raises its mmap
// threshold and serves blocks of that size from its heap), which stayed on 4 KiB pages. A test in a busy
// process found such a copy with no huge page at all.
//
// The copy starts `offset` bytes (a multiple of 64) into its first page, not on the 2 MiB boundary: the
// caller's policy (kernels/placement.py says why).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "check.h"

namespace {

constexpr int64_t kHugePage = int64_t{2} << 20;

// An anonymous mapping, unmapped when this goes out of scope unless released (to the tensor's deleter).
class Mapping {
 public:
  explicit Mapping(size_t length)
      : length_(length), p_(mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)) {
    LOSA_CHECK(p_ != MAP_FAILED, "huge_page_copy: out of memory mapping ", length, " bytes");
  }
  ~Mapping() {
    if (p_ != nullptr) munmap(p_, length_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  char* data() const { return static_cast<char*>(p_); }
  void release() { p_ = nullptr; }

 private:
  size_t length_;
  void* p_;
};

at::Tensor huge_page_copy(const at::Tensor& tensor, int64_t offset) {
  LOSA_CHECK(tensor.device().is_cpu(), "huge_page_copy: need a CPU tensor, got ", tensor.device());
  LOSA_CHECK(offset >= 0 && offset < kHugePage && offset % 64 == 0,
             "huge_page_copy: offset must be a multiple of 64 in [0, 2 MiB), got ", offset);
  const at::Tensor src = tensor.contiguous();
  const int64_t nbytes = static_cast<int64_t>(src.nbytes());
#ifdef __linux__
  if (nbytes >= kHugePage) {
    // Huge pages cover the tensor's size rounded up; the last `offset` bytes may spill past them onto
    // ordinary pages (a tensor of exactly k huge pages would otherwise take a whole page more).
    const int64_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    const int64_t spill = (offset + 4095) / 4096 * 4096;
    const size_t length = static_cast<size_t>(kHugePage + size + spill);  // room to start on a 2 MiB boundary
    Mapping map(length);
    char* base = map.data() + (kHugePage - reinterpret_cast<uintptr_t>(map.data()) % kHugePage) % kHugePage;
    madvise(base, size, MADV_HUGEPAGE);  // advice before the first touch; ignored when THP is off
    std::memcpy(base + offset, src.data_ptr(), nbytes);
    // The untouched slack before and after the copy costs address space only.
    at::Tensor out = at::from_blob(
        base + offset, src.sizes(), [p = map.data(), length](void*) { munmap(p, length); }, src.options());
    map.release();
    return out;
  }
#endif
  return src.clone();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) { m.def("huge_page_copy(Tensor tensor, int offset=0) -> Tensor"); }

TORCH_LIBRARY_IMPL(losa, CPU, m) { m.impl("huge_page_copy", &huge_page_copy); }
