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
  DPR_TOPK_UNSUPPORTED = 5,
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

// ---- int8 screen (exact): see score_topk.h for the method and the bound --------------------------------
// The same top-k as dpr_score_topk_f32 (same scores, bit for bit, as the AVX-512 / AVX2 tiles), but most items
// are ruled out by an int8 dot product (vpdpbusd on AVX-512 VNNI) plus a rigorous bound on its error; only
// the items the bound cannot rule out get their exact fp32 score.
enum {
  DPR_TOPK_SCREEN_AUTO = 0,      // VNNI when the CPU has it and DPR_TOPK_ISA does not cap below avx512
  DPR_TOPK_SCREEN_GENERIC = 1,   // the portable screen (same hits, any CPU; slower than the fp32 tiles)
  DPR_TOPK_SCREEN_VNNI = 2,      // the VNNI tile (DPR_TOPK_UNSUPPORTED on a CPU without it)
};

// What DPR_TOPK_SCREEN_AUTO runs here: "avx512vnni", or "generic" (no AVX-512 VNNI on this CPU, or
// DPR_TOPK_ISA caps the kernel below AVX-512: a caller should keep the fp32 path, which is faster then).
const char* dpr_score_topk_int8_isa(void);
// 1 when the CPU has AVX-512 F + BW + VNNI (whatever DPR_TOPK_ISA says).
int dpr_score_topk_cpu_has_vnni(void);

// table (N + 1, d) float32 as above (row 0 skipped), 1 <= d <= 16384. G = ceil(d / 4).
// packed8: panels(N) * G * PANEL * 4 bytes: byte [p][g][j][l] = round(x[c] / s) + 128, c = 4 g + l (128 past d).
// stats: panels(N) * 4 * PANEL floats: [p][0][j] = s = max|x| / 127, [p][1][j] = ||x - s x8||, [p][2][j] = ||x||,
//   [p][3][0] / [p][3][1] = the panel's largest [1] / [2].
int dpr_score_topk_pack_int8(const float* table, int64_t n_items, int64_t d, uint8_t* packed8, float* stats);

// As dpr_score_topk_f32 (same arguments and results), plus: table = the (N + 1, d) float32 table itself (the
// exact re-score reads it), packed8 / stats from dpr_score_topk_pack_int8; excl_sorted = 0: exclusion rows
// in any order (sorted here, as dpr_score_topk_f32_any_order); isa: DPR_TOPK_SCREEN_*; out_rescored: NULL or
// (B) int64, the number of exact fp32 re-scores each row needed (a debugging / benchmarking count).
int dpr_score_topk_int8(const float* queries, int64_t batch, int64_t d, const float* table, const uint8_t* packed8,
                        const float* stats, int64_t n_items, int64_t k, const int64_t* excl_offsets,
                        const int64_t* excl_items, int excl_sorted, const uint8_t* allowed,
                        int64_t allowed_row_stride, int64_t* out_idx, float* out_scores, int num_threads, int isa,
                        int64_t* out_rescored);

#ifdef __cplusplus
}
#endif
