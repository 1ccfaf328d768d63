// Attention backward core (flash-attn 2's algorithm, arXiv:2307.08691 Alg. 2), compiled once per CPU ISA.
//
// A task owns the keys of one (sequence, kv head) pair, or one chunk of them when there are too few pairs
// to keep every thread busy. It walks its keys in blocks of at most kBlockKeys (K, V converted to fp32
// once, dK, dV accumulated in fp32), and for each block every query tile of every query head of the GQA
// group that sees the block: Q, Q^T, dO, dO^T of the tile are packed once and serve all the block's key
// tiles (packing per (key tile, query tile) pair would cost as much as the products). Per pair, all
// scores kept transposed (keys x queries, so elementwise work runs along vectors of queries):
//   S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dV += P^T dO, dK += dS^T Q, dQ_tile += dS K      (five attn::gemm calls, no tile transposed).
// dQ of a query tile sums over the block's key tiles locally, then over blocks into the task's fp32 dq
// buffer (dq_accum, or a per-chunk buffer); a last pass sums the chunks' buffers in chunk order into dq.
// Every sum has a fixed order, so results do not depend on thread timing; tasks are handed out through an
// atomic counter (which task runs where may vary, what each computes does not).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/vec/vec.h"
#include "kernels/attention.h"
#include "kernels/attention_tile.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

constexpr int kNk = 64;           // keys per tile
constexpr int kMq = 64;           // queries per tile
constexpr int kBlockKeys = 1024;  // keys whose fp32 K, V, dK, dV a task holds at once (multiple of kNk)

// ---- small vector helpers the vec layer lacks: |x| and tanh ----

template <typename T>
static inline ScalarVec<T> vabs(ScalarVec<T> x) { return {std::fabs(x.v)}; }
template <typename T>
static inline ScalarVec<T> vtanh(ScalarVec<T> x) { return {std::tanh(x.v)}; }
#if defined(LLMKERN_ISA_AVX512) || defined(LLMKERN_ISA_AVX2)
static inline VecF vabs(VecF x) { return max(x, VecF::zero() - x); }
// Cephes tanhf: odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above (no cancellation either side).
static inline VecF vtanh(VecF x) {
  const VecF a = vabs(x), one = VecF::set1(1.f), z = x * x;
  VecF big = one - VecF::set1(2.f) / (exp(a + a) + one);
  big = VecF::select_gt(VecF::zero(), x, VecF::zero() - big, big);
  VecF pz = fmadd(VecF::set1(-5.70498872745e-3f), z, VecF::set1(2.06390887954e-2f));
  pz = fmadd(pz, z, VecF::set1(-5.37397155531e-2f));
  pz = fmadd(pz, z, VecF::set1(1.33314422036e-1f));
  pz = fmadd(pz, z, VecF::set1(-3.33332819422e-1f));
  const VecF small = fmadd(x * z, pz, x);
  return VecF::select_gt(a, VecF::set1(0.625f), big, small);
}
#else
template <int N>
static inline ArrayVec<N> vabs(ArrayVec<N> x) { return ArrayVec<N>::make([&](int l) { return std::fabs(x.v[l]); }); }
template <int N>
static inline ArrayVec<N> vtanh(ArrayVec<N> x) { return ArrayVec<N>::make([&](int l) { return std::tanh(x.v[l]); }); }
#endif

// 0, 1, 2, ... : query offsets within a vector (ALiBi distances).
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

// Per-thread scratch: the block's fp32 K, V, dK, dV and one query tile's packed operands and products.
template <typename A>
struct Work {
  int Dp, Mp;
  attn::Scratch<A> kb, vb, dkb, dvb;      // [kBlockKeys][Dp]
  attn::Scratch<A> qp, dop, dqt;          // [kMq][Dp]
  attn::Scratch<A> qt, dot;               // [D][Mp] (transposed, columns = queries)
  attn::Scratch<A> pt, dst, tt;           // [kNk][Mp]: P^T, dP^T then dS^T, tanh (softcap)
  attn::Scratch<A> lse, delta;            // [Mp]
  Work(int D, int Dp_, int Mp_)
      : Dp(Dp_), Mp(Mp_), kb(size_t(kBlockKeys) * Dp_), vb(size_t(kBlockKeys) * Dp_),
        dkb(size_t(kBlockKeys) * Dp_), dvb(size_t(kBlockKeys) * Dp_), qp(size_t(kMq) * Dp_),
        dop(size_t(kMq) * Dp_), dqt(size_t(kMq) * Dp_), qt(size_t(D) * Mp_), dot(size_t(D) * Mp_),
        pt(size_t(kNk) * Mp_), dst(size_t(kNk) * Mp_), tt(size_t(kNk) * Mp_), lse(Mp_), delta(Mp_) {}
};

