// Attention backward core (flash-attn 2's algorithm, arXiv:2307.08691 Alg. 2), compiled once per CPU ISA.
//
// A task owns the keys of one (sequence, kv head) pair, or one chunk of them when there are too few pairs
// to give every thread two tasks. It walks its keys in blocks of kBlockKeys: K (fp32 rows), K^T (times the
// score scale) and V^T (per key tile) are packed once per block and dK, dV accumulate in fp32; then every
// query tile of every query head of the GQA group that sees the block packs its Q and dO rows (fp32) once
// and runs over the block's key tiles. Score tiles are row-major [query][key] (the backward has no
// reduction over keys: lse and delta come in per row), so no tile is transposed per (key, query) pair:
//   S = Q K^T, dP = dO V^T, P = exp(S - lse), dS = scale P (dP - delta),
//   dV^T += dO^T P, dK^T += Q^T dS, dQ_tile += dS K   (five register-blocked products, attention_tile.h;
// dV and dK are kept transposed per key tile, so P and dS are B operands with 256-byte rows, as the forward's
// O^T += V^T P^T: 1.04x on the fp32 backward; they are written back as rows once per block).
// dS carries the softmax scale, so dK and dQ need no pass of their own to scale them. dQ of a query tile
// sums over the block's key tiles locally, then over blocks into its key chunk's dq buffer: for the first
// chunk dq itself when dq has the accumulation type (float32, float64), else a scratch buffer; a last pass
// sums the chunks' buffers in chunk order into dq (none when dq is the only buffer).
// On the amx build, bf16's five products run on the AMX tiles (Bwd::kTiles, cpu/vec/amx.h).
// Tile pairs outside the causal / local window are skipped. Every sum has a fixed order, so results do not
// depend on thread timing; tasks are handed out through an atomic counter (which thread runs a task may
// vary, what it computes does not).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/vec/vec.h"
#include "kernels/attention.h"
#include "kernels/attention_tile.h"
#include "kernels/parallel.h"
#include "kernels/prefetch.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

constexpr int kNk = 64;           // keys per tile (a multiple of every vector width)
constexpr int kMq = 64;           // queries per tile
constexpr int kBlockKeys = 512;   // keys whose fp32 K, K^T, V^T, dK, dV a task holds at once (multiple of kNk)
constexpr int kPrefetchRows = 6;  // rows the packing loops prefetch ahead

// 0, 1, 2, ... : key offsets within a vector (ALiBi distances).
alignas(64) constexpr float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

template <typename T>
static inline T* at_row(const AttnTensor& t, int64_t b, int64_t row, int64_t h) {
  return static_cast<T*>(t.ptr) + b * t.batch_stride + row * t.row_stride + h * t.head_stride;
}

// One sequence: its rows' start in the packed tensors (0 when batched), lengths, and its first dq row.
struct Seq {
  int64_t q0, k0, dq_row0;
  int lq, lk;
};

static inline Seq seq_of(const AttnParams& f, int b) {
  Seq s;
  if (f.cu_seqlens_q) {
    s.q0 = f.cu_seqlens_q[b];
    s.k0 = f.cu_seqlens_k[b];
    s.lq = f.cu_seqlens_q[b + 1] - f.cu_seqlens_q[b];
    s.lk = f.cu_seqlens_k[b + 1] - f.cu_seqlens_k[b];
    s.dq_row0 = s.q0;
  } else {
    s.q0 = s.k0 = 0;
    s.lq = f.seqlen_q;
    s.lk = f.seqlen_k;
    s.dq_row0 = int64_t(b) * f.seqlen_q;
  }
  return s;
}

// The window as bounds on key - query - (Lk - Lq): [-left, right]; "none" is a bound no offset reaches.
struct Band {
  int64_t lo, hi;  // key j is visible to query i iff lo <= j - i - diag <= hi
};

static inline Band band_of(const AttnParams& f) {
  constexpr int64_t kNone = int64_t(1) << 40;
  return {f.window_left >= 0 ? -int64_t(f.window_left) : -kNone, f.window_right >= 0 ? int64_t(f.window_right) : kNone};
}

// Rows of q/k/v/dout are usually a page or more apart (other heads in between), where the hardware
// prefetchers stop: the packing loops prefetch a few rows ahead themselves.
template <typename T>
static inline void prefetch_row(const T* row, int n) {
  prefetch_l1_span(row, int64_t(n) * int64_t(sizeof(T)));
}

