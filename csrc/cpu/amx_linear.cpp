// y = x · Wᵀ + bias for bf16 values and bf16 activations on Intel AMX (Sapphire Rapids and later); the
// dispatcher gives it every call from 4 tokens on (sparse_linear.h).
//
// Why: from a few tokens on, the AVX-512 row kernel (sparse_linear.cpp) is bound by its dot products, and
// on an AMX Xeon oneDNN's dense bf16 GEMM overtakes it: 4096x4096 at 70%, 2 threads, 8 tokens, 2.11 ms
// against dense's 1.26 ms (benchmarks/RESULTS.md). The tile unit does the multiply almost for free, so
// what is left is the decode, which is what a sparse kernel should spend its time on.
//
// How, per block of 16 output rows (the threads claim runs of blocks):
//   * x is packed once per call into AMX's B layout: per group of `width` tokens (16, or the token count
//     below 16; zero past the last token) and 32-column chunk, 16 rows of column pairs, each row holding
//     (x[t][2p], x[t][2p + 1]) for the group's tokens t;
//   * each 32-column chunk of the block's rows is expanded from the packed values (a masked load of the
//     kept values, then vpexpandw from the register, per row and chunk: vpexpandw straight from memory was
//     the bottleneck, 64 tokens 3.45 -> 1.87 ms at 4096x4096 70%) into a 16 x 32 bf16 buffer, loaded as
//     the A tile. Two buffers alternate: the next chunk is expanded while the tile unit works on this one,
//     and a tile load never waits on the stores just made;
//   * TDPBF16PS adds A · B into C [16 rows x width tokens], fp32, one C tile per token group: up to 5
//     groups (80 tokens) per pass over the block, so 5 independent accumulations hide the TDP latency;
//   * with more than 80 tokens, the passes are gathered into sweeps whose packed x fits L2 (see
//     kSweepBytes); within a sweep, a block's first pass keeps every expanded tile (16 x 32 x words bf16),
//     and its later passes load them back instead of expanding again;
//   * while a block runs, the next block's values and mask words are prefetched into L2, in order;
//   * each pass's C goes through a small buffer to y: gathered per token, biased, rounded to bf16.
// The masked load reads only the kept values (masked lanes never fault), so the value stream needs no
// padding. Both packed layouts work: a mask word's popcount is its chunk's value count in each
// (sparse_linear.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include <immintrin.h>

#include "check.h"
#include "cpu/cpu_features.h"
#include "cpu/sparse_linear.h"

namespace losa::cpu {

namespace {

#define LOSA_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2")))

constexpr int kGroup = 16;      // tokens per C tile at most (a tile row holds 16 fp32)
constexpr int kMaxGroups = 5;   // C tiles 0-4, B tiles 5-6 (alternating), A tile 7
constexpr int kBlockRows = 16;  // output rows per A / C tile

// The 64-byte operand of LDTILECFG (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile has 16 rows: C 16 rows x `width` fp32, B 16 pairs x `width` tokens, A 16 rows x 32 bf16.
// `width` is 16, or the token count below 16: narrower B and C tiles make the products cheaper
// (4-8 tokens on 16-wide tiles were 1.3-1.5x slower).
TileConfig tile_config(int width) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>(t == 7 ? 64 : width * 4);
  }
  return c;
}

// Linux hands a process the (8 KiB) tile state only on request; without it the first tile instruction
// raises SIGILL. The request is process-wide, so once is enough.
bool os_grants_tiles() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// x [tokens, cols] bf16 -> [groups][words][16 pairs][width tokens] uint32 (zero past cols and tokens).
// One masked load per token and chunk gives the chunk's 16 pairs; a scatter puts them in a tile column.
LOSA_AMX void pack_chunk(const uint16_t* x, int64_t tokens, int64_t cols, int64_t words, int width,
                         int64_t group, int64_t k, uint32_t* out) {
  const int64_t left = cols - k * 32;
  const __mmask32 valid = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(width));
  uint32_t* tile = out + (group * words + k) * 16 * width;
  for (int64_t t = 0; t < width; ++t) {
    const int64_t token = group * width + t;
    const __m512i pairs = token < tokens ? _mm512_maskz_loadu_epi16(valid, x + token * cols + k * 32)
                                         : _mm512_setzero_si512();
    _mm512_i32scatter_epi32(tile + t, column, pairs, 4);
  }
}

