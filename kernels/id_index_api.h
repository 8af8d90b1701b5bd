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

// The elements of buf[0 .. len) in Triton's BYTES wire form (each: its length as 4 little-endian bytes, then its
// bytes). out[e] = the value of element e, 0 when it is not a key, -1 when it is empty (padding). *n_elements =
// the number of elements; at most max_out are written (more: DPR_IDX_BAD_ARGUMENT, *n_elements still the count).
// A length prefix that runs past len: DPR_IDX_BAD_ARGUMENT. Used by the native Triton backend, whose histories
// then never become Python strings.
int dpr_id_index_lookup_wire(const dpr_id_index* index, const char* buf, int64_t len, int64_t* out, int64_t max_out,
                             int64_t* n_elements);

void dpr_id_index_free(dpr_id_index* index);

#ifdef __cplusplus
}
#endif
