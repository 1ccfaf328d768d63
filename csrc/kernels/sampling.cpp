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
// exp(x - max), summed in double). Two radix levels over the values' order-preserving bit keys (histograms of 2048
// bins: the top 11 bits, then the next 11 of the bin holding the cut) find the few values sharing the cut's top 22
// bits; only those are sorted. Top-p first drops the values whose mass is below (1 - top_p) / n of the total
// (together they hold less than the 1 - top_p that top-p removes, so top-p removes each of them), which leaves a few
// candidates in a peaked distribution. ~4 passes over the row; no sort of it. 16 x 8192 float32 logits, top_p 0.95:
// 0.27-0.46 ms against 2.4-3.7 ms for torch's top-1024 candidates and 6-8 ms for a full sort (bench_sampling).
//
// Sampling (sample_kernel): the filter, min-p and an inverse CDF draw in one pass more; penalties (penalties_kernel):
// a per-token counter array instead of PyTorch's index lists.
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

constexpr int kBinBits = 11;  // bins a level: 2048 (the first: the sign, the exponent and 2 mantissa bits)
constexpr int kBins = 1 << kBinBits;

// Larger floats have larger keys (-0 just below +0).
inline uint32_t key_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x80000000u ? ~u : u | 0x80000000u;
}
inline float value_of(uint32_t key) {
  const uint32_t u = key & 0x80000000u ? key & 0x7fffffffu : ~key;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

using Item = std::pair<uint32_t, float>;  // (key, weight)

struct Scratch {
  std::vector<float> e, cv, cw;
  std::vector<double> blocks;  // the draw's block sums
  std::vector<double> hist;  // 2 x kBins: even and odd items apart, so adds to one bin do not wait for each other
  std::vector<Item> items, last;
};

// One radix level: histograms the weights of items get(i) (i < n) by key bits [shift, shift + kBinBits) and walks the
// bins down from the top, adding each bin's weight to `above` while the total stays below need. Returns the bin that
// reaches need (its weight not added), or -1 when all of them together fall short (rounding).
template <typename Get>
int level(int64_t n, Get get, int shift, double need, double& above, std::vector<double>& hist) {
  hist.assign(2 * kBins, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const Item it = get(i);
    hist[(i & 1) * kBins + ((it.first >> shift) & (kBins - 1))] += it.second;
  }
  for (int b = kBins - 1; b >= 0; --b) {
    const double h = hist[b] + hist[kBins + b];
    if (above + h >= need) return b;
    above += h;
  }
  return -1;
}

// The largest of values v[0, n) whose weight at or above it reaches need: weight(> t) < need <= weight(>= t), with
// weights w (nullptr: 1 each); -inf when all of them together fall short (rounding). Two radix levels of 11 key bits
// narrow the values to those sharing the cut's top 22 bits, which are sorted.
template <bool kWeighted>
float cut(const float* v, const float* w, int64_t n, double need, Scratch& s) {
  constexpr int kShift1 = 32 - kBinBits, kShift2 = 32 - 2 * kBinBits;
  const auto weight = [w](int64_t i) { return kWeighted ? w[i] : 1.f; };
  double above = 0;  // weight of the values above the current bin
  const int b1 = level(n, [&](int64_t i) { return Item(key_of(v[i]), weight(i)); }, kShift1, need, above, s.hist);
  if (b1 < 0) return -std::numeric_limits<float>::infinity();
  s.items.resize(size_t(n));
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free, as the candidates in the top-p pass
    const uint32_t key = key_of(v[i]);
    s.items[m] = Item(key, weight(i));
    m += int(key >> kShift1) == b1;
  }
  s.items.resize(size_t(m));
  const int b2 = level(int64_t(s.items.size()), [&](int64_t i) { return s.items[i]; }, kShift2, need, above, s.hist);
  if (b2 < 0)  // rounding between the two levels' sums: keep the whole first-level bin
    return value_of(std::min_element(s.items.begin(), s.items.end())->first);
  s.last.clear();
  for (const Item& it : s.items)
    if (int((it.first >> kShift2) & (kBins - 1)) == b2) s.last.push_back(it);
  std::sort(s.last.begin(), s.last.end(), [](const Item& a, const Item& c) { return a.first > c.first; });
  for (size_t i = 0; i < s.last.size();) {  // equal values (ties) together
    double tie = 0;
    size_t j = i;
    for (; j < s.last.size() && s.last[j].first == s.last[i].first; ++j) tie += s.last[j].second;
    if (above + tie >= need) return value_of(s.last[i].first);
    above += tie, i = j;
  }
  return value_of(s.last.back().first);  // rounding again: keep the whole bin
}

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

