// ONNX Runtime custom-op library: dpr::FusedMoEGate (Lite custom-op API).
//
//   FusedMoEGate(z, w_router, b_router, expert_out, polarity, residual) -> out
//   attributes: experts_per_polarity (int), top_k (int); T in {float, float16}, polarity int64.
//
// Registered for the CPU EP (the CPU twin) and, when compiled with -DDPR_WITH_CUDA and linked with the
// nvcc-built launchers, for the CUDA EP. Built against ORT 1.21 headers; it reaches ORT only through
// OrtApiBase (ORT_API_MANUAL_INIT) and asks for API version min(ORT_API_VERSION, what ORT offers), so
// it loads in newer onnxruntime releases.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "fused_moe_gate.h"
#include "fused_moe_gate_api.h"

namespace {

const char* kDomain = "dpr";
const char* kOpName = "FusedMoEGate";

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

Ort::Status invalid(const std::string& msg) {
  const std::string full = std::string("dpr::FusedMoEGate: ") + msg;
  return Ort::Status(full.c_str(), ORT_INVALID_ARGUMENT);
}

// Validates the six input shapes and the attributes; fills B, d, E.
Ort::Status check_shapes(const std::vector<int64_t>& z, const std::vector<int64_t>& w, const std::vector<int64_t>& b,
                         const std::vector<int64_t>& y, const std::vector<int64_t>& p, const std::vector<int64_t>& r,
                         int64_t n, int64_t k, int64_t& B, int64_t& d, int64_t& E) {
  if (z.size() != 2) return invalid("z must be 2-D (B, d), got shape " + shape_str(z));
  B = z[0];
  d = z[1];
  if (y.size() != 3) return invalid("expert_out must be 3-D (B, E, d), got shape " + shape_str(y));
  E = y[1];
  if (y[0] != B || y[2] != d)
    return invalid("expert_out shape " + shape_str(y) + " does not match z " + shape_str(z) + " as (B, E, d)");
  if (w.size() != 2 || w[0] != d || w[1] != E)
    return invalid("w_router must be (d, E) = " + shape_str({d, E}) + ", got " + shape_str(w));
  if (b.size() != 1 || b[0] != E) return invalid("b_router must be (E,) = " + shape_str({E}) + ", got " + shape_str(b));
  if (p.size() != 1 || p[0] != B)
    return invalid("polarity must be (B,) = " + shape_str({B}) + " int64, got " + shape_str(p));
  if (r.size() != 2 || r[0] != B || r[1] != d)
    return invalid("residual must be (B, d) = " + shape_str({B, d}) + ", got " + shape_str(r));
  if (n < 1 || n > DPR_MAX_EXPERTS_PER_POLARITY)
    return invalid("attribute experts_per_polarity must be in 1..32, got " + std::to_string(n));
  if (E != 2 * n)
    return invalid("expert_out has " + std::to_string(E) + " experts, expected 2 * experts_per_polarity = " +
                   std::to_string(2 * n));
  if (k < 1 || k > n)
    return invalid("attribute top_k must be in 1.." + std::to_string(n) + ", got " + std::to_string(k));
  if (d < 1) return invalid("d must be >= 1");
  return Ort::Status{nullptr};
}

template <typename T>
struct Storage;  // ORT element type -> the C API's element type
template <>
struct Storage<float> {
  using type = float;
};
template <>
struct Storage<Ort::Float16_t> {
  using type = uint16_t;
};

template <typename T>
int cpu_call(const T* z, const T* w, const T* b, const T* y, const int64_t* p, const T* r, T* o, int64_t B, int64_t d,
             int64_t E, int64_t n, int64_t k);
template <>
int cpu_call<float>(const float* z, const float* w, const float* b, const float* y, const int64_t* p, const float* r,
                    float* o, int64_t B, int64_t d, int64_t E, int64_t n, int64_t k) {
  return dpr_fused_moe_gate_cpu_f32(z, w, b, y, p, r, o, B, d, E, n, k, 0);
}
template <>
int cpu_call<Ort::Float16_t>(const Ort::Float16_t* z, const Ort::Float16_t* w, const Ort::Float16_t* b,
                             const Ort::Float16_t* y, const int64_t* p, const Ort::Float16_t* r, Ort::Float16_t* o,
                             int64_t B, int64_t d, int64_t E, int64_t n, int64_t k) {
  static_assert(sizeof(Ort::Float16_t) == 2, "Float16_t must be 2 bytes");
  return dpr_fused_moe_gate_cpu_f16(reinterpret_cast<const uint16_t*>(z), reinterpret_cast<const uint16_t*>(w),
                                    reinterpret_cast<const uint16_t*>(b), reinterpret_cast<const uint16_t*>(y), p,
                                    reinterpret_cast<const uint16_t*>(r), reinterpret_cast<uint16_t*>(o), B, d, E, n,
                                    k, 0);
}

#ifdef DPR_WITH_CUDA
template <typename T>
int cuda_call(const T* z, const T* w, const T* b, const T* y, const int64_t* p, const T* r, T* o, int64_t B, int64_t d,
              int64_t E, int64_t n, int64_t k, void* stream);
template <>
int cuda_call<float>(const float* z, const float* w, const float* b, const float* y, const int64_t* p, const float* r,
                     float* o, int64_t B, int64_t d, int64_t E, int64_t n, int64_t k, void* stream) {
  return dpr_fused_moe_gate_cuda_f32(z, w, b, y, p, r, o, B, d, E, n, k, stream);
}
template <>
int cuda_call<Ort::Float16_t>(const Ort::Float16_t* z, const Ort::Float16_t* w, const Ort::Float16_t* b,
                              const Ort::Float16_t* y, const int64_t* p, const Ort::Float16_t* r, Ort::Float16_t* o,
                              int64_t B, int64_t d, int64_t E, int64_t n, int64_t k, void* stream) {
  return dpr_fused_moe_gate_cuda_f16(reinterpret_cast<const uint16_t*>(z), reinterpret_cast<const uint16_t*>(w),
                                     reinterpret_cast<const uint16_t*>(b), reinterpret_cast<const uint16_t*>(y), p,
                                     reinterpret_cast<const uint16_t*>(r), reinterpret_cast<uint16_t*>(o), B, d, E, n,
                                     k, stream);
}
#endif

// Reads the two int attributes without throwing across ORT (errors are reported at Compute).
struct Attrs {
  int64_t n = 0, k = 0;
  std::string error;
  Attrs(const OrtApi* api, const OrtKernelInfo* info) {
    OrtStatus* st = api->KernelInfoGetAttribute_int64(info, "experts_per_polarity", &n);
    if (st) {
      error = std::string("missing int attribute experts_per_polarity: ") + api->GetErrorMessage(st);
      api->ReleaseStatus(st);
      return;
    }
    st = api->KernelInfoGetAttribute_int64(info, "top_k", &k);
    if (st) {
      error = std::string("missing int attribute top_k: ") + api->GetErrorMessage(st);
      api->ReleaseStatus(st);
    }
  }
};

template <typename T, bool kCuda>
struct FusedMoEGateKernel {
  Attrs attrs;
  FusedMoEGateKernel(const OrtApi* api, const OrtKernelInfo* info) : attrs(api, info) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<T>& z, const Ort::Custom::Tensor<T>& w,
                      const Ort::Custom::Tensor<T>& b, const Ort::Custom::Tensor<T>& y,
                      const Ort::Custom::Tensor<int64_t>& pol, const Ort::Custom::Tensor<T>& res,
                      Ort::Custom::Tensor<T>& out) {
    try {
      if (!attrs.error.empty()) return invalid(attrs.error);
      int64_t B = 0, d = 0, E = 0;
      Ort::Status st = check_shapes(z.Shape(), w.Shape(), b.Shape(), y.Shape(), pol.Shape(), res.Shape(), attrs.n,
                                    attrs.k, B, d, E);
      if (!st.IsOK()) return st;
      T* o = out.Allocate({B, d});
      if (B == 0) return Ort::Status{nullptr};
      int code;
#ifdef DPR_WITH_CUDA
      if (kCuda) {
        void* stream = Ort::KernelContext(ctx).GetGPUComputeStream();
        code = cuda_call<T>(z.Data(), w.Data(), b.Data(), y.Data(), pol.Data(), res.Data(), o, B, d, E, attrs.n,
                            attrs.k, stream);
        if (code == DPR_ERR_CUDA) {
          const std::string m = std::string("dpr::FusedMoEGate CUDA launch failed: ") + dpr_cuda_last_error();
          return Ort::Status(m.c_str(), ORT_EP_FAIL);
        }
      } else
#endif
      {
        (void)ctx;
        code = cpu_call<T>(z.Data(), w.Data(), b.Data(), y.Data(), pol.Data(), res.Data(), o, B, d, E, attrs.n,
                           attrs.k);
      }
      if (code != DPR_OK) return invalid(dpr_status_message(code));
      return Ort::Status{nullptr};
    } catch (const Ort::Exception& e) {
      return Ort::Status(e);
    } catch (const std::exception& e) {
      return Ort::Status(e);
    }
  }
};