template <typename T>
struct Bwd {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;

  const AttnBwdParams& p;
  const AttnParams& f;
  int D, Dp, Mp, G, nchunks;
  A* const* dq_bufs;  // [nchunks] fp32 (double for fp64) buffers laid out as dq_accum

  // ---- packing one query tile of head h: rows [i0, i0 + mq) of sequence b ----
  void pack_queries(Work<A>& w, int b, const Seq& s, int h, int i0, int mq) const {
    const A qscale = A(f.softcap > 0 ? f.scale / f.softcap : f.scale);
    for (int ii = 0; ii < mq; ++ii) {
      const int64_t row = s.q0 + i0 + ii;
      attn::load_row<V>(at_row<const T>(f.q, b, row, h), D, A(1), w.qp.ptr + ii * Dp, Dp);
      const T* dor = at_row<const T>(p.dout, b, row, h);
      attn::load_row<V>(dor, D, A(1), w.dop.ptr + ii * Dp, Dp);
      w.delta.ptr[ii] = row_dot<V>(dor, at_row<const T>(f.out, b, row, h), D);
      w.lse.ptr[ii] = A(*at_row<const float>(f.lse, b, row, h));
    }
    for (int ii = mq; ii < Mp; ++ii) {
      w.delta.ptr[ii] = A(0);
      w.lse.ptr[ii] = std::numeric_limits<A>::infinity();  // padded queries: P = 0
    }
    for (int d = 0; d < D; ++d) {
      A* qrow = w.qt.ptr + int64_t(d) * Mp;
      A* dorow = w.dot.ptr + int64_t(d) * Mp;
      for (int ii = 0; ii < mq; ++ii) {
        qrow[ii] = w.qp.ptr[ii * Dp + d] * qscale;
        dorow[ii] = w.dop.ptr[ii * Dp + d];
      }
      for (int ii = mq; ii < Mp; ++ii) qrow[ii] = dorow[ii] = A(0);
    }
  }