// Filters row x in place; returns its max (which the filter keeps), or NaN for a row holding NaN (left as it is).
float row_top_k_top_p(float* x, int64_t n, int64_t k, float top_p, Scratch& s) {
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
  if (std::isnan(nan_sum)) return nan_sum;
  if (k > 0 && k < n) drop_below(x, n, cut<false>(x, nullptr, n, double(k), s));
  if (!(top_p < 1.f) || !std::isfinite(m)) return m;  // an infinite max: softmax is NaN, top-p removes nothing
  s.e.resize(size_t(n));
  VecSum<V> sum;
  for_each_chunk<V>(n, [&](auto v, int64_t j) {
    using Vv = decltype(v);
    const Vv e = exp_sub(Vv::load(x + j), Vv::set1(m));
    e.store(s.e.data() + j);
    sum.add(e);
  });
  const float floor = float((1.0 - top_p) * sum.total() / double(n));
  s.cv.resize(size_t(n)), s.cw.resize(size_t(n));
  const float lo = std::max(floor, std::numeric_limits<float>::min());
  int64_t nc = 0;
  // The total in double, as the histograms sum the candidates (the cut at top_p 0.999 is ~1e-7 of it away); two sums
  // in registers, so the adds do not wait for each other.
  double t0 = 0, t1 = 0;
  const auto take = [&](int64_t j) {  // branch-free: whether a token qualifies is a coin flip to the predictor
    s.cv[nc] = x[j], s.cw[nc] = s.e[j];
    nc += s.e[j] >= lo;
  };
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) take(j), take(j + 1), t0 += s.e[j], t1 += s.e[j + 1];
  if (j < n) take(j), t0 += s.e[j];
  drop_below(x, n, cut<true>(s.cv.data(), s.cw.data(), nc, double(top_p) * (t0 + t1), s));
  return m;
}

constexpr int64_t kDrawBlock = 16;  // tokens a block of the draw's CDF walk

// The token sample_kernel draws from row x (see kernels/sampling.h).
int64_t row_sample(float* x, int64_t n, float t, int64_t k, float top_p, float min_p, float u, Scratch& s) {
  using V = VecF;
  if (t == 0.f) return row_argmax(x, n);
  for_each_chunk<V>(n, [&](auto v, int64_t i) {
    using Vv = decltype(v);
    (Vv::load(x + i) / Vv::set1(t)).store(x + i);  // divided, as transformers' TemperatureLogitsWarper does
  });
  const float m = row_top_k_top_p(x, n, k, top_p, s);  // NaN for a NaN row: then the total below is NaN too
  // exp(x - max): the probabilities up to their sum; min-p drops those below min_p of the largest (exp(0) = 1).
  s.e.resize(size_t(n));
  for_each_chunk<V>(n, [&](auto v, int64_t j) {
    using Vv = decltype(v);
    const Vv e = exp_sub(Vv::load(x + j), Vv::set1(m));
    Vv::select_gt(Vv::set1(min_p), e, Vv::zero(), e).store(s.e.data() + j);
  });
  // The total in double, through the sums of blocks of kDrawBlock tokens (four chains of adds in each, so they do
  // not wait for each other). The draw walks those sums and scans only the block where the CDF crosses u * total:
  // no branch per token (after top-p or min-p, whether a token kept any probability is a coin flip to the predictor).
  const int64_t nb = (n + kDrawBlock - 1) / kDrawBlock;
  s.blocks.resize(size_t(nb));
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j0 = b * kDrawBlock, j1 = std::min(n, j0 + kDrawBlock);
    double part[4] = {0, 0, 0, 0};
    for (int64_t j = j0; j < j1; ++j) part[j & 3] += s.e[j];
    total += s.blocks[size_t(b)] = (part[0] + part[1]) + (part[2] + part[3]);
  }
  if (!(total > 0) || !std::isfinite(total)) return row_argmax(x, n);  // NaN (its first one), or an infinite max
  const double target = double(u) * total;
  double cum = 0;
  int64_t b = 0;
  for (; b < nb && cum + s.blocks[size_t(b)] <= target; ++b) cum += s.blocks[size_t(b)];
  for (int64_t j = b * kDrawBlock; j < n; ++j)  // a token with probability 0 never takes the CDF past target
    if ((cum += s.e[j]) > target) return j;
  int64_t last = n - 1;  // u * total rounded up to the total: the last token with probability > 0
  while (s.e[size_t(last)] == 0.f) --last;
  return last;
}

