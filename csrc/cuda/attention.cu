// Attention forward/backward and the paged kv-cache write, SIMT CUDA kernels (math and layouts:
// kernels/attention.h; no tensor cores, no atomics, no [Lq x Lk] matrix anywhere).
//
// Shared structure. A warp owns "rows": (query i, head h) pairs of one sequence b and kv head hk, packed
// GQA-style (row r is query i = r / G of head hk * G + r % G, G = nheads / nheads_k), so the G query heads
// reading the same k/v rows run in the same block and share them through L1. Lane `lane` owns head-dim
// elements d = c * 32 + lane, c < NE = DB / 32 (DB: head_dim rounded up to 32/64/128/256), so every row
// vector lives in registers and every k/v/q row load is coalesced. Keys go by in tiles of 16: each lane
// forms its partial dot products for the 16 keys, and one transpose_sum (15 shuffles + 1) leaves the full
// dot of key (lane & 15) in lane `lane`. k/v rows are read straight from global memory (the warps of a
// block read the same rows, which L1 serves), which keeps warps independent: no barriers except in the
// split forward's final combine.
//
// attn_fwd_kernel<T, DB, RW, KS>: grid (ceil(seqlen_q * G / (4 / KS * RW)), nheads_k, batch), 4 warps.
//   KS = 1 (prefill): each warp has its own RW rows and sweeps all their visible keys with an online
//   softmax. KS = 4 (decode, few rows): the 4 warps share RW rows and split the key tiles round robin
//   (flash-decoding inside one block: no workspace needed); (m, l, acc) are combined in shared memory.
// Backward (FA2 math, deterministic: every output element is written by exactly one thread):
//   attn_bwd_delta_kernel: delta_i = dout_i . out_i, a warp per (row, head).
//   attn_bwd_dkdv_kernel<T, DB, KW, QG>: a warp per KW keys (4 KW per block) of one kv head, sweeping the
//   visible query rows of all G heads QG at a time; writes dk, dv (zeros for keys no query sees).
//   attn_bwd_dq_kernel<T, DB, RW>: the forward's row layout, sweeping keys; writes dq.
// kv_write_kernel<T, VEC>: a block per token, a warp per head.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace llmkern {
namespace cuda {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kKeyTile = 16;       // keys per step: one 16-way transpose_sum per row
constexpr int kFewBlocks = 264;    // ~2 waves on an H100/H200 (132 SMs): below it, decode splits the keys
constexpr unsigned kFull = 0xffffffffu;
// At least 3 blocks (12 warps) per SM: caps the heavy kernels at 168 registers. Uncapped, ptxas keeps
// every k/v load of a tile in flight (up to 255 registers, 1-2 blocks per SM), too few warps to hide
// the latency of the global k/v reads.
constexpr int kMinBlocks = 3;

template <typename T> constexpr bool kIsF64 = std::is_same<T, double>::value;

template <typename A> __device__ __forceinline__ A neg_inf() { return A(-INFINITY); }

// ---------------------------------------------------------------------------------------------------
// Geometry and addressing

// One sequence's lengths and where its rows start (attention.h: AttnTensor, AttnParams).
struct Seq {
  int lq, lk;
  int64_t q0, k0;  // first packed q / k row (0 unless varlen)
  int64_t kb;      // k/v batch index (non-paged)
};

// `cache`: honour seqused_k / kv_batch_idx / block_table (the forward only; the backward ignores them).
__device__ __forceinline__ Seq seq_of(const AttnParams& p, int b, bool cache) {
  Seq s;
  s.q0 = p.cu_seqlens_q ? p.cu_seqlens_q[b] : 0;
  s.lq = p.cu_seqlens_q ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.seqlen_q;
  s.k0 = p.cu_seqlens_k ? p.cu_seqlens_k[b] : 0;
  s.lk = p.cu_seqlens_k ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.seqlen_k;
  if (cache && p.seqused_k) s.lk = p.seqused_k[b];
  s.kb = cache && p.kv_batch_idx ? p.kv_batch_idx[b] : b;
  return s;
}

__device__ __forceinline__ int64_t row_off(const AttnTensor& t, int b, int64_t row, int h) {
  return b * t.batch_stride + row * t.row_stride + h * t.head_stride;
}

// Element offsets of key j's rows (kv head hk) in k and v: through the block table when paged.
__device__ __forceinline__ void key_offsets(const AttnParams& p, const Seq& s, int b, int j, int hk, bool cache,
                                            int64_t& koff, int64_t& voff) {
  int64_t blk = s.kb, row = s.k0 + j;
  if (cache && p.block_table) {
    blk = p.block_table[b * p.block_table_stride + j / p.block_size];
    row = j % p.block_size;
  }
  koff = blk * p.k.batch_stride + row * p.k.row_stride + hk * p.k.head_stride;
  voff = blk * p.v.batch_stride + row * p.v.row_stride + hk * p.v.head_stride;
}

// Loads / stores a head_dim row (lane's elements d = c * 32 + lane); elements d >= D, or an invalid row,
// read as 0.
template <typename T, int NE>
__device__ __forceinline__ void load_row(const T* ptr, int D, bool valid, acc_t<T> (&x)[NE]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < NE; ++c) {
    const int d = c * 32 + lane;
    x[c] = valid && d < D ? to_acc(ptr[d]) : acc_t<T>(0);
  }
}