// Walks a byte range a few cache lines per chunk, so the range is fetched over the block's chunks.
// Why: the 16 rows' value streams advance a few bytes per chunk each, too scattered for the hardware
// prefetcher, and a value load missing to memory stalled the whole pass (perf: 45% of the samples on the
// instruction after it). The next block is one contiguous range, fetched in order, well ahead of use:
// 1.1-1.4x at 64-128 tokens, no difference at 4-16 (RESULTS.md).
struct Prefetcher {
  const char* at = nullptr;
  const char* end = nullptr;
  int64_t per_chunk = 0;
  Prefetcher() = default;
  Prefetcher(const char* begin, int64_t lines, int64_t words)
      : at(begin), end(begin + lines * 64), per_chunk((lines + words - 1) / std::max<int64_t>(words, 1)) {}
  void step() {
    for (int64_t i = 0; i < per_chunk && at < end; ++i, at += 64) _mm_prefetch(at, _MM_HINT_T1);
  }
};

// Where a pass's results go: y [tokens][rows] bf16, plus the bias (fp32, or none) before the rounding.
struct Output {
  uint16_t* y;
  const float* bias;
  int64_t tokens, rows;
};

struct Block {
  const SparseRows& w;
  const uint32_t* xv;    // packed x of this pass's first group
  const Output& out;
  int64_t first_token;  // this pass's
  int width;            // tokens per group
  // The next block's values and mask words, fetched into L2 while this block runs (empty when none).
  Prefetcher next_values, next_mask;
};

// The byte ranges a block reads, for prefetching: its rows' values are contiguous in both layouts, and
// so are its mask words.
void set_next_block(Block& b, int64_t r0) {
  const SparseRows& w = b.w;
  const int64_t r1 = std::min<int64_t>(r0 + kBlockRows, w.rows);
  const int64_t begin = w.row_begin(r0), end = w.row_end(r1 - 1);
  b.next_values = Prefetcher(static_cast<const char*>(w.values) + begin * 2,
                             std::max<int64_t>(0, (end - begin) * 2 + 63) / 64, w.words);
  b.next_mask = Prefetcher(reinterpret_cast<const char*>(w.mask + r0 * w.words),
                           ((r1 - r0) * w.words * 4 + 63) / 64, w.words);
}

// Expands chunk k of rows r0.. (n of them) into a [16][32] bf16 buffer; rows past n are left as they are.
LOSA_AMX inline void expand_chunk(const SparseRows& w, int64_t r0, int64_t n, int64_t k, int64_t* cursor,
                                  uint16_t* a) {
  const auto* values = static_cast<const uint16_t*>(w.values);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t m = w.mask[(r0 + i) * w.words + k];
    const int kept = __builtin_popcount(m);
    const __m512i packed = _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, kept), values + cursor[i]);
    _mm512_store_si512(a + i * 32, _mm512_maskz_expand_epi16(m, packed));
    cursor[i] += kept;
  }
}