  // ---- one (key tile, query tile) pair: keys [j0, j0 + nk) (block-relative jb), queries [i0, i0 + mq) ----
  void pair(Work<A>& w, const Seq& s, const Band& bd, A slope, int jb, int j0, int nk, int i0, int mq) const {
    const int64_t diag = s.lk - s.lq;
    const A* K = w.kb.ptr + int64_t(jb) * Dp;
    const A* Vt = w.vb.ptr + int64_t(jb) * Dp;
    A* PT = w.pt.ptr;
    A* DS = w.dst.ptr;
    attn::gemm<V, false>(nk, Mp, D, K, Dp, 1, w.qt.ptr, Mp, PT, Mp);     // S^T = K Q^T (scaled)
    attn::gemm<V, false>(nk, Mp, D, Vt, Dp, 1, w.dot.ptr, Mp, DS, Mp);   // dP^T = V dO^T
    const bool softcap = f.softcap > 0;
    const A cap = A(f.softcap);
    // The tile is fully inside the band when its corner offsets are.
    const bool full = (j0 + nk - 1) - i0 - diag <= bd.hi && j0 - (i0 + mq - 1) - diag >= bd.lo;
    for (int jj = 0; jj < nk; ++jj) {
      const int64_t j = j0 + jj;
      A* prow = PT + int64_t(jj) * Mp;
      A* dsrow = DS + int64_t(jj) * Mp;
      A* trow = w.tt.ptr + int64_t(jj) * Mp;
      const A dist0 = A(i0 + diag - j);  // i + diag - j at the tile's first query
      for_each_chunk<V>(Mp, [&](auto v, int64_t c) {
        using Vv = decltype(v);
        Vv sc = Vv::load(prow + c);
        if (softcap) {
          const Vv t = vtanh(sc);
          t.store(trow + c);
          sc = t * Vv::set1(cap);
        }
        if (slope != A(0)) sc = fmadd(Vv::set1(-slope), vabs(Vv::load(kIota) + Vv::set1(dist0 + A(c))), sc);
        const Vv pr = exp(sc - Vv::load(w.lse.ptr + c));
        pr.store(prow + c);
      });
      if (!full) {  // queries seeing key j: i - i0 in [j - diag - hi - i0, j - diag - lo - i0]
        const int64_t a = std::clamp<int64_t>(j - diag - bd.hi - i0, 0, Mp);
        const int64_t e = std::clamp<int64_t>(j - diag - bd.lo - i0 + 1, a, Mp);
        std::fill(prow, prow + a, A(0));
        std::fill(prow + e, prow + Mp, A(0));
      }
      for_each_chunk<V>(Mp, [&](auto v, int64_t c) {
        using Vv = decltype(v);
        Vv ds = Vv::load(prow + c) * (Vv::load(dsrow + c) - Vv::load(w.delta.ptr + c));
        if (softcap) {
          const Vv t = Vv::load(trow + c);
          ds = ds * (Vv::set1(A(1)) - t * t);
        }
        ds.store(dsrow + c);
      });
    }
    A* dV = w.dvb.ptr + int64_t(jb) * Dp;
    A* dK = w.dkb.ptr + int64_t(jb) * Dp;
    attn::gemm<V, true>(nk, Dp, mq, PT, Mp, 1, w.dop.ptr, Dp, dV, Dp);        // dV += P^T dO
    attn::gemm<V, true>(nk, Dp, mq, DS, Mp, 1, w.qp.ptr, Dp, dK, Dp);         // dK += dS^T Q
    attn::gemm<V, true>(mq, Dp, nk, DS, 1, Mp, K, Dp, w.dqt.ptr, Dp);         // dQ += dS K
  }

  // ---- one task: sequence b, kv head kvh, key chunk c ----
  void task(Work<A>& w, int b, int kvh, int c) const {
    const Seq s = seq_of(f, b);
    const Band bd = band_of(f);
    const int64_t diag = s.lk - s.lq;
    A* dqbuf = dq_bufs[c];
    // This chunk's dq contribution starts at 0 for every row and head of the group.
    for (int i = 0; i < s.lq; ++i)
      std::fill_n(dqbuf + ((s.dq_row0 + i) * f.nheads + int64_t(kvh) * G) * D, size_t(G) * D, A(0));
    const int ktiles = (s.lk + kNk - 1) / kNk;
    const int kt0 = int(int64_t(ktiles) * c / nchunks), kt1 = int(int64_t(ktiles) * (c + 1) / nchunks);
    const int64_t ck_end = std::min<int64_t>(int64_t(kt1) * kNk, s.lk);
    for (int64_t kb0 = int64_t(kt0) * kNk; kb0 < ck_end; kb0 += kBlockKeys) {
      const int nkb = int(std::min<int64_t>(kBlockKeys, ck_end - kb0));
      block(w, b, kvh, s, bd, diag, int(kb0), nkb, dqbuf);
    }
  }

