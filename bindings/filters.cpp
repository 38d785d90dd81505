// biastransfer._C: filters.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_filters(py::module_& m) {}

}  // namespace libtransfer::bindings
