// y = x · Wᵀ for bf16 values and bf16 activations, 4-64 tokens, on Intel AMX (Sapphire Rapids and later).
//
// Why: from a few tokens on, the AVX-512 row kernel (sparse_linear.cpp) is bound by its dot products, and
// on an AMX Xeon oneDNN's dense bf16 GEMM overtakes it: 4096x4096 at 70%, 2 threads, 8 tokens, 2.11 ms
// against dense's 1.26 ms (benchmarks/RESULTS.md). The tile unit does the multiply almost for free, so
// what is left is the decode, which is what a sparse kernel should spend its time on.
//
// How, per block of 16 output rows (one thread each):
//   * x is packed once per call into AMX's B layout: for each 32-column chunk, 16 rows of column pairs,
//     each row holding (x[t][2p], x[t][2p + 1]) for every token t of a group of at most 16;
//   * each 32-column chunk of the block's rows is expanded from the packed values (vpexpandw, one
//     instruction per row and chunk) into a 16 x 32 bf16 buffer in L1, loaded as the A tile;
//   * TDPBF16PS adds A · B into C = yᵀ [16 rows x tokens], fp32, one C tile per token group;
//   * C is stored and written out transposed.
// Up to 32 tokens go through in one pass (two token groups); more in passes of 32, a block at a time.
// The expand reads only the kept values (masked lanes never fault), so the value stream needs no padding.
// Both packed layouts work: a mask word's popcount is its chunk's value count in each (sparse_linear.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "check.h"
#include "cpu/cpu_features.h"
#include "cpu/sparse_linear.h"

namespace losa::cpu {

namespace {

#define LOSA_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))

constexpr int kGroup = 16;      // tokens per C tile (a tile row holds 16 fp32)
constexpr int kMaxGroups = 2;   // C tiles 0-1, B tiles 2-3, A tile 4
constexpr int64_t kPassTokens = kGroup * kMaxGroups;  // tokens per pass over the weight
constexpr int kBlockRows = 16;  // output rows per A / C tile

// The 64-byte operand of LDTILECFG (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands a process the (8 KiB) tile state only on request; without it the first tile instruction
// raises SIGILL. The request is process-wide, so once is enough.
bool os_grants_tiles() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct Plan {
  int64_t tokens, groups, words;
  int group_tokens[kMaxGroups];
  TileConfig config;
};

Plan make_plan(int64_t tokens, int64_t words) {
  Plan p{tokens, (tokens + kGroup - 1) / kGroup, words, {0, 0}, {}};
  for (int g = 0; g < p.groups; ++g) {
    p.group_tokens[g] = static_cast<int>(std::min<int64_t>(kGroup, tokens - g * kGroup));
    const auto bytes = static_cast<uint16_t>(p.group_tokens[g] * 4);
    p.config.rows[g] = kBlockRows;  // C: 16 rows x tokens fp32
    p.config.colsb[g] = bytes;
    p.config.rows[2 + g] = 16;  // B: 16 column pairs x tokens
    p.config.colsb[2 + g] = bytes;
  }
  p.config.rows[4] = kBlockRows;  // A: 16 rows x 32 bf16
  p.config.colsb[4] = 64;
  return p;
}

// x [tokens, cols] bf16 -> per token group g, [words][16 pairs][group tokens] uint32 (zero past cols).
at::Tensor pack_activations(const at::Tensor& x, const Plan& p) {
  const int64_t cols = x.size(1);
  auto packed = at::zeros({p.groups * p.words * 16 * kGroup}, x.options().dtype(at::kInt));
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t tg = p.group_tokens[g];
    uint32_t* out = dst + g * p.words * 16 * kGroup;
    for (int64_t t = 0; t < tg; ++t) {
      const uint16_t* row = src + (g * kGroup + t) * cols;
      for (int64_t k = 0; k < cols; ++k) {
        const int64_t chunk = k / 32, pair = (k % 32) / 2;
        out[(chunk * 16 + pair) * tg + t] |= uint32_t{row[k]} << (16 * (k % 2));
      }
    }
  }
  return packed;
}

LOSA_AMX void run_block(const SparseRows& w, const Plan& p, const uint32_t* xv, int64_t r0, float* out) {
  alignas(64) uint16_t a[kBlockRows * 32];
  alignas(64) float c[kBlockRows * kGroup];
  const int64_t n = std::min<int64_t>(kBlockRows, w.rows - r0);
  const auto* values = static_cast<const uint16_t*>(w.values);
  int64_t cursor[kBlockRows];
  for (int64_t i = 0; i < n; ++i) cursor[i] = w.row_begin(r0 + i);
  std::memset(a, 0, sizeof(a));  // rows past the weight's last stay zero
  _tile_zero(0);
  if (p.groups > 1) _tile_zero(1);  // an unconfigured tile faults
  for (int64_t k = 0; k < p.words; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t m = w.mask[(r0 + i) * p.words + k];
      _mm512_store_si512(a + i * 32, _mm512_maskz_expandloadu_epi16(m, values + cursor[i]));
      cursor[i] += __builtin_popcount(m);
    }
    _tile_loadd(4, a, 64);
    _tile_loadd(2, xv + k * 16 * p.group_tokens[0], p.group_tokens[0] * 4);
    _tile_dpbf16ps(0, 4, 2);
    if (p.groups > 1) {
      const uint32_t* x1 = xv + p.words * 16 * kGroup;
      _tile_loadd(3, x1 + k * 16 * p.group_tokens[1], p.group_tokens[1] * 4);
      _tile_dpbf16ps(1, 4, 3);
    }
  }
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t tg = p.group_tokens[g];
    if (g == 0) _tile_stored(0, c, tg * 4);
    else _tile_stored(1, c, tg * 4);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t = 0; t < tg; ++t) out[(g * kGroup + t) * w.rows + r0 + i] = c[i * tg + t];
  }
}

