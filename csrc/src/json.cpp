#include "json.h"

#include "util.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace sde {

class JsonParser {
 public:
  JsonParser(const char *data, size_t size, const std::string &what) : p_(data), begin_(data), end_(data + size), what_(what) {}

  Json document() {
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

  [[noreturn]] void fail(const std::string &why) {
    throw FormatError(what_ + ": invalid JSON at byte " + std::to_string(p_ - begin_) + ": " + why);
  }

  void skip_space() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  Json parse_value(int depth) {
    if (depth > 256) fail("nesting too deep");
    skip_space();
    if (p_ == end_) fail("unexpected end of input");
    Json v;
    switch (*p_) {
      case '{': {
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
          v.index_[key] = v.members_.size();
          v.members_.emplace_back(std::move(key), std::move(member));
          skip_space();
          if (p_ < end_ && *p_ == ',') { ++p_; continue; }
          if (p_ < end_ && *p_ == '}') { ++p_; return v; }
          fail("expected ',' or '}'");
        }
      }
      case '[': {
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
      case 'N': expect_word("NaN"); v.type_ = Json::Type::Number; v.number_ = NAN; return v;  // Python's json.dumps
      case 'I': expect_word("Infinity"); v.type_ = Json::Type::Number; v.number_ = INFINITY; return v;
      default:
        v.type_ = Json::Type::Number;
        v.number_ = parse_number();
        return v;
    }
  }

  void expect_word(const char *word) {
    for (const char *w = word; *w; ++w, ++p_)
      if (p_ == end_ || *p_ != *w) fail(std::string("expected '") + word + "'");
  }

  double parse_number() {
    const char *start = p_;
    if (p_ < end_ && *p_ == '-') {
      ++p_;
      if (p_ < end_ && *p_ == 'I') { expect_word("Infinity"); return -INFINITY; }
    }
    while (p_ < end_ && (std::isdigit(static_cast<unsigned char>(*p_)) || *p_ == '.' || *p_ == 'e' || *p_ == 'E' ||
                         *p_ == '+' || *p_ == '-'))
      ++p_;
    if (p_ == start) fail("unexpected character");
    std::string text(start, p_);
    char *stop = nullptr;
    double value = std::strtod(text.c_str(), &stop);
    if (stop != text.c_str() + text.size()) fail("bad number '" + text + "'");
    return value;
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
      char c = *p_++;
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
          if (cp >= 0xD800 && cp < 0xDC00 && end_ - p_ >= 6 && p_[0] == '\\' && p_[1] == 'u') {
            p_ += 2;
            unsigned low = hex4();
            if (low >= 0xDC00 && low < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            else fail("bad surrogate pair");
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
  return JsonParser(data, size, what).document();
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

double Json::number() const { SDE_JSON_EXPECT(Number, "a number"); return number_; }
int64_t Json::integer() const {
  SDE_JSON_EXPECT(Number, "an integer");
  if (number_ != std::floor(number_)) throw FormatError("JSON number " + std::to_string(number_) + " is not an integer");
  return static_cast<int64_t>(number_);
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
