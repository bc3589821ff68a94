// The N:M canonical format's codec: checking, packing, unpacking and the kernel layout, one pass over the
// rows instead of PyTorch's [rows, groups, M] temporaries: 4-11x faster per step on 7B-sized layers, and
// ld.load of a 2:4 model about 14x (benchmarks/format_codecs.py, RESULTS.md).
//
// The layouts are described once, in losa_deploy/kernels/formats/nm.py (module docstring); the PyTorch
// functions there stay as the reference these ops are tested against, and as the path on other devices.
// In short: a row's groups are M consecutive columns (the last one possibly narrower, the tail); each
// group has an F-bit field (F = 4, 8 or 16) in the row's mask bytes, little-endian in group order, bit j
// set when column g*M + j is kept; its kept values sit in slots [g*N, g*N + kept) of the row's values,
// N being the weight's largest N. A row keeps at most its own N per full group and ceil(N*t/M) in a tail
// of width t.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "check.h"
#include "cpu/value_bits.h"

namespace {

int field_bits(int64_t m) { return m <= 4 ? 4 : m <= 8 ? 8 : 16; }

int64_t mask_bytes(int64_t cols, int64_t m) { return ((cols + m - 1) / m * field_bits(m) + 7) / 8; }

uint32_t read_field(const uint8_t* row, int64_t g, int bits) {
  if (bits == 8) return row[g];
  if (bits == 16) return row[2 * g] | (static_cast<uint32_t>(row[2 * g + 1]) << 8);
  return (row[g >> 1] >> ((g & 1) * 4)) & 0xFu;
}

void write_field(uint8_t* row, int64_t g, int bits, uint32_t field) {
  if (bits == 8) {
    row[g] = static_cast<uint8_t>(field);
  } else if (bits == 16) {
    row[2 * g] = static_cast<uint8_t>(field & 0xFF);
    row[2 * g + 1] = static_cast<uint8_t>(field >> 8);
  } else {
    row[g >> 1] |= static_cast<uint8_t>(field << ((g & 1) * 4));
  }
}

// The shape of one weight's groups, and what each group of a row with N = n may keep.
struct Groups {
  int64_t m, cols, count, full, tail;
  int bits;
  Groups(int64_t m_, int64_t cols_)
      : m(m_), cols(cols_), count((cols_ + m_ - 1) / m_), full(cols_ / m_), tail(cols_ % m_), bits(field_bits(m_)) {}
  int64_t width(int64_t g) const { return g < full ? m : tail; }
  int64_t target(int64_t g, int64_t n) const { return g < full ? n : (n * tail + m - 1) / m; }
  // Values stored per row of N = n (the kernel layout's row length).
  int64_t slots(int64_t n) const { return full * n + (n * tail + m - 1) / m; }
};

void check_args(const char* op, const at::Tensor& mask, int64_t m, int64_t cols) {
  LOSA_CHECK(m >= 2 && m <= 16, op, ": M must be in [2, 16], got ", m);
  LOSA_CHECK(cols >= 0, op, ": negative column count ", cols);
  LOSA_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.device().is_cpu(), op,
             ": mask must be a 2-D uint8 CPU tensor");
  LOSA_CHECK(mask.size(1) == mask_bytes(cols, m), op, ": mask has ", mask.size(1), " bytes per row, ", cols,
             " columns of N:", m, " need ", mask_bytes(cols, m));
}

void check_row_n(const char* op, const at::Tensor& row_n, int64_t rows) {
  LOSA_CHECK(row_n.dim() == 1 && row_n.size(0) == rows && row_n.scalar_type() == at::kLong &&
                 row_n.device().is_cpu(),
             op, ": row_n must be int64 [", rows, "] on the CPU");
}

void check_values(const char* op, const at::Tensor& values, int64_t rows, int64_t slots) {
  LOSA_CHECK(values.device().is_cpu() && (values.element_size() == 2 || values.element_size() == 4), op,
             ": values must be a 16- or 32-bit CPU tensor");
  LOSA_CHECK(values.dim() == 2 && values.size(0) == rows && values.size(1) == slots, op, ": values must be [",
             rows, ", ", slots, "], got ", values.sizes());
}

