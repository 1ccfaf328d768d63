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
// attn_decode_kernel<T, DB, R> (+ attn_decode_combine_kernel): the forward for few rows per kv head
//   (decode), f32/bf16/f16 with 16-byte aligned rows: 16-byte k/v loads, keys split over warps and, with
//   p.workspace, over blocks (flash-decoding). See "Decode forward" below; launch_fwd picks it.
// Backward (FA2 math, deterministic: every output element is written by exactly one thread):
//   attn_bwd_delta_kernel: delta_i = dout_i . out_i, a warp per (row, head).
//   attn_bwd_dkdv_kernel<T, DB, KW, QG>: a warp per KW keys (4 KW per block) of one kv head, sweeping the
//   visible query rows of all G heads QG at a time; writes dk, dv (zeros for keys no query sees).
//   attn_bwd_dq_kernel<T, DB, RW>: the forward's row layout, sweeping keys; writes dq.
// kv_write_kernel<T, VEC>: a block per token, a warp per head.
#include <climits>
#include <cstring>

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
// Decode forward: few query rows (seqlen_q * G <= kDecMaxRows) per (sequence, kv head), so the k/v reads
// dominate and must run at memory bandwidth. A block owns R rows and a key chunk (split) of one (sequence,
// kv head); its 8 warps take tiles of TK keys round robin. Within a warp, LPK lanes cover one key row with
// 16-byte loads (lane chunk d0 = (lane % LPK) * VEC .. + VEC), so a warp load covers KPW = 32 / LPK keys
// and each lane has U k and U v loads in flight per tile. A lane keeps its own keys' probabilities: P V
// needs no shuffle (the lane that loaded key j's k chunk also loads its v chunk), and the per-lane partial
// (l, acc) is summed over the KPW key groups once at the end. Warps combine in shared memory, in warp
// order; with several splits the block writes float32 partials (m, l, acc) to p.workspace and
// attn_decode_combine_kernel merges them in split order (deterministic for a given split count).

constexpr int kDecWarps = 8, kDecThreads = 32 * kDecWarps;
constexpr int kDecMaxRows = 64;         // seqlen_q * G per (sequence, kv head) that the decode path takes
constexpr int kDecMaxSplits = 64;
constexpr int kDecKeysPerSplit = 256;   // a split block gets at least this many keys when the kernel chooses

template <typename T, int DB, int R> struct DecGeom {
  static constexpr int VEC = kVec<T>;   // elements per 16-byte load
  static constexpr int LPK = DB / VEC;  // lanes per key row
  static constexpr int KPW = 32 / LPK;  // keys per warp load
  static constexpr int U = 4;           // k (and v) loads per lane per tile
  // Blocks per SM: two (128-register cap) up to 2 rows; 4 rows take ~200 registers (no spill): one.
  static constexpr int kMinBlocks = R >= 4 ? 1 : 2;
  static constexpr int TK = KPW * U;    // keys per warp tile
  static_assert(LPK >= 1 && LPK <= 32 && 32 % LPK == 0, "a key row spans at most one warp");
};

// 16 raw bytes (VEC elements of T) as accumulation-type values.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&x)[kVec<T>]) {
  Pack<T, kVec<T>> pk;
  memcpy(&pk, &raw, 16);
#pragma unroll
  for (int e = 0; e < kVec<T>; ++e) x[e] = to_acc(pk.v[e]);
}

template <int R, int VEC>
struct DecRows {
  bool valid[R];
  int64_t diag[R];
  float slope[R];
  float q[R][VEC];  // this lane's chunk of each row's query
};

