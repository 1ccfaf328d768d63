// Weight-only quantized linear and dequantize, CUDA (formats and params: kernels/quant.h; CPU twins:
// kernels/quant_pack.cpp, kernels/quant_linear.cpp). Torch-free.
//
// Every kernel computes the same dequantized value as the CPU: w = code[q] * absmax (nf4),
// (q - z) * s (int4), q * s (int8), in fp32; the nested nf4 absmax is
// fadd_rn(fmul_rn(nested_code[nested_q[b]], nested_absmax[b / 256]), nested_offset), written with the
// explicit-rounding intrinsics so nvcc cannot contract it into an FMA (bitsandbytes rounds twice).
//
// Kernels:
// - dequant_vec_kernel<T, F>: 8 consecutive flattened elements per thread (4 packed bytes / 8 int8 bytes
//   in, 16-byte stores out); dequant_elem_kernel<T>: one element per thread, any shape (the fallback).
// - qmma_kernel<T, F, MT> (bf16/fp16 x, m >= 2): tensor cores (mma.sync m16n8k16, fp32 accumulation); a block
//   owns 128 weight rows and 16 MT rows of x and runs k in chunks of 128, with k split over blocks (fp32
//   partials in a workspace, summed in order by qsplit_sum_kernel<T>) when the grid would not fill the GPU.
//   Each lane streams its own 16/32 packed bytes per chunk from global memory straight into mma fragments
//   (the k order inside a chunk is permuted to make that so); x is staged in shared memory by cp.async.
// - qgemv_kernel<T, F, MT> (fp32 x with m <= 8, bf16/fp16 x with m = 1): 8 warps per block, 2 weight rows
//   per warp. The block walks k in chunks: all MT (m rounded up to 1/2/4/8) rows of the x chunk are staged in
//   shared memory as fp32 (swizzled, see xs_index), then every lane streams 16-byte units of its warp's two
//   weight rows, so every weight byte is read once from global memory, decodes them in registers (nf4
//   through the 16-entry code table in shared memory) and accumulates MT x 2 fp32 dot products; a warp
//   shuffle reduction ends it.
// - qgemm_kernel<T, F> (fp32 x, m > 8): SIMT, a 64 x 64 output tile per 256-thread block, tiles staged as
//   fp32 (k-major), each thread accumulating a 4 x 4 sub-tile.
// - qlinear_elem_kernel<T>: a warp per output element, any shape, any dtype (f64 included): the
//   fallback for shapes the fast paths refuse (k % 32 != 0, unaligned data, non-power-of-two groups).
//
// Fast-path preconditions (checked on the host by fast_weight()): k % 32 == 0, the packed data 16-byte
// aligned, group a power of two >= 32 (nf4 and int4). Then a weight row starts on a 16-byte boundary
// (row r starts at byte r * k / 2 (4-bit) or r * k (int8), multiples of 16), every aligned run of 32
// elements of a row lies in one nf4 block / int4 group (group is a multiple of 32 and the run's
// flattened start r * k + c is a multiple of 32), and k splits into whole 32-element runs.
#include <algorithm>
#include <climits>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace llmkern {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------
// Scalar decoding (any element; the fallback kernels and the reference for the fast paths' math)