template <typename T, int NE>
__device__ __forceinline__ void store_row(T* ptr, int D, const acc_t<T> (&x)[NE], acc_t<T> mul) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < NE; ++c) {
    const int d = c * 32 + lane;
    if (d < D) ptr[d] = from_acc<T>(x[c] * mul);
  }
}

// ---------------------------------------------------------------------------------------------------
// Score math

// Key j is visible from the row with diagonal diag = i + Lk - Lq (attention.h's mask).
__device__ __forceinline__ bool visible(const AttnParams& p, int lk, int64_t diag, int j) {
  return j >= 0 && j < lk && (p.window_left < 0 || j >= diag - p.window_left) &&
         (p.window_right < 0 || j <= diag + p.window_right);
}

// s = raw (= scale * q.k), softcapped, minus the alibi bias (slope 0 without alibi); th: tanh(raw / softcap).
template <typename A>
__device__ __forceinline__ A mod_score(const AttnParams& p, A raw, A slope, int64_t diag, int j, A& th) {
  A s = raw;
  th = A(0);
  if (p.softcap > 0.f) {
    th = tanh(raw / A(p.softcap));
    s = A(p.softcap) * th;
  }
  const int64_t dist = diag >= j ? diag - j : j - diag;
  return s - slope * A(dist);
}

// d loss / d raw score (before the scale) of a visible key: ds = p (dp - delta), through the tanh of the
// softcap (alibi is additive after it); pr = p = exp(s - lse), 0 where lse = +inf. 0 where masked.
template <typename A>
__device__ __forceinline__ A grad_score(const AttnParams& p, A dot, A dp, A lse, A delta, A slope, int64_t diag,
                                        int j, int lk, A& pr) {
  pr = A(0);
  if (!visible(p, lk, diag, j)) return A(0);
  A th;
  const A s = mod_score(p, A(p.scale) * dot, slope, diag, j, th);
  pr = exp(s - lse);
  A ds = pr * (dp - delta);
  if (p.softcap > 0.f) ds *= A(1) - th * th;
  return ds;
}

// One halving exchange of transpose_sum (offset O), then the next: template recursion, so every index
// is a compile-time constant and v stays in registers.
template <int O, typename A, int N>
__device__ __forceinline__ void halving_sums(A (&v)[N], int lane) {
  if constexpr (O >= 1) {
    const bool upper = lane & O;  // keep the upper half of the values, send the lower one
#pragma unroll
    for (int k = 0; k < O; ++k) {
      const A send = upper ? v[k] : v[k + O];
      v[k] = (upper ? v[k + O] : v[k]) + __shfl_xor_sync(kFull, send, O);
    }
    halving_sums<O / 2>(v, lane);
  }
}

// Warp-wide sums of N (a power of two <= 32) values at once: on return lane l holds the sum over the warp
// of v[l % N] (v is clobbered). log2(N) halving exchanges (N - 1 shuffles), then plain butterflies over
// the rest of the warp. Lanes with the same l % N get bitwise-equal results (a + b == b + a).
template <int N, typename A>
__device__ __forceinline__ A transpose_sum(A (&v)[N]) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N: a power of two <= 32");
  halving_sums<N / 2>(v, threadIdx.x & 31);
  A s = v[0];
#pragma unroll
  for (int o = N; o < 32; o *= 2) s += __shfl_xor_sync(kFull, s, o);
  return s;
}

