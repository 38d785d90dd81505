// Placeholder until the fingerprint_inputs bindings land (replaced by the helper that owns this file).
#include "bindings.h"
namespace libtransfer::bindings {
void bind_fingerprint_inputs(pybind11::module_& m) {}
}  // namespace libtransfer::bindings