// sum_d dout[d] * out[d] in the accumulation type.
template <typename V, typename T>
static inline typename V::value_type row_dot(const T* a, const T* b, int n) {
  VecSum<V> s;
  for_each_chunk<V>(n, [&](auto v, int64_t i) {
    using Vv = decltype(v);
    s.add(Vv::load(a + i) * Vv::load(b + i));
  });
  return s.total();
}

// Per-thread scratch: a key block's fp32 K, K^T, V^T, dK, dV, and one query tile's operands and products.
template <typename A>
struct Work {
  attn::Scratch<A> kb, kt, vt, dkb, dvb;  // K [block][Dp]; K^T, V^T, dK^T, dV^T per key tile [tiles][D][kNk]
  attn::Scratch<A> qp, dop, dqt;          // [kMq][Dp]
  attn::Scratch<A> ps, ds;                // [kMq][kNk]: P, dP then dS
  attn::Scratch<A> dsb;                   // dS as bf16 rows (the bf16 pair path)
  attn::Scratch<A> lse, delta;            // [kMq]
  attn::Scratch<A> qtp, dotp;             // Q^T, dO^T as rows of query pairs [Dp][kMq / 2] (the AMX path)
  explicit Work(int Dp)
      : kb(size_t(kBlockKeys) * Dp), kt(size_t(kBlockKeys) * Dp), vt(size_t(kBlockKeys) * Dp),
        dkb(size_t(kBlockKeys) * Dp), dvb(size_t(kBlockKeys) * Dp), qp(size_t(kMq) * Dp), dop(size_t(kMq) * Dp),
        dqt(size_t(kMq) * Dp), ps(size_t(kMq) * kNk), ds(size_t(kMq) * kNk), dsb(size_t(kMq) * kNk / 2), lse(kMq),
        delta(kMq), qtp(size_t(Dp) * kMq / 2), dotp(size_t(Dp) * kMq / 2) {}
};

template <typename T>
struct Bwd {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  // With pair products (attn::kPairProducts) S and dP run over pairs of the head dimension, dV^T and dK^T over
  // pairs of queries, dQ over pairs of keys. S is scaled after its product (q, k stay exact); P and dS are
  // rounded to bf16 for the last three, as PyTorch's bf16 backward rounds them. The buffers then hold:
  // qp, dop: bf16 rows [kMq][Dp], then the rows interleaved by query pairs [kMq / 2][Dp]; kb: K rows
  // interleaved by key pairs [block / 2][Dp]; kt, vt: K^T, V^T as pairs [tiles][Dp / 2][kNk]; ps, ds: P, dS as
  // pairs of query rows [kMq / 2][kNk]; dsb: dS as bf16 rows [kMq][kNk].
  static constexpr bool kPairs = attn::kPairProducts<T>;
  using Pair = attn::Bf16Pair;
  // With AMX (the amx build) the five pair products run on the tiles (tmul::gemm): Dp is padded to whole tiles of
  // 16 pairs (zero pairs past D), dK^T and dV^T tiles have Dp rows, and dV^T / dK^T take dO^T and Q^T as rows of
  // query pairs (qtp, dotp: transposed once per query tile).
  static constexpr bool kTiles = attn::kTileProducts<T>;

  const AttnBwdParams& p;
  const AttnParams& f;
  int D, Dp, G, nchunks;
  A* const* dq_bufs;  // [nchunks] fp32 (double for fp64) buffers, row (b, i, h) at (dq row0 + i) * nheads + h

  // ---- one query tile of head h: rows [i0, i0 + mq) of sequence b, as fp32 Q and dO ----
  void pack_queries(Work<A>& w, int b, const Seq& s, int h, int i0, int mq) const {
    for (int ii = 0; ii < mq; ++ii) {
      const int64_t row = s.q0 + i0 + ii;
      if (ii + kPrefetchRows < mq) {
        prefetch_row(at_row<const T>(f.q, b, row + kPrefetchRows, h), D);
        prefetch_row(at_row<const T>(p.dout, b, row + kPrefetchRows, h), D);
      }
      const T* dor = at_row<const T>(p.dout, b, row, h);
      if constexpr (kPairs) {
        attn::copy_row_padded(at_row<const T>(f.q, b, row, h), D, Dp, bf16_row(w.qp, ii));
        attn::copy_row_padded(dor, D, Dp, bf16_row(w.dop, ii));
      } else {
        attn::load_row<V>(at_row<const T>(f.q, b, row, h), D, A(1), w.qp.ptr + ii * Dp, Dp);
        attn::load_row<V>(dor, D, A(1), w.dop.ptr + ii * Dp, Dp);
      }
      // float32 delta is the pre-pass's; fp64 (gradcheck) recomputes it at full precision.
      w.delta.ptr[ii] = std::is_same_v<A, float> ? A(*at_row<const float>(p.delta, b, row, h))
                                                 : row_dot<V>(dor, at_row<const T>(f.out, b, row, h), D);
      w.lse.ptr[ii] = A(*at_row<const float>(f.lse, b, row, h));
    }
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (kPairs)
      for (int i = 0; 2 * i < mq; ++i)
        for (auto* buf : {&w.qp, &w.dop})
          interleave_rows(bf16_row(*buf, 2 * i), 2 * i + 1 < mq ? bf16_row(*buf, 2 * i + 1) : nullptr, D, Dp,
                          &query_pairs(*buf)[int64_t(i) * Dp].bits);
#endif
#if defined(LLMKERN_ISA_AMX)
    if constexpr (kTiles)
      for (auto [buf, t] : {std::pair{&w.qp, &w.qtp}, std::pair{&w.dop, &w.dotp}})
        tmul::transpose_words(&query_pairs(*buf)->bits, (mq + 1) / 2, Dp, Dp, reinterpret_cast<uint32_t*>(t->ptr),
                             kMq / 2);
#endif
  }

