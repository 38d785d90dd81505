// biastransfer._C: the sampler.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_sampler(py::module_& m) {}

}  // namespace libtransfer::bindings
