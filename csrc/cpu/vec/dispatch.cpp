#include "cpu/vec/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <iterator>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llmkern {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
// AMX-TILE and AMX-BF16 (CPUID.(7, 0):EDX bits 24 and 22), usable once Linux grants this process the tile data
// state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; without it the first tile instruction faults).
bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  return false;
#endif
}
#endif

bool cpu_supports(CpuIsa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
    case CpuIsa::scalar: return true;
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::avx512bf16:
      return cpu_supports(CpuIsa::avx512) && __builtin_cpu_supports("avx512bf16") &&
             __builtin_cpu_supports("avx512vnni");
    case CpuIsa::amx: return cpu_supports(CpuIsa::avx512bf16) && amx_usable();
  }
  return false;
#else
  return isa == CpuIsa::scalar;
#endif
}

// Every path, narrowest first.
constexpr CpuIsa kIsas[] = {CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::avx512bf16, CpuIsa::amx};

CpuIsa parse_isa(const std::string& name) {
  std::string names;
  for (CpuIsa isa : kIsas) {
    if (name == cpu_isa_name(isa)) return isa;
    names += names.empty() ? cpu_isa_name(isa) : std::string(", ") + cpu_isa_name(isa);
  }
  throw std::invalid_argument("LLMKERN_CPU_ISA / set_cpu_isa: expected one of " + names + ", got '" + name + "'");
}

CpuIsa widest_supported() {
  for (int i = int(std::size(kIsas)) - 1; i > 0; --i)
    if (cpu_supports(kIsas[i])) return kIsas[i];
  return CpuIsa::scalar;
}

CpuIsa checked(CpuIsa isa) {
  if (!cpu_supports(isa))
    throw std::invalid_argument(std::string("cpu isa '") + cpu_isa_name(isa) +
                                "' is not supported by this CPU; supported: widest is '" +
                                cpu_isa_name(widest_supported()) + "'");
  return isa;
}

CpuIsa initial_isa() {
  const char* env = std::getenv("LLMKERN_CPU_ISA");
  return (env && *env) ? checked(parse_isa(env)) : widest_supported();
}

std::atomic<int>& active() {
  static std::atomic<int> isa{int(initial_isa())};
  return isa;
}

}  // namespace

CpuIsa active_cpu_isa() { return CpuIsa(active().load(std::memory_order_relaxed)); }

void set_cpu_isa(const std::string& name) { active().store(int(checked(parse_isa(name)))); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::amx: return "amx";
    case CpuIsa::avx512bf16: return "avx512bf16";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "scalar";
  }
}

bool avx512_double_pumped() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool zen4 = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u || d != 0x69746e65u || c != 0x444d4163u) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;  // "AuthenticAMD" above; family below
    const unsigned base = (a >> 8) & 0xf, family = base == 0xf ? base + ((a >> 20) & 0xff) : base;
    return family == 0x19;
  }();
  return zen4;
#else
  return false;
#endif
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (CpuIsa isa : kIsas)
    if (cpu_supports(isa)) names.push_back(cpu_isa_name(isa));
  return names;
}

}  // namespace llmkern
