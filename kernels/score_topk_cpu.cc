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
// The int8 screen (score_topk.h) has its own AVX-512 VNNI tile, the same 12-row x 32-item shape: 24 zmm int32
// accumulators, one vpdpbusd per accumulator per 4 table dims with the row's 4 query bytes broadcast from memory
// (inline asm: GCC 12 shuffles the accumulators through the stack around the intrinsic). On the Zen 4 this was
// written on, 512-bit vpdpbusd runs at about half the rate of 512-bit FMA but does 4x the products: the tile
// scores items about twice as fast as the fp32 one. Survivors are re-scored 8 at a time (ExactFma: AVX2 + FMA,
// an 8 x 8 transpose per 8 dims), each lane the same FMA chain as the fp32 tiles. Taken when the CPU has
// AVX-512 VNNI (cpu_isa.h) and DPR_TOPK_ISA does not cap the kernel below AVX-512; else the portable screen.
//
// The AVX2 tile has 16 ymm registers: it scores the panel in two 16-item halves, each a 6-row x 16-item
// block in 12 accumulators (two panel vectors loaded, one query scalar broadcast per row), the classic
// 6x16 AVX2 micro-kernel shape. Scores are stored for both halves and compared in registers.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <new>
#include <vector>

#include "cpu_isa.h"
#include "score_topk.h"
#include "thread_pool.h"

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

// int8 screen tile (score_topk.h): 12 rows x 32 items of int32 dots in 24 zmm accumulators, vpdpbusd of the
// items' u8 lanes (4 dims each) with the row's 4 s8 query dims broadcast from memory; the accumulators start
// at -128 sum(q8), which undoes the items' +128 shift. Then float(acc) * s against the row's bound T: the
// same float ops as ScreenTileGeneric, so the same hits.
typedef int32_t int32_u __attribute__((aligned(1), may_alias));

template <int R>
struct VnniTile {
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static uint32_t run(const int8_t* q8, int64_t G,
                                                                             const uint8_t* panel,
                                                                             const int32_t* acc0, const float* s,
                                                                             const float* T, int32_t* cand,
                                                                             uint32_t* hit) {
    __m512i a0[R], a1[R];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_set1_epi32(acc0[r]);
      a1[r] = a0[r];
    }
    const int64_t gq = G * 4;
    for (int64_t g = 0; g < G; ++g) {
      const __m512i w0 = _mm512_loadu_si512(panel + g * kPanel * 4);
      const __m512i w1 = _mm512_loadu_si512(panel + g * kPanel * 4 + 64);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        // vpdpbusd with the row's 4 query bytes broadcast from memory ({1to16}); inline asm because GCC 12
        // copies the accumulators between registers (and the stack) around the intrinsic
        const int32_u* qp = reinterpret_cast<const int32_u*>(q8 + r * gq + g * 4);
        asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(a0[r]) : "v"(w0), "m"(*qp));
        asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(a1[r]) : "v"(w1), "m"(*qp));
      }
    }
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    uint32_t any = 0;
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_set1_ps(T[r]);
      // (the masked form: GCC 12's unmasked _mm512_cvtepi32_ps warns about its own undefined source)
      const __m512 y0 = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, a0[r]), s0);
      const __m512 y1 = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, a1[r]), s1);
      const uint32_t m = static_cast<uint32_t>(_mm512_cmp_ps_mask(y0, t, _CMP_GT_OQ)) |
                         (static_cast<uint32_t>(_mm512_cmp_ps_mask(y1, t, _CMP_GT_OQ)) << 16);
      hit[r] = m;
      any |= m;
      if (m) {
        _mm512_storeu_si512(cand + r * kPanel, a0[r]);
        _mm512_storeu_si512(cand + r * kPanel + 16, a1[r]);
      }
    }
    return any;
  }
};

