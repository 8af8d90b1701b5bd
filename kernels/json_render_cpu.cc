// The /recommend answer renderer (json_render_api.h): what serve/render.py's recommend_json writes, in one pass.
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "json_render_api.h"

namespace {

// Python's float repr ("r" mode of PyOS_double_to_string with Py_DTSF_ADD_DOT_0): the shortest round-trip
// digits (std::to_chars picks them as David Gay's dtoa mode 0 does: the shortest, then the nearest), laid out
// in fixed notation when the decimal point falls at -4 < decpt <= 16, else as d[.ddd]e+XX (at least two
// exponent digits).
int repr_double(double v, char* out) {
  if (std::isnan(v)) {
    std::memcpy(out, "nan", 3);
    return 3;
  }
  if (std::isinf(v)) {
    if (v < 0) {
      std::memcpy(out, "-inf", 4);
      return 4;
    }
    std::memcpy(out, "inf", 3);
    return 3;
  }
  char buf[48];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const char* p = buf;
  const char* end = r.ptr;
  char* o = out;
  if (*p == '-') {
    *o++ = '-';
    ++p;
  }
  char digits[24];
  int nd = 0;
  for (; p < end && *p != 'e'; ++p)
    if (*p != '.') digits[nd++] = *p;
  int exp = 0;
  if (p < end) {                                  // "e+XX" / "e-XX"
    ++p;
    const bool neg = p < end && *p == '-';
    if (p < end && (*p == '+' || *p == '-')) ++p;
    for (; p < end; ++p) exp = exp * 10 + (*p - '0');
    if (neg) exp = -exp;
  }
  const int decpt = exp + 1;                      // digits d1 d2 ... = 0.d1d2... x 10^decpt
  if (decpt <= -4 || decpt > 16) {
    *o++ = digits[0];
    if (nd > 1) {
      *o++ = '.';
      std::memcpy(o, digits + 1, nd - 1);
      o += nd - 1;
    }
    *o++ = 'e';
    int e = decpt - 1;
    *o++ = e < 0 ? '-' : '+';
    e = std::abs(e);
    char eb[8];
    int ne = 0;
    do {
      eb[ne++] = static_cast<char>('0' + e % 10);
      e /= 10;
    } while (e);
    if (ne < 2) eb[ne++] = '0';
    while (ne) *o++ = eb[--ne];
  } else if (decpt <= 0) {
    *o++ = '0';
    *o++ = '.';
    for (int i = 0; i < -decpt; ++i) *o++ = '0';
    std::memcpy(o, digits, nd);
    o += nd;
  } else if (decpt >= nd) {
    std::memcpy(o, digits, nd);
    o += nd;
    for (int i = nd; i < decpt; ++i) *o++ = '0';
    *o++ = '.';
    *o++ = '0';
  } else {
    std::memcpy(o, digits, decpt);
    o += decpt;
    *o++ = '.';
    std::memcpy(o, digits + decpt, nd - decpt);
    o += nd - decpt;
  }
  return static_cast<int>(o - out);
}

// A bounded writer: every append checks the room first, so a wrong capacity is a status, never an overrun.
struct Writer {
  char* o;
  char* end;
  bool ok = true;
  void put(const char* s, size_t n) {
    if (!ok || static_cast<size_t>(end - o) < n) {
      ok = false;
      return;
    }
    std::memcpy(o, s, n);
    o += n;
  }
  void lit(const char* s) { put(s, std::strlen(s)); }
  void integer(int64_t v) {
    char b[24];
    const std::to_chars_result r = std::to_chars(b, b + sizeof(b), v);
    put(b, static_cast<size_t>(r.ptr - b));
  }
  void real(double v) {
    char b[32];
    put(b, static_cast<size_t>(repr_double(v, b)));
  }
};

bool offsets_ok(const int64_t* off, int64_t n) {
  if (off[0] < 0) return false;
  for (int64_t i = 0; i < n; ++i)
    if (off[i + 1] < off[i]) return false;
  return true;
}

}  // namespace

