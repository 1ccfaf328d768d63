// Token selection, compiled once per CPU ISA.
//
// Greedy: argmax over a row of logits. One pass per row: every lane keeps
// its largest value and the first index of it (a strict > select, so a tie keeps the earlier index), and the lanes
// are merged at the end (largest value, then smallest index). A NaN never wins the select; a lane sum that a NaN
// turns into NaN says whether the row holds one, and then a scan finds the first, which is torch.argmax's answer.
// Floor: the row's bytes from cache (the logits were just written). torch.argmax on the CPU reduces one element at a
// time: ~250 us for 16 x 8192 bf16 logits on Zen 4, a tenth of a 16-sequence decode step of the demo model.
//
// Top-k / top-p: both cuts are a threshold on the row's values, found without sorting the row. The k-th largest is
// the largest value v with count(>= v) >= k; top-p's cut is the largest v with mass(>= v) >= top_p * total (mass:
// exp(x - max), summed in double). A histogram of the row over 4096 bins of the values' order-preserving bit keys
// (the sign, exponent and 3 mantissa bits) finds the bin holding the cut; only that bin's values are sorted. Top-p
// first drops the values whose mass is below (1 - top_p) / n of the total (together they hold less than the 1 - top_p
// that top-p removes, so top-p removes each of them), which leaves a few candidates in a peaked distribution. ~4
// passes over the row; no sort of it.
#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/vec/vec.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

// Lane indices are held in the vector's element type: float counts exactly to 2^24, so longer rows go in segments.
template <typename A>
constexpr int64_t kSegment = std::is_same_v<A, float> ? int64_t(1) << 24 : int64_t(1) << 52;

template <typename T>
int64_t row_argmax(const T* x, int64_t n) {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  constexpr int W = V::W;
  alignas(64) A lane[W], lane_at[W];
  for (int l = 0; l < W; ++l) lane[l] = A(l);
  const V iota = V::load(lane), step = V::set1(A(W)), neg_inf = V::set1(-std::numeric_limits<A>::infinity());
  A best = -std::numeric_limits<A>::infinity();
  int64_t at = 0;  // the row's first maximum so far (0 while every element is -inf)
  V nan = V::zero();
  bool tail_nan = false;
  for (int64_t s0 = 0; s0 < n; s0 += kSegment<A>) {
    const T* xs = x + s0;
    const int64_t len = std::min(kSegment<A>, n - s0), full = len / W * W;
    V vbest = neg_inf, vat = V::zero(), idx = iota;
    for (int64_t i = 0; i < full; i += W, idx = idx + step) {
      const V v = V::load(xs + i);
      vat = V::select_gt(v, vbest, idx, vat);
      vbest = max(v, vbest);
      nan = nan + min(V::zero(), max(V::zero(), v));  // 0, or NaN for a NaN: min / max return the second operand
    }
    vbest.store(lane), vat.store(lane_at);
    for (int l = 0; l < W; ++l) {
      const int64_t j = s0 + int64_t(lane_at[l]);
      if (lane[l] > best || (lane[l] == best && j < at)) best = lane[l], at = j;
    }
    for (int64_t i = full; i < len; ++i) {  // later indices than the lanes': a strict > keeps the first maximum
      const A v = ScalarVec<A>::load(xs + i).v;
      tail_nan |= std::isnan(v);
      if (v > best) best = v, at = s0 + i;
    }
  }
  nan.store(lane);
  if (tail_nan || std::any_of(lane, lane + W, [](A v) { return std::isnan(v); }))
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(ScalarVec<A>::load(x + i).v)) return i;
  return at;
}

template <typename T>
void run(const ArgmaxParams& p) {
  parallel_for(0, p.rows, grain_for(p.cols * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) p.out[r] = row_argmax(static_cast<const T*>(p.x) + r * p.stride, p.cols);
  });
}

constexpr int kBinBits = 12;  // bins of the values' keys: the sign, the exponent and 3 mantissa bits

// Larger floats have larger keys (-0 just below +0).
inline uint32_t bin_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u ? ~u : u | 0x80000000u) >> (32 - kBinBits);
}

