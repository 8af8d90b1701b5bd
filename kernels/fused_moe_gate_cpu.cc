// CPU twin of the fused MoE gate: the per-row math of fused_moe_gate.h, OpenMP over rows.
// Plain C ABI (ctypes-friendly); also linked into the ONNX Runtime custom-op library.
//
// float32 takes a vector layout of the same math when the CPU has it (cpu_isa.h, chosen once at run time):
// AVX-512 for d a multiple of 16, else AVX2+FMA for d a multiple of 8. The router weight is transposed once
// per call (E x d), so each router logit is a d-long dot product over vector registers (zmm or ymm), and
// the combine out = res + sum_r gate_r * y[sel_r] runs 16 (8) lanes at a time. Selection and softmax are
// the header's; only the order of the router's d additions differs (float rounding). The header's loop,
// built for baseline x86-64, vectorises over the n experts of a group (4 SSE lanes at n = 4), so the wide
// loops are faster at the default sizes (timings: docs/ARCHITECTURE.md, "Measurements behind the defaults").
// DPR_GATE_ISA=generic forces the header's loop, DPR_GATE_ISA=avx2 caps at AVX2 (the tests run all three).
#include <stdint.h>

#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DPR_GATE_X86 1
#endif

#include "cpu_isa.h"
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

#ifdef DPR_GATE_X86
__attribute__((target("avx512f,avx512dq"))) inline float hsum(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 h) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}

// Selection + softmax of one row from its group's logits (the header's functions).
inline void select_row(const float* logits, int n, int k, int* sel, float* gate) {
  sel[0] = 0;
  gate[0] = 0.f;
  dpr_select_topk(logits, n, k, sel, gate);
  dpr_softmax_topk(gate, k);
}

// Rows [r0, r1) with the transposed router weight wt (E x d), d % 16 == 0. Same contract as the header row.
__attribute__((target("avx512f,avx512dq"))) void rows_avx512(const float* z, const float* wt, const float* bias,
                                                     const float* y, const int64_t* pol, const float* res,
                                                     float* out, int64_t r0, int64_t r1, int64_t d, int64_t E,
                                                     int n, int k) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* zr = z + r * d;
    const float* rr = res + r * d;
    float* o = out + r * d;
    const int g = dpr_polarity_group(pol[r]);
    if (g < 0) {
      std::memcpy(o, rr, sizeof(float) * static_cast<size_t>(d));   // bit-exact copy
      continue;
    }
    const int off = g * n;
    float logits[DPR_MAX_EXPERTS_PER_POLARITY];
    for (int j = 0; j < n; ++j) {
      const float* wj = wt + static_cast<int64_t>(off + j) * d;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();    // two chains hide the FMA latency
      int64_t i = 0;
      for (; i + 32 <= d; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(zr + i), _mm512_loadu_ps(wj + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(zr + i + 16), _mm512_loadu_ps(wj + i + 16), a1);
      }
      if (i < d) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(zr + i), _mm512_loadu_ps(wj + i), a0);
      logits[j] = bias[off + j] + hsum(_mm512_add_ps(a0, a1));
    }
    int sel[DPR_MAX_TOP_K];
    float gate[DPR_MAX_TOP_K];
    select_row(logits, n, k, sel, gate);
    const float* yr = y + r * E * d;
    for (int64_t i = 0; i < d; i += 16) {
      __m512 acc = _mm512_mul_ps(_mm512_set1_ps(gate[0]), _mm512_loadu_ps(yr + (off + sel[0]) * d + i));
      for (int q = 1; q < k; ++q)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(gate[q]), _mm512_loadu_ps(yr + (off + sel[q]) * d + i), acc);
      _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_loadu_ps(rr + i), acc));
    }
  }
}

