// C ABI of the history padding (CPU): a batch's histories, one flat array plus row offsets, into the user
// encoder's (B, L) left-padded input in one pass.
//
// The engine pads every batch (512 histories, about 21,000 items at the benchmark's lengths). In numpy that
// is a handful of whole-batch temporaries (repeats, cumulative sums, a scatter), about 180 us right after the
// retrieval kernel has streamed the item table through the caches; here it is one read of the kept items and
// one write of the output (tens of us). Same answer as its numpy reference (history_pad.py's pad_flat_reference,
// which the engine runs when this library is not built); tests/test_history_pad.py holds them equal.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  DPR_PAD_OK = 0,
  DPR_PAD_NULL_POINTER = 1,
  DPR_PAD_OFFSETS_START = 2,  // offsets[0] != 0
  DPR_PAD_OFFSETS_ORDER = 3,  // offsets decrease somewhere
  DPR_PAD_OFFSETS_END = 4,    // offsets[rows] > flat_len
  DPR_PAD_BAD_ARGUMENT = 5,   // rows < 0, width < 1 or flat_len < 0
};

const char* dpr_history_pad_status_string(int status);

// out (rows x width, row-major, int64): row i holds the last min(len_i, width) items of
// flat[offsets[i] .. offsets[i + 1]) right-aligned, zeros before them (0 is the padding index).
// Every offset is checked before anything is read, so bad offsets are a status, never a stray read.
int dpr_history_pad_left(const int64_t* flat, int64_t flat_len, const int64_t* offsets, int64_t rows,
                         int64_t width, int64_t* out);

#ifdef __cplusplus
}
#endif
