// Fingerprint::top_tokens.
#include "libtransfer/fingerprint/fingerprint.h"

#include <algorithm>

namespace libtransfer::fingerprint {

std::pair<torch::Tensor, torch::Tensor> Fingerprint::top_tokens(int64_t k, const std::string& field,
                                                                bool largest) const {
  TORCH_CHECK_VALUE(k >= 0, "top_tokens: k must be >= 0, got ", k);
  torch::Tensor values;
  if (field == "mean_log_ratio") {
    values = mean_log_ratio;
  } else if (field == "grad") {
    values = grad;
  } else if (field == "centered") {
    values = centered;
  } else {
    TORCH_CHECK_VALUE(false,
                      "top_tokens: field must be 'mean_log_ratio', 'grad' or 'centered', got '",
                      field, "'");
  }
  TORCH_CHECK_VALUE(values.defined(), "top_tokens: the fingerprint has no '", field, "'");
  const int64_t count = std::min<int64_t>(k, values.numel());
  // A stable sort keeps equal values in id order; NaN (none expected) sorts last either way.
  const auto order = std::get<1>(values.sort(/*stable=*/true, /*dim=*/0, /*descending=*/largest))
                         .slice(0, 0, count);
  const auto top_values = values.index_select(0, order);
  const auto ids = field == "centered" ? subset.index_select(0, order) : order;
  return {ids.clone(), top_values.clone()};
}

}  // namespace libtransfer::fingerprint