// The same with 8-lane ymm registers, d % 8 == 0 (AVX2 + FMA).
__attribute__((target("avx2,fma"))) void rows_avx2(const float* z, const float* wt, const float* bias,
                                                   const float* y, const int64_t* pol, const float* res,
                                                   float* out, int64_t r0, int64_t r1, int64_t d, int64_t E,
                                                   int n, int k) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* zr = z + r * d;
    const float* rr = res + r * d;
    float* o = out + r * d;
    const int g = dpr_polarity_group(pol[r]);
    if (g < 0) {
      std::memcpy(o, rr, sizeof(float) * static_cast<size_t>(d));   // bit-exact copy
      continue;
    }
    const int off = g * n;
    float logits[DPR_MAX_EXPERTS_PER_POLARITY];
    for (int j = 0; j < n; ++j) {
      const float* wj = wt + static_cast<int64_t>(off + j) * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();    // two chains hide the FMA latency
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(zr + i), _mm256_loadu_ps(wj + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(zr + i + 8), _mm256_loadu_ps(wj + i + 8), a1);
      }
      if (i < d) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(zr + i), _mm256_loadu_ps(wj + i), a0);
      logits[j] = bias[off + j] + hsum8(_mm256_add_ps(a0, a1));
    }
    int sel[DPR_MAX_TOP_K];
    float gate[DPR_MAX_TOP_K];
    select_row(logits, n, k, sel, gate);
    const float* yr = y + r * E * d;
    for (int64_t i = 0; i < d; i += 8) {
      __m256 acc = _mm256_mul_ps(_mm256_set1_ps(gate[0]), _mm256_loadu_ps(yr + (off + sel[0]) * d + i));
      for (int q = 1; q < k; ++q)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(gate[q]), _mm256_loadu_ps(yr + (off + sel[q]) * d + i), acc);
      _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(rr + i), acc));
    }
  }
}
#endif

// Chosen once per process; DPR_GATE_ISA=generic / avx2 caps it (cpu_isa.h).
dpr_isa::Level gate_isa() {
  static const dpr_isa::Level level = dpr_isa::level("DPR_GATE_ISA", true);
  return level;
}

#ifdef DPR_GATE_X86
// The vector layout: rows_avx512 (d % 16 == 0) or rows_avx2 (d % 8 == 0), split over the threads.
int run_f32_vec(bool avx512, const float* z, const float* w, const float* b, const float* y, const int64_t* pol,
                const float* res, float* out, int64_t B, int64_t d, int64_t E, int64_t n, int64_t k,
                int num_threads) {
  std::vector<float> wt;
  try {
    wt.resize(static_cast<size_t>(E * d));
  } catch (const std::bad_alloc&) {
    return DPR_ERR_TOO_LARGE;
  }
  for (int64_t i = 0; i < d; ++i)
    for (int64_t e = 0; e < E; ++e) wt[e * d + i] = w[i * E + e];
  const int64_t work = B * d * (n + k);
  int parts = 1;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (work >= kParallelWork && B > 1 && threads > 1) parts = threads;
#else
  (void)num_threads;
  (void)work;
#endif
  const auto rows = avx512 ? rows_avx512 : rows_avx2;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
  for (int p = 0; p < parts; ++p)
    rows(z, wt.data(), b, y, pol, res, out, B * p / parts, B * (p + 1) / parts, d, E, (int)n, (int)k);
  return DPR_OK;
}
#endif

template <typename T>
int run(const T* z, const T* w, const T* b, const T* y, const int64_t* pol, const T* res, T* out, int64_t B,
        int64_t d, int64_t E, int64_t n, int64_t k, int num_threads) {
  const int st = dpr_check_sizes(B, d, E, n, k);
  if (st != DPR_OK) return st;
  if (B == 0) return DPR_OK;
  if (!z || !w || !b || !y || !pol || !res || !out) return DPR_ERR_NULL_POINTER;
  if (d > INT32_MAX) return DPR_ERR_TOO_LARGE;
#ifdef DPR_GATE_X86
  if constexpr (std::is_same<T, float>::value) {
    const dpr_isa::Level isa = gate_isa();
    if (E * d <= (int64_t{1} << 24)) {
      if (isa == dpr_isa::kAvx512 && d % 16 == 0)
        return run_f32_vec(true, z, w, b, y, pol, res, out, B, d, E, n, k, num_threads);
      if (isa >= dpr_isa::kAvx2 && d % 8 == 0)   // also on AVX-512 CPUs when d is a multiple of 8 only
        return run_f32_vec(false, z, w, b, y, pol, res, out, B, d, E, n, k, num_threads);
    }
  }
#endif
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

const char* dpr_fused_moe_gate_cpu_isa(void) { return dpr_isa::level_name(gate_isa()); }

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