// Max / sum over each half warp (lanes l and l + 16 hold the same key's value after transpose_sum<16>).
template <typename A> __device__ __forceinline__ A half_max(A v) {
#pragma unroll
  for (int o = 1; o < 16; o *= 2) v = fmax(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
template <typename A> __device__ __forceinline__ A half_sum(A v) {
#pragma unroll
  for (int o = 1; o < 16; o *= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// A warp's rows (forward and dq)

template <typename A, int NE, int RW>
struct WarpRows {
  bool valid[RW];
  int i[RW], h[RW];
  int64_t diag[RW];  // i + Lk - Lq
  A slope[RW];
  A q[RW][NE];
};

// Rows r0 .. r0 + RW - 1 (r0 < nrows); a row past the sequence is marked invalid (and aliased to r0).
template <typename T, int NE, int RW>
__device__ __forceinline__ void init_rows(const AttnParams& p, const Seq& s, int b, int hk, int G, int64_t r0,
                                          WarpRows<acc_t<T>, NE, RW>& w) {
  using A = acc_t<T>;
  const int64_t nrows = int64_t(s.lq) * G;
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    w.valid[t] = r0 + t < nrows;
    const int64_t r = w.valid[t] ? r0 + t : r0;
    w.i[t] = int(r / G);
    w.h[t] = hk * G + int(r % G);
    w.diag[t] = int64_t(w.i[t]) + s.lk - s.lq;
    w.slope[t] = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_batch_stride + w.h[t]]) : A(0);
    load_row<T, NE>(static_cast<const T*>(p.q.ptr) + row_off(p.q, b, s.q0 + w.i[t], w.h[t]), p.head_dim,
                    w.valid[t], w.q[t]);
  }
}

// [lo, hi): the keys any of the warp's rows may see (rows are in query order: diag grows with t).
template <typename A, int NE, int RW>
__device__ __forceinline__ void key_range(const AttnParams& p, const Seq& s, const WarpRows<A, NE, RW>& w,
                                          int& lo, int& hi) {
  int64_t dmax = w.diag[0];
#pragma unroll
  for (int t = 1; t < RW; ++t)
    if (w.valid[t]) dmax = w.diag[t];
  const int64_t l = p.window_left >= 0 ? w.diag[0] - p.window_left : 0;
  const int64_t r = p.window_right >= 0 ? dmax + p.window_right + 1 : s.lk;
  lo = int(l < 0 ? 0 : l > s.lk ? s.lk : l);
  hi = int(r < 0 ? 0 : r > s.lk ? s.lk : r);
}

// part[t][x]: this lane's share of x_t . key (n0 + x), x < KT; the key row is at base + shfl(off, x).
// Keys >= hi are not read (their off is not valid) and give 0.
template <typename T, int NE, int RW, int KT>
__device__ __forceinline__ void tile_dots(const T* base, int64_t off, int n0, int hi, int D,
                                          const acc_t<T> (&x)[RW][NE], const bool (&valid)[RW],
                                          acc_t<T> (&part)[RW][KT]) {
  using A = acc_t<T>;
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    const int64_t o = __shfl_sync(kFull, off, k);
    A kv[NE];
    load_row<T, NE>(base + o, D, n0 + k < hi, kv);
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      A a = 0;
      if (valid[t])  // warp-uniform: a decode warp with one real row does one row's work
#pragma unroll
        for (int c = 0; c < NE; ++c) a += x[t][c] * kv[c];
      part[t][k] = a;
    }
  }
}

