// Copy, read and FMA loops behind bench_copy_ / bench_read / bench_fma_, compiled once per CPU ISA (see
// cpu/vec/vec.h).
#include "kernels/membench.h"

#include "cpu/vec/vec.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

using V = VecF;
using S = ScalarVec<float>;
// Elements per parallel task: 256 KiB of floats, large enough that task overhead is noise.
constexpr int64_t kGrain = 64 * 1024;
// Independent accumulators in the read loop, so the add latency does not bound the load rate.
constexpr int kAcc = 4;
// Upper bound on the tasks of one read (partial sums live on the stack: no heap, no std:: templates
// instantiated in an ISA-specific TU).
constexpr int64_t kMaxTasks = 1024;
// Independent FMA chains a task keeps in registers: at least the FMA latency times the FMAs issued per cycle (4 x 2
// on Zen 4 and Skylake-X), and with the two constants within AVX2's 16 registers.
constexpr int kFmaChains = 12;

double read_range(const float* p, int64_t n) {
  V acc[kAcc];
  for (auto& a : acc) a = V::zero();
  int64_t i = 0;
  for (; i + kAcc * V::W <= n; i += kAcc * V::W)
    for (int k = 0; k < kAcc; ++k) acc[k] = acc[k] + V::load(p + i + k * V::W);
  VecSum<V> rest;
  for (int k = 0; k < kAcc; ++k) rest.add(acc[k]);
  for_each_chunk<V>(n - i, [&](auto v, int64_t j) { rest.add(decltype(v)::load(p + i + j)); });
  return rest.total();
}

}  // namespace

void mem_copy_kernel(const MemCopyParams& p) {
  parallel_for(0, p.n, kGrain, [&](int64_t b, int64_t e) {
    for_each_chunk<V>(e - b, [&](auto v, int64_t i) { decltype(v)::load(p.src + b + i).store(p.dst + b + i); });
  });
}

void mem_read_kernel(const MemReadParams& p) {
  // One task per block of elements; each block's sum goes to its own slot, added in a fixed order.
  int64_t tasks = (p.n + kGrain - 1) / kGrain;
  if (tasks > kMaxTasks) tasks = kMaxTasks;
  double partial[kMaxTasks] = {};
  parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t * p.n / tasks, e = (t + 1) * p.n / tasks;
      partial[t] = read_range(p.src + b, e - b);
    }
  });
  double sum = 0;
  for (int64_t t = 0; t < tasks; ++t) sum += partial[t];
  *p.sum = sum;
}

void fma_peak_kernel(const FmaPeakParams& p) {
  parallel_for(0, p.tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const V half = V::set1(0.5f), one = V::set1(1.0f);
      V x[kFmaChains];
      for (int c = 0; c < kFmaChains; ++c) x[c] = V::set1(float(c));
      for (int64_t i = 0; i < p.iters; ++i)
#pragma GCC unroll 12
        for (int c = 0; c < kFmaChains; ++c) x[c] = fmadd(x[c], half, one);
      VecSum<V> sum;
      for (const V& v : x) sum.add(v);
      p.out[t] = sum.total();
    }
  });
  *p.flops = 2 * p.tasks * p.iters * kFmaChains * V::W;
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