// GCC's tile intrinsics are asm statements that name their tile by stringizing it (so only a literal works)
// and declare no memory access: a tile load could be moved above the stores that fill its buffer. These
// say what they touch.
#define LOSA_TILE_LOAD(tile, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #tile ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define LOSA_TILE_STORE(tile, base, stride) \
  __asm__ volatile("tilestored %%tmm" #tile ", (%0,%1,1)" ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
// C tile c += A tile 7 · B tile b (B tiles alternate, so one group's load does not wait for the previous
// group's product to finish reading its tile).
#define LOSA_GROUP_PRODUCT(c, b, xv, words, k, width)                          \
  do {                                                                         \
    LOSA_TILE_LOAD(b, (xv) + ((c) * (words) + (k)) * 16 * (width), (width) * 4); \
    __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm7, %%tmm" #c ::);            \
  } while (0)

template <int kGroups>
LOSA_AMX inline void multiply_chunk(const uint32_t* xv, int64_t words, int64_t k, int width) {
  LOSA_GROUP_PRODUCT(0, 5, xv, words, k, width);
  if constexpr (kGroups > 1) LOSA_GROUP_PRODUCT(1, 6, xv, words, k, width);
  if constexpr (kGroups > 2) LOSA_GROUP_PRODUCT(2, 5, xv, words, k, width);
  if constexpr (kGroups > 3) LOSA_GROUP_PRODUCT(3, 6, xv, words, k, width);
  if constexpr (kGroups > 4) LOSA_GROUP_PRODUCT(4, 5, xv, words, k, width);
  static_assert(kGroups >= 1 && kGroups <= kMaxGroups);
}

template <int kGroups>
LOSA_AMX inline void zero_accumulators() {
  _tile_zero(0);
  if constexpr (kGroups > 1) _tile_zero(1);
  if constexpr (kGroups > 2) _tile_zero(2);
  if constexpr (kGroups > 3) _tile_zero(3);
  if constexpr (kGroups > 4) _tile_zero(4);
}

template <int kGroups>
LOSA_AMX inline void store_accumulators(float* c, int64_t stride, int width) {
  LOSA_TILE_STORE(0, c, stride * 4);
  if constexpr (kGroups > 1) LOSA_TILE_STORE(1, c + 1 * width, stride * 4);
  if constexpr (kGroups > 2) LOSA_TILE_STORE(2, c + 2 * width, stride * 4);
  if constexpr (kGroups > 3) LOSA_TILE_STORE(3, c + 3 * width, stride * 4);
  if constexpr (kGroups > 4) LOSA_TILE_STORE(4, c + 4 * width, stride * 4);
}

// fp32 -> bf16 as ATen's vectorised conversion (Tensor.to) does it, which the op's other paths end with:
// nearest even, denormals kept, NaN as 0xFFFF. Not VCVTNEPS2BF16, which flushes denormals to zero.
LOSA_AMX inline __m256i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __m512i nan = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i out = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, nan);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(out, 16));
}

// A pass's C ([16 rows][stride] fp32, its tokens along a row) goes out transposed: per token, a gather
// down C's column gives the token's 16 outputs, which get the bias, are rounded to bf16 and stored in y.
// Why here: a yᵀ in memory, transposed, biased and rounded by ATen afterwards took as long as the tile
// products at 128 tokens (4096 rows: 1.7 ms of fp32 passes over memory).
LOSA_AMX void write_outputs(const float* c, int64_t stride, const Output& out, int64_t first_token, int64_t count,
                            int64_t r0) {
  const int64_t n = std::min<int64_t>(kBlockRows, out.rows - r0);
  const __mmask16 rows = static_cast<__mmask16>((1u << n) - 1);
  const __m512i down = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(stride)));
  uint16_t* y = out.y + first_token * out.rows + r0;
  if (out.bias) {
    const __m512 bias = _mm512_maskz_loadu_ps(rows, out.bias + r0);
    for (int64_t t = 0; t < count; ++t, y += out.rows) {
      const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(down, c + t, 4), bias);
      _mm256_mask_storeu_epi16(y, rows, round_to_bf16(v));
    }
  } else {
    for (int64_t t = 0; t < count; ++t, y += out.rows) {
      _mm256_mask_storeu_epi16(y, rows, round_to_bf16(_mm512_i32gather_ps(down, c + t, 4)));
    }
  }
}