// The first row and group whose field sets a bit outside the group's columns (code 1) or keeps more
// than its N allows (code 2), as int64 [row, group, code]; [-1, -1, 0] when every field is valid.
at::Tensor nm_canonical_check(const at::Tensor& mask_in, const at::Tensor& row_n_in, int64_t m, int64_t cols) {
  check_args("nm_canonical_check", mask_in, m, cols);
  const auto mask = mask_in.contiguous();
  const auto row_n = row_n_in.contiguous();
  const int64_t rows = mask.size(0), bytes = mask.size(1);
  check_row_n("nm_canonical_check", row_n, rows);
  const Groups gr(m, cols);
  const uint8_t* src = mask.data_ptr<uint8_t>();
  const int64_t* n_of = row_n.data_ptr<int64_t>();
  // Each row's first fault; the smallest row wins, so the answer does not depend on the threads.
  std::vector<int64_t> fault(rows, 0);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = src + r * bytes;
      for (int64_t g = 0; g < gr.count && !fault[r]; ++g) {
        const uint32_t field = read_field(row, g, gr.bits);
        const uint32_t valid = (1u << gr.width(g)) - 1u;
        if (field & ~valid) fault[r] = (g << 2) | 1;
        else if (__builtin_popcount(field) > gr.target(g, n_of[r])) fault[r] = (g << 2) | 2;
      }
    }
  });
  auto out = at::tensor({int64_t{-1}, int64_t{-1}, int64_t{0}}, at::kLong);
  for (int64_t r = 0; r < rows; ++r) {
    if (fault[r]) {
      out = at::tensor({r, fault[r] >> 2, fault[r] & 3}, at::kLong);
      break;
    }
  }
  return out;
}

// The dense [rows, cols] weight of canonical values and mask (n: the slot stride, the largest N).
at::Tensor nm_canonical_to_dense(const at::Tensor& values_in, const at::Tensor& mask_in, int64_t n, int64_t m, int64_t cols) {
  check_args("nm_canonical_to_dense", mask_in, m, cols);
  const auto mask = mask_in.contiguous();
  const auto values = values_in.contiguous();
  const int64_t rows = mask.size(0), bytes = mask.size(1);
  const Groups gr(m, cols);
  check_values("nm_canonical_to_dense", values, rows, gr.slots(n));
  // Values move as raw bits (every value dtype's +0.0 is all zero bits), 16 or 32 at a time.
  auto dense = at::zeros({rows, cols}, values.options());
  const uint8_t* msk = mask.data_ptr<uint8_t>();
  const int64_t stride = values.size(1);
  auto run = [&](auto* vals, auto* out) {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* row = msk + r * bytes;
        for (int64_t g = 0; g < gr.count; ++g) {
          uint32_t field = read_field(row, g, gr.bits) & ((1u << gr.width(g)) - 1u);
          const int64_t first = r * stride + g * n, last = first + gr.target(g, n);  // checked when built;
          for (int64_t slot = first; field && slot < last; field &= field - 1)     // bounded all the same
            out[r * cols + g * m + __builtin_ctz(field)] = vals[slot++];
        }
      }
    });
  };
  losa::cpu::with_value_bits(values, dense, run);
  return dense;
}

