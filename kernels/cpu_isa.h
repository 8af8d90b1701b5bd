// Run-time choice of the CPU kernels' vector paths (shared by the retrieval kernel and the gate's CPU twin).
// The libraries are built for baseline x86-64; the AVX2+FMA and AVX-512 code is compiled per function
// (target attribute) and taken only when the CPU has the features. Each kernel's environment variable
// (DPR_TOPK_ISA, DPR_GATE_ISA) caps the level: "generic" forces the portable code, "avx2" the AVX2+FMA
// path (the tests run every path on an AVX-512 machine), "avx512" or unset/empty the best the CPU has.
// A cap above what the CPU has is ignored (never an illegal instruction).
#pragma once
#include <cstdlib>
#include <cstring>

namespace dpr_isa {

enum Level : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// Name reported by the kernels' isa() helpers.
inline const char* level_name(Level l) {
  switch (l) {
    case kAvx512: return "avx512f";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

// The best level this CPU (and OS) supports: AVX-512F (+ AVX-512DQ when need_dq), else AVX2 + FMA, else
// generic. Capped by getenv(force_env) ("generic", "avx2", "avx512").
inline Level level(const char* force_env, bool need_dq) {
#if defined(__x86_64__) || defined(_M_X64)
  Level cap = kAvx512;
  const char* force = std::getenv(force_env);
  if (force != nullptr) {
    if (std::strcmp(force, "generic") == 0) cap = kGeneric;
    else if (std::strcmp(force, "avx2") == 0) cap = kAvx2;
  }
  __builtin_cpu_init();
  Level have = kGeneric;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) have = kAvx2;
  if (have == kAvx2 && __builtin_cpu_supports("avx512f") && (!need_dq || __builtin_cpu_supports("avx512dq")))
    have = kAvx512;
  return have < cap ? have : cap;
#else
  (void)force_env;
  (void)need_dq;
  return kGeneric;
#endif
}

// AVX-512 VNNI (with AVX-512F and BW) on this CPU: the retrieval kernel's int8 screen (vpdpbusd). Not capped
// by any environment variable here; the kernel applies its own cap.
inline bool has_avx512_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

}  // namespace dpr_isa
