// biastransfer._C: datasets.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_datasets(py::module_& m) {}

}  // namespace libtransfer::bindings