// Row blocks [b0, b1) for every pass of up to 32 tokens: a block's values are still in L1/L2 for the
// passes after the first.
LOSA_AMX void run_blocks(const SparseRows& w, const std::vector<Plan>& passes, const std::vector<const uint32_t*>& xv,
                         int64_t b0, int64_t b1, float* out) {
  if (passes.size() == 1) _tile_loadconfig(&passes[0].config);  // tile configuration is thread state
  for (int64_t b = b0; b < b1; ++b)
    for (size_t i = 0; i < passes.size(); ++i) {
      if (passes.size() > 1) _tile_loadconfig(&passes[i].config);
      run_block(w, passes[i], xv[i], b * kBlockRows, out + i * kPassTokens * w.rows);
    }
  _tile_release();
}

}  // namespace

bool amx_usable() {
  static const bool usable = has_feature("amx_tile") && has_feature("amx_bf16") && os_grants_tiles();
  return usable;
}

at::Tensor amx_sparse_linear(const SparseRows& w, const at::Tensor& x2) {
  LOSA_CHECK(amx_usable(), "amx_sparse_linear: this CPU or OS does not allow AMX tiles");
  LOSA_CHECK(w.dtype == at::kBFloat16 && x2.scalar_type() == at::kBFloat16, "amx_sparse_linear: bf16 only");
  const int64_t tokens = x2.size(0);
  LOSA_CHECK(tokens >= 1 && tokens <= kAmxMaxTokens, "amx_sparse_linear: 1 to ", kAmxMaxTokens, " tokens, got ",
             tokens);
  const at::Tensor x = x2.contiguous();
  std::vector<Plan> passes;
  std::vector<at::Tensor> packed;
  std::vector<const uint32_t*> xv;
  for (int64_t t0 = 0; t0 < tokens; t0 += kPassTokens) {
    passes.push_back(make_plan(std::min(kPassTokens, tokens - t0), w.words));
    packed.push_back(pack_activations(x.narrow(0, t0, passes.back().tokens), passes.back()));
    xv.push_back(reinterpret_cast<const uint32_t*>(packed.back().data_ptr<int32_t>()));
  }
  auto y = at::empty({tokens, w.rows}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  const int64_t blocks = (w.rows + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) { run_blocks(w, passes, xv, b0, b1, out); });
  return y;
}

}  // namespace losa::cpu