// acc[t] += coef_t(x) * row of key (n0 + x) for x < KT, coef_t(x) held by lane x (p for P V, ds for dq).
template <typename T, int NE, int RW, int KT>
__device__ __forceinline__ void tile_accum(const T* base, int64_t off, int n0, int hi, int D,
                                           const acc_t<T> (&coef)[RW], const bool (&valid)[RW],
                                           acc_t<T> (&acc)[RW][NE]) {
  using A = acc_t<T>;
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    if (n0 + k >= hi) break;  // warp-uniform
    const int64_t o = __shfl_sync(kFull, off, k);
    A kv[NE];
    load_row<T, NE>(base + o, D, true, kv);
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      const A ck = __shfl_sync(kFull, coef[t], k);
      if (!valid[t]) continue;
#pragma unroll
      for (int c = 0; c < NE; ++c) acc[t][c] += ck * kv[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward

// Online-softmax update of one row's (m, l, acc) by a tile whose score for key (lane & 15) is s (-inf:
// masked); returns that key's unnormalised probability. m, l, p are uniform over the warp.
template <typename A, int NE>
__device__ __forceinline__ A softmax_update(A s, A& m, A& l, A (&acc)[NE]) {
  const A m_new = fmax(m, half_max(s));
  if (m_new == neg_inf<A>()) return A(0);  // nothing visible yet: state unchanged
  const A pr = exp(s - m_new), alpha = exp(m - m_new);  // exp(-inf) = 0 for masked keys / empty state
  l = l * alpha + half_sum(pr);
  m = m_new;
#pragma unroll
  for (int c = 0; c < NE; ++c) acc[c] *= alpha;
  return pr;
}

// out_i = acc / l and lse_i = m + log l; a row that saw no key gets out = 0, lse = +inf.
template <typename T, int NE>
__device__ __forceinline__ void write_out_row(const AttnParams& p, const Seq& s, int b, int i, int h,
                                              const acc_t<T> (&acc)[NE], acc_t<T> m, acc_t<T> l) {
  using A = acc_t<T>;
  const bool any = l > A(0);
  store_row<T, NE>(static_cast<T*>(p.out.ptr) + row_off(p.out, b, s.q0 + i, h), p.head_dim, acc,
                   any ? A(1) / l : A(0));
  if ((threadIdx.x & 31) == 0)
    static_cast<float*>(p.lse.ptr)[row_off(p.lse, b, s.q0 + i, h)] = any ? float(m + log(l)) : INFINITY;
}

// KS > 1: the warps (splits) hold partial (m, l, acc) of the same RW rows; combine them in a fixed order
// through shared memory (deterministic) and write. Warp w finishes rows t = w, w + 4, ...
template <typename T, int NE, int RW, int KS>
__device__ __forceinline__ void combine_splits(const AttnParams& p, const Seq& s, int b, int hk, int G,
                                               int64_t r0, const acc_t<T> (&acc)[RW][NE], const acc_t<T> (&m)[RW],
                                               const acc_t<T> (&l)[RW]) {
  using A = acc_t<T>;
  __shared__ A sm_acc[KS][RW][NE * 32];
  __shared__ A sm_ml[KS][RW][2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < RW; ++t) {
#pragma unroll
    for (int c = 0; c < NE; ++c) sm_acc[warp][t][c * 32 + lane] = acc[t][c];
    if (lane == 0) sm_ml[warp][t][0] = m[t], sm_ml[warp][t][1] = l[t];
  }
  __syncthreads();
  const int64_t nrows = int64_t(s.lq) * G;
  for (int t = warp; t < RW && r0 + t < nrows; t += kWarps) {
    A m_all = neg_inf<A>();
    for (int k = 0; k < KS; ++k) m_all = fmax(m_all, sm_ml[k][t][0]);
    A l_all = 0, o[NE] = {};
    if (m_all != neg_inf<A>()) {
      for (int k = 0; k < KS; ++k) {
        const A w = exp(sm_ml[k][t][0] - m_all);  // 0 for a split that saw nothing
        l_all += w * sm_ml[k][t][1];
#pragma unroll
        for (int c = 0; c < NE; ++c) o[c] += w * sm_acc[k][t][c * 32 + lane];
      }
    }
    const int64_t r = r0 + t;
    write_out_row<T, NE>(p, s, b, int(r / G), hk * G + int(r % G), o, m_all, l_all);
  }
}

template <typename T, int DB, int RW, int KS>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_fwd_kernel(const __grid_constant__ AttnParams p) {
  using A = acc_t<T>;
  constexpr int NE = DB / 32, WR = kWarps / KS;  // WR: warps with distinct rows
  const int b = blockIdx.z, hk = blockIdx.y, G = p.nheads / p.nheads_k;
  const Seq s = seq_of(p, b, true);
  const int64_t nrows = int64_t(s.lq) * G, rb = int64_t(blockIdx.x) * WR * RW;
  if (rb >= nrows) return;  // block-uniform, so before combine_splits' barrier
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, split = warp / WR;
  const int64_t r0 = rb + (warp % WR) * RW;
  if (KS == 1 && r0 >= nrows) return;  // no barrier without splits
  WarpRows<A, NE, RW> w;
  init_rows<T, NE, RW>(p, s, b, hk, G, r0, w);
  A acc[RW][NE] = {}, m[RW], l[RW];
#pragma unroll
  for (int t = 0; t < RW; ++t) m[t] = neg_inf<A>(), l[t] = A(0);
  int lo, hi;
  key_range(p, s, w, lo, hi);
  const T* kp = static_cast<const T*>(p.k.ptr);
  const T* vp = static_cast<const T*>(p.v.ptr);
  for (int n0 = lo + split * kKeyTile; n0 < hi; n0 += KS * kKeyTile) {
    const int j = n0 + (lane & 15);  // the key whose score this lane ends up holding
    int64_t koff = 0, voff = 0;
    if (j < hi) key_offsets(p, s, b, j, hk, true, koff, voff);
    A part[RW][kKeyTile], pr[RW];
    tile_dots<T, NE, RW, kKeyTile>(kp, koff, n0, hi, p.head_dim, w.q, w.valid, part);
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      pr[t] = A(0);
      if (!w.valid[t]) continue;  // warp-uniform
      const A dot = transpose_sum(part[t]);
      A th;
      const A sc = visible(p, s.lk, w.diag[t], j) ? mod_score(p, A(p.scale) * dot, w.slope[t], w.diag[t], j, th)
                                                   : neg_inf<A>();
      pr[t] = softmax_update(sc, m[t], l[t], acc[t]);
    }
    tile_accum<T, NE, RW, kKeyTile>(vp, voff, n0, hi, p.head_dim, pr, w.valid, acc);
  }
  if constexpr (KS > 1) {
    combine_splits<T, NE, RW, KS>(p, s, b, hk, G, r0, acc, m, l);
  } else {
#pragma unroll
    for (int t = 0; t < RW; ++t)
      if (w.valid[t]) write_out_row<T, NE>(p, s, b, w.i[t], w.h[t], acc[t], m[t], l[t]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const __grid_constant__ AttnBwdParams bp) {
  using A = acc_t<T>;
  const AttnParams& p = bp.fwd;
  const int b = blockIdx.z, h = blockIdx.y, lane = threadIdx.x & 31;
  const Seq s = seq_of(p, b, false);
  const int i = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (i >= s.lq) return;
  const T* o = static_cast<const T*>(p.out.ptr) + row_off(p.out, b, s.q0 + i, h);
  const T* g = static_cast<const T*>(bp.dout.ptr) + row_off(bp.dout, b, s.q0 + i, h);
  A sum = 0;
  for (int d = lane; d < p.head_dim; d += 32) sum += to_acc(o[d]) * to_acc(g[d]);
  sum = group_sum(sum, 32);
  if (lane == 0) static_cast<float*>(bp.delta.ptr)[row_off(bp.delta, b, s.q0 + i, h)] = float(sum);
}

// One query row's per-row scalars for the backward.
template <typename A>
__device__ __forceinline__ void load_lse_delta(const AttnBwdParams& bp, const Seq& s, int b, int i, int h,
                                               A& lse, A& delta) {
  const int64_t row = s.q0 + i;
  lse = A(static_cast<const float*>(bp.fwd.lse.ptr)[row_off(bp.fwd.lse, b, row, h)]);
  delta = A(static_cast<const float*>(bp.delta.ptr)[row_off(bp.delta, b, row, h)]);
}

template <typename T, int DB, int RW>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dq_kernel(const __grid_constant__ AttnBwdParams bp) {
  using A = acc_t<T>;
  constexpr int NE = DB / 32;
  // Keys per step: fewer for wide rows, whose k and v rows in flight would not fit in registers.
  constexpr int KT = kIsF64<T> ? 512 / DB : DB > 128 ? 4 : kKeyTile;
  const AttnParams& p = bp.fwd;
  const int b = blockIdx.z, hk = blockIdx.y, G = p.nheads / p.nheads_k, lane = threadIdx.x & 31;
  const Seq s = seq_of(p, b, false);
  const int64_t r0 = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * RW;
  if (r0 >= int64_t(s.lq) * G) return;
  WarpRows<A, NE, RW> w;
  init_rows<T, NE, RW>(p, s, b, hk, G, r0, w);
  A g[RW][NE], dq[RW][NE] = {}, lse[RW], delta[RW];
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    load_row<T, NE>(static_cast<const T*>(bp.dout.ptr) + row_off(bp.dout, b, s.q0 + w.i[t], w.h[t]), p.head_dim,
                    w.valid[t], g[t]);
    load_lse_delta(bp, s, b, w.i[t], w.h[t], lse[t], delta[t]);
  }
  int lo, hi;
  key_range(p, s, w, lo, hi);
  const T* kp = static_cast<const T*>(p.k.ptr);
  const T* vp = static_cast<const T*>(p.v.ptr);
  for (int n0 = lo; n0 < hi; n0 += KT) {
    const int j = n0 + (lane & (KT - 1));  // the key whose ds this lane ends up holding
    int64_t koff = 0, voff = 0;
    if (j < hi) key_offsets(p, s, b, j, hk, false, koff, voff);
    // One [RW][KT] partial array live at a time (register pressure): q.k reduced before dout.v.
    A part[RW][KT], dot[RW], ds[RW];
    tile_dots<T, NE, RW, KT>(kp, koff, n0, hi, p.head_dim, w.q, w.valid, part);
#pragma unroll
    for (int t = 0; t < RW; ++t) dot[t] = w.valid[t] ? transpose_sum(part[t]) : A(0);
    tile_dots<T, NE, RW, KT>(vp, voff, n0, hi, p.head_dim, g, w.valid, part);
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      ds[t] = A(0);
      if (!w.valid[t]) continue;  // warp-uniform
      const A dp = transpose_sum(part[t]);
      A pr;
      ds[t] = grad_score(p, dot[t], dp, lse[t], delta[t], w.slope[t], w.diag[t], j, s.lk, pr);
    }
    tile_accum<T, NE, RW, KT>(kp, koff, n0, hi, p.head_dim, ds, w.valid, dq);
  }
#pragma unroll
  for (int t = 0; t < RW; ++t)
    if (w.valid[t])
      store_row<T, NE>(static_cast<T*>(bp.dq.ptr) + row_off(bp.dq, b, s.q0 + w.i[t], w.h[t]), p.head_dim, dq[t],
                       A(p.scale));
}

// The packed rows [x_lo, x_hi) (x = i * G + g) that can see any of the keys [j0, j1].
__device__ __forceinline__ void row_range(const AttnParams& p, const Seq& s, int G, int64_t j0, int64_t j1,
                                          int64_t& x_lo, int64_t& x_hi) {
  const int64_t dd = int64_t(s.lk) - s.lq;
  int64_t i_lo = p.window_right >= 0 ? j0 - dd - p.window_right : 0;
  int64_t i_hi = p.window_left >= 0 ? j1 - dd + p.window_left : s.lq - 1;
  if (i_lo < 0) i_lo = 0;
  if (i_hi > s.lq - 1) i_hi = s.lq - 1;
  x_lo = i_lo * G;
  x_hi = i_hi < i_lo ? x_lo : (i_hi + 1) * G;
}

// One group of QG rows x0 .. against the warp's KW keys: lane pair pi = lane % (KW QG) = u * KW + kk.
template <typename T, int NE, int KW, int QG>
__device__ __forceinline__ void dkdv_group(const AttnBwdParams& bp, const Seq& s, int b, int hk, int G, int64_t x0,
                                           int64_t x_hi, int64_t j0, const acc_t<T> (&k)[KW][NE],
                                           const acc_t<T> (&v)[KW][NE], acc_t<T> (&dk)[KW][NE],
                                           acc_t<T> (&dv)[KW][NE]) {
  using A = acc_t<T>;
  constexpr int NP = KW * QG;
  const AttnParams& p = bp.fwd;
  const int pi = (threadIdx.x & 31) % NP;
  A q[QG][NE], g[QG][NE];
#pragma unroll
  for (int u = 0; u < QG; ++u) {
    const int64_t x = x0 + u < x_hi ? x0 + u : x0;
    const int i = int(x / G), h = hk * G + int(x % G);
    load_row<T, NE>(static_cast<const T*>(p.q.ptr) + row_off(p.q, b, s.q0 + i, h), p.head_dim, x0 + u < x_hi, q[u]);
    load_row<T, NE>(static_cast<const T*>(bp.dout.ptr) + row_off(bp.dout, b, s.q0 + i, h), p.head_dim,
                    x0 + u < x_hi, g[u]);
  }
  A ps[NP], pd[NP];
#pragma unroll
  for (int u = 0; u < QG; ++u)
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      A a = 0, e = 0;
#pragma unroll
      for (int c = 0; c < NE; ++c) a += q[u][c] * k[kk][c], e += g[u][c] * v[kk][c];
      ps[u * KW + kk] = a, pd[u * KW + kk] = e;
    }
  const A dot = transpose_sum(ps), dp = transpose_sum(pd);
  A pr = 0, ds = 0;
  const int64_t xm = x0 + pi / KW;  // this lane's pair: row xm, key j0 + pi % KW
  if (xm < x_hi) {
    const int i = int(xm / G), h = hk * G + int(xm % G);
    A lse, delta;
    load_lse_delta(bp, s, b, i, h, lse, delta);
    const A slope = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_batch_stride + h]) : A(0);
    ds = grad_score(p, dot, dp, lse, delta, slope, int64_t(i) + s.lk - s.lq, int(j0) + pi % KW, s.lk, pr);
  }