__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::f16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::f64: return float(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Absmax of nf4 block b: fp32, or decoded from the nested (double-quant) statistics. `ncode` is the
// nested code table (global, or a shared-memory copy).
__device__ __forceinline__ float nf4_absmax(const QWeight& w, const float* ncode, int64_t b) {
  if (!w.nested_q) return w.absmax[b];
  // Two roundings, as bitsandbytes: the product in its kernel, then torch's `+= offset`.
  return __fadd_rn(__fmul_rn(ncode[w.nested_q[b]], w.nested_absmax[b >> 8]), w.nested_offset);
}

// 4-bit code of flattened element e: byte e / 2, high nibble when e is even.
__device__ __forceinline__ int nibble_at(const uint8_t* data, int64_t e) {
  const int byte = data[e >> 1];
  return (e & 1) ? (byte & 15) : (byte >> 4);
}

// w[r][c] (flattened e = r * k + c) in fp32, reading everything from global memory.
__device__ __forceinline__ float decode_one(const QWeight& w, int64_t r, int64_t c) {
  const int64_t e = r * w.k + c;
  switch (w.format) {
    case QFormat::nf4:
      return w.code[nibble_at(static_cast<const uint8_t*>(w.data), e)] * nf4_absmax(w, w.nested_code, e / w.group);
    case QFormat::int4: {
      const int64_t g = r * (w.k / w.group) + c / w.group;  // scales/zeros are [n][k / group]
      const float z = w.zeros ? float(w.zeros[g]) : 8.f;
      return (float(nibble_at(static_cast<const uint8_t*>(w.data), e)) - z) * load_as_float(w.scales, w.scales_dtype, g);
    }
    default:
      return float(static_cast<const int8_t*>(w.data)[e]) * load_as_float(w.scales, w.scales_dtype, r);
  }
}

// ---------------------------------------------------------------------------------------------------
// Run decoding (the fast paths): a run of consecutive elements of one row that lies in one block/group,
// so one scale (and zero point) serves the whole run.

// Exact small-integer -> float: the bits 0x4B000000 | v (v < 2^23) are the float 2^23 + v, so
// magic(v) - (2^23 + z) = v - z exactly (both operands are integers below 2^24). One LOP3 + one FADD
// instead of an I2F per element.
__device__ __forceinline__ float magic(uint32_t v) { return __uint_as_float(0x4B000000u | v); }
constexpr float kMagic = 8388608.f;  // 2^23

// The scale and the value subtracted from magic(q) for a run starting at flattened element e0 = r * k + c0
// (c0 a multiple of 32, fast-path preconditions). nf4 needs no offset (the table lookup gives the value).
struct RunScale {
  float s;     // absmax (nf4) or scale (int4/int8)
  float zoff;  // int4: 2^23 + z; int8: 2^23 + 128 (see decode4 for int8's bias); nf4: unused
};

template <QFormat F>
__device__ __forceinline__ RunScale run_scale(const QWeight& w, const float* ncode, int64_t r, int64_t c0, int gshift) {
  RunScale rs;
  if (F == QFormat::nf4) {
    rs.s = nf4_absmax(w, ncode, (r * w.k + c0) >> gshift);
    rs.zoff = 0.f;
  } else if (F == QFormat::int4) {
    const int64_t g = r * (w.k >> gshift) + (c0 >> gshift);
    rs.s = load_as_float(w.scales, w.scales_dtype, g);
    rs.zoff = kMagic + (w.zeros ? float(__ldg(w.zeros + g)) : 8.f);
  } else {
    rs.s = load_as_float(w.scales, w.scales_dtype, r);
    rs.zoff = kMagic + 128.f;
  }
  return rs;
}

// The 4 unscaled values (code[q], q - z or q) of the 4 consecutive elements 4j .. 4j + 3 of a run whose
// packed bytes are the little-endian words wd[] (byte b of the run is bits 8 (b % 4) .. of wd[b / 4]).
// - 4-bit: elements 4j .. 4j + 3 are bytes 2j (elements 4j high nibble, 4j + 1 low nibble) and 2j + 1
//   (4j + 2 high, 4j + 3 low), i.e. the 16 bits of word j / 2 starting at bit sb = 16 (j % 2); in it,
//   byte 2j is bits sb .. sb + 7 (high nibble at sb + 4) and byte 2j + 1 bits sb + 8 .. sb + 15.
// - int8: elements 4j .. 4j + 3 are the 4 bytes of word j, element 4j + b at bits 8b; b ^ 0x80 maps the
//   two's complement byte v to v + 128 in [0, 255], so magic(b ^ 0x80) - (2^23 + 128) = v exactly.
template <QFormat F>
__device__ __forceinline__ void decode4(const uint32_t* wd, int j, const float* code, float zoff, float (&v)[4]) {
  if (F == QFormat::int8) {
    const uint32_t x = wd[j] ^ 0x80808080u;
#pragma unroll
    for (int b = 0; b < 4; ++b) v[b] = magic((x >> (8 * b)) & 0xffu) - zoff;
  } else {
    const uint32_t x = wd[j >> 1] >> (16 * (j & 1));
    const uint32_t q[4] = {(x >> 4) & 15u, x & 15u, (x >> 12) & 15u, (x >> 8) & 15u};
#pragma unroll
    for (int b = 0; b < 4; ++b) v[b] = F == QFormat::nf4 ? code[q[b]] : magic(q[b]) - zoff;
  }
}

// Elements per 16-byte unit of packed weight, and bytes per element pair (row byte offsets: c * 2 / kPair).
template <QFormat F> constexpr int kUnit = F == QFormat::int8 ? 16 : 32;
template <QFormat F> __host__ __device__ constexpr int64_t row_bytes(int64_t k) { return F == QFormat::int8 ? k : k / 2; }
template <QFormat F> __host__ __device__ constexpr int64_t col_byte(int64_t c) { return F == QFormat::int8 ? c : c / 2; }

// Copies the nf4 code table (16) and, when nested, the nested code table (256) into shared memory.
// Callers __syncthreads() before reading them (the chunk/tile loops' first barrier does it).
template <QFormat F>
__device__ __forceinline__ void stage_tables(const QWeight& w, float* cs, float* ncs) {
  if (F != QFormat::nf4) return;
  if (threadIdx.x < 16) cs[threadIdx.x] = w.code[threadIdx.x];
  if (w.nested_q)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) ncs[i] = w.nested_code[i];
}

// ---------------------------------------------------------------------------------------------------
// Dequantize

// Thread u writes flattened elements 8u .. 8u + 7 (numel % 8 == 0; int4/int8: k % 8 == 0 so they lie in
// one row; nf4/int4: group % 8 == 0 (a power of two >= 32 here) so they share one block/group). Input:
// 4-bit: the 4 bytes at 4u (aligned to 4: data is 16-byte aligned); int8: the 8 bytes at 8u. Output:
// 8 elements = 8 * sizeof(T) bytes, written as 16-byte packs (out is 16-byte aligned, 8u * sizeof(T) a
// multiple of 16 for sizeof(T) >= 2).
template <typename T, QFormat F>
__global__ void __launch_bounds__(256) dequant_vec_kernel(const QDequantParams p, int gshift) {
  __shared__ float cs[16], ncs[256];
  stage_tables<F>(p.w, cs, ncs);
  __syncthreads();
  const int64_t units = p.w.n * p.w.k / 8;
  constexpr int V = kVec<T>;  // elements per 16-byte store
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = u * 8, r = e0 / p.w.k, c0 = e0 - r * p.w.k;
    uint32_t wd[2];
    if (F == QFormat::int8) {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(static_cast<const int8_t*>(p.w.data) + e0));
      wd[0] = raw.x;
      wd[1] = raw.y;
    } else {
      wd[0] = __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(p.w.data) + e0 / 2));
      wd[1] = 0;
    }
    // run_scale's run is 32 elements; only its block/group matters, which is the same for these 8.
    const RunScale rs = run_scale<F>(p.w, ncs, r, c0, gshift);
    acc_t<T> o[8];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float v[4];
      decode4<F>(wd, j, cs, rs.zoff, v);
#pragma unroll
      for (int b = 0; b < 4; ++b) o[4 * j + b] = acc_t<T>(v[b] * rs.s);  // the fp32 product, rounded once to T
    }
    T* dst = static_cast<T*>(p.out) + e0;
