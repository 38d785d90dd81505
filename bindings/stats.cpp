// Placeholder until the stats bindings land (replaced by the helper that owns this file).
#include "bindings.h"
namespace libtransfer::bindings {
void bind_stats(pybind11::module_& m) {}
}  // namespace libtransfer::bindings