#pragma unroll
  for (int u = 0; u < QG; ++u)
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      const A pb = __shfl_sync(kFull, pr, u * KW + kk), db = __shfl_sync(kFull, ds, u * KW + kk);
#pragma unroll
      for (int c = 0; c < NE; ++c) dv[kk][c] += pb * g[u][c], dk[kk][c] += db * q[u][c];
    }
}

template <typename T, int DB, int KW, int QG>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dkdv_kernel(const __grid_constant__ AttnBwdParams bp) {
  using A = acc_t<T>;
  constexpr int NE = DB / 32;
  const AttnParams& p = bp.fwd;
  const int b = blockIdx.z, hk = blockIdx.y, G = p.nheads / p.nheads_k;
  const Seq s = seq_of(p, b, false);
  const int64_t j0 = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * KW;
  if (j0 >= s.lk) return;
  const int64_t j1 = j0 + KW <= s.lk ? j0 + KW - 1 : s.lk - 1;  // last key of the warp
  A k[KW][NE], v[KW][NE], dk[KW][NE] = {}, dv[KW][NE] = {};
  int64_t koff[KW], voff[KW];
#pragma unroll
  for (int kk = 0; kk < KW; ++kk) {
    const int j = int(j0 + kk <= j1 ? j0 + kk : j1);
    key_offsets(p, s, b, j, hk, false, koff[kk], voff[kk]);
    load_row<T, NE>(static_cast<const T*>(p.k.ptr) + koff[kk], p.head_dim, j0 + kk <= j1, k[kk]);
    load_row<T, NE>(static_cast<const T*>(p.v.ptr) + voff[kk], p.head_dim, j0 + kk <= j1, v[kk]);
  }
  int64_t x_lo, x_hi;
  row_range(p, s, G, j0, j1, x_lo, x_hi);
  for (int64_t x0 = x_lo; x0 < x_hi; x0 += QG) dkdv_group<T, NE, KW, QG>(bp, s, b, hk, G, x0, x_hi, j0, k, v, dk, dv);
  // Keys no query sees hold zeros: every key < Lk is written (the outputs start uninitialised).
#pragma unroll
  for (int kk = 0; kk < KW; ++kk) {
    if (j0 + kk > j1) break;
    const int64_t row = s.k0 + j0 + kk;
    store_row<T, NE>(static_cast<T*>(bp.dk.ptr) + row_off(bp.dk, b, row, hk), p.head_dim, dk[kk], A(p.scale));
    store_row<T, NE>(static_cast<T*>(bp.dv.ptr) + row_off(bp.dv, b, row, hk), p.head_dim, dv[kk], A(1));
  }
}

