// Attention forward core on the CPU (FlashAttention-2, Dao 2023, Algorithm 1) and the paged-cache write,
// compiled once per ISA (see cpu/vec/vec.h). Math and layouts: kernels/attention.h.
//
// Two paths, both streaming keys in tiles with an online softmax (running max m, sum l, rescaled O), so no
// [Lq x Lk] matrix ever exists and every key row is converted to fp32 once per task:
// - Tiled (prefill): a task is (batch, kv head, chunk of Mq-query tiles) for every query head of the
//   group, with the visible keys packed once as fp32 rows (run_tiled). Scores are kept transposed,
//   S^T[key][query] = K Q^T, so the softmax runs along vectors of queries, and so is the output,
//   O^T += V^T P^T (whose B operand, P^T, then has 256-byte rows: 1.2x faster than O += P V standalone);
//   both products go through attn::gemm. Compute-bound: floor = 4 * Lq * Lk * D (halved if causal) / peak
//   FMA rate.
// - Grouped (decode, few query rows per kv head): a task is (batch, kv head, key split) holding every
//   query row of the GQA group, so each K/V row is read from memory once for all of them. Bandwidth-bound:
//   floor = bytes of K and V read / read bandwidth. Splits (flash-decoding) keep both threads busy when
//   batch * nheads_k is small; their partial (O, m, l) are combined in a fixed order (deterministic).
// On the amx build, bf16's two tiled-path products run on the AMX tiles instead (TiledTask::kTiles, cpu/vec/amx.h),
// and the grouped path widens bf16 to fp32 FMAs (GroupTask::kBf16Dot).
// Only keys inside a row block's visible band are read (unused cache slots may hold anything, NaN
// included); keys inside the band but masked for some rows get score -inf, i.e. probability exactly 0.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/attention_tile.h"
#include "kernels/parallel.h"
#include "kernels/prefetch.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

using attn::padded;
using attn::Scratch;

constexpr int kMq = 64;        // queries per tile (tiled path)
constexpr int kNk = 64;        // keys per tile (both paths)
static_assert(kMq <= kNk, "the tiled path stages a tile's output rows in its key scratch");
constexpr int kGroupRows = 16;  // the grouped path takes kv heads with at most this many query rows
constexpr int kKeyOrderRows = 4;  // ... and reads keys in memory order with at most this many (GroupTask::chunk_by_key)
constexpr int kNkG = 32;        // keys per chunk (grouped path; measured 32 > 64 > 128 on decode)

template <typename A>
constexpr A kInf = std::numeric_limits<A>::infinity();

// One sequence's geometry: lengths, row offsets and the visible key band of each query.
struct Seq {
  int b = 0, lq = 0, lk = 0;
  int64_t q_start = 0, k_start = 0;  // packed row offsets (varlen), else 0
  int kb = 0;                        // batch index into non-paged k/v
  int64_t dq = 0;                    // lk - lq (bottom-right alignment)
  int wl = -1, wr = -1;
  // Visible keys of query i: [lo(i), hi(i)], empty when lo > hi.
  int64_t lo(int64_t i) const { return wl >= 0 ? std::max<int64_t>(0, i + dq - wl) : 0; }
  int64_t hi(int64_t i) const { return wr >= 0 ? std::min<int64_t>(lk - 1, i + dq + wr) : lk - 1; }
};

static Seq make_seq(const AttnParams& p, int b) {
  Seq s;
  s.b = b;
  s.q_start = p.cu_seqlens_q ? p.cu_seqlens_q[b] : 0;
  s.lq = p.cu_seqlens_q ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.seqlen_q;
  s.lk = p.seqused_k ? p.seqused_k[b] : p.cu_seqlens_k ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.seqlen_k;
  s.k_start = (p.cu_seqlens_k && !p.block_table) ? p.cu_seqlens_k[b] : 0;
  s.kb = p.kv_batch_idx ? p.kv_batch_idx[b] : b;
  s.dq = int64_t(s.lk) - s.lq;
  s.wl = p.window_left;
  s.wr = p.window_right;
  return s;
}

template <typename T>
static inline T* row_at(const AttnTensor& t, int64_t b, int64_t row, int64_t h) {
  return static_cast<T*>(t.ptr) + b * t.batch_stride + row * t.row_stride + h * t.head_stride;
}

// Key / value rows of one sequence and kv heads [hk0, hk0 + nh), contiguous or paged.
template <typename T>
struct KvRows {
  const T *k, *v;  // row 0 (non-paged) or block 0 row 0 (paged) of head hk0
  int64_t k_rs, v_rs, k_bs, v_bs, k_hs, v_hs;
  const int32_t* blocks;  // this sequence's block table row, or null
  int bs, nh, d;
  int64_t lk;

  KvRows(const AttnParams& p, const Seq& s, int hk0, int nh_) : nh(nh_), d(p.head_dim), lk(s.lk) {
    blocks = p.block_table ? p.block_table + int64_t(s.b) * p.block_table_stride : nullptr;
    bs = p.block_size;
    k_rs = p.k.row_stride, v_rs = p.v.row_stride, k_bs = p.k.batch_stride, v_bs = p.v.batch_stride;
    k_hs = p.k.head_stride, v_hs = p.v.head_stride;
    const int64_t b = blocks ? 0 : s.kb, r = blocks ? 0 : s.k_start;
    k = row_at<const T>(p.k, b, r, hk0), v = row_at<const T>(p.v, b, r, hk0);
  }
  void rows(int64_t j, const T*& kr, const T*& vr) const {
    if (blocks) {
      const int64_t blk = blocks[j / bs], off = j % bs;
      kr = k + blk * k_bs + off * k_rs, vr = v + blk * v_bs + off * v_rs;
    } else {
      kr = k + j * k_rs, vr = v + j * v_rs;
    }
  }
  // Pointers to the rows of keys [j0, j0 + n) (head hk0), walking the block table (no division per key).
  void row_ptrs(int64_t j0, int n, const T** kr, const T** vr) const {
    if (n <= 0) return;  // j0 may be past the block table's end
    if (!blocks) {
      for (int jj = 0; jj < n; ++jj) kr[jj] = k + (j0 + jj) * k_rs, vr[jj] = v + (j0 + jj) * v_rs;
      return;
    }
    int64_t blk = j0 / bs;
    int off = int(j0 % bs);
    const T *kb = k + blocks[blk] * k_bs, *vb = v + blocks[blk] * v_bs;
    for (int jj = 0; jj < n; ++jj, ++off) {
      if (off == bs) off = 0, ++blk, kb = k + blocks[blk] * k_bs, vb = v + blocks[blk] * v_bs;
      kr[jj] = kb + off * k_rs, vr[jj] = vb + off * v_rs;
    }
  }
  // The cache lines of one key's rows of all nh heads (one span when the heads are interleaved).
  int64_t span_bytes(int64_t hs) const { return int64_t(sizeof(T)) * ((nh - 1) * hs + d); }
  void prefetch(const T* r, int64_t hs) const { prefetch_l1_span(r, span_bytes(hs)); }
  void prefetch_key(int64_t j) const {
    const T *kr, *vr;
    rows(j, kr, vr);
    prefetch(kr, k_hs);
    prefetch(vr, v_hs);
  }
#if defined(LLMKERN_ISA_AVX512BF16)
  // Keys [j0, j0 + n) of head hk0 (nh = 1, bf16) as bf16 pairs for products over pairs: kt gets the key rows,
  // dp / 2 pairs each (zero padded), vt the value rows interleaved two keys at a time, row i = (v[2i], v[2i + 1])
  // pairs, dp each (a missing last key reads as zeros). `ahead` as in load.
  void load_pairs(int64_t j0, int n, int dp, int64_t jend, int ahead, attn::Bf16Pair* kt, attn::Bf16Pair* vt) const {
    for (int jj = 0; jj < n; ++jj) {
      const int64_t j = j0 + jj;
      if (ahead > 0 && j + ahead <= jend) prefetch_key(j + ahead);
      const T *kr, *vr;
      rows(j, kr, vr);
      attn::copy_row_padded(kr, d, dp, reinterpret_cast<T*>(kt + int64_t(jj) * (dp / 2)));
      if (jj % 2) continue;
      const T *k1, *v1 = nullptr;
      if (jj + 1 < n) rows(j + 1, k1, v1);
      interleave_rows(vr, v1, d, dp, &vt[int64_t(jj / 2) * dp].bits);
    }
  }
#endif
  // Converts keys [j0, j0 + n) to fp32 rows of width dp (zero padded): head hh's key jj goes to
  // kt[(hh * n_stride + jj) * dp]. Rows are visited in memory order (all heads of a key, then the next
  // key); `ahead` keys further on are prefetched (random paged blocks defeat the hardware prefetcher).
  template <typename V>
  void load(int64_t j0, int n, int dp, int n_stride, typename V::value_type* kt, typename V::value_type* vt,
            int64_t jend, int ahead) const {
    using A = typename V::value_type;
    for (int jj = 0; jj < n; ++jj) {
      const int64_t j = j0 + jj;
      if (ahead > 0 && j + ahead <= jend) prefetch_key(j + ahead);
      const T *kr, *vr;
      rows(j, kr, vr);
      for (int hh = 0; hh < nh; ++hh) {
        const int64_t o = (int64_t(hh) * n_stride + jj) * dp;
        attn::load_row<V>(kr + hh * k_hs, d, A(1), kt + o, dp);
        attn::load_row<V>(vr + hh * v_hs, d, A(1), vt + o, dp);
      }
    }
  }
};

