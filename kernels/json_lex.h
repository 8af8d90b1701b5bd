// The JSON lexing the native body readers share (recommend_parse_cpu.cc, v2_json_parse_cpu.cc): whitespace, keys,
// strings with every escape JSON allows, integers, literals, and a validating skip of any value. Each reader is a
// recursive descent over the few shapes its plain case allows, on top of this; anything outside them stops the
// pass with the reader's "declined" status, and the caller's Python path (json.loads and its checks) decides.
// What this accepts, json.loads accepts and reads the same (strings: the same code points; integers: the same
// int); the reverse does not hold (NaN, a lone surrogate, a UTF-8 BOM, deep nesting: declined). Host code only.
#pragma once
#include <cstdint>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

namespace dpr_json {

// Strings kept as spans for a later pass (the readers' history ids, mapped through the id index at the end): one
// without an escape is a span of the body, one with escapes a span of `decoded`, its decoded text.
struct StringSpans {
  struct Span {
    int64_t off;
    int64_t len;
    bool decoded;
  };
  std::vector<Span> spans;
  std::vector<char> decoded;

  int64_t size() const { return static_cast<int64_t>(spans.size()); }
  // string i's bytes and length; `body`: the body the spans of the body point into
  std::pair<const char*, int64_t> at(const char* body, int64_t i) const {
    const Span& s = spans[static_cast<size_t>(i)];
    return {(s.decoded ? decoded.data() : body) + s.off, s.len};
  }
};

class Lexer {
 public:
  Lexer(const char* body, int64_t len, int declined_status)
      : begin_(body), p_(body), end_(body + len), declined_(declined_status) {}

  int status = 0;            // 0: fine so far; else the first failure's status
  int64_t where = 0;         // the byte offset of the first failure

 protected:
  const char* begin_;
  const char* p_;
  const char* end_;
  int declined_;
  std::vector<char> scratch_;    // a string's decoded text, when it had an escape

  bool fail(int status_code) {
    if (status == 0) {
      status = status_code;
      where = p_ - begin_;
    }
    return false;
  }
  bool decline() { return fail(declined_); }
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

  // A string of printable ASCII without escapes (a key, a name), up to its closing quote (p_ left past it); false
  // (declined) otherwise: an escape, a control character or any byte >= 0x80 (json.loads would first check that
  // the whole body is UTF-8, which this scan does not).
  bool plain_key(const char** start, size_t* n) {
    if (!at('"')) return decline();
    const char* s = ++p_;
    while (p_ < end_ && *p_ != '"' && *p_ != '\\' && static_cast<unsigned char>(*p_) >= 0x20 &&
           static_cast<unsigned char>(*p_) < 0x80)
      ++p_;
    if (!at('"')) return decline();
    *start = s;
    *n = static_cast<size_t>(p_ - s);
    ++p_;
    return true;
  }

  // An object member's plain key and the colon after it (whitespace around), p_ left at its value; false (declined)
  // as plain_key, or without the colon.
  bool member_key(std::string_view* key) {
    const char* k;
    size_t n;
    if (!plain_key(&k, &n)) return false;
    *key = std::string_view(k, n);
    ws();
    if (!at(':')) return decline();
    ++p_;
    ws();
    return true;
  }

  // An integer as json.loads reads one into an int: -?(0|[1-9][0-9]*), here at most 18 digits; a fraction or
  // an exponent makes it a float: declined.
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

  // Any JSON value json.loads reads, skipped after checking its grammar (strings decoded into scratch_ and
  // dropped), at most `depth` arrays / objects deep; NaN, Infinity and deeper nesting are declined.
  bool skip_value(int depth) {
    ws();
    if (p_ >= end_) return decline();
    const char c = *p_;
    if (c == '"') {
      bool escaped = false;
      return string(&escaped);
    }
    if (c == '{' || c == '[') {
      if (depth <= 0) return decline();
      const char close = c == '{' ? '}' : ']';
      ++p_;
      ws();
      if (at(close)) {
        ++p_;
        return true;
      }
      for (;;) {
        ws();
        if (c == '{') {
          bool escaped = false;
          if (!at('"') || !string(&escaped)) return decline();
          ws();
          if (!at(':')) return decline();
          ++p_;
        }
        if (!skip_value(depth - 1)) return false;
        const int more = after_element(close);
        if (more < 0) return false;
        if (!more) return true;
      }
    }
    if (literal("true", 4) || literal("false", 5) || literal("null", 4)) return true;
    return number();
  }

  // A JSON number (RFC 8259 grammar), skipped.
  bool number() {
    if (at('-')) ++p_;
    const auto digit = [&] { return p_ < end_ && *p_ >= '0' && *p_ <= '9'; };
    if (!digit()) return decline();
    if (*p_ == '0') ++p_;
    else while (digit()) ++p_;
    if (at('.')) {
      ++p_;
      if (!digit()) return decline();
      while (digit()) ++p_;
    }
    if (at('e') || at('E')) {
      ++p_;
      if (at('+') || at('-')) ++p_;
      if (!digit()) return decline();
      while (digit()) ++p_;
    }
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

  // A string's decoded text: its source bytes when it has no escape, else scratch_ (valid until the next string).
  bool string_text(const char** text, int64_t* n) {
    const char* start = p_ + 1;
    bool escaped = false;
    if (!string(&escaped)) return false;
    *text = escaped ? scratch_.data() : start;
    *n = escaped ? static_cast<int64_t>(scratch_.size()) : (p_ - 1) - start;
    return true;
  }

  // A string appended to `out` as a span (see StringSpans).
  bool string_span(StringSpans* out) {
    const char* start = p_ + 1;
    bool escaped = false;
    if (!string(&escaped)) return false;
    // the span is written in place: a braced temporary pushed back was built on the stack with narrower stores
    // than the copy's wide load, a store-forwarding stall that took most of the v2 reader's time per element
    StringSpans::Span& s = out->spans.emplace_back();
    if (escaped) {
      s.off = static_cast<int64_t>(out->decoded.size());
      s.len = static_cast<int64_t>(scratch_.size());
      s.decoded = true;
      out->decoded.insert(out->decoded.end(), scratch_.begin(), scratch_.end());
    } else {
      s.off = start - begin_;
      s.len = (p_ - 1) - start;
      s.decoded = false;
    }
    return true;
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

}  // namespace dpr_json