  // The factor of Q K^T before softcap (tanh(x / cap)) or softmax.
  A score_scale() const { return A(f.softcap > 0 ? f.scale / f.softcap : f.scale); }

  // K and V rows of key `row` (kv head kvh); with `ahead`, the key kPrefetchRows on is prefetched (the packing
  // loops' rows are too short for the hardware prefetchers).
  void key_rows(int b, int kvh, int64_t row, bool ahead, const T*& kr, const T*& vr) const {
    if (ahead) {
      prefetch_row(at_row<const T>(f.k, b, row + kPrefetchRows, kvh), D);
      prefetch_row(at_row<const T>(f.v, b, row + kPrefetchRows, kvh), D);
    }
    kr = at_row<const T>(f.k, b, row, kvh), vr = at_row<const T>(f.v, b, row, kvh);
  }

  // The bf16 pair path's views of qp and dop: bf16 row ii, and the rows interleaved by query pairs after them.
  T* bf16_row(attn::Scratch<A>& buf, int ii) const { return reinterpret_cast<T*>(buf.ptr) + int64_t(ii) * Dp; }
  Pair* query_pairs(attn::Scratch<A>& buf) const { return reinterpret_cast<Pair*>(buf.ptr) + int64_t(kMq) * Dp / 2; }

  // P and dS of one pair from S and dP (row-major [query][key], in place).
  void softmax_grad(Work<A>& w, const Seq& s, const Band& bd, A slope, int j0, int nk, int i0,
                                 int mq) const {
    const int64_t diag = s.lk - s.lq;
    const bool softcap = f.softcap > 0;
    const A cap = A(f.softcap), kscale = score_scale(), scale = A(f.scale);
    // The tile is fully inside the band when its corner offsets are; else each query row sees a key range.
    const bool full = (j0 + nk - 1) - i0 - diag <= bd.hi && j0 - (i0 + mq - 1) - diag >= bd.lo;
    for (int ii = 0; ii < mq; ++ii) {
      const int64_t i = i0 + ii;
      A* prow = w.ps.ptr + int64_t(ii) * kNk;
      A* dsrow = w.ds.ptr + int64_t(ii) * kNk;
      int64_t a = 0, e = nk;  // visible keys [a, e) of the tile
      if (!full) {
        a = std::clamp<int64_t>(i + diag + bd.lo - j0, 0, nk);
        e = std::clamp<int64_t>(i + diag + bd.hi - j0 + 1, a, nk);
      }
      const A lse = w.lse.ptr[ii], delta = w.delta.ptr[ii];
      const A dist0 = A(j0 - i - diag);  // j - (i + diag) at the tile's first key
      static_assert(kNk % V::W == 0, "key tiles are whole vectors");
      for (int c = 0; c < kNk; c += V::W) {  // whole tile (padding included; zeroed below)
        using Vv = V;
        Vv sc = Vv::load(prow + c);
        if constexpr (kPairs) sc = sc * Vv::set1(kscale);  // the fp32 path folds it into K^T
        Vv tv = Vv::zero();
        if (softcap) {
          tv = tanh(sc);
          sc = tv * Vv::set1(cap);
        }
        if (slope != A(0)) sc = fmadd(Vv::set1(-slope), abs(Vv::load(kIota) + Vv::set1(dist0 + A(c))), sc);
        const Vv pr = exp_sub(sc, Vv::set1(lse));
        Vv dsv = (pr * Vv::set1(scale)) * (Vv::load(dsrow + c) - Vv::set1(delta));
        if (softcap) dsv = dsv * (Vv::set1(A(1)) - tv * tv);
        pr.store(prow + c);
        dsv.store(dsrow + c);
      }
      if (a > 0 || e < kNk) {  // masked keys (and the padding past nk): P = dS = 0
        std::fill(prow, prow + a, A(0));
        std::fill(prow + e, prow + kNk, A(0));
        std::fill(dsrow, dsrow + a, A(0));
        std::fill(dsrow + e, dsrow + kNk, A(0));
      }
    }
  }

