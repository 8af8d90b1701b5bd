// libtriton_dpr.so: dpr as a native Triton backend ("backend: \"dpr\"" in config.pbtxt).
//
// Why: Triton's Python backend runs a model in a stub process, one thread, and moves every request and
// response through shared memory as Python objects; on the 2-core VM that stub was the bottleneck of
// single-request calls (43% of its GIL time in its own request/response code, measured with py-spy). This
// backend runs inside tritonserver: C++ reads every request of a batch, one Python call per batch hands the
// inputs to dpr.serve.triton_native.NativeModel as columns (bytes per input name, plus an int64 table of
// dtypes, shapes and offsets), and C++ writes every response from the columns it gets back. Python runs per
// batch, never per request.
//
// The interpreter is embedded: the Python that built this library (its libpython, its venv via
// program_name, overridable with $DPR_TRITON_PYTHON), started once per tritonserver process without signal
// handlers (tritonserver keeps SIGINT/SIGTERM) and with safe_path (never the working folder on sys.path).
// libpython is promoted to RTLD_GLOBAL so extension modules (numpy, torch) find its symbols.
//
// Contract with Python (dpr/serve/triton_native.py, which documents the same):
//   NativeModel(config_json: str, version_dir: str, instance: str)
//   NativeModel.execute(names: tuple[str], data: tuple[bytes], meta: bytes) ->
//       (errors, spans, widths, kmax, ids, id_offsets, scores, counts)
//   meta: int64 [n, m, 6] per (request, input name): dtype (0 = absent), dims, d0, d1, byte start, byte stop
//   errors: list of n, None or (code: int, message: str); spans int64 [n, 2] row ranges; widths int64 [n];
//   ids: Triton BYTES wire form of the [B, kmax] id table; id_offsets int64 [B*kmax + 1] element starts;
//   scores float32 [B, kmax]; counts int32 [B].
#include <dlfcn.h>

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "triton_backend_api.h"

#ifndef DPR_PYTHON_SONAME
#error "DPR_PYTHON_SONAME (the embedded Python's libpython soname) must be defined by the build"
#endif
#ifndef DPR_PYTHON_EXECUTABLE
#error "DPR_PYTHON_EXECUTABLE (the Python whose venv the model imports from) must be defined by the build"
#endif

#define DPR_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kModule = "dpr.serve.triton_native";
constexpr int kMeta = 6;  // dtype, dims, d0, d1, start, stop

uint64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

TRITONSERVER_Error* error(TRITONSERVER_Error_Code code, const std::string& msg) {
  return TRITONSERVER_ErrorNew(code, msg.c_str());
}

void log(TRITONSERVER_LogLevel level, const std::string& msg) {
  TRITONSERVER_Error* err = TRITONSERVER_LogMessage(level, __FILE__, __LINE__, msg.c_str());
  if (err) TRITONSERVER_ErrorDelete(err);
}

// The pending Python exception as "Type: message" (and the traceback in Triton's log); clears it.
std::string python_error(const char* what) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  std::string msg = what;
  if (type) {
    msg += ": ";
    msg += reinterpret_cast<PyTypeObject*>(type)->tp_name;
  }
  if (value) {
    PyObject* s = PyObject_Str(value);
    if (s) {
      const char* c = PyUnicode_AsUTF8(s);
      if (c && *c) (msg += ": ") += c;
      Py_DECREF(s);
    }
  }
  PyErr_Clear();
  if (PyObject* tbmod = PyImport_ImportModule("traceback")) {
    PyObject* lines = PyObject_CallMethod(tbmod, "format_exception", "OOO", type ? type : Py_None,
                                          value ? value : Py_None, tb ? tb : Py_None);
    if (lines) {
      PyObject* sep = PyUnicode_FromString("");
      PyObject* text = sep ? PyUnicode_Join(sep, lines) : nullptr;
      if (text) log(TRITONSERVER_LOG_ERROR, std::string("dpr backend: ") + PyUnicode_AsUTF8(text));
      Py_XDECREF(text);
      Py_XDECREF(sep);
      Py_DECREF(lines);
    }
    Py_DECREF(tbmod);
  }
  PyErr_Clear();
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  return msg;
}

