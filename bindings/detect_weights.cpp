// biastransfer._C: the weight test.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_detect_weights(py::module_& m) {}

}  // namespace libtransfer::bindings