// ExactPortable's chains with AVX2 + FMA: eight items at once, one ymm lane each. Each block of 8 dims is
// loaded as 8 item rows and transposed in registers (8 x 8), then the lanes take fma(q[c], x[c], acc) for c in
// order; the dims past the last full block continue each lane's chain in scalar FMAs. Every lane computes
// exactly ExactPortable's chain (fma is exactly rounded), so the same bits as the AVX-512 / AVX2 tiles.
struct ExactFma {
  __attribute__((target("avx2,fma"))) static void dots(const float* q, const float* table, int64_t d,
                                                       const int64_t* items, int m, float* out) {
    const float* x[kExactGroup];
#pragma GCC unroll 8
    for (int i = 0; i < kExactGroup; ++i) x[i] = table + (i < m ? items[i] : items[0]) * d;
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
      const __m256 r0 = _mm256_loadu_ps(x[0] + c), r1 = _mm256_loadu_ps(x[1] + c);
      const __m256 r2 = _mm256_loadu_ps(x[2] + c), r3 = _mm256_loadu_ps(x[3] + c);
      const __m256 r4 = _mm256_loadu_ps(x[4] + c), r5 = _mm256_loadu_ps(x[5] + c);
      const __m256 r6 = _mm256_loadu_ps(x[6] + c), r7 = _mm256_loadu_ps(x[7] + c);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      // column j (dim c + j) of the 8 items: lanes 0-3 from items 0-3, lanes 4-7 from items 4-7
      const __m256 v0 = _mm256_permute2f128_ps(u0, u4, 0x20), v1 = _mm256_permute2f128_ps(u1, u5, 0x20);
      const __m256 v2 = _mm256_permute2f128_ps(u2, u6, 0x20), v3 = _mm256_permute2f128_ps(u3, u7, 0x20);
      const __m256 v4 = _mm256_permute2f128_ps(u0, u4, 0x31), v5 = _mm256_permute2f128_ps(u1, u5, 0x31);
      const __m256 v6 = _mm256_permute2f128_ps(u2, u6, 0x31), v7 = _mm256_permute2f128_ps(u3, u7, 0x31);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c), v0, acc);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c + 1), v1, acc);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c + 2), v2, acc);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c + 3), v3, acc);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c + 4), v4, acc);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c + 5), v5, acc);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c + 6), v6, acc);
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + c + 7), v7, acc);
    }
    float a[kExactGroup];
    _mm256_storeu_ps(a, acc);
    for (; c < d; ++c) {
      const float qc = q[c];
#pragma GCC unroll 8
      for (int i = 0; i < kExactGroup; ++i) a[i] = __builtin_fmaf(qc, x[i][c], a[i]);
    }
    for (int i = 0; i < m; ++i) out[i] = a[i];
  }
};

#endif

constexpr int kRowsAvx512 = 12;
constexpr int kRowsAvx2 = 6;
constexpr int kRowsGeneric = 4;
constexpr int64_t kScreenMinRowsPerThread = 5;   // catalogue_parts

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

// int8 screen paths: the portable tile or the VNNI tile.
enum ScreenIsa : int { kScreenGeneric = 0, kScreenVnni = 1 };

static bool cpu_has_vnni() {
  static const bool v = dpr_isa::has_avx512_vnni();
  return v;
}

static const char* screen_name(ScreenIsa s) {
  return s == kScreenVnni ? "avx512vnni" : "generic";
}

// Auto: the VNNI tile on a CPU with AVX-512 VNNI unless DPR_TOPK_ISA caps the kernel below AVX-512 (then the
// portable screen, which a caller should not prefer to the fp32 tiles).
static ScreenIsa screen_isa_auto() {
  return (topk_isa() == dpr_isa::kAvx512 && cpu_has_vnni()) ? kScreenVnni : kScreenGeneric;
}

