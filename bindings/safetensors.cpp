// Placeholder until the safetensors bindings land (replaced by the helper that owns this file).
#include "bindings.h"
namespace libtransfer::bindings {
void bind_safetensors(pybind11::module_& m) {}
}  // namespace libtransfer::bindings