extern "C" {

const char* dpr_render_status_string(int status) {
  switch (status) {
    case DPR_RENDER_OK: return "ok";
    case DPR_RENDER_NULL_POINTER: return "a required pointer is null";
    case DPR_RENDER_BAD_ARGUMENT: return "bad shape, count or offsets";
    case DPR_RENDER_BAD_INDEX: return "a ranked item index is outside the catalogue's fragments";
    case DPR_RENDER_SHORT_BUFFER: return "the output buffer is too small";
    default: return "unknown status";
  }
}

int dpr_render_double_repr(double v, char* out) { return out == nullptr ? 0 : repr_double(v, out); }

int dpr_render_float_list(const float* v, int64_t n, char* out, int64_t capacity, int64_t* written) {
  if (written == nullptr || out == nullptr || (v == nullptr && n > 0)) return DPR_RENDER_NULL_POINTER;
  *written = 0;
  if (n < 0 || capacity < 0) return DPR_RENDER_BAD_ARGUMENT;
  Writer w{out, out + capacity};
  w.put("[", 1);
  for (int64_t i = 0; i < n; ++i) {
    if (i) w.put(", ", 2);
    const double x = static_cast<double>(v[i]);
    if (std::isnan(x)) {
      w.put("NaN", 3);                          // json.dumps' words for them (allow_nan), not repr's
    } else if (std::isinf(x)) {
      if (x < 0) w.put("-Infinity", 9);
      else w.put("Infinity", 8);
    } else {
      w.real(x);
    }
  }
  w.put("]", 1);
  if (!w.ok) return DPR_RENDER_SHORT_BUFFER;
  *written = w.o - out;
  return DPR_RENDER_OK;
}

int dpr_render_fragment_list(const int64_t* indices, int64_t n, const char* frags, const int64_t* frag_offsets,
                             int64_t n_frags, int64_t frags_len, char* out, int64_t capacity, int64_t* written) {
  if (written == nullptr || out == nullptr || frags == nullptr || frag_offsets == nullptr ||
      (indices == nullptr && n > 0))
    return DPR_RENDER_NULL_POINTER;
  *written = 0;
  if (n < 0 || n_frags < 1 || frags_len < 0 || capacity < 0) return DPR_RENDER_BAD_ARGUMENT;
  Writer w{out, out + capacity};
  w.put("[", 1);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = indices[j];
    if (i < 0 || i >= n_frags) return DPR_RENDER_BAD_INDEX;
    const int64_t a = frag_offsets[i], b = frag_offsets[i + 1];
    if (a < 0 || b < a || b > frags_len) return DPR_RENDER_BAD_ARGUMENT;
    if (j) w.put(", ", 2);
    w.put(frags + a, static_cast<size_t>(b - a));
  }
  w.put("]", 1);
  if (!w.ok) return DPR_RENDER_SHORT_BUFFER;
  *written = w.o - out;
  return DPR_RENDER_OK;
}

int dpr_render_recommend_rows(const int64_t* indices, const float* scores, int64_t rows, int64_t cols,
                              const int64_t* counts, int64_t k, const char* frags, const int64_t* frag_offsets,
                              int64_t n_frags, int64_t frags_len, const char* reasons,
                              const int64_t* reason_offsets, char* out, int64_t capacity, int64_t* written,
                              int64_t* row_ends) {
  if (written == nullptr || counts == nullptr || frags == nullptr || frag_offsets == nullptr ||
      reasons == nullptr || reason_offsets == nullptr || out == nullptr)
    return DPR_RENDER_NULL_POINTER;
  *written = 0;
  if (rows < 0 || cols < 0 || n_frags < 1 || frags_len < 0 || capacity < 0) return DPR_RENDER_BAD_ARGUMENT;
  if (rows > 0 && cols > 0 && (indices == nullptr || scores == nullptr)) return DPR_RENDER_NULL_POINTER;
  if (!offsets_ok(reason_offsets, rows)) return DPR_RENDER_BAD_ARGUMENT;
  // only the fragments this answer uses are checked (a catalogue has 100,000 of them: checking all per call
  // cost more than rendering a one-row answer)
  for (int64_t r = 0; r < rows; ++r) {
    if (counts[r] < 0 || counts[r] > cols) return DPR_RENDER_BAD_ARGUMENT;
    for (int64_t j = 0; j < counts[r]; ++j) {
      const int64_t i = indices[r * cols + j];
      if (i < 1 || i >= n_frags) return DPR_RENDER_BAD_INDEX;
      if (frag_offsets[i] < 0 || frag_offsets[i + 1] < frag_offsets[i] || frag_offsets[i + 1] > frags_len)
        return DPR_RENDER_BAD_ARGUMENT;
    }
  }
  Writer w{out, out + capacity};
  for (int64_t r = 0; r < rows; ++r) {
    if (r) w.put(", ", 2);
    w.lit("{\"k\": ");
    w.integer(k);
    w.lit(", \"count\": ");
    w.integer(counts[r]);
    w.lit(", \"short_reason\": ");
    w.put(reasons + reason_offsets[r], static_cast<size_t>(reason_offsets[r + 1] - reason_offsets[r]));
    w.lit(", \"items\": [");
    for (int64_t j = 0; j < counts[r]; ++j) {
      const int64_t i = indices[r * cols + j];
      if (j) w.put(", ", 2);
      w.lit("{\"rank\": ");
      w.integer(j + 1);
      w.put(", ", 2);
      w.put(frags + frag_offsets[i], static_cast<size_t>(frag_offsets[i + 1] - frag_offsets[i]));
      w.lit(", \"score\": ");
      w.real(static_cast<double>(scores[r * cols + j]));
      w.put("}", 1);
    }
    w.lit("]}");
    if (!w.ok) return DPR_RENDER_SHORT_BUFFER;
    if (row_ends != nullptr) row_ends[r] = w.o - out;
  }
  *written = w.o - out;
  return DPR_RENDER_OK;
}

}  // extern "C"
