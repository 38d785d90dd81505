// Argument checks shared by the stats and fingerprint functions: dtype, rank, finiteness and
// range of tensor arguments, with messages that name the argument and show the offending value.
//
// Each check is one pass over the tensor (a reduction); conversions return float64 contiguous
// tensors on the input's device, copying only when the dtype or layout differs.
#pragma once

#include <torch/types.h>

#include <string>

namespace libtransfer::stats {

// `name` as float64 with rank `dim` (-1: any rank). Floating or integer dtypes are accepted
// (integers converted exactly); bool and complex -> TypeError. Non-finite values -> ValueError
// unless allow_nonfinite.
torch::Tensor as_double(const torch::Tensor& t, const std::string& name, int64_t dim,
                        bool allow_nonfinite = false);

// "[3, 4]": a shape as users see it in messages.
std::string shape_string(const torch::Tensor& t);

}  // namespace libtransfer::stats
