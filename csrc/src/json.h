// A small, strict JSON reader (RFC 8259) for safetensors headers, engine.json, diffusers
// config files and tokenizer vocabularies. Parse errors throw FormatError naming the byte
// offset.
//
// Two dialects, each matching the reader that wrote or checks the files:
// - Json::parse: Python's json module (configs, engine.json, vocabularies). NaN, Infinity
//   and -Infinity are read (json.dumps writes them); a number beyond double's range is
//   +-inf, as float() gives.
// - Json::parse_serde: serde_json, the JSON of the reference safetensors reader. No NaN or
//   Infinity, a number beyond double's range is an error, at most 127 nested containers.
// Both: the input must be valid UTF-8 (no byte order mark, surrogates, overlong forms or
// code points past U+10FFFF), strings hold no raw control characters, a \u escape of a
// surrogate must be a high + low pair, numbers follow the RFC's grammar exactly (no
// leading zeros, '+', '.5' or '1.').
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "errors.h"

namespace sde {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Json() = default;
  static Json parse(const char *data, size_t size, const std::string &what);
  static Json parse(const std::string &text, const std::string &what) {
    return parse(text.data(), text.size(), what);
  }
  static Json parse_serde(const char *data, size_t size, const std::string &what);
  static Json read_file(const std::string &path);  // IoError / FormatError name the path

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }
  // A number written as an integer (no fraction, no exponent) whose value fits int64
  // ("-0" is 0), as Python's json gives an int.
  bool is_integer() const;
  // A number written as a non-negative integer without a sign that fits uint64: what
  // serde reads as usize ("-0" is not one).
  bool is_uint64() const { return type_ == Type::Number && int_literal_ && !negative_ && fits_u64_; }

  double number() const;
  int64_t integer() const;    // FormatError unless is_integer()
  uint64_t uint64() const;    // FormatError unless is_uint64()
  // An integer literal beyond int64's range as written ("" for other numbers): Python reads it exactly.
  const std::string &big_integer_text() const { return text_; }
  bool boolean() const;
  const std::string &str() const;
  const std::vector<Json> &array() const;
  // Object members in file order, duplicates included (find() gives the last one).
  const std::vector<std::pair<std::string, Json>> &members() const;
  // Keys that occur more than once in this object (each once, in file order).
  const std::vector<std::string> &duplicate_keys() const { return duplicates_; }
  const Json *find(const std::string &key) const;  // nullptr when absent (or not an object)
  const Json &at(const std::string &key) const;    // FormatError when absent

  // Lookups with defaults; a present key of the wrong type is a FormatError.
  double get_number(const std::string &key, double fallback) const;
  bool get_bool(const std::string &key, bool fallback) const;
  std::string get_string(const std::string &key, const std::string &fallback) const;
  // An integer in [lo, hi]; FormatError for another type or value (a config's 1000.0 counts).
  int get_int(const std::string &key, int fallback, int lo, int hi) const;

 private:
  friend class JsonParser;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0.0;
  bool int_literal_ = false;  // written without fraction or exponent
  bool negative_ = false;     // written with a minus sign
  bool fits_u64_ = false;     // the magnitude of an integer literal fits uint64
  uint64_t magnitude_ = 0;    // of an integer literal, when fits_u64_
  std::string text_;          // an integer literal beyond int64, as written
  std::string string_;
  std::vector<Json> array_;
  std::vector<std::pair<std::string, Json>> members_;
  std::map<std::string, size_t> index_;
  std::vector<std::string> duplicates_;
};

// The offset of the first byte that breaks UTF-8 (as Python's and Rust's strict decoders
// define it), or size when the bytes are valid.
size_t utf8_error_offset(const char *data, size_t size);

}  // namespace sde
