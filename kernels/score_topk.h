// Fused score + top-k: the selection logic and the portable scoring tile, shared by every ISA path.
//
// Why fused: the unfused path (MatMul, then TopK over the score matrix, then filters) writes and re-reads
// B x N scores and, with exclusion lists, over-fetches and re-runs short rows. Here each 32-item panel is
// scored into registers, compared against each row's running k-th best score, and only the rare
// candidates that beat it (about k * ln(N / k) per row) leave the registers, to be checked against the
// row's exclusion list and allowed mask and pushed into a size-k heap. Exact by construction.
//
// No framework types; the ISA-specific tiles (AVX-512, AVX2+FMA) live in score_topk_cpu.cc and plug into
// run_partition() through the Tile template parameter.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "score_topk_api.h"

namespace dpr_topk {

constexpr int kPanel = DPR_TOPK_PANEL;

struct Entry {
  float score;
  int64_t index;
};

// a ranks after b: lower score, or equal score and higher index (ties go to the lower index)
inline bool worse(const Entry& a, const Entry& b) {
  return a.score < b.score || (a.score == b.score && a.index > b.index);
}

// Size-k min-heap on worse(): the root is the current k-th best; threshold() is what a new score must beat.
struct RunningTopK {
  Entry* heap = nullptr;
  int64_t size = 0;
  int64_t k = 0;

  float threshold() const { return size < k ? -std::numeric_limits<float>::infinity() : heap[0].score; }

  void push(float score, int64_t index) {
    Entry e{score, index};
    if (size < k) {
      int64_t i = size++;
      while (i > 0) {  // sift up
        int64_t parent = (i - 1) / 2;
        if (!worse(e, heap[parent])) break;
        heap[i] = heap[parent];
        i = parent;
      }
      heap[i] = e;
      return;
    }
    if (!worse(heap[0], e)) return;
    int64_t i = 0;
    for (;;) {  // sift down from the root
      int64_t c = 2 * i + 1;
      if (c >= size) break;
      if (c + 1 < size && worse(heap[c + 1], heap[c])) ++c;
      if (!worse(heap[c], e)) break;
      heap[i] = heap[c];
      i = c;
    }
    heap[i] = e;
  }
};

struct Eligibility {
  const int64_t* excl_offsets;  // (B + 1) or null
  const int64_t* excl_items;
  const uint8_t* allowed;       // null, (N + 1) shared, or (B, N + 1)
  int64_t allowed_row_stride;

