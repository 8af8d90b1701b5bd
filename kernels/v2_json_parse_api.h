// C ABI of the v2 route's JSON reader (CPU): a KServe v2 infer request in JSON tensors, its plain case read in one
// pass, the history's ids mapped to catalogue indices through the item-id index (id_index_api.h).
//
// Why: the HTTP service read a 512-row call (555 KB, 102,400 history elements) with json.loads (1.8 ms) and then
// joined and looked up the history's strings (1.4 ms), on the event-loop thread holding the GIL, beside an engine
// call of 18 ms that needs the GIL between its steps. Here the same body is read in one call that holds no Python
// object and, bound through ctypes.CDLL, runs without the GIL.
//
// The specification is the Python reader it stands in for, serve/v2_columns.py's read_json (json.loads, then the
// plain case's checks): the caller turns what this returns into the same Part, or declines where that reader
// declines. This parser only ever accepts: a body outside the plain case is DPR_V2P_DECLINED and the caller runs
// the Python path. tests/test_v2_json_parse.py holds the two equal on fuzzed bodies and checks the declines.
//
// The plain case: one JSON object (JSON whitespace around tokens, nothing after it) whose keys appear once each:
//   "inputs": an array of objects, each with "name" (one of history, prompt, negative_prompt, k,
//     exclude_history; written before "data"), "datatype" (one of the v2 datatype names), "shape" (one or two
//     integers >= 0) and "data": an array of scalars, or an array of arrays of scalars (one per row, read
//     row-major); the history's and the prompts' scalars strings, k's integers of at most 18 digits,
//     exclude_history's true / false; no "parameters"; any other key's value checked and skipped;
//   "id", "outputs", "parameters": any JSON value, checked, its text's span returned (Python reads those);
//   any other key: its value checked and skipped.
// Keys are written without escapes. Strings hold any escape JSON allows (a lone surrogate: declined) and strictly
// valid UTF-8. Values nest at most 64 deep. NaN, Infinity and numbers outside JSON's grammar: declined.
#pragma once
#include <stdint.h>

#include "id_index_api.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
  DPR_V2P_OK = 0,
  DPR_V2P_NULL_POINTER = 1,
  DPR_V2P_DECLINED = 2,       // not the plain case (*where: the byte offset where the reader stopped)
  DPR_V2P_UNKNOWN_ID = 3,     // a non-empty history element that is not a catalogue id (*where: its ordinal)
  DPR_V2P_SHORT_BUFFER = 4,   // more elements than max_elems
  DPR_V2P_OUT_OF_MEMORY = 5,
};

// The inputs' slots in `info`, and the datatypes' codes (their order in DPR_V2P_DATATYPES).
enum { DPR_V2P_HISTORY = 0, DPR_V2P_PROMPT, DPR_V2P_NEGATIVE, DPR_V2P_K, DPR_V2P_EXCLUDE, DPR_V2P_SLOTS };
enum { DPR_V2P_SLOT_FIELDS = 7, DPR_V2P_INFO = DPR_V2P_SLOTS * DPR_V2P_SLOT_FIELDS + 6 };
#define DPR_V2P_DATATYPES "BOOL INT8 INT16 INT32 INT64 UINT8 UINT16 UINT32 UINT64 FP16 FP32 FP64 BYTES"

const char* dpr_v2_json_parse_status_string(int status);

// Reads `body`. Per input slot s, info[7s .. 7s + 6] = present (0 / 1), datatype code, ndim (1 or 2), shape[0],
// shape[1] (0 when ndim is 1), element count, and the index of its first element in its column: history ->
// `history` (catalogue indices 1..N, 0 for an empty string), prompt and negative_prompt -> strings (element i's
// UTF-8 text is str_bytes[str_offsets[i] .. str_offsets[i + 1])), k -> `ints`, exclude_history -> `bools`.
// info[35 .. 40]: the [start, end) byte spans of the values of "id", "outputs" and "parameters" (-1, -1 when
// absent). Every column holds max_elems entries (str_offsets max_elems + 1; str_bytes len bytes): len / 2 + 1
// elements always suffice.
int dpr_v2_json_parse(const dpr_id_index* index, const char* body, int64_t len, int64_t max_elems, int64_t* history,
                      int64_t* ints, uint8_t* bools, int64_t* str_offsets, char* str_bytes, int64_t* info,
                      int64_t* where);

#ifdef __cplusplus
}
#endif
