#include "json.h"

#include "util.h"

#include <clocale>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <locale.h>
#include <sstream>

namespace sde {

size_t utf8_error_offset(const char *data, size_t size) {
  const auto *s = reinterpret_cast<const unsigned char *>(data);
  size_t i = 0;
  while (i < size) {
    unsigned c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // The second byte's range excludes overlong forms (E0, F0), surrogates (ED) and
    // code points past U+10FFFF (F4); other continuation bytes are 80..BF.
    size_t extra;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) extra = 1;
    else if (c == 0xE0) extra = 2, lo = 0xA0;
    else if (c == 0xED) extra = 2, hi = 0x9F;
    else if (c >= 0xE1 && c <= 0xEF) extra = 2;
    else if (c == 0xF0) extra = 3, lo = 0x90;
    else if (c == 0xF4) extra = 3, hi = 0x8F;
    else if (c >= 0xF1 && c <= 0xF3) extra = 3;
    else return i;
    if (size - i <= extra) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k <= extra; ++k)
      if ((s[i + k] & 0xC0) != 0x80) return i;
    i += extra + 1;
  }
  return size;
}

namespace {

// strtod in the "C" locale whatever the host application set (a ',' decimal point would
// otherwise cut "1.5" short).
double c_strtod(const char *text, char **stop) {
  static locale_t c_locale = newlocale(LC_ALL_MASK, "C", static_cast<locale_t>(0));
  return strtod_l(text, stop, c_locale);
}

}  // namespace

class JsonParser {
 public:
  JsonParser(const char *data, size_t size, const std::string &what, bool serde)
      : p_(data), begin_(data), end_(data + size), what_(what), serde_(serde), max_depth_(serde ? 127 : 256) {}

  Json document() {
    size_t bad = utf8_error_offset(begin_, static_cast<size_t>(end_ - begin_));
    if (bad != static_cast<size_t>(end_ - begin_)) {
      p_ = begin_ + bad;
      fail("invalid UTF-8");
    }
    Json value = parse_value(0);
    skip_space();
    if (p_ != end_) fail("trailing characters after the JSON value");
    return value;
  }

 private:
  const char *p_;
  const char *begin_;
  const char *end_;
  const std::string &what_;
  const bool serde_;     // serde_json's rules (see json.h), else Python's json module's
  const int max_depth_;  // nested arrays and objects

  [[noreturn]] void fail(const std::string &why) {
    throw FormatError(what_ + ": invalid JSON at byte " + std::to_string(p_ - begin_) + ": " + why);
  }

  void skip_space() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  void enter(int depth) {
    if (depth + 1 > max_depth_) fail("nesting deeper than " + std::to_string(max_depth_) + " arrays and objects");
  }

  Json parse_value(int depth) {
    skip_space();
    if (p_ == end_) fail("unexpected end of input");
    Json v;
    switch (*p_) {
      case '{': {
        enter(depth);
        v.type_ = Json::Type::Object;
        ++p_;
        skip_space();
        if (p_ < end_ && *p_ == '}') { ++p_; return v; }
        for (;;) {
          skip_space();
          if (p_ == end_ || *p_ != '"') fail("expected a string key");
          std::string key = parse_string();
          skip_space();
          if (p_ == end_ || *p_ != ':') fail("expected ':'");
          ++p_;
          Json member = parse_value(depth + 1);
          auto [it, inserted] = v.index_.emplace(key, v.members_.size());
          if (!inserted) {
            bool listed = false;
            for (const auto &d : v.duplicates_) listed = listed || d == key;
            if (!listed) v.duplicates_.push_back(key);
            it->second = v.members_.size();
          }
          v.members_.emplace_back(std::move(key), std::move(member));
          skip_space();
          if (p_ < end_ && *p_ == ',') { ++p_; continue; }
          if (p_ < end_ && *p_ == '}') { ++p_; return v; }
          fail("expected ',' or '}'");
        }
      }
      case '[': {
        enter(depth);
        v.type_ = Json::Type::Array;
        ++p_;
        skip_space();
        if (p_ < end_ && *p_ == ']') { ++p_; return v; }
        for (;;) {
          v.array_.push_back(parse_value(depth + 1));
          skip_space();
          if (p_ < end_ && *p_ == ',') { ++p_; continue; }
          if (p_ < end_ && *p_ == ']') { ++p_; return v; }
          fail("expected ',' or ']'");
        }
      }
      case '"':
        v.type_ = Json::Type::String;
        v.string_ = parse_string();
        return v;
      case 't': expect_word("true"); v.type_ = Json::Type::Bool; v.bool_ = true; return v;
      case 'f': expect_word("false"); v.type_ = Json::Type::Bool; v.bool_ = false; return v;
      case 'n': expect_word("null"); return v;
      case 'N':  // Python's json.dumps writes NaN and Infinity; serde_json does not read them
        if (serde_) fail("expected a value");
        expect_word("NaN");
        v.type_ = Json::Type::Number;
        v.number_ = NAN;
        return v;
      case 'I':
        if (serde_) fail("expected a value");
        expect_word("Infinity");
        v.type_ = Json::Type::Number;
        v.number_ = INFINITY;
        return v;
      default:
        parse_number(v);
        return v;
    }
  }

