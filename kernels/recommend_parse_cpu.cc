// The /recommend body parser (recommend_parse_api.h): one pass over the bytes, a recursive descent over the few
// shapes the plain case allows, the history ids mapped through the item-id index at the end in prefetched groups
// (id_index_impl.h). Anything else stops the pass with DPR_PARSE_DECLINED; the caller's Python path decides then.
#include <cstdint>
#include <cstring>
#include <new>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "id_index_impl.h"
#include "json_lex.h"
#include "recommend_parse_api.h"

namespace {

enum Field : int { kHistory = 0, kPrompt, kNegative, kK, kExclude, kFilter, kFields };

class Parser : public dpr_json::Lexer {
 public:
  Parser(const char* body, int64_t len, int64_t max_rows, int64_t max_ids, int64_t max_strings, int64_t* offsets,
         int64_t* ks, uint8_t* exclude, int32_t* prompt, int32_t* negative, int64_t* str_offsets, char* str_bytes)
      : Lexer(body, len, DPR_PARSE_DECLINED), max_rows_(max_rows), max_ids_(max_ids),
        max_strings_(max_strings), offsets_(offsets), ks_(ks), exclude_(exclude), prompt_(prompt),
        negative_(negative), str_offsets_(str_offsets), str_bytes_(str_bytes) {}

  int64_t rows = 0;
  int64_t strings = 0;
  bool single = false;
  dpr_json::StringSpans ids;        // the history ids, in order

  bool run() {
    str_offsets_[0] = 0;
    offsets_[0] = 0;
    ws();
    if (at('{')) {
      single = true;
      if (!object()) return false;
    } else if (at('[')) {
      ++p_;
      ws();
      if (at(']')) return decline();              // an empty list: the route's to answer
      for (;;) {
        ws();
        if (!at('{') || !object()) return decline();
        const int more = after_element(']');
        if (more < 0) return false;
        if (!more) break;
      }
    } else {
      return decline();
    }
    ws();
    return p_ == end_ || decline();               // nothing but whitespace after the value
  }

 private:
  int64_t max_rows_, max_ids_, max_strings_;
  int64_t* offsets_;
  int64_t* ks_;
  uint8_t* exclude_;
  int32_t* prompt_;
  int32_t* negative_;
  int64_t* str_offsets_;
  char* str_bytes_;
  int64_t str_used_ = 0;
  std::unordered_map<std::string_view, int32_t> interned_;

  // One object: its fields into row `rows`. p_ is at '{'.
  bool object() {
    if (rows >= max_rows_) return fail(DPR_PARSE_SHORT_BUFFER);
    ++p_;
    unsigned seen = 0;
    int64_t k = 10;
    uint8_t excl = 1;
    int32_t pos = -1, neg = -1;
    ws();
    if (at('}')) return decline();                 // no history
    for (;;) {
      ws();
      const int field = key();
      if (field < 0) return false;
      if (seen & (1u << field)) return decline();  // a key twice: json.loads keeps the last; left to it
      seen |= 1u << field;
      ws();
      if (!at(':')) return decline();
      ++p_;
      ws();
      switch (field) {
        case kHistory:
          if (!history()) return false;
          break;
        case kPrompt:
          if (!optional_text(&pos)) return false;
          break;
        case kNegative:
          if (!optional_text(&neg)) return false;
          break;
        case kK:
          if (!integer(&k)) return false;
          break;
        case kExclude:
          if (literal("true", 4)) excl = 1;
          else if (literal("false", 5)) excl = 0;
          else return decline();
          break;
        default:                                   // hard_filter: only null here (a filter goes to Python)
          if (!literal("null", 4)) return decline();
      }
      const int more = after_element('}');
      if (more < 0) return false;
      if (!more) break;
    }
    if (!(seen & (1u << kHistory))) return decline();
    ks_[rows] = k;
    exclude_[rows] = excl;
    prompt_[rows] = pos;
    negative_[rows] = neg;
    ++rows;
    offsets_[rows] = static_cast<int64_t>(ids.size());
    return true;
  }

