// Build facts of libtransfer: its own version and the torch version it was compiled against.
// Each call returns a copy of a string fixed at build time (no I/O).
#pragma once

#include <string>

namespace libtransfer {

std::string version();           // e.g. "0.1.0"
std::string built_with_torch();  // torch's version string at build time, e.g. "1.13.0a0"

}  // namespace libtransfer
