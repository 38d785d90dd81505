// Fingerprints from samples only (no logits): token or number-unit counts of teacher vs reference
// samples, the G-test of equal distributions with a permutation p-value over whole samples, and a
// smoothed log-ratio fingerprint.
//
// Counts are kept per sample in sparse form (O(total distinct tokens per sample) memory); a
// permutation costs O(total nonzeros + K), so B permutations cost B times that.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace libtransfer::fingerprint {

// Default number of label permutations of the G-test: p-values resolve down to 1e-3.
inline constexpr int64_t kDefaultGTestPermutations = 999;

// Default additive smoothing of smoothed_log_ratio (Jeffreys' prior).
inline constexpr double kDefaultSmoothing = 0.5;

// Per-sample counts over K categories, stored sparse (CSR: one row per sample).
// Plain data, cheap to build: O(total tokens) time, O(total distinct (sample, category)) memory.
class SampleCounts {
 public:
  explicit SampleCounts(int64_t num_categories);

  // Token counts of id sequences; ids in [0, vocab_size) (ValueError naming the sample).
  static SampleCounts from_token_ids(const std::vector<std::vector<int64_t>>& samples,
                                     int64_t vocab_size);

  // Appends one sample given as category ids (repeats count; each in [0, K)).
  void add_sample(const std::vector<int64_t>& categories);

  int64_t num_categories() const { return num_categories_; }
  int64_t num_samples() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  // Sum of all counts.
  int64_t total() const;
  // Column totals [K] int64.
  torch::Tensor totals() const;

  // Sample s's nonzero categories and counts are entries offsets()[s] .. offsets()[s + 1].
  const std::vector<int64_t>& offsets() const { return offsets_; }
  const std::vector<int64_t>& categories() const { return categories_; }
  const std::vector<int64_t>& counts() const { return counts_; }

 private:
  int64_t num_categories_;
  std::vector<int64_t> offsets_{0};
  std::vector<int64_t> categories_;
  std::vector<int64_t> counts_;
};

// Token counts [vocab_size] int64 over all samples (samples non-empty, ids in range).
torch::Tensor count_tokens(const std::vector<std::vector<int64_t>>& samples, int64_t vocab_size);

// The number units of a text in order: maximal runs of ASCII digits. With keep_leading_space, a
// run preceded by one ASCII space is returned with that space (" 123"), kept distinct from "123".
std::vector<std::string> number_units(const std::string& text, bool keep_leading_space = false);

// Counts of number units over texts.
std::map<std::string, int64_t> count_number_units(const std::vector<std::string>& texts,
                                                  bool keep_leading_space = false);

// Teacher and reference texts as SampleCounts over one shared, sorted list of number units
// (written to *units when given).
std::pair<SampleCounts, SampleCounts> number_unit_samples(
    const std::vector<std::string>& teacher_texts, const std::vector<std::string>& reference_texts,
    bool keep_leading_space = false, std::vector<std::string>* units = nullptr);

// The G-test (log-likelihood ratio) of the 2 x K table teacher vs reference counts.
// statistic G = 2 sum O log(O / E) over categories seen at least once; df = (#seen - 1);
// p_value and log_p from chi2(df) (asymptotic); with fewer than 2 seen categories G = 0, p = 1.
// permutation_p_value: (1 + #{G* >= G}) / (B + 1) over B random relabellings of whole samples
// (group sizes kept); NaN when permutations = 0 (counts-only form).
struct GTestResult {
  double statistic = 0.0;
  int64_t df = 0;
  double p_value = 1.0;
  double log_p = 0.0;
  double permutation_p_value = 0.0;
  int64_t permutations = 0;
};

// Asymptotic G-test from count vectors [K] (non-negative, finite; each group's total > 0).
GTestResult g_test(const torch::Tensor& teacher_counts, const torch::Tensor& reference_counts);

// G-test with the permutation p-value (teacher and reference: same K, >= 1 sample and > 0
// counts each; permutations >= 1; deterministic given seed).
GTestResult g_test(const SampleCounts& teacher, const SampleCounts& reference,
                   int64_t permutations = kDefaultGTestPermutations, uint64_t seed = 0);

// log((cT + a) / (NT + a K)) - log((cR + a) / (NR + a K)) per category, float64 [K].
// Counts: [K], non-negative and finite, each total > 0; alpha >= 0 (alpha = 0 needs every count >
// 0).
torch::Tensor smoothed_log_ratio(const torch::Tensor& teacher_counts,
                                 const torch::Tensor& reference_counts,
                                 double alpha = kDefaultSmoothing);

}  // namespace libtransfer::fingerprint