struct Registry {
  std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  Ort::CustomOpDomain domain{nullptr};
};

std::mutex g_mutex;
Registry* g_registry = nullptr;  // created once, lives for the process (ORT keeps raw pointers)

}  // namespace

extern "C" {

// Called by ORT: SessionOptions.register_custom_ops_library(path) / RegisterCustomOpsLibrary.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                   const OrtApiBase* api_base) {
  const OrtApi* api = nullptr;
  // Ask for the newest API both sides know; ORT >= 1.21 returns it for ORT_API_VERSION = 21.
  for (uint32_t v = ORT_API_VERSION; v >= 16 && api == nullptr; --v) api = api_base->GetApi(v);
  if (api == nullptr) return nullptr;  // cannot even report an error without an API table
  Ort::InitApi(api);
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_registry == nullptr) {
      auto reg = std::make_unique<Registry>();
      reg->domain = Ort::CustomOpDomain(kDomain);
      using Ort::Custom::CreateLiteCustomOp;
      reg->ops.emplace_back(CreateLiteCustomOp<FusedMoEGateKernel<float, false>>(kOpName, "CPUExecutionProvider"));
      reg->ops.emplace_back(
          CreateLiteCustomOp<FusedMoEGateKernel<Ort::Float16_t, false>>(kOpName, "CPUExecutionProvider"));
#ifdef DPR_WITH_CUDA
      reg->ops.emplace_back(CreateLiteCustomOp<FusedMoEGateKernel<float, true>>(kOpName, "CUDAExecutionProvider"));
      reg->ops.emplace_back(
          CreateLiteCustomOp<FusedMoEGateKernel<Ort::Float16_t, true>>(kOpName, "CUDAExecutionProvider"));
#endif
      for (auto& op : reg->ops) reg->domain.Add(op.get());
      g_registry = reg.release();
    }
    Ort::UnownedSessionOptions(options).Add(g_registry->domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// For callers that want to check what they loaded.
__attribute__((visibility("default"))) const char* dpr_ort_ops_info(void) {
#ifdef DPR_WITH_CUDA
  return "dpr::FusedMoEGate (CPUExecutionProvider, CUDAExecutionProvider)";
#else
  return "dpr::FusedMoEGate (CPUExecutionProvider)";
#endif
}

}  // extern "C"