  // Rows of a dK^T / dV^T tile.
  int grad_rows() const { return kTiles ? Dp : D; }

  // ---- one (key tile, query tile) pair: keys [j0, j0 + nk) (tile jt of the block), queries [i0, i0 + mq) ----
  void pair(Work<A>& w, const Seq& s, const Band& bd, A slope, int jt, int j0, int nk, int i0, int mq) const {
#if defined(LLMKERN_ISA_AMX)
    if constexpr (kTiles) return pair_of_tiles(w, s, bd, slope, jt, j0, nk, i0, mq);
#endif
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (kPairs) return pair_of_pairs(w, s, bd, slope, jt, j0, nk, i0, mq);
#endif
    const A* K = w.kb.ptr + int64_t(jt) * kNk * Dp;
    const A* KT = w.kt.ptr + int64_t(jt) * D * kNk;
    const A* VT = w.vt.ptr + int64_t(jt) * D * kNk;
    attn::gemm<V, false>(mq, kNk, D, w.qp.ptr, Dp, 1, KT, kNk, w.ps.ptr, kNk);    // S = Q K^T (K^T scaled)
    attn::gemm<V, false>(mq, kNk, D, w.dop.ptr, Dp, 1, VT, kNk, w.ds.ptr, kNk);   // dP = dO V^T
    softmax_grad(w, s, bd, slope, j0, nk, i0, mq);
    A* dVT = w.dvb.ptr + int64_t(jt) * D * kNk;
    A* dKT = w.dkb.ptr + int64_t(jt) * D * kNk;
    attn::gemm<V, true>(D, kNk, mq, w.dop.ptr, 1, Dp, w.ps.ptr, kNk, dVT, kNk);  // dV^T += dO^T P
    attn::gemm<V, true>(D, kNk, mq, w.qp.ptr, 1, Dp, w.ds.ptr, kNk, dKT, kNk);   // dK^T += Q^T dS
    attn::gemm<V, true>(mq, Dp, nk, w.ds.ptr, kNk, 1, K, Dp, w.dqt.ptr, Dp);     // dQ += dS K
  }

#if defined(LLMKERN_ISA_AVX512BF16)
  // pair on the bf16 pair path (kPairs).
  void pair_of_pairs(Work<A>& w, const Seq& s, const Band& bd, A slope, int jt, int j0, int nk, int i0, int mq) const {
    const Pair *Q = reinterpret_cast<const Pair*>(w.qp.ptr), *dO = reinterpret_cast<const Pair*>(w.dop.ptr);
    const Pair* KT = reinterpret_cast<const Pair*>(w.kt.ptr) + int64_t(jt) * Dp / 2 * kNk;
    const Pair* VT = reinterpret_cast<const Pair*>(w.vt.ptr) + int64_t(jt) * Dp / 2 * kNk;
    const Pair* K = reinterpret_cast<const Pair*>(w.kb.ptr) + int64_t(jt) * kNk / 2 * Dp;
    const int dh = (D + 1) / 2, mh = (mq + 1) / 2, nh = (nk + 1) / 2;
    attn::gemm<V, false>(mq, kNk, dh, Q, Dp / 2, 1, KT, kNk, w.ps.ptr, kNk);   // S = Q K^T (unscaled)
    attn::gemm<V, false>(mq, kNk, dh, dO, Dp / 2, 1, VT, kNk, w.ds.ptr, kNk);  // dP = dO V^T
    softmax_grad(w, s, bd, slope, j0, nk, i0, mq);
    T* dsb = reinterpret_cast<T*>(w.dsb.ptr);
    for (int ii = 0; ii < mq; ++ii) attn::store_row<V>(w.ds.ptr + ii * kNk, kNk, dsb + ii * kNk);
    for (A* x : {w.ps.ptr, w.ds.ptr}) pair_up_rows(x, mq, kNk);  // P and dS rows (2i, 2i + 1) to pair row i
    A* dVT = w.dvb.ptr + int64_t(jt) * D * kNk;
    A* dKT = w.dkb.ptr + int64_t(jt) * D * kNk;
    const Pair *Pp = reinterpret_cast<const Pair*>(w.ps.ptr), *dSp = reinterpret_cast<const Pair*>(w.ds.ptr);
    attn::gemm<V, true>(D, kNk, mh, query_pairs(w.dop), 1, Dp, Pp, kNk, dVT, kNk);  // dV^T += dO^T P
    attn::gemm<V, true>(D, kNk, mh, query_pairs(w.qp), 1, Dp, dSp, kNk, dKT, kNk);  // dK^T += Q^T dS
    const Pair* dSrows = reinterpret_cast<const Pair*>(dsb);
    attn::gemm<V, true>(mq, Dp, nh, dSrows, kNk / 2, 1, K, Dp, w.dqt.ptr, Dp);  // dQ += dS K
  }

#if defined(LLMKERN_ISA_AMX)
  // pair on the tiles (kTiles): the pair path's products as tmul::gemm, on whole tiles. Rows past mq (Q, dO, dS)
  // only feed rows of S, dP and dQ that nothing reads; P and dS pair rows past the last query pair are zeroed, as
  // are K's pair rows past the tile's keys (pack_key_pairs).
  void pair_of_tiles(Work<A>& w, const Seq& s, const Band& bd, A slope, int jt, int j0, int nk, int i0, int mq) const {
    using U = uint32_t;
    const U *Q = reinterpret_cast<const U*>(w.qp.ptr), *dO = reinterpret_cast<const U*>(w.dop.ptr);
    const U* KT = reinterpret_cast<const U*>(w.kt.ptr) + int64_t(jt) * Dp / 2 * kNk;
    const U* VT = reinterpret_cast<const U*>(w.vt.ptr) + int64_t(jt) * Dp / 2 * kNk;
    const U* K = reinterpret_cast<const U*>(w.kb.ptr) + int64_t(jt) * kNk / 2 * Dp;
    const int m16 = (mq + 15) / 16 * 16, mh = (mq + 1) / 2, mh16 = (mh + 15) / 16 * 16;
    tmul::gemm(m16, kNk, Dp / 2, Q, Dp / 2, KT, kNk, w.ps.ptr, kNk, false);   // S = Q K^T (unscaled)
    tmul::gemm(m16, kNk, Dp / 2, dO, Dp / 2, VT, kNk, w.ds.ptr, kNk, false);  // dP = dO V^T
    softmax_grad(w, s, bd, slope, j0, nk, i0, mq);
    T* dsb = reinterpret_cast<T*>(w.dsb.ptr);
    for (int ii = 0; ii < mq; ++ii) attn::store_row<V>(w.ds.ptr + ii * kNk, kNk, dsb + ii * kNk);
    for (A* x : {w.ps.ptr, w.ds.ptr}) {
      pair_up_rows(x, mq, kNk);  // P and dS rows (2i, 2i + 1) to pair row i, then zero pair rows to a whole tile
      std::memset(x + int64_t(mh) * kNk, 0, sizeof(A) * size_t(mh16 - mh) * kNk);
    }
    const int64_t rows = grad_rows();
    A* dVT = w.dvb.ptr + int64_t(jt) * rows * kNk;
    A* dKT = w.dkb.ptr + int64_t(jt) * rows * kNk;
    const U *Pp = reinterpret_cast<const U*>(w.ps.ptr), *dSp = reinterpret_cast<const U*>(w.ds.ptr);
    const U *dOT = reinterpret_cast<const U*>(w.dotp.ptr), *QT = reinterpret_cast<const U*>(w.qtp.ptr);
    tmul::gemm(Dp, kNk, mh16, dOT, kMq / 2, Pp, kNk, dVT, kNk, true);  // dV^T += dO^T P
    tmul::gemm(Dp, kNk, mh16, QT, kMq / 2, dSp, kNk, dKT, kNk, true);  // dK^T += Q^T dS
    tmul::gemm(m16, Dp, kNk / 2, reinterpret_cast<const U*>(dsb), kNk / 2, K, Dp, w.dqt.ptr, Dp, true);  // dQ += dS K
  }
#endif