// The largest of values v[0, n) whose weight at or above it reaches need: weight(> t) < need <= weight(>= t), with
// weights w (nullptr: 1 each); -inf when all of them together fall short (rounding).
float cut(const float* v, const float* w, int64_t n, double need, std::vector<std::pair<float, float>>& bin) {
  std::vector<double> hist(size_t(1) << kBinBits, 0.0);
  for (int64_t i = 0; i < n; ++i) hist[bin_of(v[i])] += w ? w[i] : 1.0;
  int b = int(hist.size()) - 1;
  double above = 0;  // weight of the bins above b
  for (; b >= 0 && above + hist[b] < need; --b) above += hist[b];
  if (b < 0) return -std::numeric_limits<float>::infinity();
  bin.clear();
  for (int64_t i = 0; i < n; ++i)
    if (bin_of(v[i]) == uint32_t(b)) bin.emplace_back(v[i], w ? w[i] : 1.f);
  std::sort(bin.begin(), bin.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
  for (size_t i = 0; i < bin.size();) {  // equal values (ties) together
    double tie = 0;
    size_t j = i;
    for (; j < bin.size() && bin[j].first == bin[i].first; ++j) tie += bin[j].second;
    if (above + tie >= need) return bin[i].first;
    above += tie, i = j;
  }
  // rounding between the histogram's and these sums: keep the whole bin
  return bin.empty() ? -std::numeric_limits<float>::infinity() : bin.back().first;
}

struct Scratch {
  std::vector<float> e, cv, cw;
  std::vector<std::pair<float, float>> bin;
};

// x[i] = -inf where x[i] < t.
void drop_below(float* x, int64_t n, float t) {
  using V = VecF;
  const float ninf = -std::numeric_limits<float>::infinity();
  for_each_chunk<V>(n, [&](auto v, int64_t i) {
    using Vv = decltype(v);
    const Vv xv = Vv::load(x + i);
    Vv::select_gt(Vv::set1(t), xv, Vv::set1(ninf), xv).store(x + i);
  });
}

void row_top_k_top_p(float* x, int64_t n, int64_t k, float top_p, Scratch& s) {
  using V = VecF;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  V mv = V::set1(kNegInf), nan = V::zero();
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) {
    const V v = V::load(x + i);
    mv = max(mv, v);
    nan = nan + min(V::zero(), max(V::zero(), v));  // NaN only from a NaN (see row_argmax)
  }
  float m = reduce_max(mv, kNegInf), nan_sum = nan.reduce_add();
  for (; i < n; ++i) m = std::max(m, x[i]), nan_sum += x[i] != x[i] ? x[i] : 0.f;
  if (std::isnan(nan_sum)) return;
  if (k > 0 && k < n) drop_below(x, n, cut(x, nullptr, n, double(k), s.bin));
  if (!(top_p < 1.f) || !std::isfinite(m)) return;  // an infinite max: softmax is NaN, top-p removes nothing
  s.e.resize(size_t(n));
  VecSum<V> sum;
  for_each_chunk<V>(n, [&](auto v, int64_t j) {
    using Vv = decltype(v);
    const Vv e = exp(Vv::load(x + j) - Vv::set1(m));
    e.store(s.e.data() + j);
    sum.add(e);
  });
  const float floor = float((1.0 - top_p) * sum.total() / double(n));
  s.cv.resize(size_t(n)), s.cw.resize(size_t(n));
  const float lo = std::max(floor, std::numeric_limits<float>::min());
  int64_t nc = 0;
  double total[2] = {0, 0};  // in double, as the histogram sums the candidates: the cut at 0.999 is 1e-7 away
  for (int64_t j = 0; j < n; ++j) {  // branch-free: whether a token qualifies is a coin flip to the predictor
    s.cv[nc] = x[j], s.cw[nc] = s.e[j];
    nc += s.e[j] >= lo;
    total[j & 1] += s.e[j];
  }
  drop_below(x, n, cut(s.cv.data(), s.cw.data(), nc, double(top_p) * (total[0] + total[1]), s.bin));
}

}  // namespace

void argmax_kernel(const ArgmaxParams& p) {
  visit_dtype(p.dtype, [&](auto t) { run<decltype(t)>(p); });
}

void top_k_top_p_kernel(const TopKTopPParams& p) {
  parallel_for(0, p.rows, grain_for(4 * p.cols * int64_t(sizeof(float))), [&](int64_t r0, int64_t r1) {
    Scratch s;
    for (int64_t r = r0; r < r1; ++r) row_top_k_top_p(p.x + r * p.stride, p.cols, p.top_k[r], p.top_p[r], s);
  });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