#pragma unroll
    for (int s = 0; s < 8 / V; ++s) {
      acc_t<T> part[V];
#pragma unroll
      for (int i = 0; i < V; ++i) part[i] = o[s * V + i];
      store_acc<T, V>(dst + s * V, part);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) dequant_elem_kernel(const QDequantParams p) {
  const int64_t numel = p.w.n * p.w.k;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / p.w.k;
    static_cast<T*>(p.out)[e] = from_acc<T>(acc_t<T>(decode_one(p.w, r, e - r * p.w.k)));
  }
}

// ---------------------------------------------------------------------------------------------------
// GEMV (m <= 8)

constexpr int kGemvWarps = 8, kGemvThreads = 32 * kGemvWarps, kGemvRows = 2;  // rows per warp
constexpr int kGemvMaxM = 8;
// Dynamic shared memory for the x chunk. A block gets 48 KB in all (static + dynamic) without opting in;
// the static code tables (cs, ncs) take 1088 bytes, so the chunk stays within 46 KB.
constexpr int kGemvSmem = 46 * 1024;

// Float offset of element c of a row of the staged x chunk. Chunk i = c / 4 (16 bytes) is stored at
// i ^ ((i >> 3) & 7): a permutation inside each aligned group of 8 chunks (only the low 3 bits change,
// as a function of the bits above them), so rows (kc floats, kc % 32 == 0, i.e. whole groups) stay
// apart. Why: lane l reads chunk 8 (u0 + l) + j (4-bit: 32 elements = 8 chunks per unit) or
// 4 (u0 + l) + j (int8) at step j; unswizzled, the 8 lanes of a 128-bit shared-load phase would hit the
// same 16-byte bank group (8-way conflict). Swizzled, their low 3 bits are j ^ (l & 7) (4-bit) or
// (4 (l & 1) + j) ^ ((l >> 1) & 3) (int8, j < 4): 8 distinct bank groups, conflict-free.
__device__ __forceinline__ int xs_index(int c) {
  const int i = c >> 2;
  return ((i ^ ((i >> 3) & 7)) << 2) | (c & 3);
}

// Grid: ceil(n / 16) blocks. Warp `warp` of block b owns weight rows r0 = (8 b + warp) * 2 and r0 + 1.
// kc: elements of x staged per chunk (a multiple of 32; MT * kc * 4 bytes of dynamic shared memory).
template <typename T, QFormat F, int MT>
__global__ void __launch_bounds__(kGemvThreads) qgemv_kernel(const QLinearParams p, int kc, int gshift) {
  extern __shared__ __align__(16) float xs[];  // [MT][kc], xs_index-swizzled rows
  __shared__ float cs[16], ncs[256];
  constexpr int E = kUnit<F>, J = E / 4;  // elements per unit, float4 chunks per unit
  const QWeight& w = p.w;
  stage_tables<F>(w, cs, ncs);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = (int64_t(blockIdx.x) * kGemvWarps + warp) * kGemvRows;
  const T* x = static_cast<const T*>(p.x);
  const uint8_t* wbase = static_cast<const uint8_t*>(w.data);
  float acc[MT][kGemvRows];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int rr = 0; rr < kGemvRows; ++rr) acc[m][rr] = 0.f;

  for (int64_t k0 = 0; k0 < w.k; k0 += kc) {
    const int len = int(min(int64_t(kc), w.k - k0));  // a multiple of 32 (k % 32 == 0, kc % 32 == 0)
    __syncthreads();  // every warp is done with the previous chunk (first pass: nothing to wait for)
    // Stage x[0 .. MT)[k0 .. k0 + len) as fp32; rows m >= p.m are zeros (MT rounds m up).
    for (int i = threadIdx.x; i < MT * len; i += kGemvThreads) {
      const int m = i / len, c = i - m * len;
      xs[m * kc + xs_index(c)] = m < p.m ? float(to_acc(x[m * p.x_stride + k0 + c])) : 0.f;
    }
    __syncthreads();  // the chunk (and, first pass, the code tables) are visible to every warp
    const int units = len / E;
    for (int u = lane; u < units; u += 32) {
      const int c = u * E;  // first element of the unit within the chunk
      uint32_t wd[kGemvRows][4];
      RunScale rs[kGemvRows];
#pragma unroll
      for (int rr = 0; rr < kGemvRows; ++rr) {
        const int64_t r = r0 + rr;
        if (r < w.n) {  // warp-uniform: the whole warp owns the same rows
          // Row r, column k0 + c: byte r * row_bytes + col_byte(k0 + c), a multiple of 16 (preconditions).
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(wbase + r * row_bytes<F>(w.k) + col_byte<F>(k0 + c)));
          wd[rr][0] = raw.x, wd[rr][1] = raw.y, wd[rr][2] = raw.z, wd[rr][3] = raw.w;
          rs[rr] = run_scale<F>(w, ncs, r, k0 + c, gshift);
        } else {
          wd[rr][0] = wd[rr][1] = wd[rr][2] = wd[rr][3] = 0u;
          rs[rr].s = 0.f, rs[rr].zoff = 0.f;
        }
      }
      float part[MT][kGemvRows];  // this unit's unscaled sums; one multiply by the run's scale after
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int rr = 0; rr < kGemvRows; ++rr) part[m][rr] = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        float v[kGemvRows][4];
#pragma unroll
        for (int rr = 0; rr < kGemvRows; ++rr) decode4<F>(wd[rr], j, cs, rs[rr].zoff, v[rr]);
        // Elements c + 4j .. c + 4j + 3 = chunk (c / 4 + j) of each x row; one 16-byte shared load each.
        const int xi = xs_index(c + 4 * j);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float4 xv = *reinterpret_cast<const float4*>(xs + m * kc + xi);
