#include "safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "errors.h"
#include "json.h"

namespace sde {

struct MappedFile {
  void *data = nullptr;
  size_t size = 0;
  ~MappedFile() {
    if (data && size) munmap(data, size);
  }
};

static at::ScalarType parse_dtype(const std::string &name, const std::string &where) {
  static const std::map<std::string, at::ScalarType> table = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool},
  };
  auto it = table.find(name);
  if (it == table.end()) throw FormatError(where + ": unsupported dtype '" + name + "'");
  return it->second;
}

SafetensorsFile::SafetensorsFile(const std::string &path) : path_(path), file_(std::make_shared<MappedFile>()) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw IoError("cannot stat " + path + ": " + std::strerror(err));
  }
  size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    throw FormatError(path + ": not a safetensors file (" + std::to_string(size) + " bytes, shorter than its header)");
  }
  void *data = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (data == MAP_FAILED) throw IoError("cannot map " + path + ": " + std::strerror(err));
  file_->data = data;
  file_->size = size;

  const auto *bytes = static_cast<const unsigned char *>(data);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len == 0 || header_len > size - 8 || header_len > (100u << 20))
    throw FormatError(path + ": corrupt safetensors header length " + std::to_string(header_len) + " (file is " +
                      std::to_string(size) + " bytes)");
  Json header = Json::parse(reinterpret_cast<const char *>(bytes + 8), header_len, path + " (safetensors header)");
  if (!header.is_object()) throw FormatError(path + ": safetensors header is not a JSON object");
  size_t data_start = 8 + header_len;
  size_t data_size = size - data_start;
  for (const auto &[name, info] : header.members()) {
    if (name == "__metadata__") {
      if (info.is_object())  // the format's metadata is string -> string; other values are skipped
        for (const auto &[key, value] : info.members())
          if (value.is_string()) metadata_[key] = value.str();
      continue;
    }
    std::string where = path + ": tensor '" + name + "'";
    try {
      Entry e;
      e.dtype = parse_dtype(info.at("dtype").str(), where);
      int64_t numel = 1;
      for (const auto &d : info.at("shape").array()) {
        int64_t dim = d.integer();
        if (dim < 0) throw FormatError("negative dimension");
        e.shape.push_back(dim);
        numel *= dim;
      }
      const auto &offsets = info.at("data_offsets").array();
      if (offsets.size() != 2) throw FormatError("data_offsets must have two entries");
      int64_t begin = offsets[0].integer(), end = offsets[1].integer();
      if (begin < 0 || end < begin || static_cast<size_t>(end) > data_size)
        throw FormatError("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                          "] fall outside the " + std::to_string(data_size) + " data bytes");
      if (static_cast<int64_t>(numel * at::elementSize(e.dtype)) != end - begin)
        throw FormatError("shape and dtype need " + std::to_string(numel * at::elementSize(e.dtype)) +
                          " bytes but data_offsets span " + std::to_string(end - begin));
      e.begin = data_start + static_cast<size_t>(begin);
      e.end = data_start + static_cast<size_t>(end);
      entries_[name] = std::move(e);
    } catch (const FormatError &ex) {
      if (std::string(ex.what()).rfind(path, 0) == 0) throw;
      throw FormatError(where + ": " + ex.what());
    }
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto &kv : entries_) out.push_back(kv.first);
  return out;
}

std::vector<int64_t> SafetensorsFile::shape(const std::string &name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw FormatError(path_ + ": no tensor '" + name + "'");
  return it->second.shape;
}

std::string SafetensorsFile::metadata(const std::string &key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? std::string() : it->second;
}

at::Tensor SafetensorsFile::tensor(const std::string &name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw FormatError(path_ + ": no tensor '" + name + "'");
  const Entry &e = it->second;
  auto *holder = new std::shared_ptr<MappedFile>(file_);
  void *ptr = static_cast<char *>(file_->data) + e.begin;
  // Read-only mapping: the runtime never writes weights in place (they are constants).
  return at::from_blob(
      ptr, e.shape, [holder](void *) { delete holder; }, at::TensorOptions().dtype(e.dtype).device(at::kCPU));
}

}  // namespace sde
