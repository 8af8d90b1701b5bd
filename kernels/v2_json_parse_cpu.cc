// The v2 route's JSON reader (v2_json_parse_api.h): one pass over the bytes (json_lex.h), a recursive descent over
// the plain case's shapes, the history's ids mapped through the item-id index at the end in prefetched groups
// (id_index_impl.h). Anything else stops the pass with DPR_V2P_DECLINED; the caller's Python path decides then.
#include <cstdint>
#include <cstring>
#include <new>
#include <string_view>
#include <utility>
#include <vector>

#include "id_index_impl.h"
#include "json_lex.h"
#include "v2_json_parse_api.h"

namespace {

constexpr int kMaxDepth = 64;

class V2Parser : public dpr_json::Lexer {
 public:
  V2Parser(const char* body, int64_t len, int64_t max_elems, int64_t* ints, uint8_t* bools, int64_t* str_offsets,
           char* str_bytes, int64_t* info)
      : Lexer(body, len, DPR_V2P_DECLINED), max_elems_(max_elems), ints_(ints), bools_(bools),
        str_offsets_(str_offsets), str_bytes_(str_bytes), info_(info) {}

  dpr_json::StringSpans ids;         // the history's elements, in order (an empty one: len 0)

  bool run() {
    for (int i = 0; i < DPR_V2P_INFO; ++i) info_[i] = 0;
    for (int i = DPR_V2P_SLOTS * DPR_V2P_SLOT_FIELDS; i < DPR_V2P_INFO; ++i) info_[i] = -1;
    str_offsets_[0] = 0;
    ws();
    if (!at('{')) return decline();
    ++p_;
    ws();
    if (at('}')) return decline();               // no inputs
    unsigned seen = 0;
    for (;;) {
      ws();
      std::string_view name;
      if (!member_key(&name)) return false;
      static const std::string_view tops[4] = {"inputs", "id", "outputs", "parameters"};
      int which = -1;
      for (int i = 0; i < 4; ++i)
        if (name == tops[i]) which = i;
      if (which >= 0) {
        if (seen & (1u << which)) return decline();   // a key twice: json.loads keeps the last; left to it
        seen |= 1u << which;
      }
      if (which == 0) {
        if (!inputs()) return false;
      } else if (which > 0) {
        const char* start = p_;
        if (!skip_value(kMaxDepth)) return false;
        info_[DPR_V2P_SLOTS * DPR_V2P_SLOT_FIELDS + 2 * (which - 1)] = start - begin_;
        info_[DPR_V2P_SLOTS * DPR_V2P_SLOT_FIELDS + 2 * (which - 1) + 1] = p_ - begin_;
      } else if (!skip_value(kMaxDepth)) {
        return false;
      }
      const int more = after_element('}');
      if (more < 0) return false;
      if (!more) break;
    }
    if (!(seen & 1u)) return decline();
    ws();
    return p_ == end_ || decline();               // nothing but whitespace after the value
  }

 private:
  int64_t max_elems_;
  int64_t* ints_;
  uint8_t* bools_;
  int64_t* str_offsets_;
  char* str_bytes_;
  int64_t* info_;
  int64_t n_ints_ = 0, n_bools_ = 0, n_strings_ = 0, str_used_ = 0;

  bool inputs() {
    if (!at('[')) return decline();
    ++p_;
    ws();
    if (at(']')) return decline();               // no inputs
    for (;;) {
      ws();
      if (!input()) return false;
      const int more = after_element(']');
      if (more < 0) return false;
      if (!more) return true;
    }
  }

