// biastransfer._C: models.
#include <torch/extension.h>

#include "bindings.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_models(py::module_& m) {}

}  // namespace libtransfer::bindings

#include "model_caster.h"

namespace libtransfer::bindings {

// Placeholder until the models binding lands.
models::ModelPtr to_model(const pybind11::object&, const std::string& argument) {
  throw pybind11::type_error(argument + ": models are not bound yet");
}

}  // namespace libtransfer::bindings
