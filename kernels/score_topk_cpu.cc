// Fused score + top-k on the CPU: the AVX-512 and AVX2+FMA tiles, the runtime ISA dispatch, the OpenMP
// partition and the C ABI (score_topk_api.h). Selection logic and the portable tile: score_topk.h.
//
// The AVX-512 tile keeps a 12-row x 32-item block of scores in 24 zmm accumulators (one FMA per
// accumulator per table dimension, the query scalar broadcast from memory), then compares each row's
// two vectors with its threshold in registers: only rows with a hit store their scores. The binary is
// built for the baseline x86-64 ISA; the AVX-512 and AVX2 code is compiled per function (target attribute)
// and chosen at run time (cpu_isa.h: AVX-512 when present, else AVX2+FMA, else the portable tile), so one
// cached library works on any x86-64 CPU.
//
// The AVX2 tile has 16 ymm registers: it scores the panel in two 16-item halves, each a 6-row x 16-item
// block in 12 accumulators (two panel vectors loaded, one query scalar broadcast per row), the classic
// 6x16 AVX2 micro-kernel shape. Scores are stored for both halves and compared in registers.
#include <omp.h>

#include <algorithm>
#include <new>

#include "cpu_isa.h"
#include "score_topk.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DPR_TOPK_X86 1
#endif

namespace dpr_topk {

#ifdef DPR_TOPK_X86
template <int R>
struct Avx512Tile {
  __attribute__((target("avx512f"))) static void run(const float* q, int64_t d, const float* panel, const float* thr,
                                                      float* cand, uint32_t* hit) {
    __m512 a0[R], a1[R];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_setzero_ps();
      a1[r] = _mm512_setzero_ps();
    }
#pragma GCC unroll 2
    for (int64_t c = 0; c < d; ++c) {
      const __m512 w0 = _mm512_loadu_ps(panel + c * kPanel);
      const __m512 w1 = _mm512_loadu_ps(panel + c * kPanel + 16);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        const __m512 qv = _mm512_set1_ps(q[r * d + c]);
        a0[r] = _mm512_fmadd_ps(qv, w0, a0[r]);
        a1[r] = _mm512_fmadd_ps(qv, w1, a1[r]);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_set1_ps(thr[r]);
      const uint32_t m = static_cast<uint32_t>(_mm512_cmp_ps_mask(a0[r], t, _CMP_GT_OQ)) |
                         (static_cast<uint32_t>(_mm512_cmp_ps_mask(a1[r], t, _CMP_GT_OQ)) << 16);
      hit[r] = m;
      if (m) {
        _mm512_storeu_ps(cand + r * kPanel, a0[r]);
        _mm512_storeu_ps(cand + r * kPanel + 16, a1[r]);
      }
    }
  }
};

template <int R>
struct Avx2Tile {
  __attribute__((target("avx2,fma"))) static void run(const float* q, int64_t d, const float* panel, const float* thr,
                                                      float* cand, uint32_t* hit) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) hit[r] = 0;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {            // items [16 h, 16 h + 16) of the panel
      const float* ph = panel + 16 * h;
      __m256 a0[R], a1[R];
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_setzero_ps();
        a1[r] = _mm256_setzero_ps();
      }
#pragma GCC unroll 2
      for (int64_t c = 0; c < d; ++c) {
        const __m256 w0 = _mm256_loadu_ps(ph + c * kPanel);
        const __m256 w1 = _mm256_loadu_ps(ph + c * kPanel + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
          const __m256 qv = _mm256_broadcast_ss(q + r * d + c);
          a0[r] = _mm256_fmadd_ps(qv, w0, a0[r]);
          a1[r] = _mm256_fmadd_ps(qv, w1, a1[r]);
        }
      }
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 t = _mm256_set1_ps(thr[r]);
        const uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a0[r], t, _CMP_GT_OQ))) |
                           (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a1[r], t, _CMP_GT_OQ))) << 8);
        hit[r] |= m << (16 * h);
        _mm256_storeu_ps(cand + r * kPanel + 16 * h, a0[r]);
        _mm256_storeu_ps(cand + r * kPanel + 16 * h + 8, a1[r]);
      }
    }
  }
};

#endif

constexpr int kRowsAvx512 = 12;
constexpr int kRowsAvx2 = 6;
constexpr int kRowsGeneric = 4;