  // One input object: its name first known, then its data into that slot's column.
  bool input() {
    if (!at('{')) return decline();
    ++p_;
    int slot = -1;
    int64_t* f = nullptr;                         // info_ of its slot
    unsigned seen = 0;
    int64_t dtype = -1, ndim = 0, d0 = 0, d1 = 0;
    ws();
    if (at('}')) return decline();
    for (;;) {
      ws();
      std::string_view key;
      if (!member_key(&key)) return false;
      static const std::string_view keys[5] = {"name", "datatype", "shape", "data", "parameters"};
      int which = -1;
      for (int i = 0; i < 5; ++i)
        if (key == keys[i]) which = i;
      if (which == 4) return decline();           // parameters (binary_data_size, ...): the Python path reads it
      if (which >= 0) {
        if (seen & (1u << which)) return decline();
        seen |= 1u << which;
      }
      switch (which) {
        case 0: {                                 // name
          const char* s;
          size_t m;
          if (!plain_key(&s, &m)) return false;   // a string without escapes
          static const std::string_view names[DPR_V2P_SLOTS] = {"history", "prompt", "negative_prompt", "k",
                                                                "exclude_history"};
          for (int i = 0; i < DPR_V2P_SLOTS; ++i)
            if (std::string_view(s, m) == names[i]) slot = i;
          if (slot < 0) return decline();
          f = info_ + slot * DPR_V2P_SLOT_FIELDS;
          if (f[0]) return decline();             // an input given twice
          f[0] = 1;
          break;
        }
        case 1: {                                 // datatype
          const char* s;
          size_t m;
          if (!plain_key(&s, &m)) return false;
          static const std::string_view types[13] = {"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16",
                                                     "UINT32", "UINT64", "FP16", "FP32", "FP64", "BYTES"};
          for (int i = 0; i < 13; ++i)
            if (std::string_view(s, m) == types[i]) dtype = i;
          if (dtype < 0) return decline();
          break;
        }
        case 2:                                   // shape
          if (!shape(&ndim, &d0, &d1)) return false;
          break;
        case 3:                                   // data
          if (slot < 0) return decline();         // data before name: left to Python
          if (!data(slot, f)) return false;
          break;
        default:
          if (!skip_value(kMaxDepth)) return false;
      }
      const int more = after_element('}');
      if (more < 0) return false;
      if (!more) break;
    }
    if (seen != 0xFu) return decline();            // name, datatype, shape and data, each once
    f[1] = dtype;
    f[2] = ndim;
    f[3] = d0;
    f[4] = d1;
    return true;
  }

  bool shape(int64_t* ndim, int64_t* d0, int64_t* d1) {
    if (!at('[')) return decline();
    ++p_;
    int64_t dims[2] = {0, 0};
    int nd = 0;
    for (;;) {
      ws();
      if (nd == 2) return decline();              // a third dimension: the Python path reads it
      int64_t v;
      if (!integer(&v) || v < 0) return decline();
      dims[nd++] = v;
      const int more = after_element(']');
      if (more < 0) return false;
      if (!more) break;
    }
    *ndim = nd;
    *d0 = dims[0];
    *d1 = dims[1];
    return true;
  }

  // The elements in the slot's column so far (prompt and negative_prompt share the strings).
  int64_t filled(int slot) const {
    switch (slot) {
      case DPR_V2P_HISTORY: return ids.size();
      case DPR_V2P_K: return n_ints_;
      case DPR_V2P_EXCLUDE: return n_bools_;
      default: return n_strings_;
    }
  }

  // "data": scalars, or arrays of scalars (one per row), into the slot's column.
  bool data(int slot, int64_t* f) {
    if (!at('[')) return decline();
    ++p_;
    ws();
    f[6] = filled(slot);
    if (at(']')) {
      ++p_;
      f[5] = 0;
      return true;
    }
    const bool nested = at('[');
    for (;;) {
      ws();
      if (nested) {
        if (!at('[')) return decline();           // rows and scalars mixed: the Python path reads it
        ++p_;
        ws();
        if (at(']')) {
          ++p_;
        } else {
          for (;;) {
            ws();
            const int more = element(slot);
            if (more < 0) return false;
            if (!more) break;
          }
        }
        const int more = after_element(']');
        if (more < 0) return false;
        if (!more) break;
        continue;
      }
      const int more = element(slot);
      if (more < 0) return false;
      if (!more) break;
    }
    f[5] = filled(slot) - f[6];
    return true;
  }