// x = softcap * tanh(x / softcap) over n (a multiple of V::W) scores.
template <typename V>
static void softcap_scores(typename V::value_type* x, int64_t n, typename V::value_type cap) {
  using A = typename V::value_type;
  const V inv = V::set1(A(1) / cap), c = V::set1(cap);
  for (int64_t i = 0; i < n; i += V::W) (c * tanh(V::load(x + i) * inv)).store(x + i);
}

static inline void write_empty_row(void* out, int d, DType dt, float* lse) {
  std::memset(out, 0, size_t(d * dtype_size(dt)));
  if (lse) *lse = std::numeric_limits<float>::infinity();
}

// ---------------------------------------------------------------------------------------------------------
// Tiled path: one task = (sequence, head, queries [i0, i0 + mq)).
template <typename T>
struct TiledTask {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  static constexpr int W = V::W;

  // With pair products (attn::kPairProducts) K Q^T runs over pairs of the head dimension and V^T P^T over pairs of
  // keys. Scores are scaled after the product (q stays exact) and P is rounded to bf16 for the second, as
  // PyTorch's bf16 attention rounds it. Buffers then hold pairs: qt [dp / 2][mp], kt [kKeys][dp / 2],
  // vt [kKeys / 2][dp], P in s [kKeys / 2][mp].
  static constexpr bool kPairs = attn::kPairProducts<T>;
  using Pair = attn::Bf16Pair;
  // With AMX (the amx build) both pair products run on the tiles (tmul::gemm): the head dimension is padded to
  // whole tiles of 16 pairs, and O^T += V^T P^T takes V^T as rows of key pairs: packed once per task (pvt), or
  // transposed per key tile into vtt when the task's keys are not packed.
  static constexpr bool kTiles = attn::kTileProducts<T>;
  // Keys per tile: 128 on the tiles (O^T's C tiles are loaded and stored once per key tile: 74 / 83 / 80 ms for
  // 128 / 64 / 256 keys at issue 3's bf16 prefill, in one process), else kNk.
  static constexpr int kKeys = kTiles ? 128 : kNk;
  // The tile product cannot scale O^T's columns as it loads them (vdpbf16ps's gemm does, for free), so with
  // kTiles that rescaling is a pass over O^T of its own, and a query's running max m moves only when a score
  // exceeds it by more than this (FlashAttention-3's lazy rescaling): P <= e^8 and l stay far inside fp32's
  // range, P's bf16 rounding is relative either way, and most key tiles then skip the pass.
  static constexpr A kLazyMax = A(8);
  // The running max after a tile whose maximum (the old m included) is mx.
  static V lazy_max(V mx, V old) { return V::select_gt(mx, old + V::set1(kLazyMax), mx, old); }

  const AttnParams& p;
  int d, dp;
  A *qt, *kt, *vt, *s, *o, *m, *l, *alpha, *pos, *vtt;  // scratch, see size()
  // Keys [pj0, pj0 + pn) of the current kv head packed as fp32 rows [pn][dp] (pk, pv), or pn = 0.
  const A *pk = nullptr, *pv = nullptr;
  int64_t pj0 = 0, pn = 0;
  const uint32_t* pvt = nullptr;  // kTiles: the packed keys' V^T, dp rows of pvt_ld key pairs
  int64_t pvt_ld = 0;

  static int64_t size(int d) {
    const int64_t dp = attn::padded_head<V, T>(d), mp = padded<V>(kMq);
    return dp * mp + 2 * kKeys * dp + kKeys * mp + dp * mp + 4 * mp + (kTiles ? dp * kKeys / 2 : 0);
  }
  // Extra room the task's key pack needs beyond 2 rows of dp per key (see pack_vt).
  static int64_t pack_extra(int d) { return kTiles ? (kKeys + 64) * int64_t(attn::padded_head<V, T>(d)) : 0; }
  TiledTask(const AttnParams& p_, A* buf) : p(p_), d(p_.head_dim), dp(attn::padded_head<V, T>(p_.head_dim)) {
    const int64_t mp = padded<V>(kMq);
    qt = buf, kt = qt + dp * mp, vt = kt + kKeys * dp, s = vt + kKeys * dp, o = s + kKeys * mp;
    m = o + dp * mp, l = m + mp, alpha = l + mp, pos = alpha + mp, vtt = pos + mp;
  }

  void run(const Seq& sq, int h, int i0, int mq) {
    const int hk = h / (p.nheads / p.nheads_k);
    const int mp = padded<V>(mq);
    const int64_t jlo = sq.lo(i0), jhi = sq.hi(i0 + mq - 1);
    float* lse0 = p.lse.ptr ? row_at<float>(p.lse, sq.b, sq.q_start + i0, h) : nullptr;
    if (jlo > jhi) {  // no query of the tile sees a key (e.g. lk = 0)
      for (int c = 0; c < mq; ++c)
        write_empty_row(row_at<T>(p.out, sq.b, sq.q_start + i0 + c, h), d, p.dtype,
                        lse0 ? lse0 + c * p.lse.row_stride : nullptr);
      return;
    }
    if constexpr (kPairs) pack_q_pairs(sq, h, i0, mq, mp);
    else pack_q(sq, h, i0, mq, mp);
    for (int c = 0; c < mp; ++c) m[c] = -kInf<A>, l[c] = A(0), pos[c] = A(i0 + c + sq.dq);
    const A slope = p.alibi_slopes ? A(p.alibi_slopes[sq.b * p.alibi_batch_stride + h]) : A(0);
    const KvRows<T> kv(p, sq, hk, 1);
    const bool packed = jlo >= pj0 && jhi < pj0 + pn;
    // Packed value pairs start at pj0: a tile starts at an even offset from it (an extra key before jlo is
    // outside every query's window, so mask gives it probability 0).
    const int64_t jstart = kPairs && packed ? jlo - (jlo - pj0) % 2 : jlo;
    for (int64_t j0 = jstart; j0 <= jhi; j0 += kKeys) {
      const int nk = int(std::min<int64_t>(kKeys, jhi + 1 - j0));
      if constexpr (kPairs) {
        const Pair *kq = reinterpret_cast<Pair*>(kt), *vq = reinterpret_cast<Pair*>(vt);
        if (packed) kq = reinterpret_cast<const Pair*>(pk) + (j0 - pj0) * (dp / 2),
                    vq = reinterpret_cast<const Pair*>(pv) + (j0 - pj0) / 2 * dp;
        else kv.load_pairs(j0, nk, dp, jhi, 0, reinterpret_cast<Pair*>(kt), reinterpret_cast<Pair*>(vt));
#if defined(LLMKERN_ISA_AMX)
        tmul::gemm((nk + 15) / 16 * 16, mp, dp / 2, words(kq), dp / 2, words(qt), mp, s, mp, false);
#else
        attn::gemm<V, false>(nk, mp, (d + 1) / 2, kq, dp / 2, 1, reinterpret_cast<const Pair*>(qt), mp, s, mp);
#endif
        const int np = (nk + 1) / 2;
#if defined(LLMKERN_ISA_AMX)
        if (p.softcap > 0.f || p.alibi_slopes || !(p.scale > 0.f)) {
          scale_scores(nk, mp);
          scores_to_probs(sq, i0, mq, mp, j0, nk, slope);
          pair_up_rows(s, nk, mp);  // P^T rows (2j, 2j + 1) to pair row j
        } else {
          mask(sq, i0, mq, mp, j0, nk);
          softmax_to_pairs(nk, mp);
        }
        tile_pv(j0 == jstart, packed, j0, np, vq, mp);
#else
        scale_scores(nk, mp);
        scores_to_probs(sq, i0, mq, mp, j0, nk, slope);
        pair_up_rows(s, nk, mp);  // P^T rows (2j, 2j + 1) to pair row j
        const Pair* pt = reinterpret_cast<const Pair*>(s);
        if (j0 == jstart) attn::gemm<V, false>(d, mp, np, vq, 1, dp, pt, mp, o, mp);
        else attn::gemm<V, true>(d, mp, np, vq, 1, dp, pt, mp, o, mp, alpha);
#endif
      } else {
        const A *kt_ = kt, *vt_ = vt;
        if (packed) kt_ = pk + (j0 - pj0) * dp, vt_ = pv + (j0 - pj0) * dp;
        else kv.template load<V>(j0, nk, dp, kKeys, kt, vt, jhi, 0);
        attn::gemm<V, false>(nk, mp, d, kt_, dp, 1, qt, mp, s, mp);  // S^T = K Q^T
        scores_to_probs(sq, i0, mq, mp, j0, nk, slope);
        // O^T = O^T diag(alpha) + V^T P^T (V read transposed); the first key tile writes O^T.
        if (j0 == jstart) attn::gemm<V, false>(d, mp, nk, vt_, 1, dp, s, mp, o, mp);
        else attn::gemm<V, true>(d, mp, nk, vt_, 1, dp, s, mp, o, mp, alpha);
      }
    }
    // O^T's columns divided by l, then transposed back into rows (in kt, free now).
    for (int c = 0; c < mp; ++c) alpha[c] = l[c] == A(0) ? A(0) : A(1) / l[c];
    for (int e = 0; e < d; ++e) {
      A* row = o + int64_t(e) * mp;
      for (int c = 0; c < mp; c += W) (V::load(row + c) * V::load(alpha + c)).store(row + c);
    }
    attn::transpose_tile<V>(o, mp, d, mq, kt, dp);
    for (int c = 0; c < mq; ++c) {
      T* out = row_at<T>(p.out, sq.b, sq.q_start + i0 + c, h);
      float* lse = lse0 ? lse0 + c * p.lse.row_stride : nullptr;
      if (l[c] == A(0)) { write_empty_row(out, d, p.dtype, lse); continue; }
      attn::store_row<V>(kt + int64_t(c) * dp, d, out);
      if (lse) *lse = float(m[c] + std::log(l[c]));
    }
  }

