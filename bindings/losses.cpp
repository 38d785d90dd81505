// biastransfer._C: losses and evaluation.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_losses(py::module_& m) {}

}  // namespace libtransfer::bindings