  // pack_keys on the bf16 pair path: K^T and V^T as pairs of the head dimension, K rows interleaved by key pairs.
  void pack_key_pairs(Work<A>& w, int b, int kvh, const Seq& s, int kb0, int nkb) const {
    constexpr int W = 16;
    for (int jt = 0; jt * kNk < nkb; ++jt) {
      const int nk = std::min(kNk, nkb - jt * kNk);
      Pair* KT = reinterpret_cast<Pair*>(w.kt.ptr) + int64_t(jt) * Dp / 2 * kNk;
      Pair* VT = reinterpret_cast<Pair*>(w.vt.ptr) + int64_t(jt) * Dp / 2 * kNk;
      Pair* K = reinterpret_cast<Pair*>(w.kb.ptr) + int64_t(jt) * kNk / 2 * Dp;
      for (int j0 = 0; j0 < kNk; j0 += W) {
        const T *krows[W], *vrows[W];
        for (int t = 0; t < W; ++t) {
          const int jj = j0 + t;
          krows[t] = vrows[t] = nullptr;
          if (jj >= nk) continue;
          key_rows(b, kvh, s.k0 + kb0 + jt * kNk + jj, jj + kPrefetchRows < nk, krows[t], vrows[t]);
        }
        transpose_pairs(krows, D, &KT[j0].bits, kNk);
        transpose_pairs(vrows, D, &VT[j0].bits, kNk);
        for (int t = 0; t < W && j0 + t < nk; t += 2)
          interleave_rows(krows[t], krows[t + 1], D, Dp, &K[int64_t(j0 + t) / 2 * Dp].bits);
      }
      if constexpr (kTiles) {  // the tiles read whole tiles: zero pair rows past D (K^T, V^T) and past nk (K)
        const int dh = (D + 1) / 2, nh = (nk + 1) / 2;
        for (Pair* x : {KT, VT}) std::memset(x + int64_t(dh) * kNk, 0, sizeof(Pair) * size_t(Dp / 2 - dh) * kNk);
        std::memset(K + int64_t(nh) * Dp, 0, sizeof(Pair) * size_t(kNk / 2 - nh) * Dp);
      }
    }
  }
#endif

