// Argument checks shared by the stats and fingerprint functions (see validate.h).
#include "libtransfer/stats/validate.h"

#include <torch/torch.h>

#include <sstream>

namespace libtransfer::stats {

std::string shape_string(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

torch::Tensor as_double(const torch::Tensor& t, const std::string& name, int64_t dim,
                        bool allow_nonfinite) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got an undefined tensor");
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type != at::kBool && !at::isComplexType(type), name,
                   " must be a real floating or integer tensor, got dtype ", type);
  TORCH_CHECK_VALUE(dim < 0 || t.dim() == dim, name, " must have ", dim,
                    " dimension(s), got shape ", shape_string(t));
  torch::Tensor out = t.to(at::kDouble).contiguous();
  if (!allow_nonfinite && out.numel() > 0) {
    TORCH_CHECK_VALUE(out.isfinite().all().item<bool>(), name,
                      " must be finite, got NaN or infinite values");
  }
  return out;
}

}  // namespace libtransfer::stats
