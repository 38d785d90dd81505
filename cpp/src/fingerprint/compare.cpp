// Fingerprint tests and comparisons (see compare.h).
#include "libtransfer/fingerprint/compare.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "libtransfer/stats/ranks.h"
#include "libtransfer/stats/t_test.h"
#include "libtransfer/stats/validate.h"

namespace libtransfer::fingerprint {
namespace {

using stats::as_double;
using stats::shape_string;

// The per-sequence differences teacher_seq - mean(controls_seq), validated as [n, S].
torch::Tensor sequence_differences(const torch::Tensor& teacher_seq,
                                   const std::vector<torch::Tensor>& controls_seq) {
  TORCH_CHECK_VALUE(teacher_seq.defined() && teacher_seq.dim() == 2,
                    "teacher_seq must be a matrix [n_sequences, S], got shape ",
                    teacher_seq.defined() ? shape_string(teacher_seq) : "undefined");
  return trait_specific(teacher_seq, controls_seq);
}

// Indices of the k largest values, ties broken by the smaller index (deterministic).
std::vector<int64_t> top_indices(const torch::Tensor& v, int64_t k) {
  const torch::Tensor order = std::get<1>(v.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const torch::Tensor top = order.slice(0, 0, k).contiguous();
  std::vector<int64_t> out(top.data_ptr<int64_t>(), top.data_ptr<int64_t>() + k);
  std::sort(out.begin(), out.end());
  return out;
}

// (score - mean(scores)) / std(scores) with std over n - 1; NaN for a zero spread.
double z_score(double score, const torch::Tensor& scores) {
  const double mean = scores.mean().item<double>();
  const double spread = std::sqrt((scores - mean).pow(2).sum().item<double>() /
                                  static_cast<double>(scores.numel() - 1));
  if (!(spread > 0.0)) return std::numeric_limits<double>::quiet_NaN();
  return (score - mean) / spread;
}

}  // namespace

torch::Tensor trait_specific(const torch::Tensor& teacher,
                             const std::vector<torch::Tensor>& controls) {
  TORCH_CHECK_VALUE(teacher.defined() && (teacher.dim() == 1 || teacher.dim() == 2),
                    "teacher must be a fingerprint [S] or per-sequence matrix [n, S], got shape ",
                    teacher.defined() ? shape_string(teacher) : "undefined");
  torch::Tensor out = as_double(teacher, "teacher", -1).clone();
  if (controls.empty()) return out;
  torch::Tensor sum = torch::zeros_like(out);
  for (std::size_t i = 0; i < controls.size(); ++i) {
    const std::string name = "controls[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(controls[i].defined() && controls[i].sizes() == teacher.sizes(), name,
                      " must have the teacher's shape ", shape_string(teacher), ", got ",
                      controls[i].defined() ? shape_string(controls[i]) : "undefined");
    sum += as_double(controls[i], name, -1).to(out.device());
  }
  return out - sum / static_cast<double>(controls.size());
}

GlobalTestResult global_test(const torch::Tensor& teacher_seq,
                             const std::vector<torch::Tensor>& controls_seq,
                             const std::string& statistic, int64_t permutations, uint64_t seed) {
  const auto kind = stats::parse_sign_flip_statistic(statistic);
  const torch::Tensor diffs = sequence_differences(teacher_seq, controls_seq);
  const auto r = stats::sign_flip_test(diffs, kind, permutations, seed);
  return GlobalTestResult{r.statistic, r.p_value, r.permutations, r.exact, diffs.size(0)};
}

PerTokenTestResult per_token_test(const torch::Tensor& teacher_seq,
                                  const std::vector<torch::Tensor>& controls_seq, double q) {
  TORCH_CHECK_VALUE(q > 0.0 && q <= 1.0, "q must lie in (0, 1], got ", q);
  const torch::Tensor diffs = sequence_differences(teacher_seq, controls_seq);
  const auto t = stats::one_sample_t(diffs);
  const auto bh = stats::benjamini_hochberg(t.p, q);
  return PerTokenTestResult{t.t, t.p, bh.adjusted, bh.rejected};
}

ComparisonResult compare_fingerprints(const torch::Tensor& a, const torch::Tensor& b, int64_t k,
                                      const std::vector<torch::Tensor>& controls) {
  TORCH_CHECK_VALUE(a.defined() && b.defined() && a.dim() == 1 && a.sizes() == b.sizes(),
                    "a and b must be fingerprint vectors [S] of the same length, got shapes ",
                    a.defined() ? shape_string(a) : "undefined", " and ",
                    b.defined() ? shape_string(b) : "undefined");
  TORCH_CHECK_VALUE(a.size(0) >= 2, "fingerprints need at least 2 tokens, got S = ", a.size(0));
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  const torch::Tensor x = as_double(a, "a", 1).cpu();
  const torch::Tensor y = as_double(b, "b", 1).cpu();
  ComparisonResult out;
  out.cosine = stats::pearson(x, y);
  out.spearman = stats::spearman(x, y);
  out.k = std::min<int64_t>(k, x.size(0));
  const auto top_a = top_indices(x, out.k);
  const auto top_b = top_indices(y, out.k);
  std::vector<int64_t> common;
  std::set_intersection(top_a.begin(), top_a.end(), top_b.begin(), top_b.end(),
                        std::back_inserter(common));
  out.topk_overlap = static_cast<double>(common.size()) / static_cast<double>(out.k);

  const auto count = static_cast<int64_t>(controls.size());
  out.control_cosines = torch::empty({count}, torch::kDouble);
  out.control_spearmans = torch::empty({count}, torch::kDouble);
  for (int64_t i = 0; i < count; ++i) {
    const std::string name = "controls[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(controls[i].defined() && controls[i].sizes() == a.sizes(), name,
                      " must have the shape of a, ", shape_string(a), ", got ",
                      controls[i].defined() ? shape_string(controls[i]) : "undefined");
    const torch::Tensor c = as_double(controls[i], name, 1).cpu();
    out.control_cosines[i] = stats::pearson(c, y);
    out.control_spearmans[i] = stats::spearman(c, y);
  }
  if (count >= 2) {
    out.z_cosine = z_score(out.cosine, out.control_cosines);
    out.z_spearman = z_score(out.spearman, out.control_spearmans);
  }
  return out;
}

}  // namespace libtransfer::fingerprint
