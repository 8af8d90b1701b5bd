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
//
// The int8 screen (second half of this file, dpr_score_topk_int8) is the same selection with a cheaper first
// look at each item: an int8 dot product and a rigorous bound on its error rule most items out, and only the
// others get the fp32 score; the top-k stays exact (the argument is in that section's comment).
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

// ---------------------------------------------------------------------------------------------------
// int8 screen (dpr_score_topk_int8): an exact top-k that scores most items with int8 dot products only.
//
// Tables (built once, dpr_score_topk_pack_int8): item x (fp32, d dims) gets a scale s = max|x| / 127 and
// x8 = round(x / s) in [-127, 127] (s = 0 for an all-zero item); stored as u8 = x8 + 128 in panels of
// kPanel items, G = ceil(d / 4) groups of 4 consecutive dims, each group kPanel x 4 bytes (one 32-bit lane
// per item: the vpdpbusd layout), the dims past d zero. Per item (stats, panels x 4 x kPanel floats):
// s, e = ||x - s x8|| and n = ||x|| (both rounded up to float); row 3 of a panel holds the panel's max e
// and max n. A query q gets t = max|q| / 127 (1 when max|q| < 1e-30, so 1 / t stays finite), q8 = round(q / t)
// in [-127, 127], eq = ||q - t q8||. vpdpbusd multiplies u8 by s8: the items are the u8 side (x8 + 128) and the
// accumulator starts at -128 sum(q8), so it ends at q8 . x8 exactly (no per-item correction term needed).
//
// For any item, with a = t s (q8 . x8) (the int dot is exact):
//     q.x - a = (q - t q8).x + t q8.(x - s x8)  =>  |q.x - a| <= eq n + t ||q8|| e          (Cauchy-Schwarz)
// The fp32 score f the exact path computes (a sequential FMA chain) differs from q.x by at most
// gamma_d ||q|| n with gamma_d = d u / (1 - d u), u = 2^-24. So, with
//     U = a + (t ||q8|| e + eq n) (1 + 1e-4) + (d + 16) 2^-23 ||q|| n
// f <= U holds with room to spare: (d + 16) 2^-23 = 2 (d + 16) u covers gamma_d plus 16 u ||q|| n for the
// float rounding of computing U and of comparing it (each op adds at most u of |a|, the bound or |thr|; when
// |thr| is above 2 |U| the comparison is decided by a margin of |thr| / 2 instead), and the 1e-4 covers the
// rounding of the bound's own terms (computed in double, stored rounded up).
// An item is skipped only when U <= thr, thr = the row's current k-th best EXACT score: then f <= thr, and an
// item whose score ties the k-th best loses to it (every item in the heap has a lower index). Survivors get
// their exact fp32 score (the same FMA chain as the AVX-512 / AVX2 tiles: bit-identical scores) and go
// through the same exclusion / allowed checks and heap as the fp32 path. The result is the fp32 path's
// exact top-k by construction; the int8 dot only decides which items need no exact score.
//
// Two levels: the tile compares t s acc with a per-(row, panel) bound built from the panel's max e and max n
// (one convert, one multiply and one compare per 16 items; rows whose heap is not full yet keep everything);
// hits are buffered per row with their int dot and, at a flush, re-checked with the item's own bound
// against the threshold of that moment, then re-scored exactly in groups of kExactGroup independent chains.
constexpr int kExactGroup = 8;
constexpr int kSurvivorCap = 128;   // buffered hits per row: a flush when the next panel could overflow it
constexpr int64_t kInt8MaxDim = 16384;   // |int32 accumulator| < 128 * 127 * d + 255 * 127 * d < 2^31

inline int64_t int8_groups(int64_t d) { return (d + 3) / 4; }

struct ScreenRow {
  float t, inv_t;     // query scale and 1 / t
  float a_coef;       // t ||q8|| (1 + 1e-4): multiplies e
  float b_coef;       // eq (1 + 1e-4) + (d + 16) 2^-23 ||q||: multiplies n
  double t_d, a_d, b_d;   // the same in double, for the per-item check at a flush
  int32_t acc0;       // -128 sum(q8): the accumulator's start (undoes the u8 shift of the items)
};

struct Int8Problem {
  const float* queries;   // (B, d) fp32: the exact re-score
  const int8_t* q8;       // (B, G * 4), dims past d zero
  const ScreenRow* rows;  // (B)
  const float* table;     // (N + 1, d) fp32 row-major: the exact re-score
  const uint8_t* packed8; // panels x G x kPanel x 4
  const float* stats;     // panels x 4 x kPanel
  int64_t d, G, n_items;
};

