// The activation test of shared initialization (DESIGN.md section 4): run the same inputs through
// both models, match hidden units on the correlation of their activations across inputs, and ask
// whether the matchings line up more than independence allows.
//
// Two forms, chosen per group of hidden units from the names Model::hidden_activations returns:
// - Sibling form ("<group>.gate" and "<group>.up", the GLU of TransformerLM): the units of gate
//   and of up are matched separately; the statistic is the number of agreements
//   K = #{i : pi_gate(i) = pi_up(i)}. Invariant under permutations of either model's hidden units
//   and under any invertible map of the layer's input (rotations of the residual stream), since
//   neither changes the activations. Null (approximate): under independence the two matchings are
//   unrelated, so pi_up^-1 pi_gate behaves like a uniform permutation and K like its fixed
//   points. Not exact (both matchings come from the same two models), hence the calibration on
//   known-independent pairs when controls are given.
// - Single form (any other name, e.g. the MLP's "layers.<i>"): the units are matched on activation
//   correlations and K = #{i : pi(i) = i}, the fixed points of the matching. Exact null under a
//   permutation-invariant initialization and permutation-equivariant training (as the weight
//   test): permuting B's hidden units leaves B's law unchanged and permutes pi, so pi is uniform.
//   It needs the hidden indices aligned: a copy whose hidden units were deliberately permuted
//   escapes it (the sibling form and the output test see such copies).
//
// Costs: one forward of each model on the inputs (twice per control), an [n, n] correlation
// matmul over the N rows and one O(n^3) assignment per projection.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "libtransfer/detect/evidence.h"
#include "libtransfer/models/model.h"

namespace libtransfer::detect {

// Method strings that start with this prefix mark a p-value resting on an approximate null; the
// report shows it but does not combine it into the verdict (see report.h).
inline constexpr const char* kApproximateMethodPrefix = "approximate null: ";

// log10 P(K >= k) for the number K of fixed points of a uniform random permutation of n items,
// exact: P(K = j) = s(n - j) / j! with s(m) = sum_{i <= m} (-1)^i / i! (the rencontres numbers
// over n!), summed in log space, so P(K = n) = 1/n! stays finite for any n. k <= 0 -> 0;
// k > n -> -inf. n >= 0.
double fixed_points_log10_sf(std::int64_t n, std::int64_t k);

// Pearson correlations [n, m] of the columns of x [N, n] with the columns of y [N, m] (float64 on
// x's device). A column without spread correlates 0 with everything. N >= 2.
torch::Tensor column_correlations(const torch::Tensor& x, const torch::Tensor& y);

// The matching of x's columns to y's columns maximizing the summed correlation: pi [n] (int64,
// CPU), pi[i] = the column of y matched to column i of x. x, y: [N, n] with the same n.
torch::Tensor match_on_correlation(const torch::Tensor& x, const torch::Tensor& y);

struct ActivationTestConfig {
  // Use the greedy assignment (faster on very wide layers, p-values stay valid, less power).
  bool greedy = false;
};

// What the activation test found: the test (layers = groups, in the order of A's
// hidden_activations) and, per control, its statistic (Fisher X over the groups).
struct ActivationTestResult {
  TestResult test;
  std::vector<double> control_statistics;  // one per control model
  double fisher_statistic = 0.0;           // X = -2 sum ln p over the groups of (a, b)
};

// Compares the activations of a and b on `input` (token ids [B, T] with attention_mask for
// language models, features [N, F] for feature models). Both models must expose the same groups
// with the same widths (InvalidInput naming the group and both widths otherwise). `controls`:
// models known to be independent of a (other seeds); each pair (a, control) is one draw of the
// null. With controls the test's p is empirical, (1 + #{X_control >= X}) / (1 + n), on Fisher's
// X over the groups; without, it is Fisher's combination of the groups' p-values.
ActivationTestResult activation_test(models::Model& a, models::Model& b, const torch::Tensor& input,
                                     const torch::Tensor& attention_mask = {},
                                     const std::vector<models::ModelPtr>& controls = {},
                                     const ActivationTestConfig& config = {});

}  // namespace libtransfer::detect