  // ---- one task: sequence b, kv head kvh, key chunk c ----
  void task(Work<A>& w, int b, int kvh, int c) const {
    const Seq s = seq_of(f, b);
    const Band bd = band_of(f);
    A* dqbuf = dq_bufs[c];
    // This chunk's dq contribution starts at 0 for every row and head of the group.
    for (int i = 0; i < s.lq; ++i)
      std::fill_n(dqbuf + ((s.dq_row0 + i) * f.nheads + int64_t(kvh) * G) * D, size_t(G) * D, A(0));
    const int ktiles = (s.lk + kNk - 1) / kNk;
    const int kt0 = int(int64_t(ktiles) * c / nchunks), kt1 = int(int64_t(ktiles) * (c + 1) / nchunks);
    const int64_t ck_end = std::min<int64_t>(int64_t(kt1) * kNk, s.lk);
    for (int64_t kb0 = int64_t(kt0) * kNk; kb0 < ck_end; kb0 += kBlockKeys) {
      const int nkb = int(std::min<int64_t>(kBlockKeys, ck_end - kb0));
      block(w, b, kvh, s, bd, int(kb0), nkb, dqbuf);
    }
  }

  // K, V of keys [kb0, kb0 + nkb) as fp32 K rows and, per key tile, K^T (times the score scale) and V^T; the
  // padding keys of a last partial tile are zero columns (zero scores, never read past the mask).
  void pack_keys(Work<A>& w, int b, int kvh, const Seq& s, int kb0, int nkb) const {
    constexpr int W = V::W;
    static_assert(kNk % W == 0, "key tiles are whole vectors");
    const A kscale = score_scale();
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (kPairs) pack_key_pairs(w, b, kvh, s, kb0, nkb);
#endif
    for (int jt = 0; !kPairs && jt * kNk < nkb; ++jt) {  // fp32 rows (the pair path is packed above)
      const int nk = std::min(kNk, nkb - jt * kNk);
      A* KT = w.kt.ptr + int64_t(jt) * D * kNk;
      A* VT = w.vt.ptr + int64_t(jt) * D * kNk;
      for (int j0 = 0; j0 < kNk; j0 += W) {
        const A* krows[W];
        const T* vrows[W];
        for (int t = 0; t < W; ++t) {
          const int jj = j0 + t;
          krows[t] = nullptr, vrows[t] = nullptr;
          if (jj >= nk) continue;
          const T* kr;
          key_rows(b, kvh, s.k0 + kb0 + jt * kNk + jj, jj + kPrefetchRows < nk, kr, vrows[t]);
          A* krow = w.kb.ptr + (int64_t(jt) * kNk + jj) * Dp;  // K rows stay (dQ += dS K); V^T is all dV needs
          attn::load_row<V>(kr, D, A(1), krow, Dp);
          krows[t] = krow;
        }
        attn::transpose_rows<V>(krows, D, kscale, KT + j0, kNk);
        attn::transpose_rows<V>(vrows, D, A(1), VT + j0, kNk);
      }
    }
    const size_t tiles = size_t(nkb + kNk - 1) / kNk;
    std::fill_n(w.dkb.ptr, tiles * grad_rows() * kNk, A(0));
    std::fill_n(w.dvb.ptr, tiles * grad_rows() * kNk, A(0));
  }