  template <typename X>
  static auto words(X* x) {
    using U = std::conditional_t<std::is_const_v<X>, const uint32_t, uint32_t>;
    return reinterpret_cast<U*>(x);
  }

#if defined(LLMKERN_ISA_AMX)
  // O^T (+)= V^T P^T on the tiles for one key tile of np key pairs (P^T's pair rows in s); O^T's columns are
  // scaled by alpha first, unless this is the first key tile (which overwrites O^T).
  void tile_pv(bool first, bool packed, int64_t j0, int np, const Pair* vq, int mp) {
    const int kp = (np + 15) / 16 * 16;
    uint32_t* pt = words(s);
    std::memset(pt + int64_t(np) * mp, 0, sizeof(uint32_t) * size_t(kp - np) * mp);  // whole tiles of pairs
    const uint32_t* vtp = words(vtt);
    int64_t ld = kKeys / 2;
    if (packed) vtp = pvt + (j0 - pj0) / 2, ld = pvt_ld;
    else tmul::transpose_words(words(vq), np, dp, dp, words(vtt), ld);
    if (!first)
      for (int c = 0; c < mp; c += W) {
        bool moved = false;
        for (int t = 0; t < W; ++t) moved |= alpha[c + t] != A(1);
        if (!moved) continue;
        const V a = V::load(alpha + c);
        for (int e = 0; e < dp; ++e) (V::load(o + int64_t(e) * mp + c) * a).store(o + int64_t(e) * mp + c);
      }
    tmul::gemm(dp, mp, kp, vtp, ld, pt, mp, o, mp, !first);
  }

  // The online softmax of unscaled, unmodified scores (no softcap or alibi; a positive scale), straight to P^T's
  // pair rows: one pass for the maxima, one for exp, the sums and the bf16 pairs (scale_scores, softmax_update
  // and pair_up_rows take three more passes over the tile). exp as 2^t, t = (s scale - m) log2 e, by exp2_fast
  // (relative error ~3e-6, far below P's bf16 rounding).
  void softmax_to_pairs(int nk, int mp) {
    int c = 0;
    for (; c + 2 * W <= mp; c += 2 * W) softmax_pairs_cols<2>(c, nk, mp);
    if (c < mp) softmax_pairs_cols<1>(c, nk, mp);
  }

  template <int G>
  void softmax_pairs_cols(int c, int nk, int mp) {
    const V scale = V::set1(A(p.scale)), log2e = V::set1(A(1.4426950408889634));
    V mx[G], mu[G], sum[G], a[G], b[G];
    for (int g = 0; g < G; ++g) mx[g] = V::set1(-kInf<A>), sum[g] = V::zero();
    for (int jj = 0; jj < nk; ++jj)
      for (int g = 0; g < G; ++g) mx[g] = max(mx[g], V::load(s + int64_t(jj) * mp + c + g * W));
    for (int g = 0; g < G; ++g) {
      const V old = V::load(m + c + g * W);
      mx[g] = max(old, mx[g] * scale);  // scale > 0: the maximum of the scaled scores
      mx[g] = lazy_max(mx[g], old);
      // A column with no visible key so far keeps m = -inf; mu = -1e30 there (not `lowest`: -mu log2 e must stay
      // finite) gives t = -inf, i.e. 0.
      mu[g] = V::select_gt(mx[g], V::set1(-kInf<A>), mx[g], V::set1(A(-1e30)));
      a[g] = scale * log2e, b[g] = V::zero() - mu[g] * log2e;  // t = s a + b
    }
    for (int i = 0; 2 * i < nk; ++i)
      for (int g = 0; g < G; ++g) {
        const int64_t col = c + g * W;
        const V e0 = exp2_fast(fmadd(V::load(s + int64_t(2 * i) * mp + col), a[g], b[g]));
        const V e1 = 2 * i + 1 < nk ? exp2_fast(fmadd(V::load(s + int64_t(2 * i + 1) * mp + col), a[g], b[g]))
                                    : V::zero();
        sum[g] = sum[g] + e0 + e1;
        store_pairs(e0, e1, words(s) + int64_t(i) * mp + col);  // pair row i over row i, read before (i / 2 <= i)
      }
    for (int g = 0; g < G; ++g) {
      const int cg = c + g * W;
      const V old = V::load(m + cg);
      const V al = V::select_gt(mu[g], old, exp2_fast((old - mu[g]) * log2e), V::set1(A(1)));
      fmadd(V::load(l + cg), al, sum[g]).store(l + cg);
      mx[g].store(m + cg);
      al.store(alpha + cg);
    }
  }

  // The packed keys' V^T (pvt) from their value pairs (pv: (n + 1) / 2 rows of dp pairs), placed after them:
  // dp rows of key pairs, zero past the last one so that a key tile may read whole tiles from any even key.
  void pack_vt(int64_t n) {
    const int64_t np = (n + 1) / 2, np16 = (np + 15) / 16 * 16;
    pvt_ld = np16 + kKeys / 2;
    uint32_t* dst = words(const_cast<A*>(pv)) + np * dp;
    tmul::transpose_words(words(pv), int(np), dp, dp, dst, pvt_ld);
    for (int e = 0; e < dp; ++e) std::memset(dst + e * pvt_ld + np16, 0, sizeof(uint32_t) * size_t(kKeys / 2));
    pvt = dst;
  }
#endif

  // Softcap, alibi, mask and the online softmax: S^T becomes P^T (alpha, m, l updated).
  void scores_to_probs(const Seq& sq, int i0, int mq, int mp, int64_t j0, int nk, A slope) {
    if (p.softcap > 0.f) softcap_scores<V>(s, int64_t(nk) * mp, A(p.softcap));
    if (p.alibi_slopes) alibi(j0, nk, mp, slope);
    mask(sq, i0, mq, mp, j0, nk);
    softmax_update(nk, mp);
  }

  void scale_scores(int nk, int mp) {
    const V sc = V::set1(A(p.scale));
    for (int64_t i = 0; i < int64_t(nk) * mp; i += W) (V::load(s + i) * sc).store(s + i);
  }

  // qt as pairs: qt[e / 2][c] = (q[i0 + c][e], q[i0 + c][e + 1]) unscaled, zero beyond d and in the padding columns
  // (rows past (d + 1) / 2 are left as they are: the product does not read them).
  void pack_q_pairs(const Seq& sq, int h, int i0, int mq, int mp) {
    for (int c0 = 0; c0 < mp; c0 += 16) {
      const T* rows[16];
      for (int t = 0; t < 16; ++t)
        rows[t] = c0 + t < mq ? row_at<const T>(p.q, sq.b, sq.q_start + i0 + c0 + t, h) : nullptr;
      transpose_pairs(rows, d, words(qt) + c0, mp);
    }
    if constexpr (kTiles) {  // the tiles read all dp / 2 rows
      const int rows = (d + 1) / 2;
      std::memset(words(qt) + int64_t(rows) * mp, 0, sizeof(uint32_t) * size_t(dp / 2 - rows) * mp);
    }
  }

