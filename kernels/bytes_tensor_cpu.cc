// Triton BYTES tensors (bytes_tensor_api.h): the splitter and the gather.
#include <cstring>

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

int dpr_bytes_tensor_gather(const uint8_t* table, const int64_t* table_offsets, int64_t n_table,
                            const int64_t* index, int64_t n, uint8_t* out, int64_t capacity, int64_t* out_offsets,
                            int64_t* out_len) {
  if (out_len == nullptr) return DPR_BYTES_NULL_POINTER;
  *out_len = 0;
  if (n < 0 || n_table < 0 || capacity < 0) return DPR_BYTES_BAD_ARGUMENT;
  if (out_offsets == nullptr || (n > 0 && (table == nullptr || table_offsets == nullptr || index == nullptr)))
    return DPR_BYTES_NULL_POINTER;
  int64_t at = 0;
  for (int64_t e = 0; e < n; ++e) {
    const int64_t i = index[e];
    if (i < 0 || i >= n_table) {
      *out_len = e;
      return DPR_BYTES_BAD_ARGUMENT;
    }
    const int64_t a = table_offsets[i], len = table_offsets[i + 1] - a;
    if (len > capacity - at) return DPR_BYTES_TOO_MANY;
    out_offsets[e] = at;
    if (len > 0) std::memcpy(out + at, table + a, static_cast<size_t>(len));
    at += len;
  }
  out_offsets[n] = at;
  *out_len = at;
  return DPR_BYTES_OK;
}

}  // extern "C"
