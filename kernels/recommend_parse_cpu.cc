// The /recommend body parser (recommend_parse_api.h): one pass over the bytes, a recursive descent over the few
// shapes the plain case allows, the history ids mapped through the item-id index at the end in prefetched groups
// (id_index_impl.h). Anything else stops the pass with DPR_PARSE_DECLINED; the caller's Python path decides then.
#include <cstdint>
#include <cstring>
#include <new>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "id_index_impl.h"
#include "recommend_parse_api.h"

namespace {

enum Field : int { kHistory = 0, kPrompt, kNegative, kK, kExclude, kFilter, kFields };

struct IdSpan {
  int64_t off;      // into the body, or into the decoded-id buffer when `decoded`
  int64_t len;
  bool decoded;
};

class Parser {
 public:
  Parser(const char* body, int64_t len, int64_t max_rows, int64_t max_ids, int64_t max_strings, int64_t* offsets,
         int64_t* ks, uint8_t* exclude, int32_t* prompt, int32_t* negative, int64_t* str_offsets, char* str_bytes)
      : begin_(body), p_(body), end_(body + len), max_rows_(max_rows), max_ids_(max_ids),
        max_strings_(max_strings), offsets_(offsets), ks_(ks), exclude_(exclude), prompt_(prompt),
        negative_(negative), str_offsets_(str_offsets), str_bytes_(str_bytes) {}

  int status = DPR_PARSE_OK;
  int64_t where = 0;
  int64_t rows = 0;
  int64_t strings = 0;
  bool single = false;
  std::vector<IdSpan> ids;
  std::vector<char> decoded_ids;

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
  const char* begin_;
  const char* p_;
  const char* end_;
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
  std::vector<char> scratch_;

  bool fail(int status_code) {
    if (status == DPR_PARSE_OK) {
      status = status_code;
      where = p_ - begin_;
    }
    return false;
  }
  bool decline() { return fail(DPR_PARSE_DECLINED); }
  bool at(char c) const { return p_ < end_ && *p_ == c; }

  void ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
  }

  // After an element of an array or object: 1 at ',' (another follows), 0 at `close` (the end), -1 (declined).
  int after_element(char close) {
    ws();
    if (at(',')) {
      ++p_;
      return 1;
    }
    if (at(close)) {
      ++p_;
      return 0;
    }
    return decline(), -1;
  }

  bool literal(const char* word, size_t n) {
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return false;
    p_ += n;
    return true;
  }

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
      if (static_cast<int64_t>(ids.size()) >= max_ids_) return fail(DPR_PARSE_SHORT_BUFFER);
      const char* start = p_ + 1;
      scratch_.clear();
      bool escaped = false;
      if (!string(&escaped)) return false;
      if (escaped) {
        ids.push_back({static_cast<int64_t>(decoded_ids.size()), static_cast<int64_t>(scratch_.size()), true});
        decoded_ids.insert(decoded_ids.end(), scratch_.begin(), scratch_.end());
      } else {
        ids.push_back({start - begin_, (p_ - 1) - start, false});
      }
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
    const char* start = p_ + 1;
    scratch_.clear();
    bool escaped = false;
    if (!string(&escaped)) return false;
    const char* text = escaped ? scratch_.data() : start;
    const int64_t n = escaped ? static_cast<int64_t>(scratch_.size()) : (p_ - 1) - start;
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