// compute_logprobs of one row (kernels/sampling.h): two vector passes for the log-sum-exp, one for the rank, and a
// selection of the num_top largest in which only vectors holding a value above the current num_top-th are looked at
// lane by lane.
template <typename T>
void row_logprobs(const T* x, int64_t n, int64_t token, int64_t num_top, float* token_lp, int64_t* rank, float* top,
                  int64_t* top_ids) {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  constexpr int W = V::W;
  const auto at = [&](int64_t i) { return float(ScalarVec<A>::load(x + i).v); };
  V mv = V::set1(-std::numeric_limits<A>::infinity());
  int64_t i = 0;
  for (; i + W <= n; i += W) mv = max(mv, V::load(x + i));
  float m = float(reduce_max(mv, -std::numeric_limits<A>::infinity()));
  for (; i < n; ++i) m = std::max(m, at(i));
  VecSum<V> sum;
  for_each_chunk<V>(n, [&](auto v, int64_t j) {
    using Vv = decltype(v);
    sum.add(exp_sub(Vv::load(x + j), Vv::set1(A(m))));
  });
  const float logs = std::log(float(sum.total()));
  const auto lp = [&](float v) { return (v - m) - logs; };  // as log_softmax rounds it
  const float t = lp(at(token));
  VecSum<V> above;  // counts up to 2^24 per lane exactly
  for_each_chunk<V>(n, [&](auto v, int64_t j) {
    using Vv = decltype(v);
    const Vv l = (Vv::load(x + j) - Vv::set1(A(m))) - Vv::set1(A(logs));
    above.add(Vv::select_gt(l, Vv::set1(A(t)), Vv::set1(A(1)), Vv::zero()));
  });
  *token_lp = t, *rank = int64_t(above.total()) + 1;
  if (num_top == 0) return;
  // the num_top largest values so far, descending, and their indices; a later tie never displaces an earlier one
  int64_t filled = 0;
  const auto insert = [&](float v, int64_t j) {
    if (filled == num_top && !(v > top[num_top - 1])) return;
    int64_t k = std::min(filled, num_top - 1);
    for (; k > 0 && v > top[k - 1]; --k) top[k] = top[k - 1], top_ids[k] = top_ids[k - 1];
    top[k] = v, top_ids[k] = j;
    filled = std::min(filled + 1, num_top);
  };
  i = 0;
  alignas(64) A lanes[W];
  for (; i + W <= n; i += W) {
    const V v = V::load(x + i);
    if (filled == num_top && !(reduce_max(v, -std::numeric_limits<A>::infinity()) > top[num_top - 1])) continue;
    v.store(lanes);
    for (int l = 0; l < W; ++l) insert(float(lanes[l]), i + l);
  }
  for (; i < n; ++i) insert(at(i), i);
  for (int64_t k = 0; k < filled; ++k) top[k] = lp(top[k]);
  for (int64_t k = filled; k < num_top; ++k) top[k] = -std::numeric_limits<float>::infinity(), top_ids[k] = 0;
}

template <typename T>
void run_logprobs(const LogprobParams& p) {
  parallel_for(0, p.rows, grain_for(3 * p.cols * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      row_logprobs(static_cast<const T*>(p.x) + r * p.stride, p.cols, p.tokens[r], p.num_top, p.token_logprob + r,
                   p.rank + r, p.top + r * p.num_top, p.top_ids + r * p.num_top);
  });
}

// fn(r, row r of f.x, scratch) for every row, the rows split over threads (~4 passes over each).
template <typename Fn>
void for_filter_rows(const TopKTopPParams& f, Fn&& fn) {
  parallel_for(0, f.rows, grain_for(4 * f.cols * int64_t(sizeof(float))), [&](int64_t r0, int64_t r1) {
    Scratch s;
    for (int64_t r = r0; r < r1; ++r) fn(r, f.x + r * f.stride, s);
  });
}

}  // namespace

void logprobs_kernel(const LogprobParams& p) {
  visit_dtype(p.dtype, [&](auto t) { run_logprobs<decltype(t)>(p); });
}

void argmax_kernel(const ArgmaxParams& p) {
  visit_dtype(p.dtype, [&](auto t) { run<decltype(t)>(p); });
}

void sample_kernel(const SampleParams& p) {
  const TopKTopPParams& f = p.filter;
  for_filter_rows(f, [&](int64_t r, float* x, Scratch& s) {
    p.out[r] = row_sample(x, f.cols, p.temperature[r], f.top_k[r], f.top_p[r], p.min_p[r], p.u[r], s);
  });
}

void penalties_kernel(const PenaltyParams& p) {
  parallel_for(0, p.rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> count(size_t(p.cols), 0);  // per token: seen (repetition), then its output count
    for (int64_t r = r0; r < r1; ++r) {
      float* x = p.x + r * p.stride;
      const int64_t *ids = p.ids + p.offsets[r], *end = p.ids + p.offsets[r + 1], *out = p.ids + p.output_start[r];
      const float rep = p.repetition[r], freq = p.frequency[r], pres = p.presence[r];
      if (rep != 1.f) {
        for (const int64_t* t = ids; t < end; ++t)
          if (!count[*t]) count[*t] = 1, x[*t] = x[*t] < 0.f ? x[*t] * rep : x[*t] / rep;  // as transformers'
        for (const int64_t* t = ids; t < end; ++t) count[*t] = 0;
      }
      if (freq != 0.f || pres != 0.f) {
        for (const int64_t* t = out; t < end; ++t) ++count[*t];
        for (const int64_t* t = out; t < end; ++t)  // each distinct token once; its count then reset
          if (count[*t]) x[*t] = x[*t] - freq * float(count[*t]) - pres, count[*t] = 0;
      }
    }
  });
}

void top_k_top_p_kernel(const TopKTopPParams& p) {
  for_filter_rows(p, [&](int64_t r, float* x, Scratch& s) { row_top_k_top_p(x, p.cols, p.top_k[r], p.top_p[r], s); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