// Canonical values [rows, slots(n)] and mask bytes of a weight: ``keep`` marks the kept positions (the
// weight's nonzeros) and ``source`` holds the values to store, already in the packed dtype. Rows must
// fit their N (row_n); a row that does not is an error naming it (the caller checks first).
std::tuple<at::Tensor, at::Tensor> nm_canonical_encode(const at::Tensor& keep_in, const at::Tensor& source_in,
                                             const at::Tensor& row_n_in, int64_t n, int64_t m) {
  LOSA_CHECK(keep_in.dim() == 2 && keep_in.scalar_type() == at::kBool && keep_in.device().is_cpu(),
             "nm_canonical_encode: keep must be a 2-D bool CPU tensor");
  LOSA_CHECK(source_in.sizes() == keep_in.sizes(), "nm_canonical_encode: source is ", source_in.sizes(), ", keep ",
             keep_in.sizes());
  LOSA_CHECK(m >= 2 && m <= 16, "nm_canonical_encode: M must be in [2, 16], got ", m);
  const auto keep = keep_in.contiguous();
  const auto source = source_in.contiguous();
  const auto row_n = row_n_in.contiguous();
  const int64_t rows = keep.size(0), cols = keep.size(1);
  check_row_n("nm_canonical_encode", row_n, rows);
  const Groups gr(m, cols);
  auto values = at::zeros({rows, gr.slots(n)}, source.options());
  check_values("nm_canonical_encode", values, rows, gr.slots(n));
  auto mask = at::zeros({rows, mask_bytes(cols, m)}, keep.options().dtype(at::kByte));
  const bool* kp = keep.data_ptr<bool>();
  const int64_t* n_of = row_n.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)  // a row's slots are n per group: a larger N would write the next row's
    LOSA_CHECK(n_of[r] >= 0 && n_of[r] <= n, "nm_canonical_encode: row ", r, " has N = ", n_of[r],
               " outside [0, ", n, "]");
  uint8_t* msk = mask.data_ptr<uint8_t>();
  const int64_t stride = values.size(1), bytes = mask.size(1);
  std::vector<int64_t> over(rows, 0);
  auto run = [&](const auto* src, auto* vals) {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t g = 0; g < gr.count; ++g) {
          uint32_t field = 0;
          int64_t slot = 0;
          for (int64_t j = 0; j < gr.width(g); ++j) {
            const int64_t c = g * m + j;
            if (!kp[r * cols + c]) continue;
            field |= 1u << j;
            if (slot < gr.target(g, n_of[r])) vals[r * stride + g * n + slot] = src[r * cols + c];
            ++slot;
          }
          if (slot > gr.target(g, n_of[r])) over[r] = 1;
          write_field(msk + r * bytes, g, gr.bits, field);
        }
      }
    });
  };
  losa::cpu::with_value_bits(source, values, run);
  for (int64_t r = 0; r < rows; ++r)
    LOSA_CHECK(!over[r], "nm_canonical_encode: row ", r, " keeps more weights than its N allows");
  return {values, mask};
}

// The CPU kernel's layout: every group's field filled up to exactly its target by also marking its
// lowest free columns (which hold zeros), then the values at the marked positions, rows back to back,
// and the filled fields as losa-bitmask words [rows, ceil(cols/32)].
std::tuple<at::Tensor, at::Tensor> nm_canonical_to_kernel(const at::Tensor& values_in, const at::Tensor& mask_in,
                                                    const at::Tensor& row_n_in, int64_t n, int64_t m,
                                                    int64_t cols) {
  check_args("nm_canonical_to_kernel", mask_in, m, cols);
  const auto mask = mask_in.contiguous();
  const auto values = values_in.contiguous();
  const auto row_n = row_n_in.contiguous();
  const int64_t rows = mask.size(0), bytes = mask.size(1), nwords = (cols + 31) / 32;
  const Groups gr(m, cols);
  check_values("nm_canonical_to_kernel", values, rows, gr.slots(n));
  check_row_n("nm_canonical_to_kernel", row_n, rows);
  const int64_t* n_of = row_n.data_ptr<int64_t>();
  std::vector<int64_t> offset(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    LOSA_CHECK(n_of[r] >= 0 && n_of[r] <= n, "nm_canonical_to_kernel: row ", r, " has N = ", n_of[r], " outside [0, ", n,
               "]");
    offset[r + 1] = offset[r] + gr.slots(n_of[r]);
  }
  auto out = at::zeros({offset[rows]}, values.options());
  auto words = at::zeros({rows, nwords}, mask.options().dtype(at::kInt));
  const uint8_t* msk = mask.data_ptr<uint8_t>();
  auto* wd = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  const int64_t stride = values.size(1);
  std::vector<int64_t> over(rows, 0);
  auto run = [&](const auto* vals, auto* dst) {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* row = msk + r * bytes;
        int64_t at = offset[r];
        for (int64_t g = 0; g < gr.count; ++g) {
          const uint32_t valid = (1u << gr.width(g)) - 1u;
          const uint32_t kept = read_field(row, g, gr.bits) & valid;
          int64_t need = gr.target(g, n_of[r]) - __builtin_popcount(kept);
          if (need < 0) {  // more than its N: writing it would run into the next row's values
            over[r] = 1;
            continue;
          }
          uint32_t filled = kept;
          for (uint32_t free = valid & ~kept; need > 0 && free; free &= free - 1, --need) filled |= free & (~free + 1u);
          int64_t slot = r * stride + g * n;
          for (uint32_t f = filled; f; f &= f - 1) {
            const int j = __builtin_ctz(f);
            const int64_t c = g * m + j;
            wd[r * nwords + c / 32] |= 1u << (c % 32);
            dst[at++] = (kept >> j) & 1u ? vals[slot++] : 0;
          }
        }
      }
    });
  };
  losa::cpu::with_value_bits(values, out, run);
  for (int64_t r = 0; r < rows; ++r)
    LOSA_CHECK(!over[r], "nm_canonical_to_kernel: row ", r, " keeps more weights than its N allows");
  return {out, words};
}