static void run_int8_any(ScreenIsa isa, const Int8Problem& P, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
                         const Eligibility& el, RunningTopK* tops, int64_t* rescored) {
#ifdef DPR_TOPK_X86
  if (isa == kScreenVnni) {
    run_partition_int8<kRowsAvx512, VnniTile, ExactFma>(P, r0, r1, p0, p1, el, tops, rescored);
    return;
  }
#endif
  (void)isa;
  run_partition_int8<kRowsGeneric, ScreenTileGeneric, ExactPortable>(P, r0, r1, p0, p1, el, tops, rescored);
}

// Arguments shared by every entry point; 0 or a status.
static int check_common(const float* queries, int64_t batch, int64_t d, const void* packed, int64_t n_items,
                        int64_t k, const int64_t* excl_offsets, const int64_t* excl_items, const uint8_t* allowed,
                        int64_t allowed_row_stride, const int64_t* out_idx, const float* out_scores,
                        bool check_order) {
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
        if (check_order && e > excl_offsets[b] && excl_items[e] < excl_items[e - 1]) return DPR_TOPK_BAD_EXCLUSION;
      }
    }
  }
  return DPR_TOPK_OK;
}

// Each exclusion row sorted into `sorted` (rows split over the threads when there are many items: a fork/join
// costs more than sorting a few short rows on one thread).
static int sort_exclusions(int64_t batch, const int64_t* excl_offsets, const int64_t* excl_items, int threads,
                           std::vector<int64_t>& sorted) {
  try {
    sorted.resize(static_cast<size_t>(excl_offsets[batch]));
  } catch (const std::bad_alloc&) {
    return DPR_TOPK_OUT_OF_MEMORY;
  }
  const int64_t parts = excl_offsets[batch] >= 4096 && threads > 1 ? std::min<int64_t>(threads, batch) : 1;
  dpr_pool::parallel_for(parts, [&](int64_t t) {
    for (int64_t b = batch * t / parts; b < batch * (t + 1) / parts; ++b) {
      const int64_t lo = excl_offsets[b], hi = excl_offsets[b + 1];
      std::copy(excl_items + lo, excl_items + hi, sorted.data() + lo);
      std::sort(sorted.data() + lo, sorted.data() + hi);
    }
  });
  return DPR_TOPK_OK;
}

