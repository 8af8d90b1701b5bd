// dpr::moe_gate, CUDA: the fused MoE gate's CUDA kernel (fused_moe_gate.cu, compiled by nvcc into this
// library) registered with torch's dispatcher, launched on torch's current stream, so it runs inside
// torch.cuda.graph captures like any aten kernel (no host synchronisation, no ctypes). Loaded after
// libdpr_torch_ops.so, which defines the schema. Written against the documented c10::cuda API; built only
// where nvcc and a CUDA build of torch are both present (python -m dpr.kernels.build).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused_moe_gate_api.h"
#include "moe_gate_torch.h"

namespace {

at::Tensor moe_gate_cuda(const at::Tensor& z, const at::Tensor& w_router, const at::Tensor& b_router,
                         const at::Tensor& expert_out, const at::Tensor& polarity, const at::Tensor& residual,
                         int64_t experts_per_polarity, int64_t top_k) {
  const auto s = dpr_torch::check_gate_args(z, w_router, b_router, expert_out, polarity, residual,
                                            experts_per_polarity, top_k, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), w = w_router.contiguous(), b = b_router.contiguous(),
                   y = expert_out.contiguous(), p = polarity.contiguous(), r = residual.contiguous();
  at::Tensor out = at::empty({s.B, s.d}, z.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.B == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  int status;
  if (z.scalar_type() == at::kFloat) {
    status = dpr_fused_moe_gate_cuda_f32(zc.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(),
                                         y.data_ptr<float>(), p.data_ptr<int64_t>(), r.data_ptr<float>(),
                                         out.data_ptr<float>(), s.B, s.d, s.E, experts_per_polarity, top_k, stream);
  } else {
    auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
    status = dpr_fused_moe_gate_cuda_f16(bits(zc), bits(w), bits(b), bits(y), p.data_ptr<int64_t>(), bits(r),
                                         reinterpret_cast<uint16_t*>(out.data_ptr<at::Half>()), s.B, s.d, s.E,
                                         experts_per_polarity, top_k, stream);
  }
  TORCH_CHECK(status == 0, "dpr::moe_gate (CUDA): ", dpr_status_string(status), " ", dpr_cuda_last_error());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpr, CUDA, m) { m.impl("moe_gate", &moe_gate_cuda); }
