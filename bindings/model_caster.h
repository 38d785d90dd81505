// Turning a Python object into a libtransfer Model: a bound built-in model is used as is; a
// torch.nn.Module (or an HF-style model) is wrapped so that C++ drives its forward and its
// parameters (see bindings/models.cpp). Shared by every binding that takes a model.
#pragma once

#include <torch/extension.h>

#include <string>

#include "libtransfer/models/model.h"

namespace libtransfer::bindings {

// `argument` names the parameter in error messages (TypeError for objects that are no model).
models::ModelPtr to_model(const pybind11::object& object, const std::string& argument);

}  // namespace libtransfer::bindings
