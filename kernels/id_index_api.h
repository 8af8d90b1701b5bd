// C ABI of the item-id index (CPU): exact byte-string -> item index lookup for the engine's histories.
//
// A serving batch of 512 histories holds tens of thousands of item ids; a Python dict maps them one cache
// miss after another on a cold cache (the retrieval pass before streams the item table through the caches;
// timings: docs/ARCHITECTURE.md, "Measurements behind the defaults"). This index takes the ids of a whole batch as one separator-joined UTF-8 buffer, hashes them all, and
// prefetches their slots a group at a time, so the cache misses overlap instead of queueing.
//
// Keys are byte strings (UTF-8 of the catalogue's ids), compared exactly: a hit is a byte-equal key.
// Values are 1..N (catalogue position + 1; 0 is the padding index and means "unknown").
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  DPR_IDX_OK = 0,
  DPR_IDX_NULL_POINTER = 1,
  DPR_IDX_BAD_ARGUMENT = 2,   // offsets not increasing, n < 0, or more tokens than max_out
  DPR_IDX_DUPLICATE = 3,      // two catalogue ids with the same bytes
  DPR_IDX_SEPARATOR = 4,      // a catalogue id contains the separator byte (NUL)
  DPR_IDX_OUT_OF_MEMORY = 5,
  DPR_IDX_UNKNOWN = 6,        // a looked-up element is not a key (lookup_wire_rows)
  DPR_IDX_HOLE = 7,           // an empty element between two ids of a row (lookup_wire_rows)
};

typedef struct dpr_id_index dpr_id_index;

const char* dpr_id_index_status_string(int status);

// Build from N keys: key i is blob[offsets[i] .. offsets[i + 1]) and gets value i + 1. No key may contain a
// NUL byte (the lookup's separator). The index copies what it needs; *out is freed with dpr_id_index_free.
int dpr_id_index_build(const char* blob, const int64_t* offsets, int64_t n, dpr_id_index** out);

// Tokens of buf[0 .. len), separated by NUL bytes (len == 0: no token; else count(NUL) + 1 tokens).
// out[t] = the value of token t, or 0 when it is not a key. *n_tokens = the number of tokens; at most
// max_out are written (more: DPR_IDX_BAD_ARGUMENT, *n_tokens still the count).
int dpr_id_index_lookup(const dpr_id_index* index, const char* buf, int64_t len, int64_t* out, int64_t max_out,
                        int64_t* n_tokens);

// A padded history tensor in Triton's BYTES wire form (each element: its length as 4 little-endian bytes, then its
// bytes), its rows one after the other, row r holding widths[r] elements; empty elements are padding, before or
// after a row's ids. Mapped and compacted: out[] = the values of the non-empty elements in order, lens[r] = how
// many row r holds, *n_out = how many in all (at most max_out are written). Used by the native Triton backend,
// whose histories then never become Python strings. Stops at the first problem, *bad = its element (flat index):
//   DPR_IDX_UNKNOWN: an element that is not a key;
//   DPR_IDX_HOLE: an empty element between two ids of one row (a missing id, not padding);
//   DPR_IDX_BAD_ARGUMENT: the buffer does not hold exactly sum(widths) whole elements (a length prefix runs past
//     len, or elements are left over), a negative width, or more ids than max_out.
int dpr_id_index_lookup_wire_rows(const dpr_id_index* index, const char* buf, int64_t len, const int64_t* widths,
                                  int64_t rows, int64_t* out, int64_t max_out, int64_t* lens, int64_t* n_out,
                                  int64_t* bad);

void dpr_id_index_free(dpr_id_index* index);

#ifdef __cplusplus
}
#endif