// The first row of a kernel layout whose filled groups do not each mark exactly their target, or -1.
int64_t nm_kernel_check(const at::Tensor& words_in, const at::Tensor& row_n_in, int64_t m, int64_t cols) {
  LOSA_CHECK(m >= 2 && m <= 16, "nm_kernel_check: M must be in [2, 16], got ", m);
  LOSA_CHECK(words_in.dim() == 2 && words_in.scalar_type() == at::kInt && words_in.device().is_cpu() &&
                 words_in.size(1) == (cols + 31) / 32,
             "nm_kernel_check: words must be int32 [rows, ceil(cols/32)] on the CPU");
  const auto words = words_in.contiguous();
  const auto row_n = row_n_in.contiguous();
  const int64_t rows = words.size(0), nwords = words.size(1);
  check_row_n("nm_kernel_check", row_n, rows);
  const Groups gr(m, cols);
  const auto* wd = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const int64_t* n_of = row_n.data_ptr<int64_t>();
  std::vector<uint8_t> bad(rows, 0);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t* row = wd + r * nwords;
      for (int64_t g = 0; g < gr.count && !bad[r]; ++g) {
        int64_t count = 0;
        const int64_t c0 = g * m;
        if (32 % m == 0) {  // the group sits inside one word: one popcount
          count = __builtin_popcount((row[c0 / 32] >> (c0 % 32)) & ((1ull << gr.width(g)) - 1));
        } else {
          for (int64_t c = c0; c < c0 + gr.width(g); ++c) count += (row[c / 32] >> (c % 32)) & 1u;
        }
        bad[r] = count != gr.target(g, n_of[r]);
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r)
    if (bad[r]) return r;
  return -1;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(losa, m) {
  m.def("nm_canonical_check(Tensor mask, Tensor row_n, int m, int cols) -> Tensor");
  m.def("nm_canonical_to_dense(Tensor values, Tensor mask, int n, int m, int cols) -> Tensor");
  m.def("nm_canonical_encode(Tensor keep, Tensor source, Tensor row_n, int n, int m) -> (Tensor, Tensor)");
  m.def("nm_canonical_to_kernel(Tensor values, Tensor mask, Tensor row_n, int n, int m, int cols) -> (Tensor, Tensor)");
  m.def("nm_kernel_check(Tensor words, Tensor row_n, int m, int cols) -> int");
}

TORCH_LIBRARY_IMPL(losa, CPU, m) {
  m.impl("nm_canonical_check", &nm_canonical_check);
  m.impl("nm_canonical_to_dense", &nm_canonical_to_dense);
  m.impl("nm_canonical_encode", &nm_canonical_encode);
  m.impl("nm_canonical_to_kernel", &nm_canonical_to_kernel);
  m.impl("nm_kernel_check", &nm_kernel_check);
}
