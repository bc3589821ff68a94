// The CPU sparse-linear engine shared by the bitmask and N:M op families: y = x · Wᵀ (+ bias) for a
// weight stored as rows of 32-column mask words plus the row's kept values in column order.
//
// Both packed layouts reduce to that picture (losa_deploy/kernels/formats describes the bytes):
//   * bitmask: the values of row r start at row_ptr[r]; each 32-column chunk holds popcount(word) values;
//   * N:M (load-time layout): rows of a row block have a fixed stride, and when M divides 32 every full
//     chunk holds exactly 32·N/M values, so the value cursor advances by a constant (no popcount).
//
// Paths (design: shared/design/kernels.md §4):
//   * tokens < panel_tokens: a row kernel decodes each 32-column chunk once and applies it to a block
//     of up to 8 tokens (the row's values stay in L1 across token blocks);
//   * tokens >= panel_tokens (prefill): decompress a panel of rows into a dense buffer and hand it to
//     torch's GEMM (oneDNN/MKL). Sparsity saves no FLOPs there; a tuned dense GEMM on an L2-sized panel
//     beats any micro-kernel we would write, and the decompression is a small share of the time.
// Instruction sets are compiled per function (__attribute__((target))) and chosen at run time.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace losa::cpu {

// kAmx: the avx512_bf16 kernels, with bf16 x bf16 calls of kAmxMinTokens tokens or more on Intel AMX
// tiles (amx_linear.cpp).
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// "auto" (or ""): the best this CPU supports. A named ISA the CPU lacks is an error.
// Names: portable, avx2, avx512, avx512_bf16, amx (the Python layer maps $LOSA_SPARSE_BACKEND onto them).
Isa resolve_isa(const std::string& requested);
const char* isa_name(Isa isa);

// Token count from which the panel (decompress + dense GEMM) path is used when the caller passes <= 0.
constexpr int64_t kDefaultPanelTokens = 32;

struct SparseRows {
  int64_t rows = 0, cols = 0, words = 0;  // words = ceil(cols / 32)
  const uint32_t* mask = nullptr;         // [rows, words]
  const void* values = nullptr;
  at::ScalarType dtype = at::kFloat;      // of the values: bf16, fp16 or fp32
  int64_t num_values = 0;                 // elements allocated at `values` (bounds for the wide loads)

  // Bitmask addressing.
  const int64_t* row_ptr = nullptr;  // [rows + 1]
  // N:M addressing (row_ptr == nullptr): row r of block b = r / rows_per_block starts at
  // block_start[b] + (r - b * rows_per_block) * block_stride[b]; full chunks hold block_chunk[b] values
  // (0 means "count the mask bits").
  int64_t rows_per_block = 0;
  const int64_t* block_start = nullptr;
  const int64_t* block_stride = nullptr;
  const int32_t* block_chunk = nullptr;

  int64_t row_begin(int64_t r) const {
    if (row_ptr) return row_ptr[r];
    const int64_t b = r / rows_per_block;
    return block_start[b] + (r - b * rows_per_block) * block_stride[b];
  }
  int64_t row_end(int64_t r) const {
    if (row_ptr) return row_ptr[r + 1];
    return row_begin(r) + block_stride[r / rows_per_block];
  }
  int chunk_values(int64_t r) const { return row_ptr ? 0 : block_chunk[r / rows_per_block]; }
};

// The AMX path (amx_linear.cpp): whether the CPU has AMX-BF16 and the OS lets this process use tiles,
// and y = x · Wᵀ + bias in bf16 [tokens, rows] for bf16 values and bf16 x2 [tokens, cols], any token count
// (the bias is added in fp32, before the rounding). The dispatcher gives it every call from kAmxMinTokens
// tokens on. On a 2-thread Xeon (benchmarks/RESULTS.md, 7B shapes, 50% / 70% / 2:4): at 1-2 tokens the
// row kernel is faster (0.4-0.95x), at 3 about even, at 4 the tiles win (0.94-1.47x); against the panel
// path (decompress + oneDNN's AMX GEMM) they win or tie at 512-2048 tokens too, since the output is
// written by the kernel itself (RESULTS.md, "The AMX kernel, third pass").
constexpr int64_t kAmxMinTokens = 4;
bool amx_usable();
at::Tensor amx_sparse_linear(const SparseRows& w, const at::Tensor& x2, const std::optional<at::Tensor>& bias);

// Checks x and bias against the weight and runs the kernel. x is (..., cols); the result is
// (..., rows) in x's dtype, accumulated in fp32.
at::Tensor sparse_linear_cpu(const SparseRows& w, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                             const std::string& isa, int64_t panel_tokens, const char* op);

// The dense fp32 weight [rows, cols] (for the backward pass).
at::Tensor sparse_to_dense(const SparseRows& w);

// Gradients of y = x·Wᵀ + b for x and b (the packed weight is frozen); undefined where not needed.
// dense_weight is W in fp32 (from the format's to_dense op; undefined when x needs no gradient). Only
// dispatcher ops run here, so torch.compile can trace the backward with fake tensors.
std::pair<at::Tensor, at::Tensor> sparse_linear_backward(const at::Tensor& dense_weight, const at::Tensor& grad_y,
                                                         at::ScalarType x_dtype, bool need_x,
                                                         std::optional<at::ScalarType> bias_dtype);

// Checks shared by the op families' argument validation.
void check_values(const at::Tensor& values, const char* op);
void check_mask(const at::Tensor& mask, int64_t cols, const char* op);

}  // namespace losa::cpu