static inline float round_up_float(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// How many catalogue parts a call splits into: 1 (the rows split, one range per thread: row_range) when there are
// enough rows for every thread; else split the catalogue (small batches, e.g. one latency-bound request) and merge
// the per-part heaps (merge_parts). A part starts its heaps empty, so every part re-scores its own first survivors:
// under the int8 screen a 32-row batch split in two parts re-scored 298 items per row against 163 over the whole
// catalogue. So the screen splits rows from min_rows_per_thread rows per thread (5: on the 2-core VM, 10-47 rows
// ran 7-21% faster split by rows, 4-8 rows equal or slower); the fp32 tiles, whose every row range streams the
// whole fp32 table, keep the catalogue split below two query blocks per thread (row ranges there: no faster).
static int64_t catalogue_parts(int64_t batch, int64_t rows_per_block, int threads, int64_t panels,
                               int64_t min_rows_per_thread = 0) {
  return (batch >= 2 * rows_per_block * threads || threads == 1 ||
          (min_rows_per_thread > 0 && batch >= threads * min_rows_per_thread))
             ? 1 : std::min<int64_t>(threads, std::max<int64_t>(1, panels / 4));
}

// Thread t's rows [r0, r1) when the rows are split: whole query blocks when every thread gets two or more, else the
// rows evenly (each thread's tail tile costs less than a thread idle for a block).
static void row_range(int64_t batch, int64_t rows_per_block, int threads, int64_t t, int64_t* r0, int64_t* r1) {
  const int64_t blocks = (batch + rows_per_block - 1) / rows_per_block;
  if (blocks >= 2 * threads) {
    const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
    *r0 = std::min(batch, b0 * rows_per_block);
    *r1 = std::min(batch, b1 * rows_per_block);
  } else {
    *r0 = batch * t / threads;
    *r1 = batch * (t + 1) / threads;
  }
}

// One running top-k per (part, row) over one block of entries; false when it cannot be allocated.
static bool make_heaps(int64_t parts, int64_t batch, int64_t heap_k, std::vector<Entry>& storage,
                       std::vector<RunningTopK>& tops) {
  try {
    storage.resize(static_cast<size_t>(parts * batch * heap_k));
    tops.resize(static_cast<size_t>(parts * batch));
  } catch (const std::bad_alloc&) {
    return false;
  }
  for (int64_t i = 0; i < parts * batch; ++i) tops[i] = RunningTopK{storage.data() + i * heap_k, 0, heap_k};
  return true;
}

// Each row's k best over its parts' heaps, sorted, into the outputs.
static void merge_parts(const std::vector<RunningTopK>& tops, int64_t parts, int64_t batch, int64_t k,
                        int64_t* out_idx, float* out_scores) {
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
    case DPR_TOPK_UNSUPPORTED: return "this CPU lacks the instruction set asked for (AVX-512 VNNI)";
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
  const int status = check_common(queries, batch, d, packed, n_items, k, excl_offsets, excl_items, allowed,
                                  allowed_row_stride, out_idx, out_scores, true);
  if (status != DPR_TOPK_OK || batch == 0) return status;
  const Eligibility el{excl_offsets, excl_items, allowed, allowed_row_stride};
  const int64_t panels = (n_items + kPanel - 1) / kPanel;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const dpr_isa::Level isa = topk_isa();
  const int64_t rows_per_block = block_rows(isa);
  const int64_t parts = catalogue_parts(batch, rows_per_block, threads, panels);
  std::vector<Entry> storage;
  std::vector<RunningTopK> tops;
  if (!make_heaps(parts, batch, std::min(k, n_items), storage, tops)) return DPR_TOPK_OUT_OF_MEMORY;

  if (parts == 1) {
    // contiguous row ranges, one per thread (row_range: whole query blocks here)
    dpr_pool::parallel_for(threads, [&](int64_t t) {
      int64_t r0, r1;
      row_range(batch, rows_per_block, threads, t, &r0, &r1);
      if (r0 < r1) run_any(isa, queries, d, packed, n_items, r0, r1, 0, panels, el, tops.data() + r0);
    });
  } else {
    dpr_pool::parallel_for(parts, [&](int64_t part) {
      const int64_t p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
      run_any(isa, queries, d, packed, n_items, 0, batch, p0, p1, el, tops.data() + part * batch);
    });
  }
  merge_parts(tops, parts, batch, k, out_idx, out_scores);
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
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int status = sort_exclusions(batch, excl_offsets, excl_items, threads, sorted);
  if (status != DPR_TOPK_OK) return status;
  return dpr_score_topk_f32(queries, batch, d, packed, n_items, k, excl_offsets, sorted.data(), allowed,
                            allowed_row_stride, out_idx, out_scores, num_threads);
}

const char* dpr_score_topk_int8_isa(void) { return screen_name(screen_isa_auto()); }

int dpr_score_topk_cpu_has_vnni(void) { return cpu_has_vnni() ? 1 : 0; }

int dpr_score_topk_pack_int8(const float* table, int64_t n_items, int64_t d, uint8_t* packed8, float* stats) {
  if (table == nullptr || packed8 == nullptr || stats == nullptr) return DPR_TOPK_NULL_POINTER;
  if (n_items < 1 || d < 1 || d > kInt8MaxDim) return DPR_TOPK_BAD_SHAPE;
  const int64_t panels = (n_items + kPanel - 1) / kPanel, G = int8_groups(d);
  const int64_t pack_parts = panels * d >= (1 << 16) ? std::min<int64_t>(omp_get_max_threads(), panels) : 1;
  dpr_pool::parallel_for(pack_parts, [&](int64_t part) {
  for (int64_t p = panels * part / pack_parts; p < panels * (part + 1) / pack_parts; ++p) {
    uint8_t* dst = packed8 + p * G * kPanel * 4;
    float* st = stats + p * 4 * kPanel;
    std::fill(dst, dst + G * kPanel * 4, static_cast<uint8_t>(128));   // x8 = 0
    std::fill(st, st + 4 * kPanel, 0.0f);
    float max_e = 0.0f, max_n = 0.0f;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t item = 1 + p * kPanel + j;
      if (item > n_items) break;
      const float* x = table + item * d;
      float amax = 0.0f;
      for (int64_t c = 0; c < d; ++c) amax = std::max(amax, std::fabs(x[c]));
      const float s = amax / 127.0f;
      double e2 = 0.0, n2 = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        long v = 0;
        if (s > 0.0f) v = std::max(-127L, std::min(127L, std::lround(static_cast<double>(x[c]) / s)));
        dst[(c / 4) * kPanel * 4 + j * 4 + (c % 4)] = static_cast<uint8_t>(v + 128);
        const double r = static_cast<double>(x[c]) - static_cast<double>(s) * static_cast<double>(v);
        e2 += r * r;
        n2 += static_cast<double>(x[c]) * x[c];
      }
      st[j] = s;
      st[kPanel + j] = round_up_float(std::sqrt(e2));
      st[2 * kPanel + j] = round_up_float(std::sqrt(n2));
      max_e = std::max(max_e, st[kPanel + j]);
      max_n = std::max(max_n, st[2 * kPanel + j]);
    }
    st[3 * kPanel] = max_e;
    st[3 * kPanel + 1] = max_n;
  }
  });
  return DPR_TOPK_OK;
}

