// Run-time choice of the CPU ISA path. Every kernel family is compiled for each ISA into its own
// namespace; LLMKERN_DECLARE_CPU_KERNEL declares those and an inline entry that calls the active one.
#pragma once
#include <string>
#include <vector>

namespace llmkern {

// avx512bf16 = avx512 plus AVX512_BF16 and AVX512_VNNI (bf16 pair and int16 dot products: Cooper Lake, Sapphire
// Rapids, Zen 4 and later); amx = avx512bf16 plus AMX-TILE and AMX-BF16 (bf16 tile products: Sapphire Rapids and
// later), where the OS grants the tile state.
enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3, amx = 4 };

// The path in use: the widest the CPU supports, or LLMKERN_CPU_ISA, or the last set_cpu_isa.
CpuIsa active_cpu_isa();
// Forces a path by name; throws std::invalid_argument for an unknown name or one this CPU lacks.
void set_cpu_isa(const std::string& name);
const char* cpu_isa_name(CpuIsa isa);
// Names of the paths this CPU can run, narrowest first.
std::vector<std::string> supported_cpu_isas();
// Whether the CPU runs each 512-bit vector operation as two 256-bit halves (AMD family 0x19: Zen 4, the only one of
// that family with AVX-512), at half the 512-bit product rate of later cores: crossovers between a kernel's
// compute-bound and memory-bound forms move with it.
bool avx512_double_pumped();

}  // namespace llmkern

#if defined(__x86_64__) || defined(_M_X64)
#define LLMKERN_DECLARE_CPU_KERNEL(name, Params)                    \
  namespace scalar { void name(const Params& p); }                  \
  namespace avx2 { void name(const Params& p); }                    \
  namespace avx512 { void name(const Params& p); }                  \
  namespace avx512bf16 { void name(const Params& p); }              \
  namespace amx { void name(const Params& p); }                     \
  static inline void name(const Params& p) {                        \
    switch (::llmkern::active_cpu_isa()) {                          \
      case ::llmkern::CpuIsa::amx: return amx::name(p);             \
      case ::llmkern::CpuIsa::avx512bf16: return avx512bf16::name(p); \
      case ::llmkern::CpuIsa::avx512: return avx512::name(p);       \
      case ::llmkern::CpuIsa::avx2: return avx2::name(p);           \
      default: return scalar::name(p);                              \
    }                                                               \
  }
#else
#define LLMKERN_DECLARE_CPU_KERNEL(name, Params)                    \
  namespace scalar { void name(const Params& p); }                  \
  static inline void name(const Params& p) { return scalar::name(p); }
#endif