// ---------------------------------------------------------------------------------------------------
// kv-cache write

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) kv_write_kernel(const __grid_constant__ KvWriteParams p) {
  const int64_t t = blockIdx.x, slot = p.slot_mapping[t];
  if (slot < 0 || slot >= p.num_blocks * p.block_size) return;  // -1: skip; out of range: never written
  const int64_t blk = slot / p.block_size, off = slot % p.block_size;
  const int lane = threadIdx.x & 31;
  for (int h = threadIdx.x >> 5; h < p.nheads_k; h += kWarps) {
    const T* k = static_cast<const T*>(p.k.ptr) + t * p.k.row_stride + h * p.k.head_stride;
    const T* v = static_cast<const T*>(p.v.ptr) + t * p.v.row_stride + h * p.v.head_stride;
    T* kc = static_cast<T*>(p.k_cache.ptr) + blk * p.k_cache.batch_stride + off * p.k_cache.row_stride +
            h * p.k_cache.head_stride;
    T* vc = static_cast<T*>(p.v_cache.ptr) + blk * p.v_cache.batch_stride + off * p.v_cache.row_stride +
            h * p.v_cache.head_stride;
    // A pure copy: moved as raw bits (uint4 when VEC packs 16 bytes; a Pack<double, 2> spills on sm_90a).
    using Bits = typename std::conditional<VEC * sizeof(T) == 16, uint4, Pack<T, VEC>>::type;
    for (int d = lane * VEC; d < p.head_dim; d += 32 * VEC) {
      *reinterpret_cast<Bits*>(kc + d) = *reinterpret_cast<const Bits*>(k + d);
      *reinterpret_cast<Bits*>(vc + d) = *reinterpret_cast<const Bits*>(v + d);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers

// Rows per warp: enough to reuse each k/v load a few times, few enough to fit kMinBlocks' register cap
// without spills (make cuda-check).
template <typename T, int DB> constexpr int kFwdRows = kIsF64<T> ? (DB <= 32 ? 2 : 1) : (DB <= 64 ? 4 : 2);
template <typename T, int DB> constexpr int kDqRows = kIsF64<T> || DB > 128 ? 1 : 2;
// dkdv: keys per warp and query rows per step (KW QG <= 32 pairs per transpose_sum).
template <typename T, int DB> constexpr int kDkdvKeys = kIsF64<T> ? (DB <= 128 ? 2 : 1) : (DB <= 128 ? 4 : 2);
template <typename T, int DB> constexpr int kDkdvRows = kIsF64<T> || DB > 128 ? 2 : 4;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(std::integral_constant<int, DB>) for head_dim's bucket DB.
template <typename F>
cudaError_t visit_head_dim(int head_dim, F&& f) {
  if (head_dim <= 32) return f(std::integral_constant<int, 32>{});
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

// Shapes every launch relies on (grid.y = nheads_k / nheads, grid.z = batch: <= 65535).
bool valid_shape(const AttnParams& p) {
  return p.batch >= 0 && p.batch <= 65535 && p.nheads_k >= 1 && p.nheads >= 0 && p.nheads <= 65535 &&
         p.nheads % p.nheads_k == 0 && p.head_dim >= 1 && p.head_dim <= 256 && p.seqlen_q >= 0 && p.seqlen_k >= 0 &&
         int64_t(p.seqlen_q) * (p.nheads / p.nheads_k) <= INT_MAX && (!p.block_table || p.block_size > 0);
}

template <typename T, int DB>
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int RW = kFwdRows<T, DB>;
  const int64_t rows = int64_t(p.seqlen_q) * (p.nheads / p.nheads_k);
  const int64_t unsplit_blocks = ceil_div(rows, kWarps * RW) * p.nheads_k * p.batch;
  // Split the keys over the warps (KS = 4) when the grid is too small to fill the GPU and there are keys
  // enough for every warp: decode. num_splits 1 forces no split, > 1 forces the split.
  const bool split = p.num_splits > 1 ||
                     (p.num_splits == 0 && unsplit_blocks < kFewBlocks && p.seqlen_k >= 2 * kWarps * kKeyTile);
  const dim3 grid(unsigned(ceil_div(rows, split ? RW : kWarps * RW)), p.nheads_k, p.batch);
  if (split)
    attn_fwd_kernel<T, DB, RW, kWarps><<<grid, kThreads, 0, stream>>>(p);
  else
    attn_fwd_kernel<T, DB, RW, 1><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int DB>
cudaError_t launch_bwd(const AttnBwdParams& bp, cudaStream_t stream) {
  const AttnParams& p = bp.fwd;
  const int G = p.nheads / p.nheads_k;
  if (p.seqlen_q > 0) {  // delta first: dkdv and dq read it (same stream)
    const dim3 grid(unsigned(ceil_div(p.seqlen_q, kWarps)), p.nheads, p.batch);
    attn_bwd_delta_kernel<T><<<grid, kThreads, 0, stream>>>(bp);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_k > 0) {  // even without queries: dk = dv = 0 must be written
    constexpr int KW = kDkdvKeys<T, DB>, QG = kDkdvRows<T, DB>;
    const dim3 grid(unsigned(ceil_div(p.seqlen_k, kWarps * KW)), p.nheads_k, p.batch);
    attn_bwd_dkdv_kernel<T, DB, KW, QG><<<grid, kThreads, 0, stream>>>(bp);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_q > 0) {
    constexpr int RW = kDqRows<T, DB>;
    const dim3 grid(unsigned(ceil_div(int64_t(p.seqlen_q) * G, kWarps * RW)), p.nheads_k, p.batch);
    attn_bwd_dq_kernel<T, DB, RW><<<grid, kThreads, 0, stream>>>(bp);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t attn_fwd_cuda(const AttnParams& p, cudaStream_t stream) {
  if (!cuda::valid_shape(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.nheads == 0 || p.seqlen_q == 0) return cudaSuccess;
  return cuda::visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return cuda::visit_head_dim(p.head_dim, [&](auto db) { return cuda::launch_fwd<T, decltype(db)::value>(p, stream); });
  });
}

cudaError_t attn_bwd_cuda(const AttnBwdParams& p, cudaStream_t stream) {
  if (!cuda::valid_shape(p.fwd)) return cudaErrorInvalidValue;
  if (p.fwd.batch == 0 || p.fwd.nheads == 0 || (p.fwd.seqlen_q == 0 && p.fwd.seqlen_k == 0)) return cudaSuccess;
  return cuda::visit_cuda_dtype(p.fwd.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return cuda::visit_head_dim(p.fwd.head_dim,
                                [&](auto db) { return cuda::launch_bwd<T, decltype(db)::value>(p, stream); });
  });
}

cudaError_t kv_write_cuda(const KvWriteParams& p, cudaStream_t stream) {
  using namespace cuda;
  if (p.tokens == 0 || p.nheads_k == 0) return cudaSuccess;
  if (p.tokens < 0 || p.tokens > INT_MAX || p.nheads_k < 0 || p.head_dim < 1 || p.block_size < 1 || p.num_blocks < 0)
    return cudaErrorInvalidValue;
  return visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const bool vec = aligned16({p.k.ptr, p.v.ptr, p.k_cache.ptr, p.v_cache.ptr}) &&
                     multiples_of(V, {p.head_dim, p.k.row_stride, p.k.head_stride, p.v.row_stride, p.v.head_stride,
                                      p.k_cache.batch_stride, p.k_cache.row_stride, p.k_cache.head_stride,
                                      p.v_cache.batch_stride, p.v_cache.row_stride, p.v_cache.head_stride});
    if (vec)  // qualified: llmkern::kv_write_kernel is the CPU kernel
      cuda::kv_write_kernel<T, V><<<unsigned(p.tokens), kThreads, 0, stream>>>(p);
    else
      cuda::kv_write_kernel<T, 1><<<unsigned(p.tokens), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace llmkern