#pragma unroll
          for (int rr = 0; rr < kGemvRows; ++rr)
            part[m][rr] += xv.x * v[rr][0] + xv.y * v[rr][1] + xv.z * v[rr][2] + xv.w * v[rr][3];
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int rr = 0; rr < kGemvRows; ++rr) acc[m][rr] += part[m][rr] * rs[rr].s;
    }
  }

  // Every lane (all 32 take part in the shuffles) ends with the full sums; lane 0 writes them.
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int rr = 0; rr < kGemvRows; ++rr) {
      const float s = group_sum(acc[m][rr], 32);
      const int64_t r = r0 + rr;
      if (lane == 0 && m < p.m && r < w.n) out[m * p.out_stride + r] = from_acc<T>(s + (bias ? float(to_acc(bias[r])) : 0.f));
    }
}

// ---------------------------------------------------------------------------------------------------
// Tiled GEMM (m > 8), SIMT

constexpr int kBM = 64, kBN = 64, kBK = 32, kGemmThreads = 256;

// Loader: thread t fills tile row lr = t % 64 at k offsets lk .. lk + 7, lk = 8 (t / 64) (4 x 8 = 32 =
// kBK), for both the x tile (row m0 + lr) and the W tile (row n0 + lr), and stores them k-major
// (As[lk + i][lr]): the 32 lanes of a warp have consecutive lr and the same lk, so each store is 32
// consecutive floats (conflict-free).
// Math: thread t owns rows tm * 4 .. + 3 (tm = t / 16) and columns tn * 4 .. + 3 (tn = t % 16) of the
// 64 x 64 tile; per k it reads As[k][tm * 4 .. + 3] (2 distinct float4 per warp: broadcast) and
// Ws[k][tn * 4 .. + 3] (16 consecutive float4 per warp: conflict-free).
template <typename T, QFormat F>
__global__ void __launch_bounds__(kGemmThreads) qgemm_kernel(const QLinearParams p, int gshift, bool xvec) {
  __shared__ __align__(16) float As[kBK][kBM];
  __shared__ __align__(16) float Ws[kBK][kBN];
  __shared__ float cs[16], ncs[256];
  const QWeight& w = p.w;
  stage_tables<F>(w, cs, ncs);
  const int t = threadIdx.x, lr = t % kBM, lk = 8 * (t / kBM), tm = t / 16, tn = t % 16;
  const int64_t n0 = int64_t(blockIdx.x) * kBN, m0 = int64_t(blockIdx.y) * kBM;
  const int64_t wr = n0 + lr, xr = m0 + lr;
  const bool wvalid = wr < w.n, xvalid = xr < p.m;
  const T* xrow = static_cast<const T*>(p.x) + (xvalid ? xr : 0) * p.x_stride;
  const uint8_t* wrow = static_cast<const uint8_t*>(w.data) + (wvalid ? wr : 0) * row_bytes<F>(w.k);

  // Global -> registers for the step at k0: raw weight words + the run scale, 8 x values.
  uint32_t wd[2];
  RunScale rs;
  float xv[8];
  auto load = [&](int64_t k0) {
    const int64_t c = k0 + lk;  // a multiple of 8; the 8 elements lie in one block/group (group >= 32)
    if (wvalid) {
      if (F == QFormat::int8) {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(wrow + c));  // 8-byte aligned: c % 8 == 0
        wd[0] = raw.x, wd[1] = raw.y;
      } else {
        wd[0] = __ldg(reinterpret_cast<const uint32_t*>(wrow + c / 2)), wd[1] = 0u;  // 4-byte aligned
      }
    } else {
      wd[0] = wd[1] = 0u;
    }
    rs = wvalid ? run_scale<F>(w, ncs, wr, c, gshift) : RunScale{0.f, 0.f};
    if (!xvalid) {
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[i] = 0.f;
    } else if (xvec) {  // x 16-byte aligned, x_stride % 8 == 0: 8 elements = whole 16-byte packs
      constexpr int V = kVec<T> < 8 ? kVec<T> : 8;
#pragma unroll
      for (int s = 0; s < 8 / V; ++s) {
        acc_t<T> a[V];
        load_acc<T, V>(xrow + c + s * V, a);
#pragma unroll
        for (int i = 0; i < V; ++i) xv[s * V + i] = float(a[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[i] = float(to_acc(xrow[c + i]));
    }
  };

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  // The first barrier below also publishes the code tables: the first load may read ncs, so it waits.
  __syncthreads();
  load(0);
  for (int64_t k0 = 0; k0 < w.k; k0 += kBK) {
    __syncthreads();  // the previous step's math is done with As / Ws
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float v[4];
      decode4<F>(wd, j, cs, rs.zoff, v);
#pragma unroll
      for (int b = 0; b < 4; ++b) Ws[lk + 4 * j + b][lr] = v[b] * rs.s;  // = the dequantized fp32 value
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) As[lk + i][lr] = xv[i];
    __syncthreads();
    if (k0 + kBK < w.k) load(k0 + kBK);  // in flight during the math below
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][tm * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Ws[kk][tn * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  }

  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = n0 + tn * 4 + j;
    if (c >= w.n) continue;
    const float bj = bias ? float(to_acc(bias[c])) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + tm * 4 + i;
      if (m < p.m) out[m * p.out_stride + c] = from_acc<T>(acc[i][j] + bj);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Linear on tensor cores (bf16/fp16 x, m >= 2): mma.sync m16n8k16, fp32 accumulation, k split over blocks.
//
// The dequantized weight is rounded to T (bf16/fp16) before the multiply, as bitsandbytes' and every
// dequantize-then-matmul path do; x is used as stored. A block has 4 warps and owns 128 weight rows (n) and
// 16 MT rows of x (m); warp `warp` owns weight rows warp * 32 .. + 31 of them (4 n8 tiles) for all 16 MT
// rows (MT m16 tiles). k goes in chunks of 128; blockIdx.z picks a run of chunks (the split).
//
// The k order inside a chunk is permuted so that each lane decodes one contiguous 32-element unit of its
// weight row. A dot product does not care in which order k runs, as long as x and W use the same order:
// lane tq (= lane % 4) of each row group owns unit tq (elements 32 tq .. + 31 of the chunk), and the chunk's
// k16 step s (0..7) takes elements 32 tq + 4 s + j (j = 0..3) of each unit to the mma's k positions
// 2 tq + {0, 1, 8, 9}[j]. Those are exactly the positions a lane holds in the fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"; g = lane / 4; two consecutive-k elements per 32-bit
// register, the lower k in the low half):
//   A (x, 16 x 16): a0 = (row g, k 2tq, 2tq+1), a1 = (row g+8, same k), a2 = (row g, k 2tq+8, +9),
//     a3 = (row g+8, k 2tq+8, +9): with the permutation, a0 | a2 are elements 4s .. 4s+3 of unit tq of x row g.
//   B (W, 16 x 8, element (k, n) at W[n][k]): b0 = (k 2tq, 2tq+1; n g), b1 = (k 2tq+8, +9; n g): elements
//     4s .. 4s+3 of unit tq of weight row g, i.e. decode4 j = s of the lane's own 16 (32 int8) packed bytes.
//   C (16 x 8 fp32): c0, c1 = (row g; n 2tq, 2tq+1), c2, c3 = (row g+8; n 2tq, 2tq+1).
// So every lane reads its weight straight from global memory into registers (16 or 32 bytes per unit, the
// next chunk's loads in flight during this chunk's math) and no shuffle or shared memory is needed for W.
//
// x goes through shared memory (every warp of the block uses the same x chunk): cp.async copies of 16 bytes
// (zero-filled past m or k), double-buffered, one barrier per chunk. Row `row` of the staged chunk holds its
// 16 16-byte pieces at xpos(row, i) = row * 18 + i + i / 8: a lane's 16-byte fragment load (piece 4 tq + sp
// of rows g, g + 8) then hits 8 distinct 4-bank groups in each quarter-warp (rows g, g + 1 differ by 18
// pieces, 2 mod 8; tq = 0..3 lands on sp + {0, 4, 1, 5} mod 8), and so does the copy (8 consecutive pieces).
//
// With several splits each block writes its fp32 partial sums to p.workspace ([splits][m][n]) and
// qsplit_sum_kernel adds them in split order (deterministic), with the bias, and rounds once to T.
constexpr int kQWarps = 4, kQThreads = 32 * kQWarps, kQTilesN = 4;  // n8 tiles per warp
constexpr int kQBlockN = kQWarps * kQTilesN * 8;                     // weight rows per block
constexpr int kQChunk = 128, kQUnit = 32;                            // k per chunk; per lane and row
constexpr int kQRowPieces = 18;                                      // 16 x 16 bytes + 2 of padding

__device__ __forceinline__ int xpos(int row, int i) { return row * kQRowPieces + i + (i >> 3); }

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);  // round each to T
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a * b on one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// 16 bytes global -> shared without registers; src_bytes 0 writes zeros (src is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

// Grid: (ceil(n / 128), ceil(m / (16 MT)), splits); split z takes chunks [z cps, min((z + 1) cps, chunks)).
// xvec: x 16-byte aligned with x_stride % 8 == 0 (cp.async); else x is staged with 2-byte loads.
template <typename T, QFormat F, int MT>
__global__ void __launch_bounds__(kQThreads) qmma_kernel(const QLinearParams p, int gshift, bool xvec, int cps) {
  constexpr int W = F == QFormat::int8 ? 8 : 4;  // 32-bit words of a lane's 32-element unit
  constexpr int XPieces = 16 * MT * 16;            // 16-byte pieces of one staged x chunk
  __shared__ __align__(16) uint4 xs[2][16 * MT * kQRowPieces];
  __shared__ float cs[16], ncs[256];
  const QWeight& w = p.w;
  stage_tables<F>(w, cs, ncs);
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31, g = lane >> 2, tq = lane & 3;
  const int64_t m0 = int64_t(blockIdx.y) * 16 * MT;
  const int64_t r0 = int64_t(blockIdx.x) * kQBlockN + warp * kQTilesN * 8 + g;  // this lane's row of n8 tile 0
  const int64_t chunks = (w.k + kQChunk - 1) / kQChunk;
  const int64_t ch0 = int64_t(blockIdx.z) * cps, ch1 = min(ch0 + cps, chunks);
  const uint8_t* wbase = static_cast<const uint8_t*>(w.data);
  const uint16_t* x = static_cast<const uint16_t*>(p.x);

  // The lane's units of chunk ch (rows r0 + 8 nt, elements ch * 128 + 32 tq ..): packed words and run scale.
  // Past n or k: zeros with scale 0 (a finite 0 for every format).
  auto load_w = [&](int64_t ch, uint32_t (&wd)[kQTilesN][W], RunScale (&rs)[kQTilesN]) {
    const int64_t c = ch * kQChunk + kQUnit * tq;
#pragma unroll
    for (int nt = 0; nt < kQTilesN; ++nt) {
      const int64_t r = r0 + 8 * nt;
      if (r < w.n && c < w.k) {
        // Byte r * row_bytes + col_byte(c): a multiple of 16 (fast-path preconditions, c % 32 == 0).
        const uint4* src = reinterpret_cast<const uint4*>(wbase + r * row_bytes<F>(w.k) + col_byte<F>(c));
#pragma unroll
        for (int h = 0; h < W / 4; ++h) {
          const uint4 v = __ldg(src + h);
          wd[nt][4 * h] = v.x, wd[nt][4 * h + 1] = v.y, wd[nt][4 * h + 2] = v.z, wd[nt][4 * h + 3] = v.w;
        }
        rs[nt] = run_scale<F>(w, ncs, r, c, gshift);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) wd[nt][i] = 0u;
        rs[nt] = RunScale{0.f, 0.f};
      }
    }
  };
  // x rows m0 .. m0 + 16 MT, elements ch * 128 .. + 127 into xs[buf]; thread t copies pieces t, t + 128, ...
  auto stage_x = [&](int64_t ch, int buf) {
#pragma unroll
    for (int j = 0; j < XPieces / kQThreads; ++j) {
      const int piece = t + j * kQThreads, row = piece >> 4, i = piece & 15;
      const int64_t m = m0 + row, c = ch * kQChunk + 8 * i;
      const bool valid = m < p.m && c < w.k;  // k % 32 == 0: a piece is wholly in or out
      uint4* dst = &xs[buf][xpos(row, i)];
      const uint16_t* src = x + (valid ? m * p.x_stride + c : 0);
      if (xvec) {
        cp_async16(dst, src, valid ? 16 : 0);
      } else {
        uint32_t h[8] = {};
        if (valid)
#pragma unroll
          for (int e = 0; e < 8; ++e) h[e] = src[e];
        *dst = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
      }
    }
  };

  float acc[MT][kQTilesN][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kQTilesN; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  uint32_t wd[kQTilesN][W], wn[kQTilesN][W];
  RunScale rs[kQTilesN], rn[kQTilesN];
  __syncthreads();  // the code tables: load_w may read ncs
  load_w(ch0, wd, rs);
  stage_x(ch0, 0);
  cp_async_wait_all();
  __syncthreads();
  for (int64_t ch = ch0; ch < ch1; ++ch) {
    const int buf = int(ch - ch0) & 1;
    const bool more = ch + 1 < ch1;
    if (more) {  // in flight during the math below; xs[buf ^ 1] was last read before the previous barrier
      load_w(ch + 1, wn, rn);
      stage_x(ch + 1, buf ^ 1);
    }
#pragma unroll
    for (int sp = 0; sp < 4; ++sp) {  // 16-byte piece sp of the lane's x units = k16 steps 2 sp, 2 sp + 1
      uint4 xa[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) xa[mt][h] = xs[buf][xpos(mt * 16 + g + 8 * h, 4 * tq + sp)];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int s = 2 * sp + half;
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = half ? xa[mt][0].z : xa[mt][0].x;
          a[mt][1] = half ? xa[mt][1].z : xa[mt][1].x;
          a[mt][2] = half ? xa[mt][0].w : xa[mt][0].y;
          a[mt][3] = half ? xa[mt][1].w : xa[mt][1].y;
        }
#pragma unroll
        for (int nt = 0; nt < kQTilesN; ++nt) {
          float v[4];
          decode4<F>(wd[nt], s, cs, rs[nt].zoff, v);
          const float sc = rs[nt].s;
          const uint32_t b[2] = {pack2<T>(v[0] * sc, v[1] * sc), pack2<T>(v[2] * sc, v[3] * sc)};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma16816<T>(acc[mt][nt], a[mt], b);
        }
      }
    }
    if (more) {
#pragma unroll
      for (int nt = 0; nt < kQTilesN; ++nt) {
#pragma unroll
        for (int i = 0; i < W; ++i) wd[nt][i] = wn[nt][i];
        rs[nt] = rn[nt];
      }
    }
    cp_async_wait_all();
    __syncthreads();  // xs[buf ^ 1] is complete and xs[buf] is free
  }

  const bool split = gridDim.z > 1;
  T* out = static_cast<T*>(p.out);
  float* ws = split ? static_cast<float*>(p.workspace) + int64_t(blockIdx.z) * p.m * w.n : nullptr;
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int nt = 0; nt < kQTilesN; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t c = r0 - g + 8 * nt + 2 * tq + e;  // C column 2tq + e of n8 tile nt
      if (c >= w.n) continue;
      const float bc = bias && !split ? float(to_acc(bias[c])) : 0.f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // C rows g (c0, c1) and g + 8 (c2, c3)
          const int64_t m = m0 + mt * 16 + g + 8 * h;
          if (m >= p.m) continue;
          const float v = acc[mt][nt][2 * h + e];
          if (split)
            ws[m * w.n + c] = v;
          else
            out[m * p.out_stride + c] = from_acc<T>(v + bc);
        }
    }
}