  // A key, written without escapes: its Field, or -1 (declined).
  int key() {
    if (!at('"')) return decline(), -1;
    const char* s = ++p_;
    while (p_ < end_ && *p_ != '"' && *p_ != '\\') ++p_;
    if (!at('"')) return decline(), -1;
    const std::string_view name(s, static_cast<size_t>(p_ - s));
    ++p_;
    static const std::string_view names[kFields] = {"history", "prompt", "negative_prompt", "k",
                                                    "exclude_history", "hard_filter"};
    for (int f = 0; f < kFields; ++f)
      if (name == names[f]) return f;
    return decline(), -1;
  }

  bool history() {
    if (!at('[')) return decline();
    ++p_;
    ws();
    if (at(']')) {
      ++p_;
      return true;
    }
    for (;;) {
      ws();
      if (!at('"')) return decline();
      if (ids.size() >= max_ids_) return fail(DPR_PARSE_SHORT_BUFFER);
      if (!string_span(&ids)) return false;
      const int more = after_element(']');
      if (more < 0) return false;
      if (!more) return true;
    }
  }

  // null (-1) or a string, interned among the distinct strings of the body.
  bool optional_text(int32_t* out) {
    if (literal("null", 4)) {
      *out = -1;
      return true;
    }
    if (!at('"')) return decline();
    const char* text;
    int64_t n;
    if (!string_text(&text, &n)) return false;
    char* dst = str_bytes_ + str_used_;            // the decoded text of a string is never longer than its source
    if (n > 0) std::memcpy(dst, text, static_cast<size_t>(n));
    const std::string_view view(dst, static_cast<size_t>(n));
    const auto found = interned_.find(view);
    if (found != interned_.end()) {
      *out = found->second;
      return true;
    }
    if (strings >= max_strings_) return fail(DPR_PARSE_SHORT_BUFFER);
    interned_.emplace(view, static_cast<int32_t>(strings));
    *out = static_cast<int32_t>(strings);
    str_used_ += n;
    str_offsets_[++strings] = str_used_;
    return true;
  }
};

}  // namespace

extern "C" {

const char* dpr_recommend_parse_status_string(int status) {
  switch (status) {
    case DPR_PARSE_OK: return "ok";
    case DPR_PARSE_NULL_POINTER: return "null pointer";
    case DPR_PARSE_DECLINED: return "declined (not a plain /recommend body: the Python path decides)";
    case DPR_PARSE_UNKNOWN_ID: return "a history id is not in the catalogue";
    case DPR_PARSE_SHORT_BUFFER: return "more rows, ids or strings than the capacities given";
    case DPR_PARSE_OUT_OF_MEMORY: return "out of memory";
    default: return "unknown status";
  }
}

int dpr_recommend_parse(const dpr_id_index* index, const char* body, int64_t len, int64_t max_rows, int64_t max_ids,
                        int64_t max_strings, int64_t* offsets, int64_t* items, int64_t* ks, uint8_t* exclude,
                        int32_t* prompt, int32_t* negative, int64_t* str_offsets, char* str_bytes, int64_t* counts,
                        int64_t* where) {
  if (index == nullptr || (body == nullptr && len > 0) || offsets == nullptr || ks == nullptr ||
      exclude == nullptr || prompt == nullptr || negative == nullptr || str_offsets == nullptr ||
      counts == nullptr || where == nullptr || (items == nullptr && max_ids > 0) ||
      (str_bytes == nullptr && len > 0))
    return DPR_PARSE_NULL_POINTER;
  *where = 0;
  if (len <= 0 || max_rows < 0 || max_ids < 0 || max_strings < 0) return DPR_PARSE_DECLINED;
  try {
    Parser ps(body, len, max_rows, max_ids, max_strings, offsets, ks, exclude, prompt, negative, str_offsets,
              str_bytes);
    if (!ps.run()) {
      *where = ps.where;
      return ps.status;
    }
    // the ids, a group at a time (hash and prefetch, then probe: id_index_impl.h)
    const int64_t n = ps.ids.size();
    const int64_t unknown = index->map_spans(n, [&](int64_t i) { return ps.ids.at(body, i); }, items, false);
    if (unknown >= 0) {
      *where = unknown;
      return DPR_PARSE_UNKNOWN_ID;
    }
    counts[0] = ps.rows;
    counts[1] = n;
    counts[2] = ps.strings;
    counts[3] = ps.single ? 1 : 0;
    return DPR_PARSE_OK;
  } catch (const std::bad_alloc&) {
    return DPR_PARSE_OUT_OF_MEMORY;
  }
}

}  // extern "C"
