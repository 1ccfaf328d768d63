// AMX bf16 tile products (the amx build only): C (+)= A B with A and B bf16 and C fp32, in the eight tile
// registers as a 2 x 2 block of 16 x 16 C tiles, two A tiles of 16 rows x 16 pairs and two B tiles of 16 pair
// rows x 16 columns. One tdpbf16ps is 16 x 16 x 32 multiply-adds, 16 times a vdpbf16ps's work.
//
// Layouts are the pair products' (attn::Operands over Bf16Pair): A row-major with its inner dimension in bf16
// pairs, B as rows of pairs (row k holds (B[2k][j], B[2k + 1][j]) for each column j), which is the tiles' own
// layout, so operands packed for vdpbf16ps feed the tiles as they are.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace llmkern {
namespace LLMKERN_ISA {
namespace tmul {

// Palette 1 with every tile 16 rows of 64 bytes (ldtilecfg's 64-byte operand).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

// Tiles configured for one thread's share of a call; at its end the thread's previous configuration comes back,
// or the tiles are released when it had none (a thread holding tile state saves and restores 8 KB more at every
// context switch). Restoring matters to a caller that keeps tiles configured between its own calls: oneDNN's
// brgemm (under torch's CPU kernels) remembers the palette it last loaded on a thread and skips ldtilecfg when
// it matches, so a configuration released under it would fault its next tile instruction.
struct TileScope {
  alignas(64) uint8_t saved[64];
  TileScope() {
    static const TileConfig config;
    _tile_storeconfig(saved);  // all zeros (palette 0) when the thread had no configuration
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (saved[0] != 0) _tile_loadconfig(saved);
    else _tile_release();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// C tile (i, j) of the block is tmm(2 i + j); A tiles tmm4-5, B tiles tmm6-7. Strides in bytes. step() runs after
// each k step's products are issued (see gemm). GCC's tile intrinsics are asm statements without a memory operand,
// so compiler barriers order them after the stores that wrote the operands and before the reads of C.
template <int MI, int NJ, typename Step>
static inline void block(int kp, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
                         int64_t ldc, bool acc, Step& step) {
  const int64_t sa = 4 * lda, sb = 4 * ldb, sc = 4 * ldc;
  float* c1 = c + 16 * ldc;
  asm volatile("" ::: "memory");
  if (acc) {
    _tile_loadd(0, c, sc);
    if constexpr (NJ > 1) _tile_loadd(1, c + 16, sc);
    if constexpr (MI > 1) _tile_loadd(2, c1, sc);
    if constexpr (MI > 1 && NJ > 1) _tile_loadd(3, c1 + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NJ > 1) _tile_zero(1);
    if constexpr (MI > 1) _tile_zero(2);
    if constexpr (MI > 1 && NJ > 1) _tile_zero(3);
  }
  for (int k = 0; k < kp; k += 16) {
    _tile_loadd(4, a + k, sa);
    if constexpr (MI > 1) _tile_loadd(5, a + 16 * lda + k, sa);
    _tile_loadd(6, b + k * ldb, sb);
    if constexpr (NJ > 1) _tile_loadd(7, b + k * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NJ > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MI > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MI > 1 && NJ > 1) _tile_dpbf16ps(3, 5, 7);
    step();
  }
  _tile_stored(0, c, sc);
  if constexpr (NJ > 1) _tile_stored(1, c + 16, sc);
  if constexpr (MI > 1) _tile_stored(2, c1, sc);
  if constexpr (MI > 1 && NJ > 1) _tile_stored(3, c1 + 16, sc);
  asm volatile("" ::: "memory");
}

// C[m][n] (+)= sum_k A[m][k] B[k][n] over bf16 pairs (k counts pairs): a [m][lda] and b [kp][ldb] in pairs,
// c [m][ldc] fp32; m, n and kp multiples of 16 (callers pad: zero pairs in both operands past the real k, any
// finite rows of A past the real m, whose rows of C they then ignore). acc: add to C, else overwrite it.
// step() runs after each of the gemm_steps(m, n, kp) k steps: vector work placed there (the next operand's
// unpacking) executes while the tile unit works through the products just issued. The tiles hold live state
// meanwhile: step() must not execute tile instructions or call anything that may (oneDNN, torch, parallel_for).
template <typename Step>
static inline void gemm(int m, int n, int kp, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                        float* c, int64_t ldc, bool acc, Step&& step) {
  for (int i = 0; i < m; i += 32)
    for (int j = 0; j < n; j += 32) {
      const uint32_t* ai = a + i * lda;
      float* cij = c + i * ldc + j;
      if (i + 16 < m) {
        if (j + 16 < n) block<2, 2>(kp, ai, lda, b + j, ldb, cij, ldc, acc, step);
        else block<2, 1>(kp, ai, lda, b + j, ldb, cij, ldc, acc, step);
      } else {
        if (j + 16 < n) block<1, 2>(kp, ai, lda, b + j, ldb, cij, ldc, acc, step);
        else block<1, 1>(kp, ai, lda, b + j, ldb, cij, ldc, acc, step);
      }
    }
}

static inline int64_t gemm_steps(int m, int n, int kp) {
  return int64_t((m + 31) / 32) * ((n + 31) / 32) * ((kp + 15) / 16);
}

static inline void gemm(int m, int n, int kp, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                        float* c, int64_t ldc, bool acc) {
  gemm(m, n, kp, a, lda, b, ldb, c, ldc, acc, [] {});
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (32-bit words; cols a multiple of 16, rows past
// the last one read as zeros up to a multiple of 16): a tile of pairs transposed, in 16 x 16 register blocks.
static inline void transpose_words(const uint32_t* src, int rows, int64_t lds, int cols, uint32_t* dst,
                                   int64_t ldd) {
  for (int r0 = 0; r0 < rows; r0 += 16)
    for (int c0 = 0; c0 < cols; c0 += 16) {
      VecAvx512 x[16];
      for (int t = 0; t < 16; ++t)
        x[t] = r0 + t < rows ? VecAvx512::load(reinterpret_cast<const float*>(src + (r0 + t) * lds + c0))
                             : VecAvx512::zero();
      transpose(x);
      for (int t = 0; t < 16; ++t) x[t].store(reinterpret_cast<float*>(dst + (c0 + t) * ldd + r0));
    }
}

// The B operand of y^T = W x^T for m rows of bf16 x (row stride x_stride, k even): xt[i][c] = (x[c][2i],
// x[c][2i + 1]) for i < k / 2, c < mp = m rounded up to 16, zero in the columns past m. Only the column groups
// [g0, g1) of 16 (all of them by default), so that threads can share the packing.
static inline void pack_xt(const bf16* x, int64_t m, int64_t x_stride, int64_t k, uint32_t* xt, int64_t g0 = 0,
                           int64_t g1 = -1) {
  const int64_t mp = (m + 15) / 16 * 16;
  for (int64_t c0 = 16 * g0; c0 < (g1 < 0 ? mp : 16 * g1); c0 += 16) {
    const bf16* rows[16];
    for (int t = 0; t < 16; ++t) rows[t] = c0 + t < m ? x + (c0 + t) * x_stride : nullptr;
    transpose_pairs(rows, int(k), xt + c0, mp);
  }
}

}  // namespace tmul
}  // namespace LLMKERN_ISA
}  // namespace llmkern
