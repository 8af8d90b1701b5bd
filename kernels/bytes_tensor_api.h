// C ABI of the Triton BYTES tensor splitter (CPU): the wire form of a BYTES tensor (each element: its length as
// 4 little-endian bytes, then its bytes, in C order) into each element's [start, end) in the buffer.
//
// Triton's Python backend turns every BYTES input into a numpy array of bytes objects with a Python loop (two
// struct calls per element); the dpr model's 512-row history input holds ~25,000 elements, and that loop took
// 13.7 ms of the model's Python per call, as much as a third of the engine's own time (py-spy on the backend
// stub, 2-core VM). Splitting here leaves Python one slice per element. serve/triton_python.py's
// _deserialize_bytes_tensor uses it (and its own loop when this library is not built);
// tests/test_serve_triton_bytes.py holds both equal to Triton's deserialize_bytes_tensor.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  DPR_BYTES_OK = 0,
  DPR_BYTES_NULL_POINTER = 1,
  DPR_BYTES_TRUNCATED = 2,   // a length prefix or an element runs past the end of the buffer
  DPR_BYTES_TOO_MANY = 3,    // more elements than `capacity` (n / 4 is always enough)
  DPR_BYTES_BAD_ARGUMENT = 4,
};

const char* dpr_bytes_tensor_status_string(int status);

// starts[i], ends[i]: element i's bytes are buf[starts[i] .. ends[i]); *count: the number of elements. On an
// error, *count is the number of whole elements before the problem.
int dpr_bytes_tensor_split(const uint8_t* buf, int64_t n, int64_t* starts, int64_t* ends, int64_t capacity,
                           int64_t* count);

// The wire form of a BYTES tensor whose element e is element index[e] of a table of BYTES elements (the
// catalogue's item ids, each already in wire form): table element i is table[table_offsets[i] ..
// table_offsets[i + 1]), its 4-byte length included. out_offsets[e] = element e's start in out (n + 1 values, the
// last = *out_len, the bytes written). An index outside [0, n_table): DPR_BYTES_BAD_ARGUMENT, *out_len = that
// element's position e; more than capacity bytes: DPR_BYTES_TOO_MANY. The native Triton backend writes its
// item_ids output with it (README "Serving"), where a bytes object per id and a join cost ~1 us per answered row.
int dpr_bytes_tensor_gather(const uint8_t* table, const int64_t* table_offsets, int64_t n_table,
                            const int64_t* index, int64_t n, uint8_t* out, int64_t capacity, int64_t* out_offsets,
                            int64_t* out_len);
#ifdef __cplusplus
}
#endif