// out = the sum of the splits' partials (in split order) + bias, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(256) qsplit_sum_kernel(const QLinearParams p, int splits) {
  const int64_t total = p.m * p.w.n;
  const float* ws = static_cast<const float*>(p.workspace);
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = e / p.w.n, c = e - m * p.w.n;
    float s = 0.f;
#pragma unroll 4
    for (int z = 0; z < splits; ++z) s += ws[z * total + e];  // unrolled: 4 loads in flight, the same order
    static_cast<T*>(p.out)[m * p.out_stride + c] = from_acc<T>(s + (bias ? float(to_acc(bias[c])) : 0.f));
  }
}

// ---------------------------------------------------------------------------------------------------
// Fallback linear: a warp per output element (grid.x covers n in groups of 8 warps, grid.y strides m).

template <typename T>
__global__ void __launch_bounds__(256) qlinear_elem_kernel(const QLinearParams p) {
  using A = acc_t<T>;
  const int64_t r = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= p.w.n) return;  // warp-uniform: the shuffles below involve whole warps only
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t m = blockIdx.y; m < p.m; m += gridDim.y) {
    const T* xrow = static_cast<const T*>(p.x) + m * p.x_stride;
    A s = 0;
    for (int64_t c = lane; c < p.w.k; c += 32) s += to_acc(xrow[c]) * A(decode_one(p.w, r, c));
    s = group_sum(s, 32);
    if (lane == 0) static_cast<T*>(p.out)[m * p.out_stride + r] = from_acc<T>(s + (bias ? to_acc(bias[r]) : A(0)));
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side

int log2_exact(int64_t v) {  // log2(v) for a power of two, else -1
  if (v <= 0 || (v & (v - 1))) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

// The shift for the fast paths (see the file comment), or -1 when they do not apply.
int fast_weight(const QWeight& w) {
  if (w.k <= 0 || w.k % 32 || !aligned16({w.data})) return -1;
  if (w.format == QFormat::int8) return 0;
  const int s = log2_exact(w.group);
  return s >= 5 ? s : -1;
}

// Structural checks that the kernels' indexing relies on (the tensor-level glue checks the rest).
bool valid_weight(const QWeight& w) {
  if (w.n < 0 || w.k < 0 || !w.data) return false;
  switch (w.format) {
    case QFormat::nf4: return w.group > 0 && w.code && (w.absmax || (w.nested_q && w.nested_code && w.nested_absmax));
    case QFormat::int4: return w.group > 0 && w.k % w.group == 0 && w.k % 2 == 0 && w.scales;
    case QFormat::int8: return w.scales != nullptr;
  }
  return false;
}

template <typename F>
cudaError_t visit_format(QFormat f, F&& fn) {
  switch (f) {
    case QFormat::nf4: return fn(std::integral_constant<QFormat, QFormat::nf4>{});
    case QFormat::int4: return fn(std::integral_constant<QFormat, QFormat::int4>{});
    case QFormat::int8: return fn(std::integral_constant<QFormat, QFormat::int8>{});
  }
  return cudaErrorInvalidValue;
}

unsigned grid_for(int64_t items, int per_block) {
  return unsigned(std::min<int64_t>((items + per_block - 1) / per_block, int64_t(1) << 20));
}

template <typename T, QFormat F, int MT>
cudaError_t launch_gemv(const QLinearParams& p, int gshift, cudaStream_t stream) {
  // The largest chunk that fits kGemvSmem, a multiple of 32, no longer than k rounded up to 32.
  const int64_t cap = (kGemvSmem / (MT * int(sizeof(float)))) / 32 * 32;
  const int kc = int(std::min<int64_t>(cap, (p.w.k + 31) / 32 * 32));
  const int64_t grid = (p.w.n + kGemvWarps * kGemvRows - 1) / (kGemvWarps * kGemvRows);
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  qgemv_kernel<T, F, MT><<<unsigned(grid), kGemvThreads, size_t(MT) * kc * sizeof(float), stream>>>(p, kc, gshift);
  return cudaGetLastError();
}

// grid.y holds at most 65535 row tiles: larger m runs as several launches over consecutive row ranges (x and
// out offset by whole rows). launch(q, row_tiles) launches one of them and returns cudaGetLastError().
template <typename T, typename Launch>
cudaError_t over_row_ranges(const QLinearParams& p, int tile_rows, Launch&& launch) {
  const int64_t rows_per_launch = int64_t(65535) * tile_rows;
  for (int64_t r0 = 0; r0 < p.m; r0 += rows_per_launch) {
    QLinearParams q = p;
    q.m = std::min(rows_per_launch, p.m - r0);
    q.x = static_cast<const T*>(p.x) + r0 * p.x_stride;
    q.out = static_cast<T*>(p.out) + r0 * p.out_stride;
    const cudaError_t err = launch(q, unsigned(ceil_div(q.m, tile_rows)));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// fp32 x, m > 8: SIMT tiles.
template <QFormat F>
cudaError_t launch_gemm(const QLinearParams& p, int gshift, cudaStream_t stream) {
  const int64_t gx = ceil_div(p.w.n, kBN);
  if (gx > INT_MAX) return cudaErrorInvalidValue;
  const bool xvec = aligned16({p.x}) && p.x_stride % 8 == 0;
  return over_row_ranges<float>(p, kBM, [&](const QLinearParams& q, unsigned tiles) {
    qgemm_kernel<float, F><<<dim3(unsigned(gx), tiles), kGemmThreads, 0, stream>>>(q, gshift, xvec);
    return cudaGetLastError();
  });
}

// The tensor-core linear: m16 tiles per block (MT) and k splits.
int qmma_tiles_m(int64_t m) { return m <= 16 ? 1 : m <= 32 ? 2 : 4; }

// Blocks of qmma_kernel<T, F, MT> resident on one SM at once (its registers and shared memory decide).
template <typename T, QFormat F, int MT>
int qmma_resident() {
  int blocks = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, qmma_kernel<T, F, MT>, kQThreads, 0);
  return err == cudaSuccess && blocks > 0 ? blocks : 1;
}

// Splits of k for `slots` resident blocks on the GPU: one full wave of blocks, as long as every split keeps at
// least two chunks (the next chunk's loads overlap this one's math) and the fp32 partials (written once and
// read once) stay within the weight's own bytes. 1 when m needs several launches (the workspace holds one).
int qmma_splits(const QLinearParams& p, int64_t slots) {
  const int64_t tiles_m = ceil_div(p.m, 16 * qmma_tiles_m(p.m));
  if (tiles_m > 65535) return 1;
  const int64_t blocks = ceil_div(p.w.n, kQBlockN) * tiles_m, chunks = ceil_div(p.w.k, kQChunk);
  const int64_t weight_bytes = p.w.n * (p.w.format == QFormat::int8 ? p.w.k : p.w.k / 2);
  const int64_t s = std::min({ceil_div(slots, blocks), chunks / 2, weight_bytes / (p.m * p.w.n * 4)});
  return s <= 1 ? 1 : int(ceil_div(chunks, ceil_div(chunks, s)));
}

template <typename T, QFormat F>
int qmma_splits(const QLinearParams& p, int num_sms) {
  switch (qmma_tiles_m(p.m)) {
    case 1: return qmma_splits(p, int64_t(num_sms) * qmma_resident<T, F, 1>());
    case 2: return qmma_splits(p, int64_t(num_sms) * qmma_resident<T, F, 2>());
    default: return qmma_splits(p, int64_t(num_sms) * qmma_resident<T, F, 4>());
  }
}

int64_t qmma_workspace_bytes(const QLinearParams& p, int splits) {
  return splits > 1 ? int64_t(splits) * p.m * p.w.n * int64_t(sizeof(float)) : 0;
}

template <typename T, QFormat F, int MT>
cudaError_t launch_qmma_tiles(const QLinearParams& p, int gshift, int splits, cudaStream_t stream) {
  const int64_t gx = ceil_div(p.w.n, kQBlockN), cps = ceil_div(ceil_div(p.w.k, kQChunk), splits);
  if (gx > INT_MAX) return cudaErrorInvalidValue;
  const bool xvec = aligned16({p.x}) && p.x_stride % 8 == 0;
  const cudaError_t err = over_row_ranges<T>(p, 16 * MT, [&](const QLinearParams& q, unsigned tiles) {
    const dim3 grid(unsigned(gx), tiles, unsigned(splits));
    qmma_kernel<T, F, MT><<<grid, kQThreads, 0, stream>>>(q, gshift, xvec, int(cps));
    return cudaGetLastError();
  });
  if (err != cudaSuccess || splits == 1) return err;
  qsplit_sum_kernel<T><<<grid_for(p.m * p.w.n, 256), 256, 0, stream>>>(p, splits);  // same stream: after every split
  return cudaGetLastError();
}

template <typename T, QFormat F>
cudaError_t launch_qmma(const QLinearParams& p, int gshift, cudaStream_t stream) {
  int splits = 1;
  if (p.workspace) {
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    splits = qmma_splits<T, F>(p, sms);
    if (p.workspace_bytes < qmma_workspace_bytes(p, splits)) splits = 1;
  }
  switch (qmma_tiles_m(p.m)) {
    case 1: return launch_qmma_tiles<T, F, 1>(p, gshift, splits, stream);
    case 2: return launch_qmma_tiles<T, F, 2>(p, gshift, splits, stream);
    default: return launch_qmma_tiles<T, F, 4>(p, gshift, splits, stream);
  }
}

}  // namespace
}  // namespace cuda

cudaError_t dequantize_cuda(const QDequantParams& params, cudaStream_t stream) {
  using namespace cuda;
  if (!valid_weight(params.w) || !params.out) return cudaErrorInvalidValue;
  const int64_t numel = params.w.n * params.w.k;
  if (numel == 0) return cudaSuccess;
  QDequantParams p = params;
  if (p.w.format == QFormat::nf4) {  // only the flattened index matters: one row, so any shape with
    p.w.n = 1;                       // numel % 32 == 0 takes the vector path
    p.w.k = numel;
  }
  const int gshift = fast_weight(p.w);  // k % 32 == 0 implies numel % 8 == 0 and k % 8 == 0
  return visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) <= 4) {  // f64 (gradcheck) always takes the element-wise kernel
      if (gshift >= 0 && aligned16({p.out}))
        return visit_format(p.w.format, [&](auto fmt) {
        constexpr QFormat F = decltype(fmt)::value;
          dequant_vec_kernel<T, F><<<grid_for(numel / 8, 256), 256, 0, stream>>>(p, gshift);
          return cudaGetLastError();
        });
    }
    dequant_elem_kernel<T><<<grid_for(numel, 256), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t qlinear_cuda(const QLinearParams& p, cudaStream_t stream) {
  using namespace cuda;
  if (!valid_weight(p.w) || !p.x || !p.out || p.m < 0) return cudaErrorInvalidValue;
  if (p.m == 0 || p.w.n == 0) return cudaSuccess;
  const int gshift = fast_weight(p.w);
  return visit_cuda_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) <= 4) {  // f64 (gradcheck) always takes the element-wise kernel
      if (gshift >= 0)
        return visit_format(p.w.format, [&](auto fmt) -> cudaError_t {
        constexpr QFormat F = decltype(fmt)::value;
        // bf16/fp16 x: the GEMV at m = 1, the tensor cores from m = 2 on. On an H200 at 4096 x 4096: m = 1,
        // 10.5 us int4 and 11.5 us nf4 on the GEMV against 13.9 and 12.8 us on the tensor cores; m = 4,
        // 23.4 us on the GEMV, while the tensor cores take about as long at m = 16 as at m = 1 (15 us).
        if (p.m == 1) return launch_gemv<T, F, 1>(p, gshift, stream);
        if constexpr (!std::is_same<T, float>::value) {
          return launch_qmma<T, F>(p, gshift, stream);
        } else {  // fp32 x: the GEMV up to 8 rows, SIMT tiles past them
          if (p.m == 2) return launch_gemv<T, F, 2>(p, gshift, stream);
          if (p.m <= 4) return launch_gemv<T, F, 4>(p, gshift, stream);
          if (p.m <= kGemvMaxM) return launch_gemv<T, F, 8>(p, gshift, stream);
          return launch_gemm<F>(p, gshift, stream);
        }
        });
    }
    const int64_t gx = (p.w.n + 7) / 8;
    if (gx > INT_MAX) return cudaErrorInvalidValue;
    qlinear_elem_kernel<T><<<dim3(unsigned(gx), unsigned(std::min<int64_t>(p.m, 65535))), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

int64_t qlinear_cuda_workspace_bytes(const QLinearParams& p, int num_sms) {
  using namespace cuda;
  if (!valid_weight(p.w) || p.m <= 1 || p.w.n == 0 || fast_weight(p.w) < 0) return 0;
  int64_t bytes = 0;  // the tensor-core path only: bf16/fp16 x, m >= 2
  visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) == 2)
      visit_format(p.w.format, [&](auto fmt) {
        bytes = qmma_workspace_bytes(p, qmma_splits<T, decltype(fmt)::value>(p, num_sms));
        return cudaSuccess;
      });
    return cudaSuccess;
  });
  return bytes;
}

}  // namespace llmkern