int dpr_score_topk_int8(const float* queries, int64_t batch, int64_t d, const float* table, const uint8_t* packed8,
                        const float* stats, int64_t n_items, int64_t k, const int64_t* excl_offsets,
                        const int64_t* excl_items, int excl_sorted, const uint8_t* allowed,
                        int64_t allowed_row_stride, int64_t* out_idx, float* out_scores, int num_threads, int isa,
                        int64_t* out_rescored) {
  int status = check_common(queries, batch, d, packed8, n_items, k, excl_offsets, excl_items, allowed,
                            allowed_row_stride, out_idx, out_scores, excl_sorted != 0);
  if (status != DPR_TOPK_OK || batch == 0) return status;
  if (table == nullptr || stats == nullptr) return DPR_TOPK_NULL_POINTER;
  if (d > kInt8MaxDim) return DPR_TOPK_BAD_SHAPE;
  ScreenIsa si;
  if (isa == DPR_TOPK_SCREEN_AUTO) si = screen_isa_auto();
  else if (isa == DPR_TOPK_SCREEN_GENERIC) si = kScreenGeneric;
  else if (isa == DPR_TOPK_SCREEN_VNNI) {
    if (!cpu_has_vnni()) return DPR_TOPK_UNSUPPORTED;
    si = kScreenVnni;
  } else {
    return DPR_TOPK_BAD_SHAPE;
  }
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  std::vector<int64_t> sorted;
  if (excl_offsets != nullptr && !excl_sorted) {
    status = sort_exclusions(batch, excl_offsets, excl_items, threads, sorted);
    if (status != DPR_TOPK_OK) return status;
    excl_items = sorted.data();
  }
  const int64_t G = int8_groups(d), panels = (n_items + kPanel - 1) / kPanel;
  const int64_t rows_per_block = si == kScreenGeneric ? kRowsGeneric : kRowsAvx512;
  const int64_t parts = catalogue_parts(batch, rows_per_block, threads, panels, kScreenMinRowsPerThread);
  std::vector<int8_t> q8;
  std::vector<ScreenRow> rows;
  std::vector<Entry> storage;
  std::vector<RunningTopK> tops;
  std::vector<int64_t> rescored;
  if (!make_heaps(parts, batch, std::min(k, n_items), storage, tops)) return DPR_TOPK_OUT_OF_MEMORY;
  try {
    q8.assign(static_cast<size_t>(batch * G * 4), 0);
    rows.resize(static_cast<size_t>(batch));
    if (out_rescored != nullptr) rescored.assign(static_cast<size_t>(parts * batch), 0);
  } catch (const std::bad_alloc&) {
    return DPR_TOPK_OUT_OF_MEMORY;
  }
  // Per query row (see score_topk.h for the bound): t, q8, ||q8||, eq = ||q - t q8||, ||q||, all in double.
  const double slack = static_cast<double>(d + 16) * std::ldexp(1.0, -23);
  for (int64_t b = 0; b < batch; ++b) {
    const float* q = queries + b * d;
    float amax = 0.0f;
    for (int64_t c = 0; c < d; ++c) amax = std::max(amax, std::fabs(q[c]));
    const float t = amax >= 1e-30f ? amax / 127.0f : 1.0f;   // 1 / t stays finite
    int64_t sum = 0;
    double q8n2 = 0.0, eq2 = 0.0, qn2 = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      const long v = std::max(-127L, std::min(127L, std::lround(static_cast<double>(q[c]) / t)));
      q8[b * G * 4 + c] = static_cast<int8_t>(v);
      sum += v;
      q8n2 += static_cast<double>(v) * v;
      const double r = static_cast<double>(q[c]) - static_cast<double>(t) * v;
      eq2 += r * r;
      qn2 += static_cast<double>(q[c]) * q[c];
    }
    const double a = static_cast<double>(t) * std::sqrt(q8n2) * (1.0 + 1e-4);
    const double bc = std::sqrt(eq2) * (1.0 + 1e-4) + slack * std::sqrt(qn2);
    ScreenRow& R = rows[b];
    R.t = t;
    R.inv_t = 1.0f / t;
    R.a_coef = round_up_float(a);
    R.b_coef = round_up_float(bc);
    R.t_d = t;
    R.a_d = a;
    R.b_d = bc;
    R.acc0 = static_cast<int32_t>(-128 * sum);
  }
  const Int8Problem P{queries, q8.data(), rows.data(), table, packed8, stats, d, G, n_items};
  const Eligibility el{excl_offsets, excl_items, allowed, allowed_row_stride};
  int64_t* rc = out_rescored != nullptr ? rescored.data() : nullptr;
  std::atomic<int> oom{0};   // the per-row survivor buffers are allocated inside the threads
  if (parts == 1) {
    dpr_pool::parallel_for(threads, [&](int64_t t) {
      int64_t r0, r1;
      row_range(batch, rows_per_block, threads, t, &r0, &r1);
      try {
        if (r0 < r1) run_int8_any(si, P, r0, r1, 0, panels, el, tops.data() + r0, rc ? rc + r0 : nullptr);
      } catch (const std::bad_alloc&) {
        oom.store(1, std::memory_order_relaxed);
      }
    });
  } else {
    dpr_pool::parallel_for(parts, [&](int64_t part) {
      const int64_t p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
      try {
        run_int8_any(si, P, 0, batch, p0, p1, el, tops.data() + part * batch, rc ? rc + part * batch : nullptr);
      } catch (const std::bad_alloc&) {
        oom.store(1, std::memory_order_relaxed);
      }
    });
  }
  if (oom) return DPR_TOPK_OUT_OF_MEMORY;
  if (out_rescored != nullptr) {
    for (int64_t b = 0; b < batch; ++b) {
      int64_t total = 0;
      for (int64_t part = 0; part < parts; ++part) total += rescored[part * batch + b];
      out_rescored[b] = total;
    }
  }
  merge_parts(tops, parts, batch, k, out_idx, out_scores);
  return DPR_TOPK_OK;
}

}  // extern "C"
