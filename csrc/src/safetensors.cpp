#include "safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>

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

namespace {

constexpr uint64_t kMaxHeader = 100'000'000;  // the reference's MAX_HEADER_SIZE

struct Dtype {
  const char *name;
  unsigned bits;
  std::optional<at::ScalarType> type;  // none: torch has no such dtype (the reference refuses it too)
};

using T = at::ScalarType;

// The reference's dtypes (safetensors Dtype) and the torch dtypes it returns them as.
const Dtype kDtypes[] = {
  {"BOOL", 8, T::Bool},
  {"F4", 4, T::Float4_e2m1fn_x2},
  {"F6_E2M3", 6, std::nullopt},
  {"F6_E3M2", 6, std::nullopt},
  {"U8", 8, T::Byte},
  {"I8", 8, T::Char},
  {"F8_E5M2", 8, T::Float8_e5m2},
  {"F8_E4M3", 8, T::Float8_e4m3fn},
  {"F8_E8M0", 8, T::Float8_e8m0fnu},
  {"F8_E4M3FNUZ", 8, T::Float8_e4m3fnuz},
  {"F8_E5M2FNUZ", 8, T::Float8_e5m2fnuz},
  {"I16", 16, T::Short},
  {"U16", 16, T::UInt16},
  {"F16", 16, T::Half},
  {"BF16", 16, T::BFloat16},
  {"I32", 32, T::Int},
  {"U32", 32, T::UInt32},
  {"F32", 32, T::Float},
  {"C64", 64, T::ComplexFloat},
  {"F64", 64, T::Double},
  {"I64", 64, T::Long},
  {"U64", 64, T::UInt64},
};

const Dtype *find_dtype(const std::string &name) {
  for (const auto &d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

// A header member's tensor description, as serde derives it for the reference's
// TensorInfo: an object with each field once (others ignored) or an array of the three.
struct TensorInfo {
  const Dtype *dtype = nullptr;
  std::string dtype_name;
  std::vector<uint64_t> shape;
  uint64_t begin = 0, end = 0;
};

const Dtype *read_dtype(const Json &v) {
  std::string name;
  if (v.is_string()) {
    name = v.str();
  } else if (v.is_object()) {  // serde's externally tagged form of a unit variant: {"F16": null}
    if (v.members().size() != 1) throw FormatError("dtype as an object must have a single key");
    if (!v.members()[0].second.is_null()) throw FormatError("dtype {\"NAME\": value} needs a null value");
    name = v.members()[0].first;
  } else {
    throw FormatError("dtype must be a string");
  }
  const Dtype *d = find_dtype(name);
  if (!d) throw FormatError("unknown dtype '" + name + "'");
  return d;
}

std::vector<uint64_t> read_uints(const Json &v, const char *field) {
  if (!v.is_array()) throw FormatError(std::string(field) + " must be an array");
  std::vector<uint64_t> out;
  for (const auto &x : v.array()) {
    if (!x.is_uint64()) throw FormatError(std::string(field) + " must hold non-negative integers (at most 2^64 - 1)");
    out.push_back(x.uint64());
  }
  return out;
}

TensorInfo read_tensor_info(const Json &v) {
  const Json *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
  if (v.is_object()) {
    for (const auto &[key, value] : v.members()) {
      const Json **slot = key == "dtype" ? &dtype : key == "shape" ? &shape : key == "data_offsets" ? &offsets : nullptr;
      if (!slot) continue;  // other fields are ignored, as serde does
      if (*slot) throw FormatError("field '" + key + "' given twice");
      *slot = &value;
    }
    if (!dtype) throw FormatError("missing field 'dtype'");
    if (!shape) throw FormatError("missing field 'shape'");
    if (!offsets) throw FormatError("missing field 'data_offsets'");
  } else if (v.is_array()) {
    if (v.array().size() != 3) throw FormatError("a tensor given as an array needs [dtype, shape, data_offsets]");
    dtype = &v.array()[0];
    shape = &v.array()[1];
    offsets = &v.array()[2];
  } else {
    throw FormatError("must be an object {dtype, shape, data_offsets}");
  }
  TensorInfo info;
  info.dtype = read_dtype(*dtype);
  info.dtype_name = info.dtype->name;
  info.shape = read_uints(*shape, "shape");
  std::vector<uint64_t> range = read_uints(*offsets, "data_offsets");
  if (range.size() != 2) throw FormatError("data_offsets must have two entries");
  info.begin = range[0];
  info.end = range[1];
  return info;
}

std::string range_str(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

}  // namespace

const char *safetensors_dtype_name(at::ScalarType type) {
  for (const auto &d : kDtypes)
    if (d.type == type) return d.name;
  return nullptr;
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
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError("cannot read " + path + ": not a regular file");
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
  if (header_len == 0 || header_len > kMaxHeader || header_len > size - 8)
    throw FormatError(path + ": corrupt safetensors header length " + std::to_string(header_len) + " (file is " +
                      std::to_string(size) + " bytes; at most " + std::to_string(kMaxHeader) + ")");
  Json header = Json::parse_serde(reinterpret_cast<const char *>(bytes + 8), header_len, path + " (safetensors header)");
  if (!header.is_object()) throw FormatError(path + ": safetensors header is not a JSON object");

  // -- the header's members ---------------------------------------------------------
  std::map<std::string, TensorInfo> tensors;  // a name given twice: the last one counts
  bool metadata_seen = false;
  for (const auto &[name, value] : header.members()) {
    if (name == "__metadata__") {
      if (metadata_seen) throw FormatError(path + ": '__metadata__' is given twice");
      metadata_seen = true;
      if (value.is_null()) continue;
      if (!value.is_object()) throw FormatError(path + ": '__metadata__' must be an object of strings");
      has_metadata_ = true;
      for (const auto &[key, item] : value.members()) {
        if (!item.is_string())
          throw FormatError(path + ": '__metadata__' value of '" + key + "' is not a string (metadata maps strings to strings)");
        metadata_[key] = item.str();
      }
      continue;
    }
    try {
      tensors[name] = read_tensor_info(value);
    } catch (const FormatError &e) {
      throw FormatError(path + ": tensor '" + name + "': " + e.what());
    }
  }

  // -- the data ranges: contiguous from 0, in order, covering the data exactly ------
  std::vector<std::pair<std::string, const TensorInfo *>> order;
  for (const auto &[name, info] : tensors) order.emplace_back(name, &info);
  std::stable_sort(order.begin(), order.end(), [](const auto &a, const auto &b) {
    return std::make_pair(a.second->begin, a.second->end) < std::make_pair(b.second->begin, b.second->end);
  });
  const uint64_t data_size = size - 8 - header_len;
  uint64_t expected_begin = 0;
  for (const auto &[name, info] : order) {
    std::string where = path + ": tensor '" + name + "'";
    if (info->begin != expected_begin || info->end < info->begin)
      throw FormatError(where + ": data_offsets " + range_str(info->begin, info->end) + " do not start where the " +
                        "previous range ends (" + std::to_string(expected_begin) +
                        "): data ranges must be contiguous, without gap or overlap");
    expected_begin = info->end;
    uint64_t elements = 1, bits = 0;
    for (uint64_t dim : info->shape)
      if (__builtin_mul_overflow(elements, dim, &elements))
        throw FormatError(where + ": its shape's element count overflows 64 bits");
    if (__builtin_mul_overflow(elements, static_cast<uint64_t>(info->dtype->bits), &bits))
      throw FormatError(where + ": its size in bits overflows 64 bits");
    if (bits % 8) throw FormatError(where + ": " + std::to_string(elements) + " " + info->dtype_name + " elements are not whole bytes");
    if (info->end - info->begin != bits / 8)
      throw FormatError(where + ": shape and dtype need " + std::to_string(bits / 8) + " bytes but data_offsets " +
                        range_str(info->begin, info->end) + " span " + std::to_string(info->end - info->begin));
  }
  if (expected_begin != data_size)
    throw FormatError(path + ": the tensors' data ranges end at byte " + std::to_string(expected_begin) + " but the " +
                      "file holds " + std::to_string(data_size) + " data bytes after its header (a wrong header " +
                      "length, a truncated file or extra bytes)");

  // -- torch views of the mapping ----------------------------------------------------
  const uint64_t data_start = 8 + header_len;
  for (const auto &[name, info] : tensors) {
    std::string where = path + ": tensor '" + name + "'";
    if (!info.dtype->type) throw FormatError(where + ": dtype " + info.dtype_name + " has no torch equivalent");
    std::vector<int64_t> shape;
    for (uint64_t dim : info.shape) {
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw FormatError(where + ": dimension " + std::to_string(dim) + " exceeds torch's int64 sizes");
      shape.push_back(static_cast<int64_t>(dim));
    }
    if (info.dtype->bits == 4) {  // float4_e2m1fn_x2 holds two values per byte along the last dimension
      if (shape.empty() || shape.back() % 2)
        throw FormatError(where + ": an F4 tensor needs a last dimension of even length (two values per byte)");
      shape.back() /= 2;
    }
    void *ptr = static_cast<char *>(file_->data) + data_start + info.begin;
    at::Tensor view;
    try {
      // As the reference builds it (the bytes as uint8, viewed as the dtype, reshaped), so
      // that torch's own checks decide what it can hold. The deleter's copy of file_ keeps
      // the mapping alive. Read-only: the runtime never writes weights in place.
      at::Tensor bytes = at::from_blob(
          ptr, {static_cast<int64_t>(info.end - info.begin)}, [keep = file_](void *) {},
          at::TensorOptions().dtype(at::kByte).device(at::kCPU));
      view = bytes.view(*info.dtype->type).reshape(shape);
    } catch (const c10::Error &e) {
      throw FormatError(where + ": torch cannot hold it: " + e.what_without_backtrace());
    }
    entries_[name] = Entry{info.dtype_name, std::move(view)};
  }
}

const SafetensorsFile::Entry &SafetensorsFile::entry(const std::string &name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw FormatError(path_ + ": no tensor '" + name + "'");
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto &kv : entries_) out.push_back(kv.first);
  return out;
}

std::vector<int64_t> SafetensorsFile::shape(const std::string &name) const { return entry(name).view.sizes().vec(); }

const std::string &SafetensorsFile::dtype_name(const std::string &name) const { return entry(name).dtype_name; }

std::string SafetensorsFile::metadata(const std::string &key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? std::string() : it->second;
}

at::Tensor SafetensorsFile::tensor(const std::string &name) const { return entry(name).view; }

}  // namespace sde
