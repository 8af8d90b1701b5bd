// Triton BYTES tensor splitter (bytes_tensor_api.h).
#include "bytes_tensor_api.h"

extern "C" {

const char* dpr_bytes_tensor_status_string(int status) {
  switch (status) {
    case DPR_BYTES_OK: return "ok";
    case DPR_BYTES_NULL_POINTER: return "a required pointer is null";
    case DPR_BYTES_TRUNCATED: return "the data is truncated (an element's length runs past the end)";
    case DPR_BYTES_TOO_MANY: return "more elements than the output arrays hold";
    case DPR_BYTES_BAD_ARGUMENT: return "bad length or capacity";
    default: return "unknown status";
  }
}

int dpr_bytes_tensor_split(const uint8_t* buf, int64_t n, int64_t* starts, int64_t* ends, int64_t capacity,
                           int64_t* count) {
  if (count == nullptr) return DPR_BYTES_NULL_POINTER;
  *count = 0;
  if (n < 0 || capacity < 0) return DPR_BYTES_BAD_ARGUMENT;
  if (n > 0 && (buf == nullptr || starts == nullptr || ends == nullptr)) return DPR_BYTES_NULL_POINTER;
  int64_t off = 0, c = 0;
  int status = DPR_BYTES_OK;
  while (off < n) {
    if (n - off < 4) {
      status = DPR_BYTES_TRUNCATED;
      break;
    }
    const uint64_t len = static_cast<uint64_t>(buf[off]) | static_cast<uint64_t>(buf[off + 1]) << 8 |
                         static_cast<uint64_t>(buf[off + 2]) << 16 | static_cast<uint64_t>(buf[off + 3]) << 24;
    off += 4;
    if (len > static_cast<uint64_t>(n - off)) {
      status = DPR_BYTES_TRUNCATED;
      break;
    }
    if (c >= capacity) {
      status = DPR_BYTES_TOO_MANY;
      break;
    }
    starts[c] = off;
    off += static_cast<int64_t>(len);
    ends[c] = off;
    ++c;
  }
  *count = c;               // on an error: the whole elements before it
  return status;
}

}  // extern "C"
