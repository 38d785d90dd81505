// The output test of shared initialization (DESIGN.md section 4): how alike are the two models'
// logits on probe inputs, judged against control models known to be independent of the first.
//
// Statistic: the Pearson correlation of the logits, flattened over positions and classes after
// centering each position's logits (logits are defined up to a constant per position, so only
// differences between classes carry information). Costs one forward per model on the probes.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "libtransfer/detect/evidence.h"
#include "libtransfer/models/model.h"

namespace libtransfer::detect {

// Default probe inputs: this many rows of uniform noise in [-1, 1] for feature models, or of
// uniformly random tokens for language models (kDefaultProbeLength positions each).
inline constexpr std::int64_t kDefaultProbeRows = 256;
inline constexpr std::int64_t kDefaultProbeLength = 16;

// Probe inputs for `model`, seeded (a CPU generator, so the same seed gives the same probes on
// every machine), on the model's device: features [rows, F] uniform in [-1, 1) or token ids
// [rows, length] uniform in 0 .. V - 1.
torch::Tensor default_probe_inputs(models::Model& model, std::int64_t rows = kDefaultProbeRows,
                                   std::int64_t length = kDefaultProbeLength,
                                   std::uint64_t seed = 0);

// Logits of model on input as [P, C] float64 rows, one per real position (language models: the
// positions where attention_mask is non-zero; feature models: one per example), each centered.
torch::Tensor centered_logit_rows(models::Model& model, const torch::Tensor& input,
                                  const torch::Tensor& attention_mask = {});

// The correlation of two centered logit row sets of the same shape (the cosine of the flattened
// tensors, which is Pearson's r since every row has mean 0). 0 when either has no spread.
double logit_correlation(const torch::Tensor& a_rows, const torch::Tensor& b_rows);

struct OutputTestResult {
  TestResult test;
  double correlation = 0.0;                  // r(a, b)
  std::vector<double> control_correlations;  // r(a, control) per control
  double z = 0.0;  // (r - mean(controls)) / sd(controls); NaN with fewer than 2 controls
};

// Correlation of the logits of a and b on `input` (undefined: default_probe_inputs(a, seed)).
// Outputs must have the same size (InvalidInput naming both). With n controls:
// p = (1 + #{r_control >= r}) / (1 + n). Without controls the test reports r and leaves the
// p-value out (skipped_reason says so): there is no closed-form null for r.
OutputTestResult output_test(models::Model& a, models::Model& b, const torch::Tensor& input = {},
                             const torch::Tensor& attention_mask = {},
                             const std::vector<models::ModelPtr>& controls = {},
                             std::uint64_t seed = 0);

}  // namespace libtransfer::detect
