// sdengine._C: Python bindings of libsdengine.
#include <pybind11/pybind11.h>

#include "sdengine.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "sdengine native runtime";
  m.def("version", &sde_version, "libsdengine version");
  m.def("status_str", [](int status) { return sde_status_str(static_cast<sde_status>(status)); });
}