class Gil {
 public:
  Gil() : state_(PyGILState_Ensure()) {}
  ~Gil() { PyGILState_Release(state_); }
 private:
  PyGILState_STATE state_;
};

std::once_flag python_once;
std::string python_failure;

void start_python() {
  // extension modules resolve Python's symbols globally; tritonserver dlopened us (and libpython) locally
  if (!dlopen(DPR_PYTHON_SONAME, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD)) {
    python_failure = std::string("cannot make ") + DPR_PYTHON_SONAME + " global: " + dlerror();
    return;
  }
  if (Py_IsInitialized()) return;  // another backend of this process embeds Python already: share it
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.install_signal_handlers = 0;  // SIGINT/SIGTERM stay tritonserver's (it drains, then exits)
  config.safe_path = 1;                // never the working folder on sys.path
  config.parse_argv = 0;
  const char* exe = getenv("DPR_TRITON_PYTHON");
  PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, exe && *exe ? exe : DPR_PYTHON_EXECUTABLE);
  if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(st)) {
    python_failure = std::string("starting Python failed: ") + (st.err_msg ? st.err_msg : "?");
    return;
  }
  PyEval_SaveThread();  // the GIL is taken per call, from Triton's threads
}

struct Instance {
  PyObject* model = nullptr;  // a NativeModel
};

// Per-request inputs gathered into one column per input name.
struct Columns {
  std::vector<std::string> names;
  std::vector<std::string> data;

  size_t slot(const char* name) {
    for (size_t j = 0; j < names.size(); ++j)
      if (names[j] == name) return j;
    names.emplace_back(name);
    data.emplace_back();
    return names.size() - 1;
  }
};

// BYTES elements in [p, p + n): their count, or -1 when a length prefix runs past the end.
int64_t count_bytes_elements(const char* p, uint64_t n) {
  int64_t count = 0;
  uint64_t off = 0;
  while (off < n) {
    if (off + 4 > n) return -1;
    uint32_t len;
    std::memcpy(&len, p + off, 4);
    off += 4;
    if (len > n - off) return -1;
    off += len;
    ++count;
  }
  return count;
}