static int block_rows(dpr_isa::Level isa) {
  return isa == dpr_isa::kAvx512 ? kRowsAvx512 : isa == dpr_isa::kAvx2 ? kRowsAvx2 : kRowsGeneric;
}

static void run_any(dpr_isa::Level isa, const float* queries, int64_t d, const float* packed, int64_t n_items,
                    int64_t r0, int64_t r1, int64_t p0, int64_t p1, const Eligibility& el, RunningTopK* tops) {
#ifdef DPR_TOPK_X86
  if (isa == dpr_isa::kAvx512) {
    run_partition<kRowsAvx512, Avx512Tile>(queries, d, packed, n_items, r0, r1, p0, p1, el, tops);
    return;
  }
  if (isa == dpr_isa::kAvx2) {
    run_partition<kRowsAvx2, Avx2Tile>(queries, d, packed, n_items, r0, r1, p0, p1, el, tops);
    return;
  }
#endif
  (void)isa;
  run_partition<kRowsGeneric, GenericTile>(queries, d, packed, n_items, r0, r1, p0, p1, el, tops);
}

// Chosen once per process. DPR_TOPK_ISA=generic / avx2 caps the level (the tests run every path on an
// AVX-512 machine).
static dpr_isa::Level topk_isa() {
  static const dpr_isa::Level level = dpr_isa::level("DPR_TOPK_ISA", false);
  return level;
}

}  // namespace dpr_topk

using namespace dpr_topk;

extern "C" {

const char* dpr_score_topk_status_string(int status) {
  switch (status) {
    case DPR_TOPK_OK: return "ok";
    case DPR_TOPK_BAD_SHAPE: return "bad shape (batch, d, n_items or k out of range)";
    case DPR_TOPK_NULL_POINTER: return "null pointer";
    case DPR_TOPK_BAD_EXCLUSION: return "exclusion lists malformed (offsets not increasing, item outside 0..N, or a row not sorted)";
    case DPR_TOPK_OUT_OF_MEMORY: return "out of memory";
    default: return "unknown status";
  }
}

const char* dpr_score_topk_isa(void) { return dpr_isa::level_name(topk_isa()); }

int dpr_score_topk_pack_f32(const float* table, int64_t n_items, int64_t d, float* packed) {
  if (table == nullptr || packed == nullptr) return DPR_TOPK_NULL_POINTER;
  if (n_items < 1 || d < 1) return DPR_TOPK_BAD_SHAPE;
  const int64_t panels = (n_items + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = packed + p * d * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t item = 1 + p * kPanel + j;
      for (int64_t c = 0; c < d; ++c) dst[c * kPanel + j] = item <= n_items ? table[item * d + c] : 0.0f;
    }
  }
  return DPR_TOPK_OK;
}

