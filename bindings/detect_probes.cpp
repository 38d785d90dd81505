// biastransfer._C: activation, output and susceptibility tests, report.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_detect_probes(py::module_& m) {}

}  // namespace libtransfer::bindings
