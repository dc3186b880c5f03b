// Reading .safetensors files: the file is memory-mapped and each tensor is a view of
// the mapping (no copy); the mapping lives as long as any tensor that views it.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data, offsets relative to the end of the header.
#pragma once

#include <ATen/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sde {

struct MappedFile;

class SafetensorsFile {
 public:
  // Opens and validates the header (IoError: unreadable; FormatError: corrupt, naming the path).
  explicit SafetensorsFile(const std::string &path);

  const std::string &path() const { return path_; }
  bool contains(const std::string &name) const { return entries_.count(name) != 0; }
  std::vector<std::string> names() const;
  std::vector<int64_t> shape(const std::string &name) const;
  // A CPU tensor viewing the mapped bytes; it keeps the mapping alive.
  at::Tensor tensor(const std::string &name) const;
  // A string of the header's "__metadata__" ("" when absent).
  std::string metadata(const std::string &key) const;

 private:
  struct Entry {
    at::ScalarType dtype;
    std::vector<int64_t> shape;
    size_t begin, end;  // absolute byte offsets in the file
  };
  std::string path_;
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace sde
