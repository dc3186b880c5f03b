// A small JSON reader (RFC 8259): enough for safetensors headers, engine.json,
// diffusers config files and tokenizer vocabularies. Parse errors throw FormatError
// naming the byte offset.
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
  static Json read_file(const std::string &path);  // IoError / FormatError name the path

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  double number() const;
  int64_t integer() const;
  bool boolean() const;
  const std::string &str() const;
  const std::vector<Json> &array() const;
  // Object members in file order (duplicates: the last one wins in find()).
  const std::vector<std::pair<std::string, Json>> &members() const;
  const Json *find(const std::string &key) const;  // nullptr when absent (or not an object)
  const Json &at(const std::string &key) const;    // FormatError when absent

  // Lookups with defaults; a present key of the wrong type is a FormatError.
  double get_number(const std::string &key, double fallback) const;
  bool get_bool(const std::string &key, bool fallback) const;
  std::string get_string(const std::string &key, const std::string &fallback) const;

 private:
  friend class JsonParser;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  std::vector<Json> array_;
  std::vector<std::pair<std::string, Json>> members_;
  std::map<std::string, size_t> index_;
};

}  // namespace sde
