// Reading .safetensors files: the file is memory-mapped and each tensor is a view of
// the mapping (no copy); the mapping lives as long as any tensor that views it.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data, offsets relative to the end of the header.
//
// The reader accepts exactly the files that the reference reader (the `safetensors`
// library, safe_open(..., framework="pt") then get_tensor) accepts, with the same tensors:
// - N in [1, 100,000,000] and 8 + N <= the file size; the header valid UTF-8 and JSON as
//   serde_json reads it (Json::parse_serde: trailing whitespace allowed, which is how
//   writers pad the header);
// - the header an object; "__metadata__" at most once, null or an object of strings;
//   every other member a tensor: {"dtype", "shape", "data_offsets"} each exactly once
//   (other fields ignored), or the array [dtype, shape, data_offsets]; dtype a known name
//   (or {"NAME": null}); shape and data_offsets non-negative integers that fit uint64, two
//   offsets; a tensor named twice: the last one counts (each must still be well formed);
// - sorted by (begin, end), the data ranges are contiguous from 0 without gap or overlap,
//   each exactly shape x dtype bits / 8 long (the product checked for uint64 overflow,
//   whole bytes) and together exactly the bytes after the header;
// - torch can hold every tensor: no 6-bit dtype, dimensions up to int64's maximum, 4-bit
//   F4 pairs packed in a last dimension of even length (the tensor is (..., last / 2) of
//   float4_e2m1fn_x2).
// Anything else is a FormatError naming the path, the tensor and the rule.
#pragma once

#include <ATen/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sde {

struct MappedFile;

// The format's name of a torch dtype ("F16", "BF16", ...), or nullptr when it has none.
const char *safetensors_dtype_name(at::ScalarType type);

class SafetensorsFile {
 public:
  // Opens and validates the whole header (IoError: unreadable; FormatError: corrupt, naming the path).
  explicit SafetensorsFile(const std::string &path);

  const std::string &path() const { return path_; }
  bool contains(const std::string &name) const { return entries_.count(name) != 0; }
  std::vector<std::string> names() const;  // sorted
  std::vector<int64_t> shape(const std::string &name) const;
  // The header's dtype name ("F16", "BF16", ...).
  const std::string &dtype_name(const std::string &name) const;
  // A CPU tensor viewing the mapped bytes; it keeps the mapping alive.
  at::Tensor tensor(const std::string &name) const;
  // A string of the header's "__metadata__" ("" when absent).
  std::string metadata(const std::string &key) const;
  // Whether the header has a non-null "__metadata__", and all of it.
  bool has_metadata() const { return has_metadata_; }
  const std::map<std::string, std::string> &metadata_map() const { return metadata_; }

 private:
  struct Entry {
    std::string dtype_name;
    at::Tensor view;  // of the mapping, made while opening so that torch's checks run then
  };
  const Entry &entry(const std::string &name) const;

  std::string path_;
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
  bool has_metadata_ = false;
};

}  // namespace sde