// The block's rows x = rb + r (x < nrows valid; i = x / G, h = hk G + x % G) and the keys [lo, hi) any
// of them may see (diag grows with x).
template <typename T, int R>
__device__ __forceinline__ void dec_rows(const AttnParams& p, const Seq& s, int b, int hk, int G, int64_t rb,
                                         int64_t nrows, int d0, DecRows<R, kVec<T>>& w, int& lo, int& hi) {
  int64_t dmin = 0, dmax = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t x = rb + r < nrows ? rb + r : rb;  // rb < nrows
    w.valid[r] = rb + r < nrows;
    const int i = int(x / G), h = hk * G + int(x % G);
    w.diag[r] = int64_t(i) + s.lk - s.lq;
    w.slope[r] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (w.valid[r] && d0 < p.head_dim)
      raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q.ptr) + row_off(p.q, b, s.q0 + i, h) + d0);
    unpack16<T>(raw, w.q[r]);
    if (r == 0) dmin = w.diag[r];
    if (w.valid[r]) dmax = w.diag[r];
  }
  const int64_t l = p.window_left >= 0 ? dmin - p.window_left : 0;
  const int64_t r = p.window_right >= 0 ? dmax + p.window_right + 1 : s.lk;
  lo = int(l < 0 ? 0 : l > s.lk ? s.lk : l);
  hi = int(r < 0 ? 0 : r > s.lk ? s.lk : r);
}

// One warp tile: keys n0 + u * KPW + (lane / LPK), u < U, those >= c_hi skipped (never read: a paged
// cache may hold garbage there). Updates the warp-uniform m and the lane's partial l, acc.
template <typename T, int DB, int R>
__device__ __forceinline__ void dec_tile(const AttnParams& p, const Seq& s, int b, int hk, int n0, int c_hi, int d0,
                                         const DecRows<R, kVec<T>>& w, float (&m)[R], float (&l)[R],
                                         float (&acc)[R][kVec<T>]) {
  using Geo = DecGeom<T, DB, R>;
  constexpr int VEC = Geo::VEC, LPK = Geo::LPK, KPW = Geo::KPW, U = Geo::U;
  const int grp = (threadIdx.x & 31) / LPK;
  const T* kp = static_cast<const T*>(p.k.ptr);
  const T* vp = static_cast<const T*>(p.v.ptr);
  int j[U];
  uint4 kr[U], vr[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {  // all loads first: 2 U x 16 bytes in flight per lane
    j[u] = n0 + u * KPW + grp;
    kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
    if (j[u] < c_hi && d0 < p.head_dim) {
      int64_t ko, vo;
      key_offsets(p, s, b, j[u], hk, true, ko, vo);
      kr[u] = *reinterpret_cast<const uint4*>(kp + ko + d0);
      vr[u] = *reinterpret_cast<const uint4*>(vp + vo + d0);
    }
  }
  float sc[R][U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float kf[VEC];
    unpack16<T>(kr[u], kf);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float a = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) a += w.q[r][e] * kf[e];
      sc[r][u] = a;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int o = 1; o < LPK; o *= 2) sc[r][u] += __shfl_xor_sync(kFull, sc[r][u], o);  // within the key's lanes
      float th;
      sc[r][u] = w.valid[r] && j[u] < c_hi && visible(p, s.lk, w.diag[r], j[u])
                     ? mod_score(p, p.scale * sc[r][u], w.slope[r], w.diag[r], j[u], th)
                     : neg_inf<float>();
    }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float mt = sc[r][0];
#pragma unroll
    for (int u = 1; u < U; ++u) mt = fmaxf(mt, sc[r][u]);
#pragma unroll
    for (int o = LPK; o < 32; o *= 2) mt = fmaxf(mt, __shfl_xor_sync(kFull, mt, o));  // over the key groups
    const float mn = fmaxf(m[r], mt);
    if (mn == neg_inf<float>()) {  // warp-uniform: nothing visible yet, state unchanged
#pragma unroll
      for (int u = 0; u < U; ++u) sc[r][u] = 0.f;
      continue;
    }
    const float alpha = expf(m[r] - mn);  // 0 for the empty state
    m[r] = mn;
    l[r] *= alpha;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[r][e] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      sc[r][u] = expf(sc[r][u] - mn);  // now the probability (0 where masked)
      l[r] += sc[r][u];
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float vf[VEC];
    unpack16<T>(vr[u], vf);  // zeros for skipped keys: never 0 * NaN
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][e] += sc[r][u] * vf[e];
  }
}