// Read one request's inputs into the columns; "" or the reason the request is refused.
std::string gather(TRITONBACKEND_Request* request, Columns& cols, std::vector<int64_t>& meta) {
  uint32_t count = 0;
  if (TRITONSERVER_Error* e = TRITONBACKEND_RequestInputCount(request, &count)) {
    std::string m = TRITONSERVER_ErrorMessage(e);
    TRITONSERVER_ErrorDelete(e);
    return "reading the request failed: " + m;
  }
  for (uint32_t i = 0; i < count; ++i) {
    TRITONBACKEND_Input* input;
    const char* name;
    TRITONSERVER_DataType dtype;
    const int64_t* shape;
    uint32_t dims = 0, buffers = 0;
    uint64_t size = 0;
    TRITONSERVER_Error* e = TRITONBACKEND_RequestInputByIndex(request, i, &input);
    if (!e) e = TRITONBACKEND_InputProperties(input, &name, &dtype, &shape, &dims, &size, &buffers);
    if (e) {
      std::string m = TRITONSERVER_ErrorMessage(e);
      TRITONSERVER_ErrorDelete(e);
      return "reading the request failed: " + m;
    }
    if (dims < 1 || dims > 2) {
      std::string s = "[";
      for (uint32_t d = 0; d < dims; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
      return std::string("input '") + name + "' must have shape [batch, n], got " + s + "]";
    }
    size_t j = cols.slot(name);
    if (meta.size() < (j + 1) * kMeta) meta.resize((j + 1) * kMeta, 0);
    std::string& col = cols.data[j];
    const size_t start = col.size();
    for (uint32_t b = 0; b < buffers; ++b) {
      const void* buf;
      uint64_t len;
      TRITONSERVER_MemoryType mt = TRITONSERVER_MEMORY_CPU;
      int64_t mt_id = 0;
      if ((e = TRITONBACKEND_InputBuffer(input, b, &buf, &len, &mt, &mt_id))) {
        std::string m = TRITONSERVER_ErrorMessage(e);
        TRITONSERVER_ErrorDelete(e);
        col.resize(start);
        return std::string("reading input '") + name + "' failed: " + m;
      }
      if (mt == TRITONSERVER_MEMORY_GPU) {
        col.resize(start);
        return std::string("input '") + name + "' is in GPU memory; the dpr backend reads CPU tensors";
      }
      col.append(static_cast<const char*>(buf), len);
    }
    const int64_t d0 = shape[0], d1 = dims == 2 ? shape[1] : 1;
    if (dtype == TRITONSERVER_TYPE_BYTES) {
      const int64_t n = count_bytes_elements(col.data() + start, col.size() - start);
      if (n != d0 * d1) {
        col.resize(start);
        return std::string("input '") + name + "': its BYTES data " +
               (n < 0 ? std::string("is truncated") : "holds " + std::to_string(n) + " elements") +
               " for shape [" + std::to_string(d0) + ", " + std::to_string(d1) + "]";
      }
    }
    int64_t* m = &meta[j * kMeta];
    m[0] = dtype;
    m[1] = dims;
    m[2] = d0;
    m[3] = d1;
    m[4] = static_cast<int64_t>(start);
    m[5] = static_cast<int64_t>(col.size());
  }
  return "";
}

// What Python answered, copied out of its objects (so responses are written without the GIL).
struct Answers {
  std::vector<int> code;  // -1: answered; else a TRITONSERVER_Error_Code
  std::vector<std::string> message;
  std::vector<int64_t> spans, widths, id_offsets;
  std::string ids;
  std::vector<float> scores;
  std::vector<int32_t> counts;
  int64_t kmax = 0;
};

template <typename T>
bool copy_bytes(PyObject* obj, std::vector<T>& out) {
  char* p;
  Py_ssize_t n;
  if (!PyBytes_Check(obj) || PyBytes_AsStringAndSize(obj, &p, &n) < 0 || n % sizeof(T)) return false;
  out.resize(n / sizeof(T));
  std::memcpy(out.data(), p, n);
  return true;
}

// Parse NativeModel.execute's tuple; "" or what is wrong with it.
std::string read_answers(PyObject* res, size_t n, Answers& a) {
  if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 8) return "NativeModel.execute must return an 8-tuple";
  PyObject* errors = PyTuple_GET_ITEM(res, 0);
  if (!PyList_Check(errors) || static_cast<size_t>(PyList_GET_SIZE(errors)) != n)
    return "NativeModel.execute: errors must be a list with one entry per request";
  a.code.assign(n, -1);
  a.message.assign(n, "");
  for (size_t i = 0; i < n; ++i) {
    PyObject* e = PyList_GET_ITEM(errors, i);
    if (e == Py_None) continue;
    const char* msg;
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2 || !(msg = PyUnicode_AsUTF8(PyTuple_GET_ITEM(e, 1)))) {
      PyErr_Clear();
      return "NativeModel.execute: an error must be (code, message)";
    }
    a.code[i] = static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(e, 0)));
    a.message[i] = msg;
  }
  a.kmax = PyLong_AsLongLong(PyTuple_GET_ITEM(res, 3));
  if (PyErr_Occurred() || a.kmax < 0) {
    PyErr_Clear();
    return "NativeModel.execute: kmax must be an int >= 0";
  }
  char* ids;
  Py_ssize_t ids_len;
  if (!copy_bytes(PyTuple_GET_ITEM(res, 1), a.spans) || !copy_bytes(PyTuple_GET_ITEM(res, 2), a.widths) ||
      !copy_bytes(PyTuple_GET_ITEM(res, 5), a.id_offsets) || !copy_bytes(PyTuple_GET_ITEM(res, 6), a.scores) ||
      !copy_bytes(PyTuple_GET_ITEM(res, 7), a.counts) || !PyBytes_Check(PyTuple_GET_ITEM(res, 4)) ||
      PyBytes_AsStringAndSize(PyTuple_GET_ITEM(res, 4), &ids, &ids_len) < 0) {
    PyErr_Clear();
    return "NativeModel.execute: spans, widths, ids, id_offsets, scores and counts must be bytes";
  }
  a.ids.assign(ids, ids_len);
  const size_t rows = a.counts.size();
  const size_t cells = rows * static_cast<size_t>(a.kmax);
  if (a.spans.size() != 2 * n || a.widths.size() != n || a.scores.size() != cells || a.id_offsets.size() != cells + 1 ||
      (cells && (a.id_offsets[0] < 0 || a.id_offsets[cells] > ids_len)))
    return "NativeModel.execute: the output columns' sizes disagree";
  for (size_t i = 0; i < n; ++i) {
    if (a.code[i] >= 0) continue;
    if (a.spans[2 * i] < 0 || a.spans[2 * i] > a.spans[2 * i + 1] || static_cast<size_t>(a.spans[2 * i + 1]) > rows ||
        a.widths[i] < 0 || a.widths[i] > a.kmax)
      return "NativeModel.execute: a request's rows or width are out of range";
  }
  return "";
}

