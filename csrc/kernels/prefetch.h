// Software prefetch the compiler cannot drop. GCC 12 deleted __builtin_prefetch loops whose only effect was the
// prefetch (its dead-code elimination takes the builtin for side-effect free: a helper that prefetched a GEMV
// block's scales compiled to nothing); an asm volatile statement is always emitted. Prefetches never fault, so
// p may point past an allocation.
#pragma once
#include <cstdint>

namespace llmkern {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Into L1 and L2 (prefetcht0).
static inline void prefetch_l1(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }
// Into L2 only (prefetcht1): for lines needed later than the L1 can hold them.
static inline void prefetch_l2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }
#else
static inline void prefetch_l1(const void* p) { __builtin_prefetch(p, 0, 3); }
static inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
#endif

// Every cache line of the `bytes` bytes from p (one prefetch per 64 bytes).
static inline void prefetch_l1_span(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) prefetch_l1(static_cast<const char*>(p) + o);
}
static inline void prefetch_l2_span(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) prefetch_l2(static_cast<const char*>(p) + o);
}

// The line of element i of a row of T at p (`bytes` long) into L1, when i starts a line inside the row. Called for
// each vector (or element) i of a pass over another row of T, it brings p's row in alongside, a line per 64 bytes
// the pass advances.
template <typename T>
static inline void prefetch_l1_along(const T* p, int64_t bytes, int64_t i) {
  const int64_t off = i * int64_t(sizeof(T));
  if (off % 64 == 0 && off < bytes) prefetch_l1(reinterpret_cast<const char*>(p) + off);
}

}  // namespace llmkern
