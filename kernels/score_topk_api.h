// C ABI of the fused score + top-k retrieval kernel (CPU). No framework types: plain pointers.
//
// Exact maximum-inner-product top-k over a packed item table, with per-row exclusion lists and an
// optional allowed mask applied *during* selection (no over-fetch, no second pass):
//
//   scores[b, i] = sum_c queries[b, c] * table[i, c]          for items i = 1..N
//   out[b]       = the k best eligible items, score descending, lower index first on ties
//
// Packed table layout (dpr_score_topk_pack_f32 writes it): panels of DPR_TOPK_PANEL items, each panel
// d x DPR_TOPK_PANEL floats, item-contiguous, so one panel row is one 64-byte vector; panel p holds
// items 1 + p * PANEL ... ; the tail of the last panel is zero and never returned.
#pragma once
#include <stdint.h>

#define DPR_TOPK_PANEL 32

#ifdef __cplusplus
extern "C" {
#endif

// Status codes (0 = ok); dpr_score_topk_status_string names them.
enum {
  DPR_TOPK_OK = 0,
  DPR_TOPK_BAD_SHAPE = 1,
  DPR_TOPK_NULL_POINTER = 2,
  DPR_TOPK_BAD_EXCLUSION = 3,
  DPR_TOPK_OUT_OF_MEMORY = 4,
};

const char* dpr_score_topk_status_string(int status);

// The instruction set the dispatcher picked on this CPU ("avx512f" or "generic").
const char* dpr_score_topk_isa(void);

// table: (N + 1, d) row-major float32, row 0 = padding (skipped). packed: panels(N) * d * PANEL floats.
int dpr_score_topk_pack_f32(const float* table, int64_t n_items, int64_t d, float* packed);

// queries (B, d) float32; packed table of n_items items; k >= 1.
// excl_offsets (B + 1) / excl_items: row b excludes excl_items[excl_offsets[b] .. excl_offsets[b + 1]),
//   sorted ascending within the row (both NULL: no exclusion).
// allowed: NULL, or uint8 (N + 1) shared by every row (allowed_row_stride = 0), or (B, N + 1) with
//   allowed_row_stride = N + 1; an item is eligible only where allowed[...] != 0.
// out_idx (B, k) int64 / out_scores (B, k) float32: rows with fewer than k eligible items are padded with
//   index -1 and score -inf.
// num_threads <= 0: OpenMP's default.
int dpr_score_topk_f32(const float* queries, int64_t batch, int64_t d, const float* packed, int64_t n_items,
                       int64_t k, const int64_t* excl_offsets, const int64_t* excl_items, const uint8_t* allowed,
                       int64_t allowed_row_stride, int64_t* out_idx, float* out_scores, int num_threads);

// As dpr_score_topk_f32, but each exclusion row may come in any order (repeats allowed): the engine passes a
// batch's histories as they are (chronological, with the batch's own offsets). The rows are sorted into
// scratch memory here, split over the kernel's threads, then searched as above: no per-(row, item) keys are
// built by the caller. Offsets and items are checked as dpr_score_topk_f32 checks them (except the order).
int dpr_score_topk_f32_any_order(const float* queries, int64_t batch, int64_t d, const float* packed,
                                 int64_t n_items, int64_t k, const int64_t* excl_offsets,
                                 const int64_t* excl_items, const uint8_t* allowed, int64_t allowed_row_stride,
                                 int64_t* out_idx, float* out_scores, int num_threads);

#ifdef __cplusplus
}
#endif
