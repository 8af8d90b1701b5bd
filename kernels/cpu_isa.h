// Run-time choice of the CPU kernels' AVX-512 paths (shared by the retrieval kernel and the gate's CPU twin).
// The libraries are built for baseline x86-64; AVX-512 code is compiled per function (target attribute) and
// taken only when the CPU has the features and the kernel's environment variable does not say "generic"
// (the tests force the portable path that way).
#pragma once
#include <cstdlib>
#include <cstring>

namespace dpr_isa {

// True when the CPU has AVX-512F (and AVX-512DQ when need_dq) and getenv(force_env) is not "generic".
inline bool avx512_enabled(const char* force_env, bool need_dq) {
#if defined(__x86_64__) || defined(_M_X64)
  const char* force = std::getenv(force_env);
  if (force != nullptr && std::strcmp(force, "generic") == 0) return false;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) return false;
  return !need_dq || __builtin_cpu_supports("avx512dq");
#else
  (void)force_env;
  (void)need_dq;
  return false;
#endif
}

}  // namespace dpr_isa
