// dpr::moe_gate, CPU: the fused MoE gate's C++ CPU twin (fused_moe_gate_cpu.cc, linked into this library)
// registered with torch's dispatcher. Defines the operator's schema; libdpr_torch_ops_cuda.so adds the CUDA
// implementation and dpr/kernels/moe_gate_op.py the fake (meta) one. Called like any aten op: no Python,
// no ctypes on the way (torch.ops.dpr.moe_gate, torch.compile, torch.export).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fused_moe_gate_api.h"
#include "moe_gate_torch.h"

namespace {

at::Tensor moe_gate_cpu(const at::Tensor& z, const at::Tensor& w_router, const at::Tensor& b_router,
                        const at::Tensor& expert_out, const at::Tensor& polarity, const at::Tensor& residual,
                        int64_t experts_per_polarity, int64_t top_k) {
  const auto s = dpr_torch::check_gate_args(z, w_router, b_router, expert_out, polarity, residual,
                                            experts_per_polarity, top_k, c10::DeviceType::CPU);
  const at::Tensor zc = z.contiguous(), w = w_router.contiguous(), b = b_router.contiguous(),
                   y = expert_out.contiguous(), p = polarity.contiguous(), r = residual.contiguous();
  at::Tensor out = at::empty({s.B, s.d}, z.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.B == 0) return out;
  // torch's intra-op thread count: the twin forks only for large batches (kParallelWork)
  const int threads = at::get_num_threads();
  int status;
  if (z.scalar_type() == at::kFloat) {
    status = dpr_fused_moe_gate_cpu_f32(zc.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(),
                                        y.data_ptr<float>(), p.data_ptr<int64_t>(), r.data_ptr<float>(),
                                        out.data_ptr<float>(), s.B, s.d, s.E, experts_per_polarity, top_k, threads);
  } else {  // float16: the twin takes IEEE binary16 bit patterns
    auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
    status = dpr_fused_moe_gate_cpu_f16(bits(zc), bits(w), bits(b), bits(y), p.data_ptr<int64_t>(), bits(r),
                                        reinterpret_cast<uint16_t*>(out.data_ptr<at::Half>()), s.B, s.d, s.E,
                                        experts_per_polarity, top_k, threads);
  }
  TORCH_CHECK(status == 0, "dpr::moe_gate (CPU): ", dpr_status_string(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpr, m) { m.def(DPR_MOE_GATE_SCHEMA); }

TORCH_LIBRARY_IMPL(dpr, CPU, m) { m.impl("moe_gate", &moe_gate_cpu); }