  // qt[e][c] = scale * q[i0 + c][e], zero in the padding columns.
  void pack_q(const Seq& sq, int h, int i0, int mq, int mp) {
    for (int c0 = 0; c0 < mp; c0 += W) {
      const T* rows[W];
      for (int t = 0; t < W; ++t)
        rows[t] = c0 + t < mq ? row_at<const T>(p.q, sq.b, sq.q_start + i0 + c0 + t, h) : nullptr;
      attn::transpose_rows<V>(rows, d, A(p.scale), qt + c0, mp);
    }
  }

  // s[jj][c] -= slope * |i0 + c + dq - j|.
  void alibi(int64_t j0, int nk, int mp, A slope) {
    const V ns = V::set1(-slope);
    for (int jj = 0; jj < nk; ++jj) {
      const V j = V::set1(A(j0 + jj));
      A* row = s + int64_t(jj) * mp;
      for (int c = 0; c < mp; c += W) {
        const V x = V::load(pos + c) - j;
        fmadd(ns, abs(x), V::load(row + c)).store(row + c);
      }
    }
  }

  // Scores of keys outside a query's window become -inf (only boundary tiles have any).
  void mask(const Seq& sq, int i0, int mq, int mp, int64_t j0, int nk) {
    const bool left = sq.wl >= 0 && j0 < sq.lo(i0 + mq - 1);
    const bool right = sq.wr >= 0 && j0 + nk - 1 > sq.hi(i0);
    if (!left && !right) return;
    for (int jj = 0; jj < nk; ++jj) {
      const int64_t j = j0 + jj;
      // Query i sees j iff j - dq - wr <= i <= j - dq + wl.
      const int64_t cmin = sq.wr >= 0 ? std::clamp<int64_t>(j - sq.dq - sq.wr - i0, 0, mq) : 0;
      const int64_t cmax = sq.wl >= 0 ? std::clamp<int64_t>(j - sq.dq + sq.wl - i0 + 1, cmin, mq) : mq;
      A* row = s + int64_t(jj) * mp;
      for (int64_t c = 0; c < cmin; ++c) row[c] = -kInf<A>;
      for (int64_t c = cmax; c < mq; ++c) row[c] = -kInf<A>;
    }
  }

  // The softmax update of G query vectors [c, c + G * W) at once: G independent max and exp chains per key
  // row (one chain per vector was latency-bound).
  template <int G>
  void softmax_cols(int c, int nk, int mp) {
    const V lowest = V::set1(std::numeric_limits<A>::lowest());
    V mx[G], mu[G], sum[G];
    for (int g = 0; g < G; ++g) mx[g] = V::load(m + c + g * W), sum[g] = V::zero();
    for (int jj = 0; jj < nk; ++jj)
      for (int g = 0; g < G; ++g) mx[g] = max(mx[g], V::load(s + int64_t(jj) * mp + c + g * W));
    if constexpr (kTiles)
      for (int g = 0; g < G; ++g) mx[g] = lazy_max(mx[g], V::load(m + c + g * W));
    // A column with no visible key so far keeps m = -inf; subtracting `lowest` then gives exp(-inf) = 0.
    for (int g = 0; g < G; ++g) mu[g] = max(mx[g], lowest);
    for (int jj = 0; jj < nk; ++jj)
      for (int g = 0; g < G; ++g) {
        A* x = s + int64_t(jj) * mp + c + g * W;
        const V e = exp_sub(V::load(x), mu[g]);
        e.store(x);
        sum[g] = sum[g] + e;
      }
    for (int g = 0; g < G; ++g) {
      const int cg = c + g * W;
      const V old = V::load(m + cg);
      V a = exp(old - mu[g]);
      if constexpr (kTiles) a = V::select_gt(mu[g], old, a, V::set1(A(1)));  // exactly 1 where m stays
      fmadd(V::load(l + cg), a, sum[g]).store(l + cg);
      mx[g].store(m + cg);
      a.store(alpha + cg);
    }
  }

  // Online softmax along query vectors: s becomes P^T = exp(s - m_new), alpha = exp(m - m_new) (O^T's column
  // rescaling, done by the V^T P^T product).
  void softmax_update(int nk, int mp) {
    int c = 0;
    for (; c + 4 * W <= mp; c += 4 * W) softmax_cols<4>(c, nk, mp);
    switch ((mp - c) / W) {
      case 3: softmax_cols<3>(c, nk, mp); break;
      case 2: softmax_cols<2>(c, nk, mp); break;
      case 1: softmax_cols<1>(c, nk, mp); break;
    }
  }
};

// Keys packed per task at most (fp32 K and V rows): beyond, tiles are converted on the fly.
constexpr int64_t kPackBytes = int64_t(16) << 20;

// Tasks = (sequence, kv head, chunk of query tiles), each covering all G query heads of the kv head: the
// task packs its keys once into contiguous fp32 rows, which every tile then streams (k/v rows of one head
// are strided in memory, e.g. 8 KB apart for 32 heads of 128: they would conflict in L1/L2 if re-read
// per tile, and be converted once per tile).
template <typename T>
void run_tiled(const AttnParams& p) {
  using TT = TiledTask<T>;
  using A = typename TT::A;
  const int g = p.nheads / p.nheads_k;
  const int ntiles = (p.seqlen_q + kMq - 1) / kMq;
  const int64_t heads = int64_t(p.batch) * p.nheads_k, threads = std::max(1, max_threads());
  // Enough chunks for ~4 tasks per thread.
  const int want = int(std::clamp<int64_t>((4 * threads + heads - 1) / heads, 1, ntiles));
  const int per_chunk = (ntiles + want - 1) / want, nchunks = (ntiles + per_chunk - 1) / per_chunk;
  const int64_t dp = attn::padded_head<typename TT::V, T>(p.head_dim);
  const int64_t pack_keys = std::min<int64_t>(std::max(p.seqlen_k, 1), kPackBytes / (2 * dp * int64_t(sizeof(A))));
  parallel_for(0, heads * nchunks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<A> buf(TT::size(p.head_dim)), pack(size_t(2 * pack_keys * dp + TT::pack_extra(p.head_dim)));
    [[maybe_unused]] attn::TilesIf<TT::kTiles> tile_state;
    TT task(p, buf.ptr);
    for (int64_t t = t0; t < t1; ++t) {
      const int k = int(t % nchunks), hk = int(t / nchunks % p.nheads_k), b = int(t / nchunks / p.nheads_k);
      // Chunks in the order 0, n-1, 1, n-2, ...: contiguous task ranges get equal causal work.
      const int chunk = (k % 2 == 0) ? k / 2 : nchunks - 1 - k / 2;
      const Seq sq = make_seq(p, b);
      const int qa = chunk * per_chunk * kMq, qb = std::min(sq.lq, qa + per_chunk * kMq);
      if (qa >= qb) continue;
      const int64_t jlo = sq.lo(qa), jhi = sq.hi(qb - 1);
      task.pn = 0;
      if (jlo <= jhi && jhi - jlo + 1 <= pack_keys) {
        const int n = int(jhi - jlo + 1);
        const KvRows<T> kv(p, sq, hk, 1);
        task.pk = pack.ptr, task.pj0 = jlo, task.pn = n;
        if constexpr (TT::kPairs) {  // n rows of dp / 2 key pairs, then the value pairs (see TiledTask)
          task.pv = pack.ptr + n * dp / 2;
          auto* pairs = reinterpret_cast<typename TT::Pair*>(pack.ptr);
          kv.load_pairs(jlo, n, int(dp), jhi, 4, pairs, pairs + n * dp / 2);
#if defined(LLMKERN_ISA_AMX)
          if constexpr (TT::kTiles) task.pack_vt(n);
#endif
        } else {
          task.pv = pack.ptr + n * dp;
          kv.template load<typename TT::V>(jlo, n, int(dp), n, pack.ptr, pack.ptr + n * dp, jhi, 4);
        }
      }
      for (int gg = 0; gg < g; ++gg)
        for (int i0 = qa; i0 < qb; i0 += kMq) task.run(sq, hk * g + gg, i0, std::min(kMq, qb - i0));
    }
  });
}

// Cache lines to prefetch (spans of bytes), issued a few at a time from inside a product's loop: issued in one
// burst, the misses beyond the core's fill buffers stall it, and memory and compute take turns instead of
// overlapping (paged decode from memory: 1.08-1.13x, side by side).
// Spans alternate between two lengths (a key's k rows, then its v rows). The lines go to L2 (prefetcht1): a chunk
// is 128 KB at 8 kv heads of 128, four times the L1d, and prefetched into L1 they evicted the working set (from
// memory 1.2x on Zen 4, side by side; T2 the same).
struct Lines {
  const char* const* span;
  int64_t len[2];
  int n = 0, i = 0;  // spans, the next one
  int64_t off = 0;   // the next line's offset in span i

