// C ABI of the /recommend answer renderer (CPU): a batch's ranked items as the JSON text the HTTP service sends.
//
// The service renders every answer on its event-loop thread, holding the GIL, while the engine's threads need it
// for their own Python steps: the Python renderer (serve/render.py's recommend_json: per-item fragments joined
// with map/zip, repr() per score) took 4.4 ms of a 512-request call, here about a tenth of that. The Python
// renderer is the specification and the fallback when this library is not built; tests/test_json_render.py
// holds the two byte for byte equal, and the score text equal to Python's repr() on float32 and float64 values,
// edge cases included.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  DPR_RENDER_OK = 0,
  DPR_RENDER_NULL_POINTER = 1,
  DPR_RENDER_BAD_ARGUMENT = 2,  // rows < 0, cols < 0, n_frags < 1, a count outside [0, cols], bad offsets
  DPR_RENDER_BAD_INDEX = 3,     // a ranked item index outside [1, n_frags - 1]
  DPR_RENDER_SHORT_BUFFER = 4,  // capacity too small (the caller's bound was wrong): nothing usable written
};

const char* dpr_render_status_string(int status);

// Python's repr() of v (the shortest text that reads back as v; fixed notation for exponents -4..15, else
// d.ddde+XX; "inf", "-inf", "nan") into out, which must hold 32 bytes. Returns the text's length.
int dpr_render_double_repr(double v, char* out);

// json.dumps() of the n float32 values as Python floats: "[" + each one's repr() joined by ", " + "]", with
// NaN, Infinity and -Infinity for the values JSON has no number for (json.dumps' allow_nan words). A 512 x 10
// score tensor of the v2 route's JSON answer took json.dumps 1.7 ms on the 2-core VM. Writes at most `capacity`
// bytes (26 per value and 2 suffice) and the length to *written.
int dpr_render_float_list(const float* v, int64_t n, char* out, int64_t capacity, int64_t* written);

// "[" + the fragments of items indices[0..n) joined by ", " + "]": json.dumps() of a list whose elements' texts are
// the fragments (the v2 route's JSON item_ids: each catalogue id's json.dumps() text, index 0 the padding's "").
// A 512 x 10 id tensor took json.dumps 0.2 ms on the 2-core VM, on the event loop holding the GIL. An index outside
// [0, n_frags) is DPR_RENDER_BAD_INDEX. Writes at most `capacity` bytes (2 + n * (longest fragment + 2) suffice)
// and the length to *written.
int dpr_render_fragment_list(const int64_t* indices, int64_t n, const char* frags, const int64_t* frag_offsets,
                             int64_t n_frags, int64_t frags_len, char* out, int64_t capacity, int64_t* written);

// Rows 0..rows-1 of an answer, each
//   {"k": K, "count": C, "short_reason": REASON, "items": [ITEM, ...]}
// and each of its first C items
//   {"rank": R, FRAGMENT, "score": SCORE}
// with rows joined by ", " (no enclosing brackets). indices / scores: (rows, cols) row-major; counts: (rows,);
// FRAGMENT of item i: frags[frag_offsets[i] .. frag_offsets[i + 1]) (n_frags fragments in frags_len bytes;
// index 0 is the padding and never rendered); REASON of row r: reasons[reason_offsets[r] .. reason_offsets[r + 1]), already JSON;
// SCORE: repr() of the float32 score as a double. Writes at most `capacity` bytes to out and the length to
// *written; row_ends (rows entries, or NULL) gets the offset just past each row's text, so a caller can cut the
// answer of one request out of a batch's (the HTTP service's batching front, serve/http_front.py). Every count,
// index and offset it reads is checked before it is used.
int dpr_render_recommend_rows(const int64_t* indices, const float* scores, int64_t rows, int64_t cols,
                              const int64_t* counts, int64_t k, const char* frags, const int64_t* frag_offsets,
                              int64_t n_frags, int64_t frags_len, const char* reasons,
                              const int64_t* reason_offsets, char* out, int64_t capacity, int64_t* written,
                              int64_t* row_ends);

#ifdef __cplusplus
}
#endif
