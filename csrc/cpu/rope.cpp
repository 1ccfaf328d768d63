// RoPE family on the CPU: the shared tensor-level ops (ops/rope.h) over the ISA-dispatched core.
#include "ops/rope.h"

namespace llmkern {
namespace {

struct CpuRope {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static void rope(const RopeParams& p) { rope_kernel(p); }

  // One scan before any write: a bad position raises here instead of reading outside the cache, and an
  // in-place query is left untouched. positions: contiguous int64.
  static void check_positions(const Tensor& positions, int64_t max_position) {
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t n = positions.numel();
    int64_t first_bad = 0;
    while (first_bad < n && pos[first_bad] >= 0 && pos[first_bad] < max_position) ++first_bad;
    TORCH_CHECK_INDEX(first_bad == n, "positions: value ", first_bad < n ? pos[first_bad] : 0, " at (flat) index ", first_bad,
                      " is outside [0, max_position=", max_position, "), max_position being cos_sin_cache.size(0)");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { register_rope_ops<CpuRope>(m); }

}  // namespace llmkern