// Portable screen tile: R rows x one panel. cand gets the int dots (q8 . x8), hit the items whose
// t s (q8 . x8) may beat the row's bound (y = float(acc) * s > T[r]); the same float ops as the VNNI tile,
// so both tiles give the same hits. Returns the OR of the rows' hit masks.
template <int R>
struct ScreenTileGeneric {
  static uint32_t run(const int8_t* q8, int64_t G, const uint8_t* panel, const int32_t* acc0, const float* s,
                      const float* T, int32_t* cand, uint32_t* hit) {
    int32_t acc[R][kPanel];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kPanel; ++j) acc[r][j] = acc0[r];
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* w = panel + g * kPanel * 4;
      for (int r = 0; r < R; ++r) {
        const int8_t* qq = q8 + r * G * 4 + g * 4;
        const int32_t q0 = qq[0], q1 = qq[1], q2 = qq[2], q3 = qq[3];
        for (int j = 0; j < kPanel; ++j)
          acc[r][j] += q0 * w[4 * j] + q1 * w[4 * j + 1] + q2 * w[4 * j + 2] + q3 * w[4 * j + 3];
      }
    }
    uint32_t any = 0;
    for (int r = 0; r < R; ++r) {
      uint32_t m = 0;
      for (int j = 0; j < kPanel; ++j) {
        cand[r * kPanel + j] = acc[r][j];
        const float y = static_cast<float>(acc[r][j]) * s[j];
        m |= static_cast<uint32_t>(y > T[r]) << j;
      }
      hit[r] = m;
      any |= m;
    }
    return any;
  }
};

// Exact fp32 scores of m <= kExactGroup items for one query: acc = fma(q[c], x[c], acc), c = 0 .. d-1, from
// 0: each lane of the AVX-512 / AVX2 tiles does exactly this, so the scores are bit-identical to theirs.
// Independent chains, one per item, so the FMA latency is hidden.
struct ExactPortable {
  static void dots(const float* q, const float* table, int64_t d, const int64_t* items, int m, float* out) {
    float acc[kExactGroup] = {};
    const float* x[kExactGroup];
    for (int i = 0; i < kExactGroup; ++i) x[i] = table + (i < m ? items[i] : items[0]) * d;
    for (int64_t c = 0; c < d; ++c) {
      const float qc = q[c];
      for (int i = 0; i < kExactGroup; ++i) acc[i] = std::fma(qc, x[i][c], acc[i]);
    }
    for (int i = 0; i < m; ++i) out[i] = acc[i];
  }
};

struct Survivors {
  int64_t item[kSurvivorCap];
  int32_t dot[kSurvivorCap];
  int count = 0;
};

// Re-check one row's buffered hits with their own bound against the current threshold; re-score the rest
// exactly, in groups of kExactGroup, check eligibility, push. Items come in increasing index order (the heap's
// tie rule holds). Unless `last`, a final group of fewer than kExactGroup stays in the buffer for the next
// flush (a group's cost hardly depends on how full it is; its items keep their order before later hits).
template <class Exact>
inline void flush_row(const Int8Problem& P, int64_t row, Survivors& sv, const Eligibility& el, RunningTopK& top,
                      int64_t* rescored, bool last) {
  const ScreenRow& R = P.rows[row];
  const float* q = P.queries + row * P.d;
  int64_t pend[kExactGroup];
  int32_t pend_dot[kExactGroup];
  float sc[kExactGroup];
  int np = 0;
  double thr = top.threshold();
  for (int i = 0; i < sv.count; ++i) {
    const int64_t item = sv.item[i];
    const int64_t p = (item - 1) / kPanel, j = (item - 1) % kPanel;
    const float* st = P.stats + p * 4 * kPanel;
    const double U = R.t_d * static_cast<double>(st[j]) * sv.dot[i] + R.a_d * st[kPanel + j] +
                     R.b_d * st[2 * kPanel + j];
    if (U <= thr) continue;
    if (!el.ok(row, item)) continue;
    pend_dot[np] = sv.dot[i];
    pend[np++] = item;
    if (np == kExactGroup) {
      Exact::dots(q, P.table, P.d, pend, np, sc);
      if (rescored != nullptr) *rescored += np;
      for (int g = 0; g < np; ++g) top.push(sc[g], pend[g]);
      np = 0;
      thr = top.threshold();
    }
  }
  if (np && last) {
    Exact::dots(q, P.table, P.d, pend, np, sc);
    if (rescored != nullptr) *rescored += np;
    for (int g = 0; g < np; ++g) top.push(sc[g], pend[g]);
    np = 0;
  }
  for (int g = 0; g < np; ++g) {
    sv.item[g] = pend[g];
    sv.dot[g] = pend_dot[g];
  }
  sv.count = np;
}