// Fill one answered request's response with the outputs it asked for; nullptr or the error.
TRITONSERVER_Error* write_outputs(TRITONBACKEND_Request* request, TRITONBACKEND_Response* response, const Answers& a,
                                  size_t i) {
  const int64_t r0 = a.spans[2 * i], r1 = a.spans[2 * i + 1], kw = a.widths[i], rows = r1 - r0;
  uint32_t nout = 0;
  if (TRITONSERVER_Error* e = TRITONBACKEND_RequestOutputCount(request, &nout)) return e;
  for (uint32_t o = 0; o < nout; ++o) {
    const char* name;
    if (TRITONSERVER_Error* e = TRITONBACKEND_RequestOutputName(request, o, &name)) return e;
    const std::string out = name;
    TRITONSERVER_DataType dt;
    int64_t shape[2] = {rows, kw};
    uint64_t size = 0;
    if (out == "item_ids") {
      dt = TRITONSERVER_TYPE_BYTES;
      for (int64_t r = r0; r < r1; ++r) size += a.id_offsets[r * a.kmax + kw] - a.id_offsets[r * a.kmax];
    } else if (out == "scores") {
      dt = TRITONSERVER_TYPE_FP32;
      size = static_cast<uint64_t>(rows * kw) * sizeof(float);
    } else if (out == "counts") {
      dt = TRITONSERVER_TYPE_INT32;
      shape[1] = 1;
      size = static_cast<uint64_t>(rows) * sizeof(int32_t);
    } else {
      return error(TRITONSERVER_ERROR_INVALID_ARG, "unknown output '" + out + "'; dpr answers item_ids, scores, counts");
    }
    TRITONBACKEND_Output* output;
    void* buf;
    TRITONSERVER_MemoryType mt = TRITONSERVER_MEMORY_CPU;
    int64_t mt_id = 0;
    if (TRITONSERVER_Error* e = TRITONBACKEND_ResponseOutput(response, &output, name, dt, shape, 2)) return e;
    if (TRITONSERVER_Error* e = TRITONBACKEND_OutputBuffer(output, &buf, size, &mt, &mt_id)) return e;
    if (mt == TRITONSERVER_MEMORY_GPU)
      return error(TRITONSERVER_ERROR_INTERNAL, "Triton gave a GPU buffer for output '" + out + "'");
    char* p = static_cast<char*>(buf);
    for (int64_t r = r0; r < r1; ++r) {
      if (dt == TRITONSERVER_TYPE_BYTES) {
        const int64_t s = a.id_offsets[r * a.kmax], z = a.id_offsets[r * a.kmax + kw];
        std::memcpy(p, a.ids.data() + s, z - s);
        p += z - s;
      } else if (dt == TRITONSERVER_TYPE_FP32) {
        std::memcpy(p, &a.scores[r * a.kmax], kw * sizeof(float));
        p += kw * sizeof(float);
      } else {
        std::memcpy(p, &a.counts[r], sizeof(int32_t));
        p += sizeof(int32_t);
      }
    }
  }
  return nullptr;
}

