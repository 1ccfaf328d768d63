// Threading for kernel cores without ATen headers: forwards to at::parallel_for (csrc/cpu/parallel.cpp),
// so torch.set_num_threads governs llmkern too.
#pragma once
#include <cstdint>
#include <functional>

namespace llmkern {

// Calls fn(begin, end) on disjoint sub-ranges of [begin, end), each at least `grain` long but the last.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
int max_threads();

// Rows per task such that one task moves roughly `bytes_per_task` bytes (amortises task overhead).
inline int64_t grain_for(int64_t bytes_per_row, int64_t bytes_per_task = 64 * 1024) {
  int64_t g = bytes_per_task / (bytes_per_row > 0 ? bytes_per_row : 1);
  return g > 0 ? g : 1;
}

}  // namespace llmkern
