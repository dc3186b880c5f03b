#include "sdengine.h"

extern "C" {

const char *sde_version(void) { return "0.1.0"; }

const char *sde_status_str(sde_status status) {
  switch (status) {
    case SDE_OK: return "ok";
    case SDE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SDE_ERR_IO: return "I/O error";
    case SDE_ERR_FORMAT: return "bad file format";
    case SDE_ERR_OUT_OF_MEMORY: return "out of memory";
    case SDE_ERR_DEVICE: return "device error";
    case SDE_ERR_CANCELLED: return "cancelled";
    case SDE_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

}  // extern "C"