  void block(Work<A>& w, int b, int kvh, const Seq& s, const Band& bd, int kb0, int nkb, A* dqbuf) const {
    const int64_t diag = s.lk - s.lq;
    pack_keys(w, b, kvh, s, kb0, nkb);
    // Queries seeing some key of [kb0, kb0 + nkb): i in [kb0 - diag - hi, kb0 + nkb - 1 - diag - lo].
    const int64_t qlo = std::max<int64_t>(0, kb0 - diag - bd.hi);
    const int64_t qhi = std::min<int64_t>(s.lq - 1, kb0 + nkb - 1 - diag - bd.lo);
    for (int64_t i0 = qlo / kMq * kMq; i0 <= qhi; i0 += kMq) {
      const int mq = int(std::min<int64_t>(kMq, s.lq - i0));
      // Keys this tile's queries see: [i0 + diag + lo, i0 + mq - 1 + diag + hi], within the block.
      const int64_t klo = std::max<int64_t>(kb0, i0 + diag + bd.lo);
      const int64_t khi = std::min<int64_t>(kb0 + nkb - 1, i0 + mq - 1 + diag + bd.hi);
      if (klo > khi) continue;
      const int jt0 = int((klo - kb0) / kNk), jt1 = int((khi - kb0) / kNk);
      for (int g = 0; g < G; ++g) {
        const int h = kvh * G + g;
        const A slope = f.alibi_slopes ? A(f.alibi_slopes[b * f.alibi_batch_stride + h]) : A(0);
        pack_queries(w, b, s, h, int(i0), mq);
        std::fill_n(w.dqt.ptr, size_t(mq) * Dp, A(0));
        for (int jt = jt0; jt <= jt1; ++jt)
          pair(w, s, bd, slope, jt, kb0 + jt * kNk, std::min(kNk, nkb - jt * kNk), int(i0), mq);
        for (int ii = 0; ii < mq; ++ii) {
          A* dst = dqbuf + ((s.dq_row0 + i0 + ii) * f.nheads + h) * D;
          const A* src = w.dqt.ptr + int64_t(ii) * Dp;
          for_each_chunk<V>(D, [&](auto v, int64_t c) {
            using Vv = decltype(v);
            (Vv::load(dst + c) + Vv::load(src + c)).store(dst + c);
          });
        }
      }
    }
    for (int jt = 0; jt * kNk < nkb; ++jt) {
      const int nk = std::min(kNk, nkb - jt * kNk);
      const int64_t row0 = s.k0 + kb0 + jt * kNk;
      store_tile(w, w.dvb.ptr + int64_t(jt) * grad_rows() * kNk, nk, p.dv, b, row0, kvh);
      store_tile(w, w.dkb.ptr + int64_t(jt) * grad_rows() * kNk, nk, p.dk, b, row0, kvh);
    }
  }

  // Rows [row0, row0 + nk) of the gradient g (laid out as k) from a transposed tile [D][kNk] (dK's already scaled:
  // dS carries the softmax scale), through kb (free once the block's pairs are done).
  void store_tile(Work<A>& w, const A* tile, int nk, const AttnTensor& g, int b, int64_t row0, int kvh) const {
    attn::transpose_tile<V>(tile, kNk, D, nk, w.kb.ptr, Dp);
    for (int jj = 0; jj < nk; ++jj)
      attn::store_row<V>(w.kb.ptr + int64_t(jj) * Dp, D, at_row<T>(g, b, row0 + jj, kvh));
  }
};

// Calls fn(b, i) for every query row i of every sequence b, rows split among the threads.
template <typename Fn>
void for_query_rows(const AttnParams& f, Fn&& fn) {
  const int32_t* cu = f.cu_seqlens_q;
  const int64_t first = cu ? cu[0] : 0, rows = cu ? cu[f.batch] - first : int64_t(f.batch) * f.seqlen_q;
  parallel_for(0, rows, grain_for(int64_t(f.nheads) * f.head_dim * 8), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (cu) {  // the sequence holding packed row first + r (empty sequences share its offset)
        const int64_t row = first + r;
        const int b = int(std::upper_bound(cu, cu + f.batch + 1, int32_t(row)) - cu) - 1;
        fn(b, int(row - cu[b]));
      } else {
        fn(int(r / f.seqlen_q), int(r % f.seqlen_q));
      }
    }
  });
}