// Rows r0 .. r0 + R, panels [p0, p1) with the screen tile; hits buffered in sv[0 .. R) (one per row, kept
// across calls), flushed when a buffer could overflow at the next panel and, in whole groups, at the end.
template <int R, template <int> class Tile, class Exact>
inline void run_rows_int8(const Int8Problem& P, int64_t r0, int64_t p0, int64_t p1, const Eligibility& el,
                          RunningTopK* tops, Survivors* sv, int64_t* rescored) {
  float thr[R], T[R], ac[R], bc[R], it[R];   // per row, contiguous: the bound's loop vectorises
  int32_t acc0[R];
  int32_t cand[R * kPanel];
  uint32_t hit[R];
  for (int r = 0; r < R; ++r) {
    thr[r] = tops[r].threshold();
    const ScreenRow& row = P.rows[r0 + r];
    acc0[r] = row.acc0;
    ac[r] = row.a_coef;
    bc[r] = row.b_coef;
    it[r] = row.inv_t;
  }
  const int64_t gq = P.G * 4;
  for (int64_t p = p0; p < p1; ++p) {
    const float* st = P.stats + p * 4 * kPanel;
    const float max_e = st[3 * kPanel], max_n = st[3 * kPanel + 1];
    for (int r = 0; r < R; ++r) T[r] = (thr[r] - (ac[r] * max_e + bc[r] * max_n)) * it[r];
    if (!Tile<R>::run(P.q8 + r0 * gq, P.G, P.packed8 + p * P.G * kPanel * 4, acc0, st, T, cand, hit)) continue;
    for (int r = 0; r < R; ++r) {
      uint32_t m = hit[r];
      if (m == 0) continue;
      Survivors& s = sv[r];
      while (m) {
        const int j = __builtin_ctz(m);
        m &= m - 1;
        const int64_t item = 1 + p * kPanel + j;
        if (item > P.n_items) break;
        s.item[s.count] = item;
        s.dot[s.count++] = cand[r * kPanel + j];
        // the exact re-score at the flush reads the item's fp32 row: start fetching it now (a random row of
        // a table far larger than the caches; without this the re-scores wait on memory)
        const char* row = reinterpret_cast<const char*>(P.table + item * P.d);
        for (int64_t off = 0; off < P.d * static_cast<int64_t>(sizeof(float)); off += 64) __builtin_prefetch(row + off);
      }
      if (s.count > kSurvivorCap - kPanel) {
        flush_row<Exact>(P, r0 + r, s, el, tops[r], rescored ? rescored + r : nullptr, false);
        thr[r] = tops[r].threshold();
      }
    }
  }
  for (int r = 0; r < R; ++r)
    if (sv[r].count >= kExactGroup)
      flush_row<Exact>(P, r0 + r, sv[r], el, tops[r], rescored ? rescored + r : nullptr, false);
}

template <int RMAX, template <int> class Tile, class Exact>
inline void run_partition_int8(const Int8Problem& P, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
                               const Eligibility& el, RunningTopK* tops, int64_t* rescored) {
  std::vector<Survivors> sv(static_cast<size_t>(r1 - r0));   // per row, across the chunks
  // ~128 KB of int8 panels and their stats per chunk (in L2 while the thread's query blocks stream over it;
  // 64 KB to 512 KB measured within 5% of each other on Zen 4, 128 KB the best of those)
  const int64_t chunk = std::max<int64_t>(1, (128 * 1024) / (P.G * kPanel * 4 + 4 * kPanel * (int64_t)sizeof(float)));
  for (int64_t pc = p0; pc < p1; pc += chunk) {
    const int64_t pe = std::min(p1, pc + chunk);
    int64_t r = r0;
    for (; r + RMAX <= r1; r += RMAX)
      run_rows_int8<RMAX, Tile, Exact>(P, r, pc, pe, el, tops + (r - r0), sv.data() + (r - r0),
                                       rescored ? rescored + (r - r0) : nullptr);
    const int64_t rest = r1 - r;
    RunningTopK* t = tops + (r - r0);
    int64_t* rc = rescored ? rescored + (r - r0) : nullptr;
    switch (rest) {  // tail block (RMAX <= 12)
#define DPR_TOPK_TAIL8(n) \
  case n:                 \
    if (n < RMAX) run_rows_int8<(n < RMAX ? n : 1), Tile, Exact>(P, r, pc, pe, el, t, sv.data() + (r - r0), rc); \
    break;
      DPR_TOPK_TAIL8(1) DPR_TOPK_TAIL8(2) DPR_TOPK_TAIL8(3) DPR_TOPK_TAIL8(4) DPR_TOPK_TAIL8(5)
      DPR_TOPK_TAIL8(6) DPR_TOPK_TAIL8(7) DPR_TOPK_TAIL8(8) DPR_TOPK_TAIL8(9) DPR_TOPK_TAIL8(10)
      DPR_TOPK_TAIL8(11)
#undef DPR_TOPK_TAIL8
      default:
        break;
    }
  }
  for (int64_t r = r0; r < r1; ++r)
    if (sv[r - r0].count)
      flush_row<Exact>(P, r, sv[r - r0], el, tops[r - r0], rescored ? rescored + (r - r0) : nullptr, true);
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
