// Threading for kernel cores without ATen headers: at::parallel_for or llmkern's own pool (csrc/cpu/parallel.cpp),
// both sized by torch.set_num_threads.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

namespace llmkern {

// Calls fn(begin, end) on disjoint sub-ranges of [begin, end), each at least `grain` long but the last.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
int max_threads();
std::string parallel_backend();  // "openmp" or "pool"
// pool_threads: the pool's size (0: torch's thread count). std::invalid_argument for another name, or pool_threads
// outside 0..4096.
void set_parallel_backend(const std::string& name, int64_t pool_threads = 0);

// Rows per task such that one task moves roughly `bytes_per_task` bytes (amortises task overhead).
inline int64_t grain_for(int64_t bytes_per_row, int64_t bytes_per_task = 64 * 1024) {
  int64_t g = bytes_per_task / (bytes_per_row > 0 ? bytes_per_row : 1);
  return g > 0 ? g : 1;
}

// Work sharing for uneven progress: up to `threads` workers each call worker(claim), where claim(i0, i1) takes
// the next run of at most `step` items of [0, n) from a shared counter and returns false when none are left.
// Unlike an even split up front, a thread descheduled on a shared machine does not leave the others idle at
// the end.
template <typename Worker>
static inline void parallel_claim(int64_t n, int64_t step, int64_t threads, Worker&& worker) {
  std::atomic<int64_t> next{0};
  auto claim = [&](int64_t& i0, int64_t& i1) {
    i0 = next.fetch_add(step, std::memory_order_relaxed);
    i1 = std::min(n, i0 + step);
    return i0 < n;
  };
  parallel_for(0, std::min(threads, n), 1, [&](int64_t, int64_t) { worker(claim); });
}

}  // namespace llmkern
