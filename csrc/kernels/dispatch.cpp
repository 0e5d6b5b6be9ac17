// Run-time choice of the kernel variant. Every SIMD variant lives in its own
// translation unit compiled with its own ISA flags; nothing from those files is
// called unless CPUID says the CPU has the features.
#include <cstdlib>
#if defined(PLM_ARM) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(PLM_ARM) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#include "kernels/kernels.h"

namespace plm::kernels {

// Defined by the variant files; nullptr if the variant is not (yet) implemented.
#if defined(PLM_X86)
const KernelTable* avx2_kernel_table();
const KernelTable* avxvnni_kernel_table();       // kernels_avx2.cpp built with AVX-VNNI
const KernelTable* avxvnni_evex_kernel_table();  // the same with EVEX vpdpbusd (dot_avx2.h)
const KernelTable* avx512_kernel_table();
#endif
#if defined(PLM_ARM)
const KernelTable* neon_kernel_table();     // kernels_neon.cpp at PLM_NEON_LEVEL 0
const KernelTable* dotprod_kernel_table();  // the same at level 1 (+dotprod)
const KernelTable* i8mm_kernel_table();     // the same at level 2 (+i8mm)
#endif

namespace {

#if defined(PLM_X86)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool cpu_has_avxvnni() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
}
bool cpu_has_avx512vl_vnni() {  // what the EVEX build of the AVX2 files needs
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
}
#endif

#if defined(PLM_ARM)
#if defined(__linux__)
// The kernel's HWCAP bits (asm/hwcap.h), spelled out for older headers.
constexpr unsigned long kHwcapAsimdDp = 1UL << 20;  // SDOT/UDOT (ARMv8.2 dotprod)
constexpr unsigned long kHwcap2I8mm = 1UL << 13;    // SMMLA (ARMv8.6 i8mm)
bool cpu_has_dotprod() { return getauxval(AT_HWCAP) & kHwcapAsimdDp; }
bool cpu_has_i8mm() { return cpu_has_dotprod() && (getauxval(AT_HWCAP2) & kHwcap2I8mm); }
#elif defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int v = 0;
  size_t size = sizeof v;
  return sysctlbyname(name, &v, &size, nullptr, 0) == 0 && v != 0;
}
bool cpu_has_dotprod() { return sysctl_flag("hw.optional.arm.FEAT_DotProd"); }
bool cpu_has_i8mm() { return cpu_has_dotprod() && sysctl_flag("hw.optional.arm.FEAT_I8MM"); }
#else  // no way to ask here: the baseline only
bool cpu_has_dotprod() { return false; }
bool cpu_has_i8mm() { return false; }
#endif
#endif

// Usable variants on this CPU, best last.
std::vector<const KernelTable*> usable_tables() {
  std::vector<const KernelTable*> v{&ref_kernels()};
#if defined(PLM_X86)
  if (cpu_has_avx2() && avx2_kernel_table()) v.push_back(avx2_kernel_table());
  // Never the best where AVX-512 is (below): there it is a test of the AVX-VNNI code.
  if (cpu_has_avx512vl_vnni()) v.push_back(avxvnni_evex_kernel_table());
  if (cpu_has_avxvnni()) v.push_back(avxvnni_kernel_table());
  if (cpu_has_avx512() && avx512_kernel_table()) v.push_back(avx512_kernel_table());
#endif
#if defined(PLM_ARM)
  if (neon_kernel_table()) v.push_back(neon_kernel_table());
  if (cpu_has_dotprod() && dotprod_kernel_table()) v.push_back(dotprod_kernel_table());
  if (cpu_has_i8mm() && i8mm_kernel_table()) v.push_back(i8mm_kernel_table());
#endif
  return v;
}

const std::vector<const KernelTable*>& tables() {
  static const std::vector<const KernelTable*> v = usable_tables();
  return v;
}

}  // namespace

const KernelTable* kernels_by_name(const std::string& name) {
  for (const KernelTable* t : tables())
    if (name == t->name) return t;
  return nullptr;
}

std::vector<std::string> available_kernels() {
  std::vector<std::string> names;
  for (const KernelTable* t : tables()) names.emplace_back(t->name);
  return names;
}

const KernelTable& best_kernels() {
  static const KernelTable* chosen = [] {
    // PLM_KERNELS=ref|avx2|avxvnni|avxvnni-evex|avx512|neon|dotprod|i8mm forces a variant; an unusable one is ignored.
    if (const char* env = std::getenv("PLM_KERNELS"))
      if (const KernelTable* t = kernels_by_name(env)) return t;
    return tables().back();
  }();
  return *chosen;
}

}  // namespace plm::kernels