  template <int N>
  void issue() {
    if (i < n && off + 64 * N <= len[i & 1]) {  // the usual case: N lines of one span, unrolled
      for (int l = 0; l < N; ++l) line(span[i] + off + 64 * l);
      if ((off += 64 * N) >= len[i & 1]) off = 0, ++i;
      return;
    }
    for (int l = 0; l < N && i < n; ++l) one();
  }
  void rest() {
    while (i < n) one();
  }
  static void line(const char* p) { prefetch_l2(p); }
  void one() {
    line(span[i] + off);
    if ((off += 64) >= len[i & 1]) off = 0, ++i;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Grouped path: one task = (sequence, key split, kv heads [hk0, hk0 + nh)) with all R = lq * G query rows
// of each head's group, row r of head hh = query r / G of head (hk0 + hh) * G + r % G. Several kv heads
// share a task when they are interleaved in memory (k/v rows [.., heads_k, d]): the task then reads the
// cache sequentially. Keys and values are read in place (no fp32 copy): scores are dot products of
// kDots (rows x keys) accumulators reduced together, O += P V takes the value rows as gemm's B operand.
template <typename T>
struct GroupTask {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  static constexpr int W = V::W;
  static constexpr int kNkp = (kNkG + 15) / 16 * 16;
  static constexpr int kDots = W >= 16 ? 16 : 8;  // accumulators per dot block (registers)
  static constexpr int kPairs = W >= 16 ? 2 : 1;  // vector pairs per P V strip: 4 rows x 2 x kPairs accumulators
  // Lines of the next chunk prefetched per key of a P V strip (per key pair on the bf16 dot path), and per block of
  // keys of the score products. Spread over both phases, a head's share of the misses overlaps all of its products:
  // with the lines issued in the P V strips only (8 per key pair), the prefetches themselves stalled, waiting for miss
  // buffers (14% of the decode's samples); from memory, in process: bf16 7.08 -> 5.83 ms, fp32 6.80 -> 5.90 ms, and
  // 7.79 -> 7.18 ms on the avx512 path (issue 3's case).
  static constexpr int kPfLines = 4, kPfDotLines = 16, kPfQuadLines = 16;  // chunk_by_key: per 4 keys and head
  // With pair products (attn::kPairProducts) q . k and P V are bf16 pair dot products (no widening). P is rounded
  // to bf16 for P V, as PyTorch's bf16 attention rounds it; O rows are then in interleave order. Not on the amx
  // build: on the Xeons with AMX a vdpbf16ps takes 4 FMAs' issue slots for 2 FMAs' work (0.82 against 0.20 ns a
  // core, independent chains), so bf16 rows widened to fp32 FMAs run faster (issue 3's decode from memory 12.4 ->
  // 10.5 ms; 1.1-1.45x over GQA shapes, MHA even). Nor on the tiles: with 4 query rows of a tile's 16 columns, the
  // scores and P V on AMX (chunks of 32 keys, head by head) took 13.5 ms against 11.9.
  static constexpr bool kBf16Dot = attn::kPairProducts<T> && !attn::kTileProducts<T>;
  static_assert(!kBf16Dot || kNkp == 32, "P rows are converted to bf16 32 at a time");

  const AttnParams& p;
  // Rows of q and O are in paired order (attn::load_row_paired): pairs of vectors over [0, d2), natural after.
  int d, dp, d2, dfull, g, rows, nh;  // rows: R of the longest sequence (the per-head stride)
  A *q, *s, *o, *m, *l, *slope;
  const T* zero_row;  // d zeros: the key of padding slots in a dot block
  const T* kp[kNkp];  // this chunk's key / value rows (head hk0)
  const T* vp[kNkG];
  const T* kn[kNkG];  // the next chunk's, prefetched while this one runs
  const T* vn[kNkG];
  const char* pf_span[2 * kNkG];  // this head's share of the next chunk's k / v spans (Lines)

  // Width of q and O rows: whole vectors, or whole 32-element pair blocks on the bf16 dot path.
  static int row_width(int d) { return kBf16Dot ? (d + 31) / 32 * 32 : int(padded<V>(d)); }
  static int64_t size(int d, int rows, int nh) {
    const int64_t dp = row_width(d), hr = int64_t(nh) * rows;
    return 2 * hr * dp + hr * kNkp + 3 * hr + dp;
  }
  GroupTask(const AttnParams& p_, int rows_, int nh_, A* buf)
      : p(p_), d(p_.head_dim), dp(row_width(p_.head_dim)), d2(attn::paired<V>(p_.head_dim)),
        dfull(p_.head_dim / W * W), g(p_.nheads / p_.nheads_k), rows(rows_), nh(nh_) {
    const int64_t hr = int64_t(nh) * rows;
    q = buf, s = q + hr * dp, o = s + hr * kNkp;
    m = o + hr * dp, l = m + hr, slope = l + hr;
    A* z = slope + hr;
    std::memset(z, 0, sizeof(A) * dp);  // sizeof(T) <= sizeof(A): dp zero A's hold d zero T's
    zero_row = reinterpret_cast<const T*>(z);
  }

  // Attends the rows of sequence sq, heads [hk0, hk0 + nh), to keys [ja, jb]; leaves unnormalized O, m, l.
  void run(const Seq& sq, int hk0, int64_t ja, int64_t jb) {
    const int R = sq.lq * g;
    const A scale = A(p.scale);
    for (int hh = 0; hh < nh; ++hh) {
      for (int r = 0; r < R; ++r) {
        const int h = (hk0 + hh) * g + r % g;
        const int64_t rr = int64_t(hh) * rows + r;
        const T* qr = row_at<const T>(p.q, sq.b, sq.q_start + r / g, h);
        if constexpr (kBf16Dot) {  // as is (scores are scaled instead), zero padded
          attn::copy_row_padded(qr, d, 2 * dp, reinterpret_cast<T*>(q + rr * dp));
        } else {
          attn::load_row_paired<V>(qr, d, scale, q + rr * dp, dp);
        }
        m[rr] = -kInf<A>, l[rr] = A(0);
        slope[rr] = p.alibi_slopes ? A(p.alibi_slopes[sq.b * p.alibi_batch_stride + h]) : A(0);
      }
      std::memset(o + int64_t(hh) * rows * dp, 0, sizeof(A) * R * dp);
    }
    if (ja > jb) return;
    const KvRows<T> kv(p, sq, hk0, nh);
    int nk = int(std::min<int64_t>(kNkG, jb + 1 - ja));
    kv.row_ptrs(ja, nk, kp, vp);
    const bool by_key = kBf16Dot && nh > 1 && R <= kKeyOrderRows;
    for (int64_t j0 = ja; j0 <= jb; j0 += kNkG) {
      for (int jj = nk; jj < kNkp; ++jj) kp[jj] = zero_row;
      const int64_t next = j0 + kNkG;
      const int next_n = int(std::clamp<int64_t>(jb + 1 - next, 0, kNkG));
      kv.row_ptrs(next, next_n, kn, vn);
#if defined(LLMKERN_ISA_AVX512BF16)
      if constexpr (kBf16Dot)
        if (by_key) chunk_by_key(sq, R, j0, nk, next_n, kv);
#endif
      for (int hh = 0; hh < nh && !by_key; ++hh) {
        // Prefetch this head's share of the next chunk (random paged blocks defeat the hardware prefetcher).
        Lines pf = next_lines(kv, next_n * hh / nh, next_n * (hh + 1) / nh);
        const int64_t r0 = int64_t(hh) * rows;
        scores(R, nk, q + r0 * dp, hh * kv.k_hs, s + r0 * kNkp, pf);
        for (int r = 0; r < R; ++r) {
          row_update(sq, r, r0 + r, j0, nk);
#if defined(LLMKERN_ISA_AVX512BF16)
          if constexpr (kBf16Dot) to_bf16_in_place(s + (r0 + r) * kNkp);
#endif
        }
        values(R, nk, hh * kv.v_hs, s + r0 * kNkp, o + r0 * dp, pf);
        pf.rest();
      }
      std::memcpy(kp, kn, sizeof(kn));
      std::memcpy(vp, vn, sizeof(vn));
      nk = next_n;
    }
  }

  // The k and v spans of the next chunk's keys [j0, j1) (kn, vn), to prefetch while this chunk runs.
  Lines next_lines(const KvRows<T>& kv, int j0, int j1) {
    Lines pf{pf_span, {kv.span_bytes(kv.k_hs), kv.span_bytes(kv.v_hs)}};
    for (int jj = j0; jj < j1; ++jj) {
      pf_span[pf.n++] = reinterpret_cast<const char*>(kn[jj]);
      pf_span[pf.n++] = reinterpret_cast<const char*>(vn[jj]);
    }
    return pf;
  }

  // sc[r][jj] = q_r . k_jj for the chunk's keys (rows in blocks of 4, 2, 1).
  void scores(int R, int nk, const A* qh, int64_t hoff, A* sc, Lines& pf) const {
    int r = 0;
    for (; r + 4 <= R; r += 4) dot_rows<4>(nk, qh + int64_t(r) * dp, hoff, sc + int64_t(r) * kNkp, pf);
    for (; r + 2 <= R; r += 2) dot_rows<2>(nk, qh + int64_t(r) * dp, hoff, sc + int64_t(r) * kNkp, pf);
    for (; r < R; ++r) dot_rows<1>(nk, qh + int64_t(r) * dp, hoff, sc + int64_t(r) * kNkp, pf);
  }

  template <int RB>
  void dot_rows(int nk, const A* q0, int64_t hoff, A* sc, Lines& pf_out) const {
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (kBf16Dot) return dot_rows_bf16<RB>(nk, reinterpret_cast<const T*>(q0), hoff, sc, pf_out);
#endif
    constexpr int KB = kDots / RB;
    Lines pf = pf_out;  // see pv_strip
    for (int jj = 0; jj < nk; jj += KB) {
      pf.template issue<kPfDotLines>();
      V acc[RB * KB];
      for (int i = 0; i < RB * KB; ++i) acc[i] = V::zero();
      const T* kr[KB];
      for (int k = 0; k < KB; ++k) kr[k] = kp[jj + k] == zero_row ? zero_row : kp[jj + k] + hoff;
      for (int e = 0; e < d2; e += 2 * W) {
        V qa[RB], qb[RB];
        for (int r = 0; r < RB; ++r) {
          qa[r] = V::load(q0 + int64_t(r) * dp + e);
          qb[r] = V::load(q0 + int64_t(r) * dp + e + W);
        }
        for (int k = 0; k < KB; ++k) {
          V ka, kb;
          load_pair(kr[k] + e, ka, kb);
          for (int r = 0; r < RB; ++r) acc[r * KB + k] = fmadd(qb[r], kb, fmadd(qa[r], ka, acc[r * KB + k]));
        }
      }
      for (int e = d2; e < dfull; e += W) {
        V qv[RB];
        for (int r = 0; r < RB; ++r) qv[r] = V::load(q0 + int64_t(r) * dp + e);
        for (int k = 0; k < KB; ++k) {
          const V kv = V::load(kr[k] + e);
          for (int r = 0; r < RB; ++r) acc[r * KB + k] = fmadd(qv[r], kv, acc[r * KB + k]);
        }
      }
      alignas(64) A out[RB * KB];
      reduce_add_each<RB * KB>(acc, out);
      for (int e = dfull; e < d; ++e)
        for (int k = 0; k < KB; ++k) {
          const A x = ScalarVec<A>::load(kr[k] + e).v;
          for (int r = 0; r < RB; ++r) out[r * KB + k] += q0[int64_t(r) * dp + e] * x;
        }
      for (int r = 0; r < RB; ++r)
        for (int k = 0; k < KB; ++k) sc[int64_t(r) * kNkp + jj + k] = out[r * KB + k];
    }
    pf_out = pf;
  }

  // O[r] += sum_jj P[r][jj] V[jj] for the chunk's keys (rows in blocks of 4, 2, 1).
  void values(int R, int nk, int64_t hoff, const A* pr, A* oh, Lines& pf) const {
    int r = 0;
    for (; r + 4 <= R; r += 4) pv_rows<4>(nk, hoff, pr + int64_t(r) * kNkp, oh + int64_t(r) * dp, pf);
    for (; r + 2 <= R; r += 2) pv_rows<2>(nk, hoff, pr + int64_t(r) * kNkp, oh + int64_t(r) * dp, pf);
    for (; r < R; ++r) pv_rows<1>(nk, hoff, pr + int64_t(r) * kNkp, oh + int64_t(r) * dp, pf);
  }

  template <int RB>
  void pv_rows(int nk, int64_t hoff, const A* pr, A* oh, Lines& pf) const {
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (kBf16Dot) return pv_rows_bf16<RB>(nk, hoff, pr, oh, pf);
#endif
    int e = 0;
    for (; e + 2 * kPairs * W <= d2; e += 2 * kPairs * W) pv_strip<RB, kPairs, true>(nk, hoff, e, pr, oh, pf);
    for (; e < d2; e += 2 * W) pv_strip<RB, 1, true>(nk, hoff, e, pr, oh, pf);
    for (; e < dfull; e += W) pv_strip<RB, 1, false>(nk, hoff, e, pr, oh, pf);
    for (int r = 0; r < RB; ++r)
      for (e = dfull; e < d; ++e) {
        A acc = oh[int64_t(r) * dp + e];
        for (int k = 0; k < nk; ++k) acc += pr[int64_t(r) * kNkp + k] * ScalarVec<A>::load(vp[k] + hoff + e).v;
        oh[int64_t(r) * dp + e] = acc;
      }
  }

  // Columns [e, e + NV W) of RB rows of O, NV = 2 NP vectors read as NP pairs (PAIRED) or one natural vector.
  template <int RB, int NP, bool PAIRED>
  void pv_strip(int nk, int64_t hoff, int e, const A* pr, A* oh, Lines& pf_out) const {
    Lines pf = pf_out;  // a local copy stays in registers (the stores to oh might alias pf_out)
    constexpr int NV = PAIRED ? 2 * NP : 1;
    V acc[RB][NV];
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < NV; ++i) acc[r][i] = V::load(oh + int64_t(r) * dp + e + i * W);
    for (int k = 0; k < nk; ++k) {
      pf.template issue<kPfLines>();
      const T* vr = vp[k] + hoff + e;
      V vv[NV];
      if constexpr (PAIRED) {
        for (int i = 0; i < NP; ++i) load_pair(vr + 2 * i * W, vv[2 * i], vv[2 * i + 1]);
      } else {
        vv[0] = V::load(vr);
      }
      for (int r = 0; r < RB; ++r) {
        const V pk = V::set1(pr[int64_t(r) * kNkp + k]);
        for (int i = 0; i < NV; ++i) acc[r][i] = fmadd(pk, vv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < NV; ++i) acc[r][i].store(oh + int64_t(r) * dp + e + i * W);
    pf_out = pf;
  }

#if defined(LLMKERN_ISA_AVX512BF16)
  // dot_rows on bf16 pairs: q rows are bf16 (row stride 2 dp), unscaled and zero padded.
  template <int RB>
  void dot_rows_bf16(int nk, const T* q0, int64_t hoff, A* sc, Lines& pf_out) const {
    constexpr int KB = kDots / RB;
    const A scale = A(p.scale);
    Lines pf = pf_out;  // see pv_strip
    for (int jj = 0; jj < nk; jj += KB) {
      pf.template issue<kPfDotLines>();
      V acc[RB * KB];
      for (int i = 0; i < RB * KB; ++i) acc[i] = V::zero();
      const T* kr[KB];
      for (int k = 0; k < KB; ++k) kr[k] = kp[jj + k] == zero_row ? zero_row : kp[jj + k] + hoff;
      for (int e = 0; e < d; e += 32) {
        const __mmask32 in = Bf16x32::first(d - e);
        Bf16x32 qv[RB];
        for (int r = 0; r < RB; ++r) qv[r] = Bf16x32::load(q0 + int64_t(r) * 2 * dp + e);
        for (int k = 0; k < KB; ++k) {
          const Bf16x32 kv = Bf16x32::load(kr[k] + e, in);
          for (int r = 0; r < RB; ++r) acc[r * KB + k] = dot_pairs(acc[r * KB + k], qv[r], kv);
        }
      }
      alignas(64) A out[RB * KB];
      reduce_add_each<RB * KB>(acc, out);
      for (int r = 0; r < RB; ++r)
        for (int k = 0; k < KB; ++k) sc[int64_t(r) * kNkp + jj + k] = scale * out[r * KB + k];
    }
    pf_out = pf;
  }

  // pv_rows on bf16 pairs: key pairs (k, k + 1) interleaved against P[r] rows of bf16 pairs (to_bf16_in_place);
  // O rows in interleave order.
  template <int RB>
  void pv_rows_bf16(int nk, int64_t hoff, const A* pr, A* oh, Lines& pf) const {
    int e = 0;
    for (; e + 64 <= dp; e += 64) pv_strip_bf16<RB, 2>(nk, hoff, e, pr, oh, pf);
    for (; e < dp; e += 32) pv_strip_bf16<RB, 1>(nk, hoff, e, pr, oh, pf);
  }

  // One chunk of keys for every kv head of the task (heads interleaved: a key's rows of all heads are one span), read
  // in memory order: the k rows of four keys at a time, head after head, then after the softmax the v rows of eight
  // keys, head after head. The hardware prefetchers follow that order; head by head over the chunk (the other path)
  // a core reads 256 bytes of every 2 KB and only the software prefetch helps. O stays in L1 (16 KB at 8 heads x 4 rows
  // of 128), updated once per eight keys. Issue 3's decode (32 / 8 heads of 128, context 4096, bf16), both paths
  // alternating in one process: 1.10-1.23x from memory, 1.36-1.49x with one row a head (MHA, 32 heads); with the
  // cache resident (context 256) 0.91-0.94x, the O updates costing more than the order saves. With 8 rows a head
  // 0.87-0.93x from memory: so only up to kKeyOrderRows rows.
  void chunk_by_key(const Seq& sq, int R, int64_t j0, int nk, int next_n, const KvRows<T>& kv) {
    Lines pf = next_lines(kv, 0, next_n);
    // Keys past nk read as zero rows; their scores are masked to -inf (P = 0). Blocks of 4 and 8 keys end by np.
    for (int jj = 0; jj < nk; jj += 4) {
      int r = 0;
      for (; r + 4 <= R; r += 4) dot_quad<4, 1>(kv.k_hs, 0, r, jj, pf);
      for (; r + 2 <= R; r += 2) dot_quad<2, 2>(kv.k_hs, 0, r, jj, pf);
      for (; r < R; ++r) dot_quad<1, 4>(kv.k_hs, 0, r, jj, pf);
    }
    for (int hh = 0; hh < nh; ++hh)
      for (int r = 0; r < R; ++r) {
        const int64_t rr = int64_t(hh) * rows + r;
        row_update(sq, r, rr, j0, nk);
        to_bf16_in_place(s + rr * kNkp);
      }
    for (int jj = 0; jj < nk; jj += 8)
      for (int hh = 0; hh < nh; ++hh) {
        pf.template issue<2 * kPfQuadLines>();
        const T* vr[8];
        for (int k = 0; k < 8; ++k) vr[k] = jj + k < nk ? vp[jj + k] + hh * kv.v_hs : zero_row;
        int e = 0;
        for (; e + 64 <= dp; e += 64) pv_eight<2>(vr, e, hh, R, jj);
        for (; e < dp; e += 32) pv_eight<1>(vr, e, hh, R, jj);
      }
    pf.rest();
  }

  // Scores of keys [jj, jj + 4) for rows [r0, r0 + RB) of heads [h0, nh), HB heads at a time (16 accumulators), then
  // the remaining heads in smaller blocks.
  template <int RB, int HB>
  void dot_quad(int64_t hs, int h0, int r0, int jj, Lines& pf) {
    constexpr int N = 4 * HB * RB;
    const A scale = A(p.scale);
    for (; h0 + HB <= nh; h0 += HB) {
      pf.template issue<kPfQuadLines>();
      V acc[N];
      for (int i = 0; i < N; ++i) acc[i] = V::zero();
      const T* kr[4 * HB];
      for (int k = 0; k < 4; ++k)
        for (int h = 0; h < HB; ++h) kr[k * HB + h] = kp[jj + k] == zero_row ? zero_row : kp[jj + k] + (h0 + h) * hs;
      const T* q0 = reinterpret_cast<const T*>(q + (int64_t(h0) * rows + r0) * dp);  // bf16 rows, 2 dp apart
      for (int e = 0; e < d; e += 32) {
        const __mmask32 in = Bf16x32::first(d - e);
        for (int h = 0; h < HB; ++h) {
          Bf16x32 kv[4];
          for (int k = 0; k < 4; ++k) kv[k] = Bf16x32::load(kr[k * HB + h] + e, in);
          for (int r = 0; r < RB; ++r) {
            const Bf16x32 qv = Bf16x32::load(q0 + (int64_t(h) * rows + r) * 2 * dp + e);
            for (int k = 0; k < 4; ++k) acc[(h * RB + r) * 4 + k] = dot_pairs(acc[(h * RB + r) * 4 + k], qv, kv[k]);
          }
        }
      }
      alignas(64) A out[N];
      reduce_add_each<N>(acc, out);
      for (int i = 0; i < HB * RB; ++i) {  // i = h RB + r: the scores of four keys, adjacent in out and in s
        A* dst = s + ((int64_t(h0) + i / RB) * rows + r0 + i % RB) * kNkp + jj;
        for (int k = 0; k < 4; ++k) dst[k] = scale * out[i * 4 + k];
      }
    }
    if constexpr (HB > 1)
      if (h0 < nh) dot_quad<RB, HB / 2>(hs, h0, r0, jj, pf);
  }

  // O[r] += sum over keys k of [jj, jj + 8) of P[r][k] vr[k - jj], columns [e, e + 32 NB), every row r of head hh.
  template <int NB>
  void pv_eight(const T* const* vr, int e, int hh, int R, int jj) {
    constexpr int NP = 4;
    Bf16x32 il[NP][NB], ih[NP][NB];  // key pairs (jj, jj + 1), (jj + 2, jj + 3), ... interleaved
    for (int b = 0; b < NB; ++b) {
      const __mmask32 in = Bf16x32::first(d - e - 32 * b);
      for (int pr = 0; pr < NP; ++pr)
        interleave(Bf16x32::load(vr[2 * pr] + e + 32 * b, in), Bf16x32::load(vr[2 * pr + 1] + e + 32 * b, in),
                   il[pr][b], ih[pr][b]);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t rr = int64_t(hh) * rows + r;
      const uint32_t* pp = reinterpret_cast<const uint32_t*>(s + rr * kNkp) + jj / 2;
      Bf16x32 pw[NP];
      for (int pr = 0; pr < NP; ++pr) pw[pr] = Bf16x32::set1_pair(pp[pr]);
      A* orow = o + rr * dp + e;
      for (int b = 0; b < NB; ++b) {
        V lo = V::load(orow + 32 * b), hi = V::load(orow + 32 * b + 16);
        for (int pr = 0; pr < NP; ++pr) lo = dot_pairs(lo, pw[pr], il[pr][b]), hi = dot_pairs(hi, pw[pr], ih[pr][b]);
        lo.store(orow + 32 * b);
        hi.store(orow + 32 * b + 16);
      }
    }
  }

  // Columns [e, e + 32 NB) of RB rows of O.
  template <int RB, int NB>
  void pv_strip_bf16(int nk, int64_t hoff, int e, const A* pr, A* oh, Lines& pf_out) const {
    Lines pf = pf_out;  // see pv_strip
    V lo[RB][NB], hi[RB][NB];
    __mmask32 in[NB];
    for (int b = 0; b < NB; ++b) {
      in[b] = Bf16x32::first(d - e - 32 * b);
      for (int r = 0; r < RB; ++r) {
        lo[r][b] = V::load(oh + int64_t(r) * dp + e + 32 * b);
        hi[r][b] = V::load(oh + int64_t(r) * dp + e + 32 * b + 16);
      }
    }
    for (int k = 0; k < nk; k += 2) {
      pf.template issue<kPfLines>();
      const T* v0 = vp[k] + hoff + e;
      const T* v1 = k + 1 < nk ? vp[k + 1] + hoff + e : zero_row;
      Bf16x32 pw[RB];  // (P[r][k], P[r][k + 1]) in every lane
      for (int r = 0; r < RB; ++r)
        pw[r] = Bf16x32::set1_pair(reinterpret_cast<const uint32_t*>(pr + int64_t(r) * kNkp)[k / 2]);
      for (int b = 0; b < NB; ++b) {
        Bf16x32 il, ih;
        interleave(Bf16x32::load(v0 + 32 * b, in[b]), Bf16x32::load(v1 + 32 * b, in[b]), il, ih);
        for (int r = 0; r < RB; ++r) {
          lo[r][b] = dot_pairs(lo[r][b], pw[r], il);
          hi[r][b] = dot_pairs(hi[r][b], pw[r], ih);
        }
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < RB; ++r) {
        lo[r][b].store(oh + int64_t(r) * dp + e + 32 * b);
        hi[r][b].store(oh + int64_t(r) * dp + e + 32 * b + 16);
      }
    pf_out = pf;
  }
#endif

  // Softcap, alibi, mask and the online softmax of row r (buffer row rr) over keys [j0, j0 + nk).
  void row_update(const Seq& sq, int r, int64_t rr, int64_t j0, int nk) {
    A* x = s + rr * kNkp;
    const int np = padded<V>(nk);
    if (p.softcap > 0.f) softcap_scores<V>(x, np, A(p.softcap));
    const int64_t i = r / g;
    if (p.alibi_slopes) {
      for (int jj = 0; jj < nk; ++jj) x[jj] -= slope[rr] * A(std::abs(i + sq.dq - (j0 + jj)));
    }
    const int64_t lo = sq.lo(i), hi = sq.hi(i);
    if (j0 < lo || j0 + nk - 1 > hi)
      for (int jj = 0; jj < nk; ++jj)
        if (j0 + jj < lo || j0 + jj > hi) x[jj] = -kInf<A>;
    for (int jj = nk; jj < np; ++jj) x[jj] = -kInf<A>;
    V mv = V::set1(-kInf<A>);
    for (int jj = 0; jj < np; jj += W) mv = max(mv, V::load(x + jj));
    const A mx = reduce_max(mv, m[rr]);
    const A mu = std::max(mx, std::numeric_limits<A>::lowest());
    V sum = V::zero();
    const V muv = V::set1(mu);
    for (int jj = 0; jj < np; jj += W) {
      const V e = exp_sub(V::load(x + jj), muv);
      e.store(x + jj);
      sum = sum + e;
    }
    const A a = mx == m[rr] ? A(1) : std::exp(m[rr] - mu);  // the max rarely moves after the first chunks
    l[rr] = l[rr] * a + sum.reduce_add();
    m[rr] = mx;
    if (a != A(1)) {
      A* orow = o + rr * dp;
      const V av = V::set1(a);
      for (int e = 0; e < dp; e += W) (V::load(orow + e) * av).store(orow + e);
    }
  }

  // An O row (paired order, or interleave order on the bf16 dot path; scrambled here) to out in natural order.
  void store_o(A* orow, T* out) const {
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (kBf16Dot) {
      for (int e = 0; e < dp; e += 32) unpermute_pairs(orow + e);
      return attn::store_row<V>(orow, d, out);
    }
#endif
    attn::store_row_paired<V>(orow, d, out);
  }

  // out / lse of row r of kv head hk from its (O, m, l); orow is scaled in place.
  void finish_row(const Seq& sq, int hk, int r, A* orow, A mr, A lr) const {
    const int h = hk * g + r % g;
    T* out = row_at<T>(p.out, sq.b, sq.q_start + r / g, h);
    float* lse = p.lse.ptr ? row_at<float>(p.lse, sq.b, sq.q_start + r / g, h) : nullptr;
    if (lr == A(0)) { write_empty_row(out, d, p.dtype, lse); return; }
    const V inv = V::set1(A(1) / lr);
    for (int e = 0; e < dp; e += W) (V::load(orow + e) * inv).store(orow + e);
    store_o(orow, out);
    if (lse) *lse = float(mr + std::log(lr));
  }
};

// Key band [ja, jb] of split `sp` out of `ns` for the whole group of sequence sq.
static inline void split_range(const Seq& sq, int ns, int sp, int64_t& ja, int64_t& jb) {
  const int64_t lo = sq.lq > 0 ? sq.lo(0) : 0, hi = sq.lq > 0 ? sq.hi(sq.lq - 1) : -1;
  const int64_t n = hi - lo + 1;
  if (n <= 0) { ja = 0, jb = -1; return; }
  const int64_t chunk = ((n + ns - 1) / ns + kNk - 1) / kNk * kNk;
  ja = lo + sp * chunk;
  jb = std::min(hi, ja + chunk - 1);
}

static int choose_splits(const AttnParams& p, int64_t tasks) {
  if (p.num_splits > 0) return p.num_splits;
  const int64_t threads = std::max(1, max_threads());
  if (tasks >= 2 * threads) return 1;
  const int64_t want = (4 * threads + tasks - 1) / tasks;
  const int64_t most = std::max<int64_t>(1, p.seqlen_k / 512);
  return int(std::min<int64_t>({want, most, 64}));
}

template <typename T>
void run_grouped(const AttnParams& p) {
  using GT = GroupTask<T>;
  using A = typename GT::A;
  const int g = p.nheads / p.nheads_k, rows = p.seqlen_q * g;
  const int64_t dp = GT::row_width(p.head_dim);
  // kv heads per task: all of them when they are interleaved within k/v rows (one sequential read).
  const bool interleaved = p.k.head_stride < p.k.row_stride && p.v.head_stride < p.v.row_stride;
  const int nh = interleaved ? p.nheads_k : 1, hgroups = p.nheads_k / nh;
  const int64_t groups = int64_t(p.batch) * hgroups;
  const int ns = choose_splits(p, groups);
  const int64_t hr = int64_t(nh) * rows;
  // Task t = (group t / ns, split t % ns), group = (batch, head group). Flash-decoding: with ns > 1 the
  // partial (O, m, l) go to `parts` and are combined below in split order.
  const int64_t part = hr * (dp + 2);  // per task: O [hr][dp], m [hr], l [hr]
  Scratch<A> parts(ns > 1 ? size_t(groups * ns * part) : 1);
  parallel_for(0, groups * ns, 1, [&](int64_t t0, int64_t t1) {
    Scratch<A> buf(GT::size(p.head_dim, rows, nh));
    GT task(p, rows, nh, buf.ptr);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t grp = t / ns;
      const int sp = int(t % ns), hk0 = int(grp % hgroups) * nh;
      const Seq sq = make_seq(p, int(grp / hgroups));
      int64_t ja, jb;
      split_range(sq, ns, sp, ja, jb);
      task.run(sq, hk0, ja, jb);
      const int R = sq.lq * g;
      if (ns == 1) {
        for (int hh = 0; hh < nh; ++hh)
          for (int r = 0; r < R; ++r) {
            const int64_t rr = int64_t(hh) * rows + r;
            task.finish_row(sq, hk0 + hh, r, task.o + rr * dp, task.m[rr], task.l[rr]);
          }
        continue;
      }
      A* dst = parts.ptr + t * part;
      std::memcpy(dst, task.o, sizeof(A) * hr * dp);
      std::memcpy(dst + hr * dp, task.m, sizeof(A) * hr);
      std::memcpy(dst + hr * dp + hr, task.l, sizeof(A) * hr);
      (void)R;
    }
  });
  if (ns == 1) return;
  parallel_for(0, groups, 1, [&](int64_t t0, int64_t t1) {
    using V = typename GT::V;
    Scratch<A> acc(dp), buf(GT::size(p.head_dim, rows, nh));
    GT task(p, rows, nh, buf.ptr);  // only finish_row is used
    for (int64_t grp = t0; grp < t1; ++grp) {
      const Seq sq = make_seq(p, int(grp / hgroups));
      const int hk0 = int(grp % hgroups) * nh;
      const A* base = parts.ptr + grp * ns * part;
      for (int hh = 0; hh < nh; ++hh)
        for (int r = 0; r < sq.lq * g; ++r) {
          const int64_t rr = int64_t(hh) * rows + r;
          A mx = -kInf<A>;
          for (int sp = 0; sp < ns; ++sp) mx = std::max(mx, base[sp * part + hr * dp + rr]);
          const A mu = std::max(mx, std::numeric_limits<A>::lowest());
          A lsum = 0;
          std::memset(acc.ptr, 0, sizeof(A) * dp);
          for (int sp = 0; sp < ns; ++sp) {
            const A* pp = base + sp * part;
            const A w = std::exp(pp[hr * dp + rr] - mu);
            if (w == A(0)) continue;
            lsum += w * pp[hr * dp + hr + rr];
            const V wv = V::set1(w);
            for (int e = 0; e < dp; e += V::W)
              fmadd(wv, V::load(pp + rr * dp + e), V::load(acc.ptr + e)).store(acc.ptr + e);
          }
          task.finish_row(sq, hk0 + hh, r, acc.ptr, mx, lsum);
        }
    }
  });
}

template <typename T>
void run_fwd(const AttnParams& p) {
  if (p.batch == 0 || p.nheads == 0 || p.seqlen_q == 0) return;
  const int g = p.nheads / p.nheads_k;
  if (int64_t(p.seqlen_q) * g <= kGroupRows) run_grouped<T>(p);
  else run_tiled<T>(p);
}

}  // namespace

void attn_fwd_kernel(const AttnParams& p) {
  visit_dtype(p.dtype, [&](auto t) { run_fwd<decltype(t)>(p); });
}

void kv_write_kernel(const KvWriteParams& p) {
  visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const int64_t items = p.tokens * p.nheads_k;
    const size_t bytes = size_t(p.head_dim) * sizeof(T);
    parallel_for(0, items, grain_for(int64_t(2 * bytes)), [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t tok = w / p.nheads_k, h = w % p.nheads_k, slot = p.slot_mapping[tok];
        if (slot < 0) continue;
        const int64_t blk = slot / p.block_size, off = slot % p.block_size;
        std::memcpy(row_at<T>(p.k_cache, blk, off, h), row_at<const T>(p.k, 0, tok, h), bytes);
        std::memcpy(row_at<T>(p.v_cache, blk, off, h), row_at<const T>(p.v, 0, tok, h), bytes);
      }
    });
  });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