void respond(TRITONBACKEND_Request* request, TRITONSERVER_Error* err, const Answers* a, size_t i) {
  TRITONBACKEND_Response* response;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ResponseNew(&response, request)) {
    log(TRITONSERVER_LOG_ERROR, std::string("dpr backend: no response object: ") + TRITONSERVER_ErrorMessage(e));
    TRITONSERVER_ErrorDelete(e);
    if (err) TRITONSERVER_ErrorDelete(err);
    return;
  }
  if (!err && a) err = write_outputs(request, response, *a, i);
  if (TRITONSERVER_Error* e = TRITONBACKEND_ResponseSend(response, TRITONSERVER_RESPONSE_COMPLETE_FINAL, err)) {
    log(TRITONSERVER_LOG_ERROR, std::string("dpr backend: sending a response failed: ") + TRITONSERVER_ErrorMessage(e));
    TRITONSERVER_ErrorDelete(e);
  }
  if (err) TRITONSERVER_ErrorDelete(err);
}

}  // namespace

DPR_EXPORT TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend*) {
  uint32_t major = 0, minor = 0;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ApiVersion(&major, &minor)) return e;
  if (major != DPR_TRITONBACKEND_MAJOR || minor < DPR_TRITONBACKEND_MINOR)
    return error(TRITONSERVER_ERROR_UNSUPPORTED,
                 "the dpr backend needs Triton's backend API " + std::to_string(DPR_TRITONBACKEND_MAJOR) + "." +
                     std::to_string(DPR_TRITONBACKEND_MINOR) + " or a newer 1.x; this tritonserver has " +
                     std::to_string(major) + "." + std::to_string(minor));
  std::call_once(python_once, start_python);
  if (!python_failure.empty()) return error(TRITONSERVER_ERROR_INTERNAL, "dpr backend: " + python_failure);
  return nullptr;
}

DPR_EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(TRITONBACKEND_ModelInstance* instance) {
  TRITONBACKEND_Model* model;
  TRITONSERVER_Message* config;
  const char *iname, *location, *cfg_json;
  size_t cfg_len;
  uint64_t version;
  TRITONBACKEND_ArtifactType artifact;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceModel(instance, &model)) return e;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceName(instance, &iname)) return e;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ModelVersion(model, &version)) return e;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ModelRepository(model, &artifact, &location)) return e;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ModelConfig(model, 1, &config)) return e;
  if (TRITONSERVER_Error* e = TRITONSERVER_MessageSerializeToJson(config, &cfg_json, &cfg_len)) {
    TRITONSERVER_MessageDelete(config);
    return e;
  }
  const std::string json(cfg_json, cfg_len);
  TRITONSERVER_MessageDelete(config);
  const std::string version_dir = std::string(location) + "/" + std::to_string(version);

  auto* st = new Instance;
  std::string failure;
  {
    Gil gil;
    PyObject* mod = PyImport_ImportModule(kModule);
    PyObject* cls = mod ? PyObject_GetAttrString(mod, "NativeModel") : nullptr;
    st->model = cls ? PyObject_CallFunction(cls, "s#ss", json.data(), static_cast<Py_ssize_t>(json.size()),
                                            version_dir.c_str(), iname)
                    : nullptr;
    if (!st->model) failure = python_error(mod ? "loading the dpr model failed" : "importing dpr.serve.triton_native failed");
    Py_XDECREF(cls);
    Py_XDECREF(mod);
  }
  if (!failure.empty()) {
    delete st;
    return error(TRITONSERVER_ERROR_INTERNAL, failure);
  }
  return TRITONBACKEND_ModelInstanceSetState(instance, st);
}

DPR_EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(TRITONBACKEND_ModelInstance* instance) {
  void* p = nullptr;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceState(instance, &p)) return e;
  auto* st = static_cast<Instance*>(p);
  if (!st) return nullptr;
  {
    Gil gil;
    if (st->model) {
      PyObject* r = PyObject_CallMethod(st->model, "close", nullptr);
      if (!r) log(TRITONSERVER_LOG_WARN, python_error("closing the dpr model failed"));
      Py_XDECREF(r);
      Py_DECREF(st->model);
    }
  }
  delete st;
  return nullptr;
}

