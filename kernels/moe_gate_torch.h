// The dpr::moe_gate torch operator: its schema and the argument checks its CPU and CUDA implementations
// share. The math is fused_moe_gate.h's (the CPU twin in fused_moe_gate_cpu.cc, the CUDA kernel in
// fused_moe_gate.cu); the specification is dpr.model.moe.moe_gate_reference. Written against the documented
// torch.library C++ API (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL); no pybind, no ctypes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "fused_moe_gate.h"

#define DPR_MOE_GATE_SCHEMA                                                                               \
  "moe_gate(Tensor z, Tensor w_router, Tensor b_router, Tensor expert_out, Tensor polarity, Tensor residual, " \
  "int experts_per_polarity, int top_k) -> Tensor"

namespace dpr_torch {

struct GateSizes {
  int64_t B, d, E;
};

// Every problem named: the argument, what it must be, what it is.
inline GateSizes check_gate_args(const at::Tensor& z, const at::Tensor& w, const at::Tensor& b, const at::Tensor& y,
                                 const at::Tensor& pol, const at::Tensor& res, int64_t n, int64_t k,
                                 c10::DeviceType device) {
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf,
              "dpr::moe_gate: z must be float32 or float16, got ", z.scalar_type());
  const at::Tensor* same[] = {&w, &b, &y, &res};
  const char* names[] = {"w_router", "b_router", "expert_out", "residual"};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(same[i]->scalar_type() == z.scalar_type(), "dpr::moe_gate: ", names[i], " has dtype ",
                same[i]->scalar_type(), ", expected ", z.scalar_type(), " like z");
  TORCH_CHECK(pol.scalar_type() == at::kLong, "dpr::moe_gate: polarity must be int64, got ", pol.scalar_type());
  const at::Tensor* all[] = {&z, &w, &b, &y, &pol, &res};
  for (const at::Tensor* t : all)
    TORCH_CHECK(t->device().type() == device && t->device() == z.device(),
                "dpr::moe_gate: all inputs must be on z's device ", z.device(), ", got one on ", t->device());
  TORCH_CHECK(z.dim() == 2, "dpr::moe_gate: z must be 2-D (B, d), got ", z.sizes());
  const int64_t B = z.size(0), d = z.size(1);
  TORCH_CHECK(y.dim() == 3 && y.size(0) == B && y.size(2) == d, "dpr::moe_gate: expert_out must be (B, E, d) = (",
              B, ", E, ", d, "), got ", y.sizes());
  const int64_t E = y.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == d && w.size(1) == E, "dpr::moe_gate: w_router must be (d, E) = (", d,
              ", ", E, "), got ", w.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == E, "dpr::moe_gate: b_router must be (E,) = (", E, ",), got ", b.sizes());
  TORCH_CHECK(pol.dim() == 1 && pol.size(0) == B, "dpr::moe_gate: polarity must be (B,) = (", B, ",), got ",
              pol.sizes());
  TORCH_CHECK(res.sizes() == z.sizes(), "dpr::moe_gate: residual must be (B, d) = (", B, ", ", d, "), got ",
              res.sizes());
  TORCH_CHECK(n >= 1 && n <= DPR_MAX_EXPERTS_PER_POLARITY, "dpr::moe_gate: experts_per_polarity must be in 1..",
              DPR_MAX_EXPERTS_PER_POLARITY, ", got ", n);
  TORCH_CHECK(E == 2 * n, "dpr::moe_gate: expert_out has ", E, " experts, expected 2 * experts_per_polarity = ",
              2 * n);
  TORCH_CHECK(k >= 1 && k <= n, "dpr::moe_gate: top_k must be in 1..", n, ", got ", k);
  return {B, d, E};
}

}  // namespace dpr_torch