  void expect_word(const char *word) {
    for (const char *w = word; *w; ++w, ++p_)
      if (p_ == end_ || *p_ != *w) fail(std::string("expected '") + word + "'");
  }

  bool digit() const { return p_ < end_ && *p_ >= '0' && *p_ <= '9'; }

  // RFC 8259: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
  void parse_number(Json &v) {
    const char *start = p_;
    v.type_ = Json::Type::Number;
    if (p_ < end_ && *p_ == '-') {
      v.negative_ = true;
      ++p_;
      if (!serde_ && p_ < end_ && *p_ == 'I') {
        expect_word("Infinity");
        v.number_ = -INFINITY;
        return;
      }
    }
    if (!digit()) fail(v.negative_ ? "invalid number" : "expected a value");
    const char *int_begin = p_;
    if (*p_ == '0') ++p_;
    else while (digit()) ++p_;
    const char *int_end = p_;
    v.int_literal_ = true;
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (!digit()) fail("invalid number: no digit after '.'");
      while (digit()) ++p_;
      v.int_literal_ = false;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (!digit()) fail("invalid number: no digit in the exponent");
      while (digit()) ++p_;
      v.int_literal_ = false;
    }
    if (v.int_literal_) {
      // Python's int() refuses decimal strings of more than 4300 digits (sys.int_info).
      if (!serde_ && int_end - int_begin > 4300) fail("an integer of more than 4300 digits");
      v.fits_u64_ = true;
      for (const char *d = int_begin; d < int_end && v.fits_u64_; ++d) {
        uint64_t digit_value = static_cast<uint64_t>(*d - '0');
        if (v.magnitude_ > (std::numeric_limits<uint64_t>::max() - digit_value) / 10) v.fits_u64_ = false;
        else v.magnitude_ = v.magnitude_ * 10 + digit_value;
      }
      if (!v.fits_u64_) v.magnitude_ = 0;
    }
    std::string text(start, p_);
    if (v.int_literal_ && !v.is_integer()) v.text_ = text;  // exact beyond int64 (Python's int)
    char *stop = nullptr;
    v.number_ = c_strtod(text.c_str(), &stop);
    if (stop != text.c_str() + text.size()) fail("bad number '" + text + "'");
    // serde_json reads integers that fit u64 (i64 when negative) exactly and the rest as
    // f64, refusing what overflows it.
    bool exact_integer = v.int_literal_ && v.fits_u64_ &&
                         (!v.negative_ || v.magnitude_ <= uint64_t{1} << 63);
    if (serde_ && !exact_integer && std::isinf(v.number_)) {
      p_ = start;
      fail("number out of range");
    }
  }

  unsigned hex4() {
    if (end_ - p_ < 4) fail("truncated \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i, ++p_) {
      char c = *p_;
      code <<= 4;
      if (c >= '0' && c <= '9') code |= c - '0';
      else if (c >= 'a' && c <= 'f') code |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') code |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return code;
  }

  std::string parse_string() {
    ++p_;  // opening quote
    std::string out;
    for (;;) {
      if (p_ == end_) fail("unterminated string");
      char c = *p_;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      ++p_;
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (p_ == end_) fail("unterminated escape");
      char e = *p_++;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xDC00 && cp < 0xE000) fail("lone trailing surrogate in a \\u escape");
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') fail("lone leading surrogate in a \\u escape");
            p_ += 2;
            unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("lone leading surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

Json Json::parse(const char *data, size_t size, const std::string &what) {
  return JsonParser(data, size, what, /*serde=*/false).document();
}

Json Json::parse_serde(const char *data, size_t size, const std::string &what) {
  return JsonParser(data, size, what, /*serde=*/true).document();
}

Json Json::read_file(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot open " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw IoError("cannot read " + path);
  return parse(buffer.str(), path);
}

static const char *type_name(Json::Type t) {
  switch (t) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return "a boolean";
    case Json::Type::Number: return "a number";
    case Json::Type::String: return "a string";
    case Json::Type::Array: return "an array";
    case Json::Type::Object: return "an object";
  }
  return "?";
}

#define SDE_JSON_EXPECT(kind, wanted) \
  if (type_ != Type::kind) throw FormatError(std::string("JSON value is ") + type_name(type_) + ", expected " wanted)

bool Json::is_integer() const {
  return type_ == Type::Number && int_literal_ && fits_u64_ &&
         magnitude_ <= (negative_ ? uint64_t{1} << 63 : static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
}

double Json::number() const { SDE_JSON_EXPECT(Number, "a number"); return number_; }
int64_t Json::integer() const {
  SDE_JSON_EXPECT(Number, "an integer");
  if (!is_integer()) {
    std::ostringstream text;
    text << number_;
    throw FormatError("JSON number " + text.str() + " is not an integer in int64's range");
  }
  if (!negative_) return static_cast<int64_t>(magnitude_);
  return magnitude_ == uint64_t{1} << 63 ? std::numeric_limits<int64_t>::min() : -static_cast<int64_t>(magnitude_);
}
uint64_t Json::uint64() const {
  SDE_JSON_EXPECT(Number, "a non-negative integer");
  if (!is_uint64()) {
    std::ostringstream text;
    text << number_;
    throw FormatError("JSON number " + text.str() + " is not a non-negative integer in uint64's range");
  }
  return magnitude_;
}
bool Json::boolean() const { SDE_JSON_EXPECT(Bool, "a boolean"); return bool_; }
const std::string &Json::str() const { SDE_JSON_EXPECT(String, "a string"); return string_; }
const std::vector<Json> &Json::array() const { SDE_JSON_EXPECT(Array, "an array"); return array_; }
const std::vector<std::pair<std::string, Json>> &Json::members() const {
  SDE_JSON_EXPECT(Object, "an object");
  return members_;
}

const Json *Json::find(const std::string &key) const {
  if (type_ != Type::Object) return nullptr;
  auto it = index_.find(key);
  return it == index_.end() ? nullptr : &members_[it->second].second;
}

const Json &Json::at(const std::string &key) const {
  const Json *v = find(key);
  if (!v) throw FormatError("missing JSON key '" + key + "'");
  return *v;
}

double Json::get_number(const std::string &key, double fallback) const {
  const Json *v = find(key);
  if (!v || v->is_null()) return fallback;
  if (v->is_bool()) return v->bool_ ? 1.0 : 0.0;
  if (!v->is_number()) throw FormatError("JSON key '" + key + "' is " + type_name(v->type_) + ", expected a number");
  return v->number_;
}

int Json::get_int(const std::string &key, int fallback, int lo, int hi) const {
  const Json *v = find(key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_number()) throw FormatError("JSON key '" + key + "' is " + type_name(v->type_) + ", expected an integer");
  double x = v->number_;
  if (!(x >= lo && x <= hi) || x != std::floor(x)) {
    std::ostringstream text;
    text << x;
    throw FormatError("JSON key '" + key + "' is " + text.str() + ", expected an integer in [" + std::to_string(lo) +
                      ", " + std::to_string(hi) + "]");
  }
  return static_cast<int>(x);
}

bool Json::get_bool(const std::string &key, bool fallback) const {
  const Json *v = find(key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_bool()) throw FormatError("JSON key '" + key + "' is " + type_name(v->type_) + ", expected a boolean");
  return v->bool_;
}

std::string Json::get_string(const std::string &key, const std::string &fallback) const {
  const Json *v = find(key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_string()) throw FormatError("JSON key '" + key + "' is " + type_name(v->type_) + ", expected a string");
  return v->string_;
}

}  // namespace sde
