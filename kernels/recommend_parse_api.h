// C ABI of the /recommend body parser (CPU): a JSON body of one request or a list of them, read straight into
// columns, its history ids mapped to catalogue indices through the item-id index (id_index_api.h) as they are read.
//
// Why: the HTTP service parsed a 512-request body (250 KB) with json.loads, checked it field by field in Python
// and built a Part from 21,000 id strings, about 2 ms holding the GIL on the event-loop thread, while the engine's
// threads needed the GIL between their own steps (an engine call ran 20-40% slower beside it; README, "Load
// test"). Here the same body is read in one call that holds no Python object and, bound through ctypes.CDLL, runs
// without the GIL.
//
// The specification is the Python path it stands in for: serve/lean.py's parse (json.loads and the checks the
// FastAPI route would make) followed by the catalogue lookup of every history id. The parser only ever accepts:
// a body outside the plain case it reads (see DPR_PARSE_DECLINED below) is declined, and the caller then runs
// that Python path, which answers it as before (every refusal keeps its wording). tests/test_recommend_parse.py
// holds the two equal on the accepted bodies and checks the declines, with fuzzed bodies.
//
// The plain case: a JSON object, or a non-empty array of objects; each object has "history" (an array of
// strings) and at most "prompt" / "negative_prompt" (a string or null), "k" (an integer of at most 18 digits),
// "exclude_history" (true or false) and "hard_filter" (null only), each key once and written without escapes.
// Strings may hold any escape JSON allows (a surrogate pair for one code point; a lone surrogate is declined, as
// the Python path declines it) and UTF-8 text (strictly valid: no overlong form, no surrogate, nothing past
// U+10FFFF). JSON whitespace anywhere between tokens; nothing but whitespace after the value.
#pragma once
#include <stdint.h>

#include "id_index_api.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
  DPR_PARSE_OK = 0,
  DPR_PARSE_NULL_POINTER = 1,
  DPR_PARSE_DECLINED = 2,       // not the plain case (malformed, another type, key or value, a hard filter...)
  DPR_PARSE_UNKNOWN_ID = 3,     // plain, but a history id is not in the catalogue: *where = its ordinal
  DPR_PARSE_SHORT_BUFFER = 4,   // more rows, ids or strings than the capacities given
  DPR_PARSE_OUT_OF_MEMORY = 5,
};

const char* dpr_recommend_parse_status_string(int status);

// Parse body[0 .. len). On DPR_PARSE_OK, with R rows, I ids and S distinct strings:
//   offsets[0 .. R]      row r's history is items[offsets[r] .. offsets[r + 1]) (catalogue indices 1..N)
//   ks[r], exclude[r]    k (default 10) and exclude_history (0/1, default 1)
//   prompt[r], negative[r]  -1 (absent or null) or the index of the row's text among the distinct strings
//   str_offsets[0 .. S]  string s is str_bytes[str_offsets[s] .. str_offsets[s + 1]), UTF-8, escapes decoded
//   counts = {R, I, S, single}: single is 1 when the body was one object, 0 for an array
// Capacities: max_rows rows (offsets: max_rows + 1), max_ids ids, max_strings strings (str_offsets:
// max_strings + 1), and str_bytes must hold len bytes (decoded text is never longer than the body).
// *where: the byte offset at which the body was declined, or the ordinal of the first unknown id.
int dpr_recommend_parse(const dpr_id_index* index, const char* body, int64_t len, int64_t max_rows, int64_t max_ids,
                        int64_t max_strings, int64_t* offsets, int64_t* items, int64_t* ks, uint8_t* exclude,
                        int32_t* prompt, int32_t* negative, int64_t* str_offsets, char* str_bytes, int64_t* counts,
                        int64_t* where);

#ifdef __cplusplus
}
#endif
