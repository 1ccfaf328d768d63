// fp32 C = A B (kernels/matmul.h), compiled once per CPU ISA, from the register-blocked products of attention's
// tiles (attn::gemm: MR rows of A broadcast against NR vectors of a B row), over C tiles in parallel.
//
// Each tile's k runs in passes of kKc with its MR x NR accumulators in registers throughout a pass: a block's B strip
// (kKc x NR vectors, 64 KB) is read from L2 while its MR rows of A stay in L1, and C is loaded and stored once a pass.
// attn::gemm's default L1-sized passes (32 columns here) cost a C load and store every 32 FMAs a register: on
// demo-target's training shapes (Zen 4, 2 threads) 150-170 GFLOP/s against 185-210 with passes of 256 (512: the same;
// whole k: 100 on k = 8192). Tiles are large when k is long (the weight gradient, k = the batch's tokens), so a
// pass's A and B chunks serve many blocks: 160 x 320 tiles ran dy^T x at 167-185 GFLOP/s against 124-141 with 96 x 128.
#include "kernels/matmul.h"

#include <algorithm>
#include <cstring>

#include "cpu/vec/vec.h"
#include "kernels/attention_tile.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

using V = VecF;
constexpr int W = V::W;
constexpr int kKc = 256;             // columns of k per pass
constexpr int64_t kMaxTileM = 192;   // rows of C per tile at most
constexpr int64_t kMaxTileN = 512;   // columns of C per tile at most (wider C: tiles of 256)

// C rows [i0, i1) x columns [j0, j1): whole vectors in place, a last partial vector through a zero-padded copy of
// B's last columns and a scratch C.
void tile(const MatmulParams& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  const int m = int(i1 - i0);
  const float* a = p.a + i0 * p.a_rs;
  const int64_t whole = (j1 - j0) / W * W, rest = j1 - j0 - whole;
  if (whole)
    attn::gemm<V, false>(m, int(whole), int(p.k), a, p.a_rs, p.a_ks, p.b + j0, p.ldb, p.c + i0 * p.ldc + j0, p.ldc,
                         nullptr, kKc);
  if (!rest) return;
  attn::Scratch<float> bt(size_t(std::max<int64_t>(p.k, 1) * W)), ct(size_t(m * W));
  for (int64_t l = 0; l < p.k; ++l) {
    float* row = bt.ptr + l * W;
    std::memcpy(row, p.b + l * p.ldb + j0 + whole, sizeof(float) * size_t(rest));
    std::fill(row + rest, row + W, 0.f);
  }
  attn::gemm<V, false>(m, W, int(p.k), a, p.a_rs, p.a_ks, bt.ptr, W, ct.ptr, W, nullptr, kKc);
  for (int i = 0; i < m; ++i)
    std::memcpy(p.c + (i0 + i) * p.ldc + j0 + whole, ct.ptr + i * W, sizeof(float) * size_t(rest));
}

}  // namespace

void matmul_kernel(const MatmulParams& p) {
  // Tile columns: all of n up to kMaxTileN, else 256. Tile rows: as few tiles as kMaxTileM allows, their count
  // rounded up to a multiple of the threads over the tile columns (an even split), rows a multiple of attn::kMR.
  const int64_t tn = p.n <= kMaxTileN ? p.n : 256, cols = (p.n + tn - 1) / tn;
  const int64_t threads = max_threads(), per = (threads + cols - 1) / cols;
  const int64_t rows_wanted = (p.m + kMaxTileM - 1) / kMaxTileM;
  const int64_t row_tiles = (rows_wanted + per - 1) / per * per;
  const int64_t rows = (p.m + row_tiles - 1) / row_tiles;
  const int64_t tm = std::max<int64_t>(attn::kMR, (rows + attn::kMR - 1) / attn::kMR * attn::kMR);
  const int64_t rt = (p.m + tm - 1) / tm;
  parallel_for(0, rt * cols, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / cols, j = t % cols;
      tile(p, i * tm, std::min(p.m, (i + 1) * tm), j * tn, std::min(p.n, (j + 1) * tn));
    }
  });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