// One pass of kGroups token groups over the 16-row block at r0. The expanded A tiles go to a ring of two
// buffers, or, when the block has more passes to run, to `keep` ([words][16][32] bf16), from which those
// passes load them (`reuse`) instead of expanding again.
template <int kGroups>
LOSA_AMX void run_block(const Block& b, int64_t r0, uint16_t* keep, bool reuse) {
  constexpr int64_t kTile = kBlockRows * 32;
  const SparseRows& w = b.w;
  zero_accumulators<kGroups>();
  if (reuse) {
    for (int64_t k = 0; k < w.words; ++k) {
      LOSA_TILE_LOAD(7, keep + k * kTile, 64);
      multiply_chunk<kGroups>(b.xv, w.words, k, b.width);
    }
  } else {
    alignas(64) uint16_t ring[2][kTile];
    const auto tile = [&](int64_t k) { return keep ? keep + k * kTile : ring[k & 1]; };
    const int64_t n = std::min<int64_t>(kBlockRows, w.rows - r0);
    if (n < kBlockRows) {  // rows past the weight's last stay zero
      std::memset(ring, 0, sizeof(ring));
      if (keep) std::memset(keep, 0, w.words * kTile * sizeof(uint16_t));
    }
    int64_t cursor[kBlockRows];
    for (int64_t i = 0; i < n; ++i) cursor[i] = w.row_begin(r0 + i);
    Prefetcher next_values = b.next_values, next_mask = b.next_mask;
    expand_chunk(w, r0, n, 0, cursor, tile(0));
    for (int64_t k = 0; k < w.words; ++k) {
      LOSA_TILE_LOAD(7, tile(k), 64);
      multiply_chunk<kGroups>(b.xv, w.words, k, b.width);
      if (k + 1 < w.words) expand_chunk(w, r0, n, k + 1, cursor, tile(k + 1));
      next_values.step();
      next_mask.step();
    }
  }
  alignas(64) float c[kBlockRows * kMaxGroups * kGroup];
  const int64_t stride = kGroups * b.width;
  store_accumulators<kGroups>(c, stride, b.width);
  write_outputs(c, stride, b.out, b.first_token, std::min<int64_t>(stride, b.out.tokens - b.first_token), r0);
}

LOSA_AMX void run_pass(int groups, const Block& b, int64_t r0, uint16_t* keep, bool reuse) {
  switch (groups) {
    case 1: return run_block<1>(b, r0, keep, reuse);
    case 2: return run_block<2>(b, r0, keep, reuse);
    case 3: return run_block<3>(b, r0, keep, reuse);
    case 4: return run_block<4>(b, r0, keep, reuse);
    default: return run_block<5>(b, r0, keep, reuse);
  }
}

// 64-byte aligned scratch (the vector stores and tile loads of kept A tiles), or none.
class AlignedTiles {
 public:
  explicit AlignedTiles(size_t n)
      : p_(n ? static_cast<uint16_t*>(::operator new(n * sizeof(uint16_t), std::align_val_t{64})) : nullptr) {}
  ~AlignedTiles() {
    if (p_) ::operator delete(p_, std::align_val_t{64});
  }
  AlignedTiles(const AlignedTiles&) = delete;
  AlignedTiles& operator=(const AlignedTiles&) = delete;
  uint16_t* data() const { return p_; }

 private:
  uint16_t* p_;
};

struct Pass {
  int64_t first_group;
  int groups;
};

// The groups spread evenly over the fewest passes (8 groups: 4 + 4, not 5 + 3), and the passes gathered
// into sweeps whose packed x stays within kSweepBytes. A sweep runs block by block, each block for every
// pass of the sweep, so a block's values are still in L1/L2 for the passes after the first, and the sweep's
// x stays in L2 while all the blocks go by. Without sweeps, x past L2 (256 tokens x 4096 columns is 2 MiB)
// was read from L3 for every block: 0.6-0.8x the panel path at 256-512 tokens.
constexpr int64_t kSweepBytes = int64_t{1} << 20;

std::vector<std::vector<Pass>> plan_sweeps(int64_t groups, int64_t words, int width) {
  const int64_t passes = (groups + kMaxGroups - 1) / kMaxGroups;
  std::vector<std::vector<Pass>> sweeps;
  int64_t bytes = 0;
  for (int64_t p = 0, g0 = 0; p < passes; ++p) {
    const int n = static_cast<int>(groups / passes + (p < groups % passes));
    const int64_t pass_bytes = n * words * 16 * width * 4;
    if (sweeps.empty() || bytes + pass_bytes > kSweepBytes) {
      sweeps.emplace_back();
      bytes = 0;
    }
    sweeps.back().push_back({g0, n});
    bytes += pass_bytes;
    g0 += n;
  }
  return sweeps;
}

