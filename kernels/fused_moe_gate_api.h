// C ABI of the fused MoE gate libraries (libdpr_kernels.so, libdpr_kernels_cuda.so, libdpr_ort_ops*.so).
// Every function returns a dpr_status code (0 = ok; dpr_status_string(code) describes it).
// Tensors are dense, row-major, contiguous: z (B,d), w_router (d,E), b_router (E), expert_out (B,E,d),
// polarity (B) int64, residual (B,d), out (B,d). fp16 tensors are passed as IEEE binary16 bit patterns.
#ifndef DPR_FUSED_MOE_GATE_API_H_
#define DPR_FUSED_MOE_GATE_API_H_

#include <stdint.h>

#define DPR_KERNELS_ABI_VERSION 1

#if defined(__CUDACC__)
#include <cuda_runtime.h>
typedef cudaStream_t dpr_stream_t;
#else
typedef void* dpr_stream_t;  // a cudaStream_t (same ABI: a pointer)
#endif

#ifdef __cplusplus
extern "C" {
#endif

int dpr_kernels_abi_version(void);
const char* dpr_status_string(int code);
// Vector path the CPU twin takes for float32 on this CPU: "avx512f" (d % 16 == 0; else as avx2),
// "avx2" (d % 8 == 0) or "generic" (DPR_GATE_ISA=generic / avx2 caps it).
const char* dpr_fused_moe_gate_cpu_isa(void);

// CPU twin; num_threads <= 0 uses OpenMP's default.
int dpr_fused_moe_gate_cpu_f32(const float* z, const float* w_router, const float* b_router,
                               const float* expert_out, const int64_t* polarity, const float* residual,
                               float* out, int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity,
                               int64_t top_k, int num_threads);
int dpr_fused_moe_gate_cpu_f16(const uint16_t* z, const uint16_t* w_router, const uint16_t* b_router,
                               const uint16_t* expert_out, const int64_t* polarity, const uint16_t* residual,
                               uint16_t* out, int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity,
                               int64_t top_k, int num_threads);

// CUDA kernel launchers (libdpr_kernels_cuda.so) on a cudaStream_t. Asynchronous: errors of the kernel itself surface at the next sync.
int dpr_fused_moe_gate_cuda_f32(const float* z, const float* w_router, const float* b_router,
                                const float* expert_out, const int64_t* polarity, const float* residual,
                                float* out, int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity,
                                int64_t top_k, dpr_stream_t stream);
int dpr_fused_moe_gate_cuda_f16(const uint16_t* z, const uint16_t* w_router, const uint16_t* b_router,
                                const uint16_t* expert_out, const int64_t* polarity, const uint16_t* residual,
                                uint16_t* out, int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity,
                                int64_t top_k, dpr_stream_t stream);
// Text of the last CUDA error seen by a launcher in this thread ("" if none).
const char* dpr_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif  // DPR_FUSED_MOE_GATE_API_H_
