// Internal exceptions, one per sde_status. They never cross the C ABI: every C entry
// point catches them and turns them into a status plus sde_last_error().
#pragma once

#include <stdexcept>
#include <string>

#include "sdengine.h"

namespace sde {

class Error : public std::runtime_error {
 public:
  Error(sde_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
  sde_status status() const { return status_; }

 private:
  sde_status status_;
};

struct InvalidArgument : Error {
  explicit InvalidArgument(const std::string &m) : Error(SDE_ERR_INVALID_ARGUMENT, m) {}
};
struct IoError : Error {
  explicit IoError(const std::string &m) : Error(SDE_ERR_IO, m) {}
};
struct FormatError : Error {
  explicit FormatError(const std::string &m) : Error(SDE_ERR_FORMAT, m) {}
};
struct DeviceError : Error {
  explicit DeviceError(const std::string &m) : Error(SDE_ERR_DEVICE, m) {}
};
struct OutOfMemory : Error {
  explicit OutOfMemory(const std::string &m) : Error(SDE_ERR_OUT_OF_MEMORY, m) {}
};
struct Cancelled : Error {
  explicit Cancelled(const std::string &m) : Error(SDE_ERR_CANCELLED, m) {}
};

}  // namespace sde