DPR_EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(TRITONBACKEND_ModelInstance* instance,
                                                                  TRITONBACKEND_Request** requests,
                                                                  const uint32_t request_count) {
  const uint64_t exec_start = now_ns();
  void* p = nullptr;
  if (TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceState(instance, &p)) return e;
  auto* st = static_cast<Instance*>(p);

  // 1. read every request's inputs into columns; a request that cannot be read is refused alone
  Columns cols;
  std::vector<std::string> refused(request_count);
  std::vector<size_t> passed;  // requests handed to Python, in order
  std::vector<std::vector<int64_t>> metas;
  for (uint32_t i = 0; i < request_count; ++i) {
    std::vector<int64_t> meta;
    std::vector<size_t> sizes;  // each column's size before this request, to drop its bytes if it is refused
    for (auto& d : cols.data) sizes.push_back(d.size());
    refused[i] = gather(requests[i], cols, meta);
    if (!refused[i].empty()) {
      for (size_t j = 0; j < sizes.size(); ++j) cols.data[j].resize(sizes[j]);  // drop what it had appended
      for (size_t j = sizes.size(); j < cols.data.size(); ++j) cols.data[j].clear();
      continue;
    }
    passed.push_back(i);
    metas.push_back(std::move(meta));
  }

  // 2. one Python call for the batch
  const uint64_t compute_start = now_ns();
  Answers answers;
  std::string failure;
  const size_t n = passed.size(), m = cols.names.size();
  if (n) {
    std::vector<int64_t> table(n * m * kMeta, 0);
    for (size_t r = 0; r < n; ++r) std::memcpy(&table[r * m * kMeta], metas[r].data(), metas[r].size() * sizeof(int64_t));
    Gil gil;
    PyObject* names = PyTuple_New(m);
    PyObject* data = PyTuple_New(m);
    for (size_t j = 0; j < m; ++j) {
      PyTuple_SET_ITEM(names, j, PyUnicode_FromStringAndSize(cols.names[j].data(), cols.names[j].size()));
      PyTuple_SET_ITEM(data, j, PyBytes_FromStringAndSize(cols.data[j].data(), cols.data[j].size()));
    }
    PyObject* meta = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(table.data()), table.size() * sizeof(int64_t));
    PyObject* res = (names && data && meta && !PyErr_Occurred())
                        ? PyObject_CallMethod(st->model, "execute", "OOO", names, data, meta)
                        : nullptr;
    if (!res)
      failure = python_error("the dpr model failed");
    else
      failure = read_answers(res, n, answers);
    Py_XDECREF(res);
    Py_XDECREF(meta);
    Py_XDECREF(data);
    Py_XDECREF(names);
  }
  const uint64_t compute_end = now_ns();

  // 3. one response per request, then its statistics and release
  uint64_t rows = 0;
  for (uint32_t i = 0, r = 0; i < request_count; ++i) {
    TRITONSERVER_Error* err = nullptr;
    const Answers* a = nullptr;
    size_t at = 0;
    if (!refused[i].empty()) {
      err = error(TRITONSERVER_ERROR_INVALID_ARG, refused[i]);
    } else {
      at = r++;
      if (!failure.empty())
        err = error(TRITONSERVER_ERROR_INTERNAL, failure);
      else if (answers.code[at] >= 0)
        err = error(static_cast<TRITONSERVER_Error_Code>(answers.code[at]), answers.message[at]);
      else {
        a = &answers;
        rows += answers.spans[2 * at + 1] - answers.spans[2 * at];
      }
    }
    const bool ok = err == nullptr;
    respond(requests[i], err, a, at);
    const uint64_t exec_end = now_ns();
    if (TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceReportStatistics(instance, requests[i], ok, exec_start,
                                                                            compute_start, compute_end, exec_end))
      TRITONSERVER_ErrorDelete(e);
    if (TRITONSERVER_Error* e = TRITONBACKEND_RequestRelease(requests[i], TRITONSERVER_REQUEST_RELEASE_ALL)) {
      log(TRITONSERVER_LOG_ERROR, std::string("dpr backend: releasing a request failed: ") + TRITONSERVER_ErrorMessage(e));
      TRITONSERVER_ErrorDelete(e);
    }
  }
  if (rows) {
    if (TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, rows, exec_start,
                                                                                 compute_start, compute_end, now_ns()))
      TRITONSERVER_ErrorDelete(e);
  }
  return nullptr;
}
