// CUDA kernel of the fused MoE gate: one warp per row, fp32 and fp16 (fp32 accumulation).
//
// Per row, in one pass and with nothing written to global memory but the output row:
//   lanes 0..n-1 each compute one router logit of the row's polarity group (coalesced reads of w),
//   k rounds of a warp arg-max select the top-k (NaN first, ties -> lower index, fused_moe_gate.h's
//   order), a warp softmax turns them into gates, and the lanes then stream the k selected expert
//   rows and the residual with 16-byte vector loads (float4 / 8 x half) to write residual + delta.
//
// The two extern "C" __global__ kernels are also the TensorRT AOT plugin's kernels (trt_plugin.py):
// their signature is TensorRT's: input pointers, then int32 scalars, then output pointers.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "fused_moe_gate.h"
#include "fused_moe_gate_api.h"

#define DPR_WARPS_PER_BLOCK 4
#define DPR_THREADS_PER_BLOCK (32 * DPR_WARPS_PER_BLOCK)

namespace {

constexpr unsigned kFull = 0xffffffffu;

template <typename T>
struct Vec;  // 16-byte vector of T, converted to/from VEC floats
template <>
struct Vec<float> {
  static constexpr int N = 4;
  static __device__ __forceinline__ void load(const float* p, float (&f)[4]) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&f)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  }
  static __device__ __forceinline__ void copy(const float* src, float* dst) {
    *reinterpret_cast<float4*>(dst) = __ldg(reinterpret_cast<const float4*>(src));
  }
};
template <>
struct Vec<uint16_t> {
  static constexpr int N = 8;
  static __device__ __forceinline__ void load(const uint16_t* p, float (&f)[8]) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &u[i], 4);
      const float2 t = __half22float2(h);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  static __device__ __forceinline__ void store(uint16_t* p, const float (&f)[8]) {
    unsigned u[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      memcpy(&u[i], &h, 4);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
  }
  static __device__ __forceinline__ void copy(const uint16_t* src, uint16_t* dst) {
    *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
  }
};

__device__ __forceinline__ float ldf(const float* p) { return __ldg(p); }
__device__ __forceinline__ float ldf(const uint16_t* p) { return dpr_half_to_float(__ldg(p)); }

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
__device__ __forceinline__ void gate_row(const T* __restrict__ z, const T* __restrict__ w, const T* __restrict__ b,
                                         const T* __restrict__ y, const int64_t* __restrict__ pol,
                                         const T* __restrict__ res, T* __restrict__ out, int B, int d, int E, int n,
                                         int k, bool vec_ok, float* s_gate, int* s_idx) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * DPR_WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= B) return;  // whole warp leaves together
  constexpr int V = Vec<T>::N;
  const T* rrow = res + (int64_t)row * d;
  T* orow = out + (int64_t)row * d;
  const int g = dpr_polarity_group(__ldg(pol + row));
  if (g < 0) {  // inactive row: bit-exact copy of the residual
    if (vec_ok) {
      for (int c = lane * V; c < d; c += 32 * V) Vec<T>::copy(rrow + c, orow + c);
    } else {
      for (int c = lane; c < d; c += 32) orow[c] = rrow[c];
    }
    return;
  }
  const int off = g * n;

  // Router logits: lane j < n owns expert off + j (reads of w are coalesced across lanes).
  const bool own = lane < n;
  float logit = 0.f;
  if (own) {
    const T* zr = z + (int64_t)row * d;
    const T* wc = w + off + lane;
    float acc = ldf(b + off + lane);
#pragma unroll 4
    for (int i = 0; i < d; ++i) acc += ldf(zr + i) * ldf(wc + (int64_t)i * E);
    logit = acc;
  }

  // Top-k: k rounds of a warp arg-max under fused_moe_gate.h's total order (lanes >= n never win).
  bool taken = !own;
  float my_val = 0.f;
  int my_idx = 0;
  for (int r = 0; r < k; ++r) {
    bool has = !taken;
    float v = logit;
    int idx = lane;
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
      const bool oh = __shfl_xor_sync(kFull, has, s);
      const float ov = __shfl_xor_sync(kFull, v, s);
      const int oi = __shfl_xor_sync(kFull, idx, s);
      const bool better = oh && (!has || dpr_ranks_before(ov, oi, v, idx));
      if (better) { has = oh; v = ov; idx = oi; }
    }
    if (lane == idx) taken = true;
    if (lane == r) { my_val = v; my_idx = idx; }
  }

  // Softmax over the k selected logits (lane r holds selection r; lane 0 holds the maximum).
  const float m = __shfl_sync(kFull, my_val, 0);
  float e = lane < k ? expf(my_val - m) : 0.f;
  float sum = e;
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) sum += __shfl_xor_sync(kFull, sum, s);
  if (lane < k) {
    s_gate[lane] = e / sum;
    s_idx[lane] = off + my_idx;
  }
  __syncwarp();

  // out = residual + sum_r gate_r * y[row, e_r]
  const T* yrow = y + (int64_t)row * E * d;
  if (vec_ok) {
    for (int c = lane * V; c < d; c += 32 * V) {
      float acc[V], t[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.f;
      for (int r = 0; r < k; ++r) {
        const float gr = s_gate[r];
        Vec<T>::load(yrow + (int64_t)s_idx[r] * d + c, t);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += gr * t[i];
      }
      Vec<T>::load(rrow + c, t);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += t[i];
      Vec<T>::store(orow + c, acc);
    }
  } else {
    for (int c = lane; c < d; c += 32) {
      float acc = 0.f;
      for (int r = 0; r < k; ++r) acc += s_gate[r] * ldf(yrow + (int64_t)s_idx[r] * d + c);
      dpr_from_float(ldf(rrow + c) + acc, orow + c);
    }
  }
}

