// CPU twin of the fused MoE gate: the per-row math of fused_moe_gate.h, OpenMP over rows.
// Plain C ABI (ctypes-friendly); also linked into the ONNX Runtime custom-op library.
#include <stdint.h>

#include "fused_moe_gate.h"
#include "fused_moe_gate_api.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Below this many multiply-adds a single thread wins over an OpenMP fork/join (which can also stall
// for a scheduler time slice on a loaded machine).
constexpr int64_t kParallelWork = 1 << 22;  // ~B >= 11000 at d=64, 4+4 experts, top-2

template <int N, typename T>
void run_rows(const T* z, const T* w, const T* b, const T* y, const int64_t* pol, const T* res, T* out,
              int64_t B, int64_t d, int64_t E, int64_t n, int64_t k, int num_threads) {
  const int64_t work = B * d * (n + k);
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (work >= kParallelWork && B > 1 && threads > 1)
#endif
  for (int64_t r = 0; r < B; ++r) {
    dpr_moe_gate_row<N, T>(z + r * d, w, b, y + r * E * d, pol[r], res + r * d, out + r * d, (int)d, (int)E,
                           (int)n, (int)k);
  }
  (void)work;
  (void)num_threads;
}

template <typename T>
int run(const T* z, const T* w, const T* b, const T* y, const int64_t* pol, const T* res, T* out, int64_t B,
        int64_t d, int64_t E, int64_t n, int64_t k, int num_threads) {
  const int st = dpr_check_sizes(B, d, E, n, k);
  if (st != DPR_OK) return st;
  if (B == 0) return DPR_OK;
  if (!z || !w || !b || !y || !pol || !res || !out) return DPR_ERR_NULL_POINTER;
  if (d > INT32_MAX) return DPR_ERR_TOO_LARGE;
  switch (n) {  // common group sizes get a compile-time trip count for the router loop
    case 2: run_rows<2>(z, w, b, y, pol, res, out, B, d, E, n, k, num_threads); break;
    case 4: run_rows<4>(z, w, b, y, pol, res, out, B, d, E, n, k, num_threads); break;
    case 8: run_rows<8>(z, w, b, y, pol, res, out, B, d, E, n, k, num_threads); break;
    case 16: run_rows<16>(z, w, b, y, pol, res, out, B, d, E, n, k, num_threads); break;
    default: run_rows<0>(z, w, b, y, pol, res, out, B, d, E, n, k, num_threads); break;
  }
  return DPR_OK;
}

}  // namespace

extern "C" {

int dpr_kernels_abi_version(void) { return DPR_KERNELS_ABI_VERSION; }

const char* dpr_status_string(int code) { return dpr_status_message(code); }

int dpr_fused_moe_gate_cpu_f32(const float* z, const float* w_router, const float* b_router,
                               const float* expert_out, const int64_t* polarity, const float* residual,
                               float* out, int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity,
                               int64_t top_k, int num_threads) {
  return run<float>(z, w_router, b_router, expert_out, polarity, residual, out, B, d, E, experts_per_polarity,
                    top_k, num_threads);
}

int dpr_fused_moe_gate_cpu_f16(const uint16_t* z, const uint16_t* w_router, const uint16_t* b_router,
                               const uint16_t* expert_out, const int64_t* polarity, const uint16_t* residual,
                               uint16_t* out, int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity,
                               int64_t top_k, int num_threads) {
  return run<uint16_t>(z, w_router, b_router, expert_out, polarity, residual, out, B, d, E,
                       experts_per_polarity, top_k, num_threads);
}

}  // extern "C"