  void block(Work<A>& w, int b, int kvh, const Seq& s, const Band& bd, int64_t diag, int kb0, int nkb,
             A* dqbuf) const {
    for (int jj = 0; jj < nkb; ++jj) {
      attn::load_row<V>(at_row<const T>(f.k, b, s.k0 + kb0 + jj, kvh), D, A(1), w.kb.ptr + int64_t(jj) * Dp, Dp);
      attn::load_row<V>(at_row<const T>(f.v, b, s.k0 + kb0 + jj, kvh), D, A(1), w.vb.ptr + int64_t(jj) * Dp, Dp);
    }
    std::fill_n(w.dkb.ptr, size_t(nkb) * Dp, A(0));
    std::fill_n(w.dvb.ptr, size_t(nkb) * Dp, A(0));
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
        for (int jt = jt0; jt <= jt1; ++jt) {
          const int jb = jt * kNk;
          pair(w, s, bd, slope, jb, kb0 + jb, std::min(kNk, nkb - jb), int(i0), mq);
        }
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
    const A scale = A(f.scale);
    for (int jj = 0; jj < nkb; ++jj) {
      const int64_t row = s.k0 + kb0 + jj;
      attn::store_row<V>(w.dvb.ptr + int64_t(jj) * Dp, D, at_row<T>(p.dv, b, row, kvh));
      const A* dk = w.dkb.ptr + int64_t(jj) * Dp;
      T* dst = at_row<T>(p.dk, b, row, kvh);
      for_each_chunk<V>(D, [&](auto v, int64_t c) {
        using Vv = decltype(v);
        (Vv::load(dk + c) * Vv::set1(scale)).store(dst + c);
      });
    }
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

// dq = scale * sum over chunks (in chunk order) of the chunks' dq buffers.
template <typename T>
void write_dq(const AttnBwdParams& p, typename VecFor<T>::type::value_type* const* bufs, int nchunks) {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  const AttnParams& f = p.fwd;
  const int D = f.head_dim;
  const A scale = A(f.scale);
  for_query_rows(f, [&](int b, int i) {
    const Seq s = seq_of(f, b);
    for (int h = 0; h < f.nheads; ++h) {
      const int64_t off = ((s.dq_row0 + i) * f.nheads + h) * D;
      T* dst = at_row<T>(p.dq, b, s.q0 + i, h);
      for_each_chunk<V>(D, [&](auto v, int64_t c) {
        using Vv = decltype(v);
        Vv acc = Vv::load(bufs[0] + off + c);
        for (int k = 1; k < nchunks; ++k) acc = acc + Vv::load(bufs[k] + off + c);
        (acc * Vv::set1(scale)).store(dst + c);
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
  const int D = f.head_dim, Dp = attn::padded<V>(D), Mp = attn::padded<V>(kMq);
  const int G = f.nheads / f.nheads_k;
  const int64_t groups = int64_t(f.batch) * f.nheads_k;
  const int threads = std::max(1, max_threads());
  // Split the keys when there are too few (sequence, kv head) pairs for two tasks per thread.
  const int max_chunks = std::max(1, (f.seqlen_k + kNk - 1) / kNk);
  const int nchunks = groups >= 2 * threads ? 1 : int(std::min<int64_t>(max_chunks, (2 * threads + groups - 1) / groups));
  // Chunk 0 accumulates into dq_accum (float32, or double for fp64); the others into their own buffers.
  const int64_t dq_elems = int64_t(f.cu_seqlens_q ? f.cu_seqlens_q[f.batch] : int64_t(f.batch) * f.seqlen_q) * f.nheads * D;
  attn::Scratch<A> extra(size_t(std::max<int64_t>(1, (nchunks - 1) * dq_elems)));
  attn::Scratch<A*> bufs{size_t(nchunks)};
  bufs.ptr[0] = static_cast<A*>(p.dq_accum);
  for (int c = 1; c < nchunks; ++c) bufs.ptr[c] = extra.ptr + (c - 1) * dq_elems;
  const Bwd<T> bwd{p, f, D, Dp, Mp, G, nchunks, bufs.ptr};
  // Tasks chunk-major (for causal masks the first chunks are the heaviest: they go first).
  const int64_t ntasks = groups * nchunks;
  int64_t next = 0;
  parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Work<A> w(D, Dp, Mp);
    for (;;) {
      const int64_t t = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      if (t >= ntasks) break;
      const int c = int(t / groups), g = int(t % groups);
      bwd.task(w, g / f.nheads_k, g % f.nheads_k, c);
    }
  });
  write_dq<T>(p, bufs.ptr, nchunks);
}

}  // namespace

void attn_bwd_kernel(const AttnBwdParams& p) {
  visit_dtype(p.fwd.dtype, [&](auto t) { attn_bwd<decltype(t)>(p); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
