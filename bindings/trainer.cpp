// biastransfer._C: the trainer.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_trainer(py::module_& m) {}

}  // namespace libtransfer::bindings