  // An integer as json.loads reads one into an int: -?(0|[1-9][0-9]*), here at most 18 digits; a fraction or
  // an exponent makes it a float, which the route refuses: declined.
  bool integer(int64_t* out) {
    const bool negative = at('-');
    if (negative) ++p_;
    if (!(p_ < end_ && *p_ >= '0' && *p_ <= '9')) return decline();
    int64_t v = 0;
    int digits = 0;
    if (*p_ == '0') {
      ++p_;
      digits = 1;
    } else {
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') {
        if (++digits > 18) return decline();
        v = v * 10 + (*p_ - '0');
        ++p_;
      }
    }
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E' || (*p_ >= '0' && *p_ <= '9'))) return decline();
    *out = negative ? -v : v;
    return true;
  }

  static int hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  bool hex4(uint32_t* out) {
    if (end_ - p_ < 4) return false;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const int h = hex(p_[i]);
      if (h < 0) return false;
      v = (v << 4) | static_cast<uint32_t>(h);
    }
    p_ += 4;
    *out = v;
    return true;
  }

  void put_utf8(uint32_t cp) {
    if (cp < 0x80) {
      scratch_.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      scratch_.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      scratch_.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      scratch_.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      scratch_.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      scratch_.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      scratch_.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      scratch_.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      scratch_.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      scratch_.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  // The length of the valid UTF-8 sequence at p_ (lead byte >= 0x80), or 0: strict (no overlong form, no
  // surrogate, nothing past U+10FFFF), as the Python path accepts text (a surrogate it decodes is refused later).
  int utf8_length() const {
    const auto b = [&](int i) { return static_cast<unsigned char>(p_[i]); };
    const int64_t left = end_ - p_;
    const unsigned char c = b(0);
    const auto cont = [&](int i) { return i < left && (b(i) & 0xC0) == 0x80; };
    if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
      if (!cont(1) || !cont(2)) return 0;
      if (c == 0xE0 && b(1) < 0xA0) return 0;     // overlong
      if (c == 0xED && b(1) > 0x9F) return 0;     // a surrogate
      return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
      if (!cont(1) || !cont(2) || !cont(3)) return 0;
      if (c == 0xF0 && b(1) < 0x90) return 0;     // overlong
      if (c == 0xF4 && b(1) > 0x8F) return 0;     // past U+10FFFF
      return 4;
    }
    return 0;
  }

  // A string; p_ at its opening quote, left past its closing one. Without escapes its text is the source
  // bytes (*escaped false); with any, the decoded text is in scratch_ (*escaped true).
  bool string(bool* escaped) {
    ++p_;
    const char* run = p_;                          // source bytes not yet copied to scratch_
    for (;;) {
      if (p_ >= end_) return decline();
      const unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        if (*escaped) scratch_.insert(scratch_.end(), run, p_);
        ++p_;
        return true;
      }
      if (c < 0x20) return decline();              // a raw control character: json.loads refuses it
      if (c < 0x80 && c != '\\') {
        ++p_;
        continue;
      }
      if (c >= 0x80) {
        const int n = utf8_length();
        if (n == 0) return decline();
        p_ += n;
        continue;
      }
      // an escape
      if (!*escaped) {
        *escaped = true;
        scratch_.clear();
      }
      scratch_.insert(scratch_.end(), run, p_);
      ++p_;
      if (p_ >= end_) return decline();
      const char e = *p_++;
      switch (e) {
        case '"': scratch_.push_back('"'); break;
        case '\\': scratch_.push_back('\\'); break;
        case '/': scratch_.push_back('/'); break;
        case 'b': scratch_.push_back('\b'); break;
        case 'f': scratch_.push_back('\f'); break;
        case 'n': scratch_.push_back('\n'); break;
        case 'r': scratch_.push_back('\r'); break;
        case 't': scratch_.push_back('\t'); break;
        case 'u': {
          uint32_t cp;
          if (!hex4(&cp)) return decline();
          if (cp >= 0xDC00 && cp <= 0xDFFF) return decline();   // a lone low surrogate
          if (cp >= 0xD800 && cp <= 0xDBFF) {                   // must be the first of a pair
            uint32_t lo;
            if (!(end_ - p_ >= 6 && p_[0] == '\\' && p_[1] == 'u')) return decline();
            p_ += 2;
            if (!hex4(&lo) || lo < 0xDC00 || lo > 0xDFFF) return decline();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(cp);
          break;
        }
        default:
          return decline();
      }
      run = p_;
    }
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
    // the ids, a group at a time: hash and prefetch the group's home slots, then probe
    const int64_t n = static_cast<int64_t>(ps.ids.size());
    uint64_t hashes[dpr_ids::kGroup];
    const char* starts[dpr_ids::kGroup];
    for (int64_t g0 = 0; g0 < n; g0 += dpr_ids::kGroup) {
      const int64_t g1 = g0 + dpr_ids::kGroup < n ? g0 + dpr_ids::kGroup : n;
      for (int64_t i = g0; i < g1; ++i) {
        const IdSpan& s = ps.ids[i];
        starts[i - g0] = (s.decoded ? ps.decoded_ids.data() : body) + s.off;
        hashes[i - g0] = dpr_ids::hash_bytes(starts[i - g0], s.len);
        index->prefetch(hashes[i - g0]);
      }
      for (int64_t i = g0; i < g1; ++i) {
        const uint32_t v = index->find(starts[i - g0], ps.ids[i].len, hashes[i - g0]);
        if (v == 0) {
          *where = i;
          return DPR_PARSE_UNKNOWN_ID;
        }
        items[i] = v;
      }
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
