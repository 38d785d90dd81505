// Average ranks, Pearson and Spearman correlations (see ranks.h).
#include "libtransfer/stats/ranks.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "libtransfer/stats/validate.h"

namespace libtransfer::stats {
namespace {

void check_pair(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK_VALUE(a.defined() && b.defined(), "a and b must be tensors");
  TORCH_CHECK_VALUE(a.dim() == 1 && b.dim() == 1 && a.size(0) == b.size(0),
                    "a and b must be vectors of the same length, got shapes ", shape_string(a),
                    " and ", shape_string(b));
  TORCH_CHECK_VALUE(a.size(0) >= 2, "a and b need at least 2 values, got ", a.size(0));
}

}  // namespace

torch::Tensor rankdata(const torch::Tensor& a) {
  const torch::Tensor x = as_double(a, "a", 1).cpu();
  const int64_t n = x.numel();
  const double* v = x.data_ptr<double>();
  std::vector<int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [v](int64_t i, int64_t j) { return v[i] < v[j]; });
  auto ranks = torch::empty({n}, torch::kDouble);
  double* r = ranks.data_ptr<double>();
  for (int64_t start = 0; start < n;) {
    int64_t end = start + 1;
    while (end < n && v[order[end]] == v[order[start]]) ++end;
    // Positions start..end-1 (0-based) share the mean of ranks start+1..end.
    const double average = 0.5 * static_cast<double>(start + 1 + end);
    for (int64_t i = start; i < end; ++i) r[order[i]] = average;
    start = end;
  }
  return ranks;
}

double pearson(const torch::Tensor& a, const torch::Tensor& b) {
  check_pair(a, b);
  const torch::Tensor x = as_double(a, "a", 1);
  const torch::Tensor y = as_double(b, "b", 1).to(x.device());
  const torch::Tensor xc = x - x.mean();
  const torch::Tensor yc = y - y.mean();
  const double nx = xc.norm().item<double>();
  const double ny = yc.norm().item<double>();
  if (nx == 0.0 || ny == 0.0) return std::numeric_limits<double>::quiet_NaN();
  const double r = (xc * yc).sum().item<double>() / (nx * ny);
  return std::clamp(r, -1.0, 1.0);
}

double spearman(const torch::Tensor& a, const torch::Tensor& b) {
  check_pair(a, b);
  return pearson(rankdata(a), rankdata(b));
}

}  // namespace libtransfer::stats
