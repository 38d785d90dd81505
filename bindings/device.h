// Device arguments from Python, checked to exist on this machine before any work starts: a
// request for CUDA on a machine without it (or for a CUDA index it does not have) is a ValueError
// naming the argument, not torch's RuntimeError from deep inside a copy.
#pragma once

#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>

#include "libtransfer/errors.h"

namespace libtransfer::bindings {

// `device` unchanged if this machine has it; InvalidInput naming `argument` otherwise.
inline torch::Device available_device(const torch::Device& device,
                                      const std::string& argument = "device") {
  if (!device.is_cuda()) return device;
  if (!torch::cuda::is_available()) {
    throw InvalidInput(argument + ": '" + device.str() +
                       "' was requested, but CUDA is not available on this machine "
                       "(torch.cuda.is_available() is False)");
  }
  const auto count = static_cast<std::int64_t>(torch::cuda::device_count());
  if (device.has_index() && device.index() >= count) {
    throw InvalidInput(argument + ": '" + device.str() + "' was requested, but this machine has " +
                       std::to_string(count) + " CUDA device(s)");
  }
  return device;
}

// Parses "cpu", "cuda", "cuda:1", ... and checks the device exists (see available_device).
inline torch::Device parse_available_device(const std::string& text,
                                            const std::string& argument = "device") {
  torch::Device device(torch::kCPU);
  try {
    device = torch::Device(text);
  } catch (const c10::Error&) {
    throw InvalidInput(argument + ": expected a torch device such as 'cpu' or 'cuda:0', got '" +
                       text + "'");
  }
  return available_device(device, argument);
}

}  // namespace libtransfer::bindings