// Row x's merged (m, l, acc[d]) goes out: final out / lse when unsplit, else a workspace partial.
template <typename T>
__device__ __forceinline__ void dec_write(const AttnParams& p, const Seq& s, int b, int hk, int G, int64_t x, int d,
                                          int split, int splits, float m, float l, float a) {
  if (splits > 1) {
    const int64_t rows_cap = int64_t(p.seqlen_q) * G;
    const int64_t n_part = int64_t(p.batch) * p.nheads_k * rows_cap * splits;
    const int64_t pi = ((int64_t(b) * p.nheads_k + hk) * rows_cap + x) * splits + split;
    float* ws = static_cast<float*>(p.workspace);
    ws[2 * n_part + pi * p.head_dim + d] = a;
    if (d == 0) ws[2 * pi] = m, ws[2 * pi + 1] = l;
    return;
  }
  const int i = int(x / G), h = hk * G + int(x % G);
  static_cast<T*>(p.out.ptr)[row_off(p.out, b, s.q0 + i, h) + d] = from_acc<T>(l > 0.f ? a / l : 0.f);
  if (d == 0) static_cast<float*>(p.lse.ptr)[row_off(p.lse, b, s.q0 + i, h)] = l > 0.f ? m + logf(l) : INFINITY;
}

// grid (ceil(seqlen_q G / R) * splits, nheads_k, batch): blockIdx.x = row group * splits + split.
template <typename T, int DB, int R>
__global__ void __launch_bounds__(kDecThreads, (DecGeom<T, DB, R>::kMinBlocks))
    attn_decode_kernel(const __grid_constant__ AttnParams p, int splits) {
  using Geo = DecGeom<T, DB, R>;
  constexpr int VEC = Geo::VEC, LPK = Geo::LPK, TK = Geo::TK;
  const int b = blockIdx.z, hk = blockIdx.y, G = p.nheads / p.nheads_k, split = int(blockIdx.x % unsigned(splits));
  const Seq s = seq_of(p, b, true);
  const int64_t nrows = int64_t(s.lq) * G, rb = int64_t(blockIdx.x / unsigned(splits)) * R;
  if (rb >= nrows) return;  // block-uniform, before the barrier
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, d0 = (lane % LPK) * VEC;
  DecRows<R, VEC> w;
  int lo, hi;
  dec_rows<T, R>(p, s, b, hk, G, rb, nrows, d0, w, lo, hi);
  const int64_t per = (int64_t(hi) - lo + splits - 1) / splits;  // keys per split
  const int64_t c_lo64 = lo + split * per;
  const int c_lo = int(c_lo64 < hi ? c_lo64 : hi), c_hi = int(c_lo + per < hi ? c_lo + per : hi);
  float m[R], l[R], acc[R][VEC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf<float>(), l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[r][e] = 0.f;
  }
  for (int n0 = c_lo + warp * TK; n0 < c_hi; n0 += kDecWarps * TK)
    dec_tile<T, DB, R>(p, s, b, hk, n0, c_hi, d0, w, m, l, acc);
  __shared__ float sm_acc[kDecWarps][R][DB];
  __shared__ float sm_ml[kDecWarps][R][2];
#pragma unroll
  for (int r = 0; r < R; ++r) {  // sum the lanes' partials over the KPW key groups
#pragma unroll
    for (int o = LPK; o < 32; o *= 2) {
      l[r] += __shfl_xor_sync(kFull, l[r], o);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][e] += __shfl_xor_sync(kFull, acc[r][e], o);
    }
    if (lane < LPK)
#pragma unroll
      for (int e = 0; e < VEC; ++e) sm_acc[warp][r][d0 + e] = acc[r][e];
    if (lane == 0) sm_ml[warp][r][0] = m[r], sm_ml[warp][r][1] = l[r];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * p.head_dim; idx += kDecThreads) {
    const int r = idx / p.head_dim, d = idx % p.head_dim;
    if (rb + r >= nrows) continue;
    float mm = neg_inf<float>(), ll = 0.f, a = 0.f;
    for (int k = 0; k < kDecWarps; ++k) mm = fmaxf(mm, sm_ml[k][r][0]);
    if (mm != neg_inf<float>())
      for (int k = 0; k < kDecWarps; ++k) {  // warp order: deterministic
        const float f = expf(sm_ml[k][r][0] - mm);  // 0 for a warp that saw nothing
        ll += f * sm_ml[k][r][1];
        a += f * sm_acc[k][r][d];
      }
    dec_write<T>(p, s, b, hk, G, rb + r, d, split, splits, mm, ll, a);
  }
}