int dpr_score_topk_f32(const float* queries, int64_t batch, int64_t d, const float* packed, int64_t n_items,
                       int64_t k, const int64_t* excl_offsets, const int64_t* excl_items, const uint8_t* allowed,
                       int64_t allowed_row_stride, int64_t* out_idx, float* out_scores, int num_threads) {
  if (batch < 0 || d < 1 || n_items < 1 || k < 1) return DPR_TOPK_BAD_SHAPE;
  if (batch == 0) return DPR_TOPK_OK;
  if (queries == nullptr || packed == nullptr || out_idx == nullptr || out_scores == nullptr)
    return DPR_TOPK_NULL_POINTER;
  if ((excl_offsets == nullptr) != (excl_items == nullptr)) return DPR_TOPK_NULL_POINTER;
  if (allowed != nullptr && allowed_row_stride != 0 && allowed_row_stride != n_items + 1) return DPR_TOPK_BAD_SHAPE;
  if (excl_offsets != nullptr) {
    if (excl_offsets[0] != 0) return DPR_TOPK_BAD_EXCLUSION;
    for (int64_t b = 0; b < batch; ++b) {
      if (excl_offsets[b + 1] < excl_offsets[b]) return DPR_TOPK_BAD_EXCLUSION;
      for (int64_t e = excl_offsets[b]; e < excl_offsets[b + 1]; ++e) {
        if (excl_items[e] < 0 || excl_items[e] > n_items) return DPR_TOPK_BAD_EXCLUSION;
        if (e > excl_offsets[b] && excl_items[e] < excl_items[e - 1]) return DPR_TOPK_BAD_EXCLUSION;
      }
    }
  }
  const Eligibility el{excl_offsets, excl_items, allowed, allowed_row_stride};
  const int64_t panels = (n_items + kPanel - 1) / kPanel;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const dpr_isa::Level isa = topk_isa();
  const int64_t rows_per_block = block_rows(isa);
  // Split the rows when there are enough query blocks for every thread; else split the catalogue (small
  // batches, e.g. one latency-bound request) and merge the per-part heaps.
  const int64_t parts = (batch >= 2 * rows_per_block * threads || threads == 1)
                            ? 1 : std::min<int64_t>(threads, std::max<int64_t>(1, panels / 4));
  const int64_t heap_k = std::min(k, n_items);
  std::vector<Entry> storage;
  std::vector<RunningTopK> tops;
  try {
    storage.resize(static_cast<size_t>(parts * batch * heap_k));
    tops.resize(static_cast<size_t>(parts * batch));
  } catch (const std::bad_alloc&) {
    return DPR_TOPK_OUT_OF_MEMORY;
  }
  for (int64_t i = 0; i < parts * batch; ++i) tops[i] = RunningTopK{storage.data() + i * heap_k, 0, heap_k};

  if (parts == 1) {
    // contiguous row ranges, in whole query blocks, one per thread
    const int64_t blocks = (batch + rows_per_block - 1) / rows_per_block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; ++t) {
      const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
      const int64_t r0 = std::min(batch, b0 * rows_per_block), r1 = std::min(batch, b1 * rows_per_block);
      if (r0 < r1) run_any(isa, queries, d, packed, n_items, r0, r1, 0, panels, el, tops.data() + r0);
    }
  } else {
#pragma omp parallel for num_threads(static_cast<int>(parts)) schedule(static)
    for (int64_t part = 0; part < parts; ++part) {
      const int64_t p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
      run_any(isa, queries, d, packed, n_items, 0, batch, p0, p1, el, tops.data() + part * batch);
    }
  }

  std::vector<Entry> merged;
  for (int64_t b = 0; b < batch; ++b) {
    if (parts == 1) {
      write_row(tops[b].heap, tops[b].size, k, out_idx + b * k, out_scores + b * k);
      continue;
    }
    merged.clear();
    for (int64_t part = 0; part < parts; ++part) {
      const RunningTopK& t = tops[part * batch + b];
      merged.insert(merged.end(), t.heap, t.heap + t.size);
    }
    write_row(merged.data(), static_cast<int64_t>(merged.size()), k, out_idx + b * k, out_scores + b * k);
  }
  return DPR_TOPK_OK;
}

int dpr_score_topk_f32_any_order(const float* queries, int64_t batch, int64_t d, const float* packed,
                                 int64_t n_items, int64_t k, const int64_t* excl_offsets,
                                 const int64_t* excl_items, const uint8_t* allowed, int64_t allowed_row_stride,
                                 int64_t* out_idx, float* out_scores, int num_threads) {
  if (excl_offsets == nullptr || excl_items == nullptr || batch <= 0)
    return dpr_score_topk_f32(queries, batch, d, packed, n_items, k, excl_offsets, excl_items, allowed,
                              allowed_row_stride, out_idx, out_scores, num_threads);
  if (excl_offsets[0] != 0) return DPR_TOPK_BAD_EXCLUSION;
  for (int64_t b = 0; b < batch; ++b)
    if (excl_offsets[b + 1] < excl_offsets[b]) return DPR_TOPK_BAD_EXCLUSION;
  std::vector<int64_t> sorted;
  try {
    sorted.resize(static_cast<size_t>(excl_offsets[batch]));
  } catch (const std::bad_alloc&) {
    return DPR_TOPK_OUT_OF_MEMORY;
  }
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  // a fork/join costs more than sorting a few short rows on one thread
#pragma omp parallel for num_threads(threads) schedule(static) if (excl_offsets[batch] >= 4096 && threads > 1)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t lo = excl_offsets[b], hi = excl_offsets[b + 1];
    std::copy(excl_items + lo, excl_items + hi, sorted.data() + lo);
    std::sort(sorted.data() + lo, sorted.data() + hi);
  }
  return dpr_score_topk_f32(queries, batch, d, packed, n_items, k, excl_offsets, sorted.data(), allowed,
                            allowed_row_stride, out_idx, out_scores, num_threads);
}

}  // extern "C"
