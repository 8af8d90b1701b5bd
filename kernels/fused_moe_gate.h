// Fused MoE gate: the per-row math shared by every implementation (CPU twin, CUDA kernel, ORT op).
//
// Specification: dpr.model.moe.moe_gate_reference (REFERENCE.md section 2, "The fused op").
//   out[b] = residual[b] + sum_{r<k} softmax(top-k logits)[r] * expert_out[b, e_r]
//   logits = z[b] @ w_router + b_router, restricted to the row's polarity group
//   (experts 0..n-1 for polarity 1, n..2n-1 for polarity 2); ties go to the lower expert index;
//   rows whose polarity is not 1 or 2 return residual unchanged, bit for bit.
//
// Compiled by g++ (host only) and nvcc (host and device). No framework types: fp16 values are
// carried as their IEEE binary16 bit patterns in uint16_t.
#ifndef DPR_FUSED_MOE_GATE_H_
#define DPR_FUSED_MOE_GATE_H_

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define DPR_HD __host__ __device__ __forceinline__
#define DPR_HOST __host__
#else
#define DPR_HD inline
#define DPR_HOST
#endif

// Limits shared by every implementation (the CUDA kernel maps one expert to one lane).
#define DPR_MAX_EXPERTS_PER_POLARITY 32
#define DPR_MAX_TOP_K 32

// Status codes of the C APIs (0 = ok).
enum dpr_status {
  DPR_OK = 0,
  DPR_ERR_NULL_POINTER = 1,
  DPR_ERR_NEGATIVE_SIZE = 2,
  DPR_ERR_EXPERTS_PER_POLARITY = 3,  // n not in 1..DPR_MAX_EXPERTS_PER_POLARITY
  DPR_ERR_NUM_EXPERTS = 4,           // E != 2 n
  DPR_ERR_TOP_K = 5,                 // k not in 1..n
  DPR_ERR_TOO_LARGE = 6,             // a size does not fit the kernel's int32 arguments
  DPR_ERR_CUDA = 7,                  // a CUDA launch failed (see dpr_cuda_last_error)
  DPR_ERR_NO_CUDA = 8,               // the library was built without CUDA
  DPR_ERR_ZERO_DIM = 9,              // d == 0
};

DPR_HD const char* dpr_status_message(int code) {
  switch (code) {
    case DPR_OK: return "ok";
    case DPR_ERR_NULL_POINTER: return "a tensor pointer is null";
    case DPR_ERR_NEGATIVE_SIZE: return "a size is negative";
    case DPR_ERR_EXPERTS_PER_POLARITY: return "experts_per_polarity must be in 1..32";
    case DPR_ERR_NUM_EXPERTS: return "expert_out/w_router/b_router must have 2 * experts_per_polarity experts";
    case DPR_ERR_TOP_K: return "top_k must be in 1..experts_per_polarity";
    case DPR_ERR_TOO_LARGE: return "a size exceeds the kernel's 32-bit limits";
    case DPR_ERR_CUDA: return "CUDA kernel launch failed";
    case DPR_ERR_NO_CUDA: return "built without CUDA";
    case DPR_ERR_ZERO_DIM: return "d (hidden size) must be >= 1";
    default: return "unknown status";
  }
}

// Checks the sizes; pointers are checked by the callers.
DPR_HD int dpr_check_sizes(int64_t B, int64_t d, int64_t E, int64_t n, int64_t k) {
  if (B < 0 || d < 0 || E < 0 || n < 0 || k < 0) return DPR_ERR_NEGATIVE_SIZE;
  if (n < 1 || n > DPR_MAX_EXPERTS_PER_POLARITY) return DPR_ERR_EXPERTS_PER_POLARITY;
  if (E != 2 * n) return DPR_ERR_NUM_EXPERTS;
  if (k < 1 || k > n) return DPR_ERR_TOP_K;
  if (d < 1) return DPR_ERR_ZERO_DIM;
  return DPR_OK;
}

// ---------------------------------------------------------------- fp16 <-> fp32 (bit patterns)
DPR_HD float dpr_half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: mant * 2^-24
      float f = (float)mant * 5.9604644775390625e-8f;
      memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  memcpy(&out, &bits, 4);
  return out;
#endif
}

// Round to nearest even (as torch / numpy / __float2half_rn).
DPR_HD uint16_t dpr_float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x47800000u) {  // >= 65536, inf or nan
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // quiet nan
    return (uint16_t)(sign | 0x7c00u);
  }
  if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    float af;
    memcpy(&af, &a, 4);
    af += 0.5f;  // aligns the mantissa to 2^-24 with round-to-nearest-even
    uint32_t r;
    memcpy(&r, &af, 4);
    return (uint16_t)(sign | (r - 0x3f000000u));
  }
  const uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu;  // rebias exponent (-112 << 23) and add the rounding bias
  a += mant_odd;
  return (uint16_t)(sign | (a >> 13));
#endif
}

DPR_HD float dpr_to_float(float v) { return v; }
DPR_HD float dpr_to_float(uint16_t v) { return dpr_half_to_float(v); }
DPR_HD void dpr_from_float(float v, float* out) { *out = v; }
DPR_HD void dpr_from_float(float v, uint16_t* out) { *out = dpr_float_to_half(v); }