// Merges the splits' partials of row x (a warp per row) in split order and writes out and lse.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_decode_combine_kernel(const __grid_constant__ AttnParams p, int splits) {
  const int b = blockIdx.z, hk = blockIdx.y, G = p.nheads / p.nheads_k, lane = threadIdx.x & 31;
  const Seq s = seq_of(p, b, true);
  const int64_t x = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (x >= int64_t(s.lq) * G) return;
  const int64_t rows_cap = int64_t(p.seqlen_q) * G;
  const int64_t n_part = int64_t(p.batch) * p.nheads_k * rows_cap * splits;
  const int64_t p0 = ((int64_t(b) * p.nheads_k + hk) * rows_cap + x) * splits;
  const float* ml = static_cast<const float*>(p.workspace) + 2 * p0;
  const float* pacc = static_cast<const float*>(p.workspace) + 2 * n_part + p0 * p.head_dim;
  float mm = neg_inf<float>(), ll = 0.f;
  for (int k = 0; k < splits; ++k) mm = fmaxf(mm, ml[2 * k]);
  if (mm != neg_inf<float>())
    for (int k = 0; k < splits; ++k) ll += expf(ml[2 * k] - mm) * ml[2 * k + 1];
  const int i = int(x / G), h = hk * G + int(x % G);
  T* out = static_cast<T*>(p.out.ptr) + row_off(p.out, b, s.q0 + i, h);
  for (int d = lane; d < p.head_dim; d += 32) {
    float a = 0.f;
    if (mm != neg_inf<float>())
      for (int k = 0; k < splits; ++k) a += expf(ml[2 * k] - mm) * pacc[int64_t(k) * p.head_dim + d];
    out[d] = from_acc<T>(ll > 0.f ? a / ll : 0.f);
  }
  if (lane == 0) static_cast<float*>(p.lse.ptr)[row_off(p.lse, b, s.q0 + i, h)] = ll > 0.f ? mm + logf(ll) : INFINITY;
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

// ---- decode path

// Rows per decode block: the rows of a (sequence, kv head) rounded up to 1, 2 or 4 (the q and acc
// chunks of every row live in registers).
inline int dec_rows_per_block(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : 4; }

// Does the decode path take p? Few rows per kv head, 16-byte loads possible (head_dim, strides and
// pointers multiples of 16 bytes), a key row within one warp's loads (not f32 above 128), not f64.
bool decode_path(const AttnParams& p) {
  if (p.dtype == DType::f64) return false;
  const int vec = p.dtype == DType::f32 ? 4 : 8;  // kVec<T>
  const int db = p.head_dim <= 32 ? 32 : p.head_dim <= 64 ? 64 : p.head_dim <= 128 ? 128 : 256;  // visit_head_dim
  const int64_t rows = int64_t(p.seqlen_q) * (p.nheads / p.nheads_k);
  return db / vec <= 32 && rows >= 1 && rows <= kDecMaxRows && aligned16({p.q.ptr, p.k.ptr, p.v.ptr}) &&
         multiples_of(vec, {p.head_dim, p.q.batch_stride, p.q.row_stride, p.q.head_stride, p.k.batch_stride,
                            p.k.row_stride, p.k.head_stride, p.v.batch_stride, p.v.row_stride, p.v.head_stride});
}