template <typename T>
__device__ __forceinline__ void gate_kernel_body(const T* z, const T* w, const T* b, const T* y, const int64_t* pol,
                                                 const T* res, int B, int d, int E, int n, int k, T* out) {
  __shared__ float s_gate[DPR_WARPS_PER_BLOCK][32];
  __shared__ int s_idx[DPR_WARPS_PER_BLOCK][32];
  constexpr int V = Vec<T>::N;
  const bool vec_ok = (d % V == 0) && aligned16(y) && aligned16(res) && aligned16(out);
  const int wid = threadIdx.x >> 5;
  gate_row<T>(z, w, b, y, pol, res, out, B, d, E, n, k, vec_ok, s_gate[wid], s_idx[wid]);
}

}  // namespace

// TensorRT-callable kernels (unmangled names; inputs, int32 scalars, outputs). Launch with
// blockDim.x = 128 (4 warps, one row each) and gridDim.x = ceil(B / 4).
extern "C" __global__ void __launch_bounds__(DPR_THREADS_PER_BLOCK, 8)
    dpr_fused_moe_gate_f32(const float* z, const float* w_router, const float* b_router, const float* expert_out,
                           const int64_t* polarity, const float* residual, int B, int d, int E, int n, int k,
                           float* out) {
  gate_kernel_body<float>(z, w_router, b_router, expert_out, polarity, residual, B, d, E, n, k, out);
}

extern "C" __global__ void __launch_bounds__(DPR_THREADS_PER_BLOCK, 8)
    dpr_fused_moe_gate_f16(const uint16_t* z, const uint16_t* w_router, const uint16_t* b_router,
                           const uint16_t* expert_out, const int64_t* polarity, const uint16_t* residual, int B,
                           int d, int E, int n, int k, uint16_t* out) {
  gate_kernel_body<uint16_t>(z, w_router, b_router, expert_out, polarity, residual, B, d, E, n, k, out);
}

namespace {

thread_local char g_last_error[256] = "";

template <typename T>
int launch(void (*kernel)(const T*, const T*, const T*, const T*, const int64_t*, const T*, int, int, int, int,
                          int, T*),
           const T* z, const T* w, const T* b, const T* y, const int64_t* pol, const T* res, T* out, int64_t B,
           int64_t d, int64_t E, int64_t n, int64_t k, cudaStream_t stream) {
  g_last_error[0] = '\0';
  const int st = dpr_check_sizes(B, d, E, n, k);
  if (st != DPR_OK) return st;
  if (B == 0) return DPR_OK;
  if (!z || !w || !b || !y || !pol || !res || !out) return DPR_ERR_NULL_POINTER;
  if (B > INT32_MAX || d > INT32_MAX || E * d > INT32_MAX) return DPR_ERR_TOO_LARGE;
  const int64_t blocks = (B + DPR_WARPS_PER_BLOCK - 1) / DPR_WARPS_PER_BLOCK;
  kernel<<<(unsigned)blocks, DPR_THREADS_PER_BLOCK, 0, stream>>>(z, w, b, y, pol, res, (int)B, (int)d, (int)E,
                                                                  (int)n, (int)k, out);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    snprintf(g_last_error, sizeof(g_last_error), "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
    return DPR_ERR_CUDA;
  }
  return DPR_OK;
}

}  // namespace

extern "C" {

int dpr_fused_moe_gate_cuda_f32(const float* z, const float* w_router, const float* b_router,
                                const float* expert_out, const int64_t* polarity, const float* residual, float* out,
                                int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity, int64_t top_k,
                                cudaStream_t stream) {
  return launch<float>(dpr_fused_moe_gate_f32, z, w_router, b_router, expert_out, polarity, residual, out, B, d, E,
                       experts_per_polarity, top_k, stream);
}

int dpr_fused_moe_gate_cuda_f16(const uint16_t* z, const uint16_t* w_router, const uint16_t* b_router,
                                const uint16_t* expert_out, const int64_t* polarity, const uint16_t* residual,
                                uint16_t* out, int64_t B, int64_t d, int64_t E, int64_t experts_per_polarity,
                                int64_t top_k, cudaStream_t stream) {
  return launch<uint16_t>(dpr_fused_moe_gate_f16, z, w_router, b_router, expert_out, polarity, residual, out, B, d,
                          E, experts_per_polarity, top_k, stream);
}

const char* dpr_cuda_last_error(void) { return g_last_error; }

#ifdef DPR_STANDALONE_CUDA_LIB
// The standalone CUDA library (libdpr_kernels_cuda.so) has no CPU twin beside it to define this; the ORT
// library links both objects, so it is defined only here, only then.
const char* dpr_status_string(int code) { return dpr_status_message(code); }
#endif

}  // extern "C"