  // One element of a "data" list and what follows it: 1 (another follows), 0 (the list ended), -1 (failed). A
  // history id of plain ASCII (no escape, no control byte), the bulk of a large call, is read in one loop without
  // calls: as string_span() and after_element() read it, which read everything else.
  int element(int slot) {
    if (slot == DPR_V2P_HISTORY && at('"')) {
      const char* start = p_ + 1;
      const char* q = start;
      while (q < end_) {
        const unsigned char c = static_cast<unsigned char>(*q);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++q;
      }
      if (q < end_ && *q == '"') {
        if (ids.size() >= max_elems_) return fail(DPR_V2P_SHORT_BUFFER), -1;
        dpr_json::StringSpans::Span& sp = ids.spans.emplace_back();
        sp.off = start - begin_;
        sp.len = q - start;
        sp.decoded = false;
        p_ = q + 1;
        if (at(',')) {                            // the separator, mostly right after the string
          ++p_;
          return 1;
        }
        return after_element(']');
      }
    }
    if (!scalar(slot)) return -1;
    return after_element(']');
  }

  bool scalar(int slot) {
    switch (slot) {
      case DPR_V2P_HISTORY:
        if (!at('"')) return decline();
        if (ids.size() >= max_elems_) return fail(DPR_V2P_SHORT_BUFFER);
        return string_span(&ids);
      case DPR_V2P_K: {
        if (n_ints_ >= max_elems_) return fail(DPR_V2P_SHORT_BUFFER);
        return integer(&ints_[n_ints_++]);
      }
      case DPR_V2P_EXCLUDE: {
        if (n_bools_ >= max_elems_) return fail(DPR_V2P_SHORT_BUFFER);
        if (literal("true", 4)) bools_[n_bools_++] = 1;
        else if (literal("false", 5)) bools_[n_bools_++] = 0;
        else return decline();
        return true;
      }
      default: {                                  // a prompt: its decoded text, never longer than its source
        if (!at('"')) return decline();
        if (n_strings_ >= max_elems_) return fail(DPR_V2P_SHORT_BUFFER);
        const char* text;
        int64_t n;
        if (!string_text(&text, &n)) return false;
        if (n > 0) std::memcpy(str_bytes_ + str_used_, text, static_cast<size_t>(n));
        str_used_ += n;
        str_offsets_[++n_strings_] = str_used_;
        return true;
      }
    }
  }
};

}  // namespace

extern "C" {

const char* dpr_v2_json_parse_status_string(int status) {
  switch (status) {
    case DPR_V2P_OK: return "ok";
    case DPR_V2P_NULL_POINTER: return "null pointer";
    case DPR_V2P_DECLINED: return "declined (not a plain v2 JSON request: the Python path decides)";
    case DPR_V2P_UNKNOWN_ID: return "a history element is not a catalogue id";
    case DPR_V2P_SHORT_BUFFER: return "more elements than the capacity given";
    case DPR_V2P_OUT_OF_MEMORY: return "out of memory";
    default: return "unknown status";
  }
}

int dpr_v2_json_parse(const dpr_id_index* index, const char* body, int64_t len, int64_t max_elems, int64_t* history,
                      int64_t* ints, uint8_t* bools, int64_t* str_offsets, char* str_bytes, int64_t* info,
                      int64_t* where) {
  if (index == nullptr || (body == nullptr && len > 0) || ints == nullptr || bools == nullptr ||
      str_offsets == nullptr || info == nullptr || where == nullptr || (history == nullptr && max_elems > 0) ||
      (str_bytes == nullptr && len > 0))
    return DPR_V2P_NULL_POINTER;
  *where = 0;
  if (len <= 0 || max_elems < 0) return DPR_V2P_DECLINED;
  try {
    V2Parser ps(body, len, max_elems, ints, bools, str_offsets, str_bytes, info);
    if (!ps.run()) {
      *where = ps.where;
      return ps.status;
    }
    // the ids, a group at a time (hash and prefetch, then probe: id_index_impl.h); an empty one is padding
    const int64_t unknown = index->map_spans(ps.ids.size(), [&](int64_t i) { return ps.ids.at(body, i); }, history,
                                             true);
    if (unknown >= 0) {
      *where = unknown;
      return DPR_V2P_UNKNOWN_ID;
    }
    return DPR_V2P_OK;
  } catch (const std::bad_alloc&) {
    return DPR_V2P_OUT_OF_MEMORY;
  }
}

}  // extern "C"