// ---------------------------------------------------------------- routing
// Polarity -> group (0 positive, 1 negative) or -1 (row inactive: output = residual).
DPR_HD int dpr_polarity_group(int64_t polarity) {
  return polarity == 1 ? 0 : (polarity == 2 ? 1 : -1);
}

// Total order used by top-k selection: does (va, ia) rank before (vb, ib)?
// NaN ranks first (as in torch.sort descending), then larger values, ties -> lower expert index.
DPR_HD bool dpr_ranks_before(float va, int ia, float vb, int ib) {
  const bool na = va != va, nb = vb != vb;
  if (na != nb) return na;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

// Selects the k best of logits[0..n) (group-local indices) in rank order: idx[0] is the best.
// Insertion into a sorted list of k; O(n k) with n, k <= 32.
DPR_HD void dpr_select_topk(const float* logits, int n, int k, int* idx, float* val) {
  int filled = 0;
  for (int j = 0; j < n; ++j) {
    const float v = logits[j];
    if (filled == k && !dpr_ranks_before(v, j, val[k - 1], idx[k - 1])) continue;
    int pos = filled < k ? filled : k - 1;
    while (pos > 0 && dpr_ranks_before(v, j, val[pos - 1], idx[pos - 1])) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = j;
    if (filled < k) ++filled;
  }
}

// In-place softmax over the k selected logits (val[0] is the largest, or NaN).
// Non-finite logits propagate: NaN or +inf yield NaN weights, as in torch.softmax.
DPR_HD void dpr_softmax_topk(float* val, int k) {
  const float m = val[0];
  // The best logit's weight is expf(0) = 1 exactly when m is finite (m - m == 0 is false for inf and NaN,
  // which keep expf's NaN): one expf fewer per row, the same bits.
  val[0] = (m - m == 0.f) ? 1.f : expf(val[0] - m);
  float s = val[0];
  for (int r = 1; r < k; ++r) {
    val[r] = expf(val[r] - m);
    s += val[r];
  }
  const float inv = 1.f / s;
  for (int r = 0; r < k; ++r) val[r] *= inv;
}

// ---------------------------------------------------------------- one row, scalar/vectorisable
// The full per-row op for one row (host; also valid device code for a thread-per-row kernel).
// z (d), w (d x E, row-major), bias (E), y (E x d: this row's expert outputs), res (d), out (d).
// N > 0 fixes the group size at compile time (lets the compiler vectorise the router loop).
template <int N, typename T>
DPR_HD void dpr_moe_gate_row(const T* z, const T* w, const T* bias, const T* y, int64_t polarity,
                             const T* res, T* out, int d, int E, int n_runtime, int k) {
  const int g = dpr_polarity_group(polarity);
  if (g < 0) {
    for (int i = 0; i < d; ++i) out[i] = res[i];  // bit-exact copy
    return;
  }
  const int n = N > 0 ? N : n_runtime;
  const int off = g * n;
  // Four independent partial sums over i break the add-latency chain (w rows are contiguous in j).
  float part[4][DPR_MAX_EXPERTS_PER_POLARITY];
  for (int u = 0; u < 4; ++u)
    for (int j = 0; j < n; ++j) part[u][j] = 0.f;
  int i = 0;
  for (; i + 4 <= d; i += 4) {
    for (int u = 0; u < 4; ++u) {
      const float zi = dpr_to_float(z[i + u]);
      const T* wr = w + (int64_t)(i + u) * E + off;
      for (int j = 0; j < n; ++j) part[u][j] += zi * dpr_to_float(wr[j]);
    }
  }
  for (; i < d; ++i) {
    const float zi = dpr_to_float(z[i]);
    const T* wr = w + (int64_t)i * E + off;
    for (int j = 0; j < n; ++j) part[0][j] += zi * dpr_to_float(wr[j]);
  }
  float logits[DPR_MAX_EXPERTS_PER_POLARITY];
  for (int j = 0; j < n; ++j)
    logits[j] = dpr_to_float(bias[off + j]) + ((part[0][j] + part[1][j]) + (part[2][j] + part[3][j]));
  int sel[DPR_MAX_TOP_K];
  float gate[DPR_MAX_TOP_K];
  sel[0] = 0;
  gate[0] = 0.f;  // k >= 1 always fills slot 0; this only quiets -Wmaybe-uninitialized
  dpr_select_topk(logits, n, k, sel, gate);
  dpr_softmax_topk(gate, k);
  // delta = sum_r gate_r * y[off + sel_r]; out = res + delta, in chunks of 64 (vectorisable).
  const int CH = 64;
  for (int c0 = 0; c0 < d; c0 += CH) {
    const int len = d - c0 < CH ? d - c0 : CH;
    float acc[CH];
    for (int i = 0; i < len; ++i) acc[i] = 0.f;
    for (int r = 0; r < k; ++r) {
      const float gr = gate[r];
      const T* yr = y + (int64_t)(off + sel[r]) * d + c0;
      for (int i = 0; i < len; ++i) acc[i] += gr * dpr_to_float(yr[i]);
    }
    for (int i = 0; i < len; ++i) dpr_from_float(dpr_to_float(res[c0 + i]) + acc[i], out + c0 + i);
  }
}

#endif  // DPR_FUSED_MOE_GATE_H_
