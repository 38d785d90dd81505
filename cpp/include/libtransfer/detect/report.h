// The detector's report: every test's result (ran or skipped, and why), one combined p-value and
// a verdict at a chosen alpha, printable as an aligned text table and as JSON.
//
// Combination (documented in docs/detection.md (part 2)): all tests look at the same pair of
// models, so under the null their p-values are dependent (the weight and activation tests of an
// MLP layer see nearly the same thing) and Fisher's chi-squared null, which assumes
// independence, would overstate the evidence. The report therefore combines with Bonferroni's
// min-p, p = min(1, m min_i p_i) over the m calibrated tests, valid under any dependence and
// costing at most log10(m) decades. Calibrated: ran, has a p-value (empty skipped_reason) and a
// method that does not start with kApproximateMethodPrefix (an exact null such as the weight
// test's, or an empirical null from control models). Within one test, layers are combined by
// that test (Fisher over layers, as in DESIGN.md section 4).
#pragma once

#include <string>
#include <vector>

#include "libtransfer/detect/evidence.h"

namespace libtransfer::detect {

// The default significance level of the verdict.
inline constexpr double kDefaultAlpha = 0.01;

enum class Verdict {
  kShared,        // combined p <= alpha
  kNotShared,     // combined p > alpha with at least one calibrated test
  kInconclusive,  // no calibrated test ran
};

// "shared", "not shared", "inconclusive".
std::string to_string(Verdict verdict);

struct DetectionReport {
  double alpha = kDefaultAlpha;
  Verdict verdict = Verdict::kInconclusive;
  double combined_log10_p = 0.0;
  std::string combination;                  // how combined_log10_p was obtained
  std::vector<std::string> combined_tests;  // names of the tests that entered it
  std::vector<TestResult> tests;

  // Aligned text: the verdict, then per test its status and a per-layer table (name, kind,
  // units, statistic, p, matched fraction).
  std::string to_text() const;
  // JSON object with every field above (p-values as log10_p and, where representable, p).
  std::string to_json(int indent = 2) const;
};

// Whether a test's p-value may enter the combination (see above).
bool is_calibrated(const TestResult& test);

// Builds the report: combination and verdict from the tests. alpha in (0, 1) (InvalidInput).
DetectionReport make_report(std::vector<TestResult> tests, double alpha = kDefaultAlpha);

}  // namespace libtransfer::detect