  bool ok(int64_t row, int64_t item) const {
    if (allowed != nullptr && allowed[row * allowed_row_stride + item] == 0) return false;
    if (excl_offsets != nullptr) {
      const int64_t* lo = excl_items + excl_offsets[row];
      const int64_t* hi = excl_items + excl_offsets[row + 1];
      if (lo != hi && std::binary_search(lo, hi, item)) return false;
    }
    return true;
  }
};

// Portable tile: R query rows x one panel of kPanel items. Writes the R x kPanel scores to `cand` and a
// bit mask per row of the scores strictly above that row's threshold. The compiler vectorises the
// inner loop for whatever ISA the translation unit targets.
template <int R>
inline void tile_generic(const float* q, int64_t d, const float* panel, const float* thr, float* cand,
                         uint32_t* hit) {
  float acc[R][kPanel];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kPanel; ++j) acc[r][j] = 0.0f;
  for (int64_t c = 0; c < d; ++c) {
    const float* w = panel + c * kPanel;
    for (int r = 0; r < R; ++r) {
      const float qv = q[r * d + c];
      for (int j = 0; j < kPanel; ++j) acc[r][j] += qv * w[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    uint32_t m = 0;
    for (int j = 0; j < kPanel; ++j) {
      cand[r * kPanel + j] = acc[r][j];
      m |= static_cast<uint32_t>(acc[r][j] > thr[r]) << j;
    }
    hit[r] = m;
  }
}

// Offer the tile's hits to the rows' heaps; refresh the thresholds.
template <int R>
inline void offer(const uint32_t* hit, const float* cand, int64_t row0, int64_t panel, int64_t n_items,
                  const Eligibility& el, RunningTopK* tops, float* thr) {
  for (int r = 0; r < R; ++r) {
    uint32_t m = hit[r];
    if (m == 0) continue;
    RunningTopK& t = tops[r];
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      const int64_t item = 1 + panel * kPanel + j;
      const float s = cand[r * kPanel + j];
      if (item > n_items || !(s > t.threshold())) continue;
      if (!el.ok(row0 + r, item)) continue;
      t.push(s, item);
    }
    thr[r] = t.threshold();
  }
}

// Score the R rows starting at r0 against panels [p0, p1) with Tile (a functor template over the row
// count R), keeping the best k per row in tops[0 .. R). Thresholds persist in the heaps across calls.
template <int R, template <int> class Tile>
inline void run_rows(const float* queries, int64_t d, const float* packed, int64_t n_items, int64_t r0,
                     int64_t p0, int64_t p1, const Eligibility& el, RunningTopK* tops) {
  float thr[R];
  float cand[R * kPanel];
  uint32_t hit[R];
  for (int r = 0; r < R; ++r) thr[r] = tops[r].threshold();
  for (int64_t p = p0; p < p1; ++p) {
    Tile<R>::run(queries + r0 * d, d, packed + p * d * kPanel, thr, cand, hit);
    offer<R>(hit, cand, r0, p, n_items, el, tops, thr);
  }
}

template <int R>
struct GenericTile {
  static void run(const float* q, int64_t d, const float* panel, const float* thr, float* cand, uint32_t* hit) {
    tile_generic<R>(q, d, panel, thr, cand, hit);
  }
};

// Rows [r0, r1), panels [p0, p1): blocks of RMAX rows, the tail block with a smaller instantiation.
// Query blocks are the outer loop inside each L2 chunk of panels.
template <int RMAX, template <int> class Tile>
inline void run_partition(const float* queries, int64_t d, const float* packed, int64_t n_items, int64_t r0,
                          int64_t r1, int64_t p0, int64_t p1, const Eligibility& el, RunningTopK* tops) {
  // ~256 KB of panels per chunk: stays in L2 while every query block of this thread streams over it
  const int64_t chunk = std::max<int64_t>(1, (256 * 1024) / (d * kPanel * (int64_t)sizeof(float)));
  for (int64_t pc = p0; pc < p1; pc += chunk) {
    const int64_t pe = std::min(p1, pc + chunk);
    int64_t r = r0;
    for (; r + RMAX <= r1; r += RMAX)
      run_rows<RMAX, Tile>(queries, d, packed, n_items, r, pc, pe, el, tops + (r - r0));
    const int64_t rest = r1 - r;
    RunningTopK* t = tops + (r - r0);
    switch (rest) {  // tail block (RMAX <= 12)
#define DPR_TOPK_TAIL(n) \
  case n:                \
    if (n < RMAX) run_rows<(n < RMAX ? n : 1), Tile>(queries, d, packed, n_items, r, pc, pe, el, t); \
    break;
      DPR_TOPK_TAIL(1) DPR_TOPK_TAIL(2) DPR_TOPK_TAIL(3) DPR_TOPK_TAIL(4) DPR_TOPK_TAIL(5) DPR_TOPK_TAIL(6)
      DPR_TOPK_TAIL(7) DPR_TOPK_TAIL(8) DPR_TOPK_TAIL(9) DPR_TOPK_TAIL(10) DPR_TOPK_TAIL(11)
#undef DPR_TOPK_TAIL
      default:
        break;
    }
  }
}

// Sorted best-first (score descending, lower index on ties) into (k) outputs, padded with -1 / -inf.
inline void write_row(Entry* entries, int64_t count, int64_t k, int64_t* out_idx, float* out_scores) {
  const int64_t n = std::min(count, k);
  std::partial_sort(entries, entries + n, entries + count, [](const Entry& a, const Entry& b) { return worse(b, a); });
  for (int64_t j = 0; j < n; ++j) {
    out_idx[j] = entries[j].index;
    out_scores[j] = entries[j].score;
  }
  for (int64_t j = n; j < k; ++j) {
    out_idx[j] = -1;
    out_scores[j] = -std::numeric_limits<float>::infinity();
  }
}

}  // namespace dpr_topk
