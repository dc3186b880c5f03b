// Internal exceptions, one per sde_status, all sde::Error (sdengine.hpp). They never cross
// the C ABI: every C entry point catches them and turns them into a status plus
// sde_last_error().
#pragma once

#include <stdexcept>
#include <string>

#include "sdengine.hpp"  // sde::Error: the one exception class, shared with the C++ header

namespace sde {

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