// The row blocks of one sweep, each for every pass of the sweep. The threads claim runs of blocks as they
// finish, the runs shrinking as the blocks run out (as parallel_row_blocks does for the row kernel): the
// two vCPUs of a shared VM do not run at the same speed, and with a fixed half each the slower one set
// the time (perf: 15% of the samples in libgomp's barrier at 256 tokens).
LOSA_AMX void run_claims(const SparseRows& w, const uint32_t* xv, const Output& out, int width,
                         const std::vector<Pass>& sweep, int64_t blocks, int threads, std::atomic<int64_t>& next) {
  // A block's expanded tiles, kept for its later passes: 16 x words x 32 bf16 (128 KiB at 4096 columns).
  // Allocated before the tiles are configured, so a failed allocation leaves no tile state behind.
  const AlignedTiles keep(sweep.size() > 1 ? w.words * kBlockRows * 32 : 0);
  const TileConfig config = tile_config(width);
  // Tile configuration is thread state. GCC 12's _tile_loadconfig declares that it reads 8 bytes of the
  // config only, which would let the compiler drop the stores of the rest; this names all 64.
  __asm__ volatile("ldtilecfg %0" ::"m"(config));
  int64_t b0 = next.load(std::memory_order_relaxed);
  while (b0 < blocks) {
    const int64_t b1 = std::min(blocks, b0 + std::max<int64_t>(1, (blocks - b0) / (2 * threads)));
    if (!next.compare_exchange_weak(b0, b1, std::memory_order_relaxed)) continue;  // b0 is the current value
    for (int64_t blk = b0; blk < b1; ++blk)
      for (size_t i = 0; i < sweep.size(); ++i) {
        const Pass& p = sweep[i];
        Block b{w, xv + p.first_group * w.words * 16 * width, out, p.first_group * width, width};
        if (i == 0 && blk + 1 < b1) set_next_block(b, (blk + 1) * kBlockRows);
        run_pass(p.groups, b, blk * kBlockRows, keep.data(), i > 0);
      }
    b0 = next.load(std::memory_order_relaxed);
  }
  _tile_release();
}

}  // namespace

bool amx_usable() {
  static const bool usable = has_feature("amx_tile") && has_feature("amx_bf16") && os_grants_tiles();
  return usable;
}

at::Tensor amx_sparse_linear(const SparseRows& w, const at::Tensor& x2, const std::optional<at::Tensor>& bias) {
  LOSA_CHECK(amx_usable(), "amx_sparse_linear: this CPU or OS does not allow AMX tiles");
  LOSA_CHECK(w.dtype == at::kBFloat16 && x2.scalar_type() == at::kBFloat16, "amx_sparse_linear: bf16 only");
  const int64_t tokens = x2.size(0);
  LOSA_CHECK(tokens >= 1, "amx_sparse_linear: no tokens");
  if (w.words == 0) {  // no columns: y = bias
    auto y = at::zeros({tokens, w.rows}, x2.options());
    return bias ? y.add_(bias->to(at::kFloat)) : y;
  }
  const at::Tensor x = x2.contiguous();
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const int width = static_cast<int>(std::min<int64_t>(tokens, kGroup));
  const int64_t groups = (tokens + width - 1) / width, blocks = (w.rows + kBlockRows - 1) / kBlockRows;
  auto packed = at::empty({groups * w.words * 16 * width}, x.options().dtype(at::kInt));
  auto* xv = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  // One thread for a small x (a parallel region costs more than packing 4 tokens of 4096 columns).
  at::parallel_for(0, groups * w.words, 512, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) pack_chunk(xs, tokens, w.cols, w.words, width, c / w.words, c % w.words, xv);
  });
  auto y = at::empty({tokens, w.rows}, x.options());
  const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const Output out{reinterpret_cast<uint16_t*>(y.data_ptr()), bias ? b.data_ptr<float>() : nullptr, tokens, w.rows};
  // At least 4 blocks a thread: a parallel region costs more than a few blocks.
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), (blocks + 3) / 4));
  for (const auto& sweep : plan_sweeps(groups, w.words, width)) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1,
                     [&](int64_t, int64_t) { run_claims(w, xv, out, width, sweep, blocks, threads, next); });
  }
  return y;
}

}  // namespace losa::cpu