// Key splits across blocks: as many as fill one wave (DecGeom::kMinBlocks blocks per SM), each with
// >= kDecKeysPerSplit keys; num_splits > 1 forces that many, 1 forbids splitting.
int dec_splits(const AttnParams& p, int num_sms) {
  const int64_t rows = int64_t(p.seqlen_q) * (p.nheads / p.nheads_k);
  const int rb = dec_rows_per_block(rows), per_sm = rb >= 4 ? 1 : 2;
  const int64_t blocks = ceil_div(rows, rb) * p.nheads_k * p.batch;
  int64_t n = p.num_splits > 0 ? p.num_splits : blocks > 0 ? per_sm * int64_t(num_sms) / blocks : 1;
  if (p.num_splits == 0 && n > ceil_div(p.seqlen_k, kDecKeysPerSplit)) n = ceil_div(p.seqlen_k, kDecKeysPerSplit);
  return int(n < 1 ? 1 : n > kDecMaxSplits ? kDecMaxSplits : n);
}

// float32 partials: (m, l) then acc[head_dim] for each (sequence, kv head, row < seqlen_q G, split).
int64_t dec_workspace_bytes(const AttnParams& p, int splits) {
  if (splits <= 1) return 0;
  const int64_t parts = int64_t(p.batch) * p.nheads_k * p.seqlen_q * (p.nheads / p.nheads_k) * splits;
  return parts * (2 + p.head_dim) * int64_t(sizeof(float));
}

template <typename T, int DB, int R>
cudaError_t launch_decode_rows(const AttnParams& p, int splits, cudaStream_t stream) {
  const int64_t rows = int64_t(p.seqlen_q) * (p.nheads / p.nheads_k);
  const dim3 grid(unsigned(ceil_div(rows, R) * splits), p.nheads_k, p.batch);
  attn_decode_kernel<T, DB, R><<<grid, kDecThreads, 0, stream>>>(p, splits);
  if (splits > 1) {  // same stream: the combine runs after every split block
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    attn_decode_combine_kernel<T><<<dim3(unsigned(ceil_div(rows, kWarps)), p.nheads_k, p.batch), kThreads, 0, stream>>>(
        p, splits);
  }
  return cudaGetLastError();
}

template <typename T, int DB>
cudaError_t launch_decode(const AttnParams& p, cudaStream_t stream) {
  int splits = 1;
  if (p.num_splits != 1 && p.workspace) {
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    splits = dec_splits(p, sms);
    if (p.workspace_bytes < dec_workspace_bytes(p, splits)) splits = 1;  // too small: split inside blocks only
  }
  const int64_t rows = int64_t(p.seqlen_q) * (p.nheads / p.nheads_k);
  switch (dec_rows_per_block(rows)) {
    case 1: return launch_decode_rows<T, DB, 1>(p, splits, stream);
    case 2: return launch_decode_rows<T, DB, 2>(p, splits, stream);
    default: return launch_decode_rows<T, DB, 4>(p, splits, stream);
  }
}

template <typename T, int DB>
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int RW = kFwdRows<T, DB>;
  if constexpr (!kIsF64<T> && DB / kVec<T> <= 32)
    if (decode_path(p)) return launch_decode<T, DB>(p, stream);
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

int64_t attn_fwd_cuda_workspace_bytes(const AttnParams& p, int num_sms) {
  if (!cuda::valid_shape(p) || p.batch == 0 || p.nheads == 0 || !cuda::decode_path(p) || p.num_splits == 1) return 0;
  return cuda::dec_workspace_bytes(p, cuda::dec_splits(p, num_sms));
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