// delta = rowsum(dout * out), float32, for every (row, head) of every sequence.
template <typename T>
void write_delta(const AttnBwdParams& p) {
  using V = typename VecFor<T>::type;
  const AttnParams& f = p.fwd;
  for_query_rows(f, [&](int b, int i) {
    const int64_t row = seq_of(f, b).q0 + i;
    for (int h = 0; h < f.nheads; ++h)
      *at_row<float>(p.delta, b, row, h) =
          float(row_dot<V>(at_row<const T>(p.dout, b, row, h), at_row<const T>(f.out, b, row, h), f.head_dim));
  });
}

// dq = the sum over chunks (in chunk order) of the chunks' dq buffers (the first may be dq itself).
template <typename T>
void write_dq(const AttnBwdParams& p, typename VecFor<T>::type::value_type* const* bufs, int nchunks) {
  using V = typename VecFor<T>::type;
  const AttnParams& f = p.fwd;
  const int D = f.head_dim;
  for_query_rows(f, [&](int b, int i) {
    const Seq s = seq_of(f, b);
    for (int h = 0; h < f.nheads; ++h) {
      const int64_t off = ((s.dq_row0 + i) * f.nheads + h) * D;
      T* dst = at_row<T>(p.dq, b, s.q0 + i, h);
      for_each_chunk<V>(D, [&](auto v, int64_t c) {
        using Vv = decltype(v);
        Vv acc = Vv::load(bufs[0] + off + c);
        for (int k = 1; k < nchunks; ++k) acc = acc + Vv::load(bufs[k] + off + c);
        acc.store(dst + c);
      });
    }
  });
}

template <typename T>
void attn_bwd(const AttnBwdParams& p) {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  const AttnParams& f = p.fwd;
  write_delta<T>(p);
  const int D = f.head_dim, Dp = attn::padded_head<V, T>(D);
  const int G = f.nheads / f.nheads_k;
  const int64_t groups = int64_t(f.batch) * f.nheads_k;
  const int threads = std::max(1, max_threads());
  // Split the keys when there are too few (sequence, kv head) pairs for two tasks per thread.
  const int max_chunks = std::max(1, (f.seqlen_k + kNk - 1) / kNk);
  const int nchunks = groups >= 2 * threads ? 1 : int(std::min<int64_t>(max_chunks, (2 * threads + groups - 1) / groups));
  // Chunk 0 accumulates into dq itself when dq has the accumulation type and rows laid out as the buffers'
  // (contiguous, as the op allocates it); the other chunks, and chunk 0 otherwise, into scratch buffers.
  const int64_t dq_elems = int64_t(f.cu_seqlens_q ? f.cu_seqlens_q[f.batch] : int64_t(f.batch) * f.seqlen_q) * f.nheads * D;
  const bool in_dq = std::is_same_v<A, T> && p.dq.head_stride == D && p.dq.row_stride == int64_t(f.nheads) * D &&
                     (f.cu_seqlens_q || p.dq.batch_stride == int64_t(f.seqlen_q) * f.nheads * D);
  const int nscratch = nchunks - int(in_dq);
  attn::Scratch<A> scratch(size_t(std::max<int64_t>(1, nscratch * dq_elems)));
  attn::Scratch<A*> bufs{size_t(nchunks)};
  for (int c = 0; c < nchunks; ++c)
    bufs.ptr[c] = in_dq && c == 0 ? static_cast<A*>(p.dq.ptr) : scratch.ptr + (c - int(in_dq)) * dq_elems;
  const Bwd<T> bwd{p, f, D, Dp, G, nchunks, bufs.ptr};
  // Tasks chunk-major (for causal masks the first chunks are the heaviest: they go first).
  const int64_t ntasks = groups * nchunks;
  int64_t next = 0;
  parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Work<A> w(Dp);
    [[maybe_unused]] attn::TilesIf<Bwd<T>::kTiles> tile_state;
    for (;;) {
      const int64_t t = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      if (t >= ntasks) break;
      const int c = int(t / groups), g = int(t % groups);
      bwd.task(w, g / f.nheads_k, g % f.nheads_k, c);
    }
  });
  if (nscratch > 0) write_dq<T>(p, bufs.ptr, nchunks);
}

}  // namespace

void attn_bwd_kernel(const AttnBwdParams& p) {
  visit_dtype(p.fwd.dtype, [&](auto t) { attn_bwd<decltype(t)>(p); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
