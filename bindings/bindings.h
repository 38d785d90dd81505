// One bind_xxx function per topic file (k2's layout); module.cpp calls each in turn.
#pragma once

#include <pybind11/pybind11.h>

namespace libtransfer::bindings {

void bind_safetensors(pybind11::module_& m);  // bindings/safetensors.cpp
void bind_tokenizer(pybind11::module_& m);    // bindings/tokenizer.cpp
void bind_data(pybind11::module_& m);         // bindings/data.cpp (IDX, JSON lines)

}  // namespace libtransfer::bindings
