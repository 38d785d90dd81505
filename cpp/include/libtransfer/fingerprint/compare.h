// Tests and comparisons of fingerprints, on plain tensors (independent of the accumulator):
// trait-specific fingerprints, the global sign-flip test over sequences, per-token t tests with
// Benjamini-Hochberg, and the comparison of two fingerprints calibrated against controls.
//
// Inputs are fingerprint vectors f [S] or per-sequence matrices [n, S] (teacher and controls
// scored on the same sequences). Costs: O(n S) per pass, plus the sign-flip test's O(B n S).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/stats/multiple_testing.h"
#include "libtransfer/stats/permutation.h"

namespace libtransfer::fingerprint {

// Default number of top tokens whose overlap compare_fingerprints reports.
inline constexpr int64_t kDefaultOverlapK = 50;

// teacher - mean(controls), float64, for [S] or [n, S] inputs (all shapes must agree). With no
// controls: the teacher itself (the comparison is then against a zero shift).
torch::Tensor trait_specific(const torch::Tensor& teacher,
                             const std::vector<torch::Tensor>& controls);

// The global test's outcome: the sign-flip test over n_sequences per-sequence differences.
struct GlobalTestResult {
  double statistic = 0.0;
  double p_value = 1.0;
  int64_t permutations = 0;
  bool exact = false;
  int64_t n_sequences = 0;
};

// H0: the teacher's per-sequence centered fingerprints differ from the controls' mean only by
// noise symmetric around 0. diffs = teacher_seq [n, S] - mean(controls_seq) (each [n, S]; no
// controls: diffs = teacher_seq), then stats::sign_flip_test(diffs, statistic, permutations, seed).
// statistic: "sumsq" or "maxt".
GlobalTestResult global_test(const torch::Tensor& teacher_seq,
                             const std::vector<torch::Tensor>& controls_seq,
                             const std::string& statistic = "sumsq",
                             int64_t permutations = stats::kDefaultPermutations, uint64_t seed = 0);

// Per-token tests: t [S], two-sided p [S], BH-adjusted p [S] (float64), rejected [S] (bool).
struct PerTokenTestResult {
  torch::Tensor t;
  torch::Tensor p;
  torch::Tensor adjusted;
  torch::Tensor rejected;
};

// One-sample t test per token of the per-sequence differences (as in global_test; n >= 2), then
// Benjamini-Hochberg at FDR q over the S tokens.
PerTokenTestResult per_token_test(const torch::Tensor& teacher_seq,
                                  const std::vector<torch::Tensor>& controls_seq,
                                  double q = stats::kDefaultFdr);

// How alike two fingerprints are. cosine: of the centered vectors (= Pearson); spearman: rank
// correlation; topk_overlap: |top-k(a) ∩ top-k(b)| / k by value, largest first (k clamped to S).
// With >= 2 controls: z = (score(a, b) - mean_c score(c, b)) / std_c score(c, b) (std with n - 1),
// i.e. how far a stands out from the controls in its likeness to b; NaN when the controls' scores
// do not vary.
struct ComparisonResult {
  double cosine = 0.0;
  double spearman = 0.0;
  double topk_overlap = 0.0;
  int64_t k = 0;
  std::optional<double> z_cosine;
  std::optional<double> z_spearman;
  torch::Tensor control_cosines;    // [C] float64, cos(c, b) per control (empty without controls)
  torch::Tensor control_spearmans;  // [C] float64
};

// a, b, controls: [S] each, finite, S >= 2; k >= 1.
ComparisonResult compare_fingerprints(const torch::Tensor& a, const torch::Tensor& b,
                                      int64_t k = kDefaultOverlapK,
                                      const std::vector<torch::Tensor>& controls = {});

}  // namespace libtransfer::fingerprint
