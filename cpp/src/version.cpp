#include "libtransfer/version.h"

#include <torch/version.h>

namespace libtransfer {

std::string version() { return LIBTRANSFER_VERSION; }

std::string built_with_torch() { return TORCH_VERSION; }

}  // namespace libtransfer
