#include "libtransfer/detect/output_test.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "libtransfer/errors.h"

namespace libtransfer::detect {
namespace {

void check_same_outputs(models::Model& a, models::Model& b, const std::string& b_argument) {
  if (a.input_kind() != b.input_kind()) {
    throw InvalidInput("output test: a (" + a.describe() + ") and " + b_argument + " (" +
                       b.describe() + ") take different kinds of input");
  }
  if (a.output_size() != b.output_size()) {
    std::ostringstream msg;
    msg << "output test: a has " << a.output_size() << " outputs, " << b_argument << " has "
        << b.output_size() << " (a vocabulary or class mismatch)";
    throw InvalidInput(msg.str());
  }
}

}  // namespace

torch::Tensor default_probe_inputs(models::Model& model, std::int64_t rows, std::int64_t length,
                                   std::uint64_t seed) {
  if (rows < 2) throw InvalidInput("probe inputs: rows must be >= 2, got " + std::to_string(rows));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  torch::Tensor out;
  if (model.input_kind() == models::InputKind::kFeatures) {
    const std::int64_t f = model.input_size();
    if (f < 1)
      throw InvalidInput("probe inputs: the model reports " + std::to_string(f) +
                         " input features");
    out = at::empty({rows, f}, torch::kFloat).uniform_(-1.0, 1.0, gen);
  } else {
    if (length < 1)
      throw InvalidInput("probe inputs: length must be >= 1, got " + std::to_string(length));
    const std::int64_t v = model.output_size();
    if (v < 1)
      throw InvalidInput("probe inputs: the model reports a vocabulary of " + std::to_string(v));
    out = at::randint(0, v, {rows, length}, gen, torch::kLong);
  }
  return out.to(model.device());
}

torch::Tensor centered_logit_rows(models::Model& model, const torch::Tensor& input,
                                  const torch::Tensor& attention_mask) {
  torch::NoGradGuard no_grad;
  torch::Tensor logits = model.forward(input, attention_mask).to(torch::kDouble);
  if (logits.dim() == 3) {
    logits = attention_mask.defined() ? logits.index({attention_mask.to(logits.device()).ne(0)})
                                      : logits.reshape({-1, logits.size(-1)});
  }
  TORCH_CHECK_VALUE(logits.dim() == 2, "output test: expected logits [B, C] or [B, T, V] from ",
                    model.describe(), ", got ", logits.sizes());
  return logits - logits.mean(1, true);
}

double logit_correlation(const torch::Tensor& a_rows, const torch::Tensor& b_rows) {
  TORCH_CHECK_VALUE(a_rows.sizes() == b_rows.sizes(),
                    "logit_correlation: shapes differ: ", a_rows.sizes(), " and ", b_rows.sizes());
  const torch::Tensor a = a_rows.to(torch::kDouble).reshape({-1});
  const torch::Tensor b = b_rows.to(torch::kDouble).to(a.device()).reshape({-1});
  const double denom = (a.norm() * b.norm()).item<double>();
  if (!(denom > 0.0)) return 0.0;
  return (a.dot(b)).item<double>() / denom;
}

OutputTestResult output_test(models::Model& a, models::Model& b, const torch::Tensor& input,
                             const torch::Tensor& attention_mask,
                             const std::vector<models::ModelPtr>& controls, std::uint64_t seed) {
  check_same_outputs(a, b, "b");
  torch::Tensor probes = input;
  torch::Tensor mask = attention_mask;
  if (!probes.defined()) {
    probes = default_probe_inputs(a, kDefaultProbeRows, kDefaultProbeLength, seed);
    mask = torch::Tensor();
  } else if (probes.numel() == 0) {
    throw InvalidInput("output test: input holds no examples");
  }
  OutputTestResult result;
  TestResult& test = result.test;
  test.test = "outputs";
  test.statistic_name = "logit_correlation";
  const torch::Tensor rows_a = centered_logit_rows(a, probes, mask);
  if (rows_a.size(0) == 0) throw InvalidInput("output test: the mask selects no position");
  result.correlation = logit_correlation(rows_a, centered_logit_rows(b, probes, mask));
  test.statistic = result.correlation;
  test.ran = true;
  LayerEvidence e;
  e.name = "logits";
  e.kind = "outputs";
  e.units = rows_a.size(1);
  e.statistic = result.correlation;
  e.statistic_name = test.statistic_name;

  for (std::size_t j = 0; j < controls.size(); ++j) {
    const std::string name = "controls[" + std::to_string(j) + "]";
    if (!controls[j]) throw InvalidInput("output test: " + name + " is null");
    check_same_outputs(a, *controls[j], name);
    result.control_correlations.push_back(
        logit_correlation(rows_a, centered_logit_rows(*controls[j], probes, mask)));
  }
  result.z = std::numeric_limits<double>::quiet_NaN();
  if (controls.empty()) {
    test.skipped_reason =
        "no p-value: the logit correlation has no closed-form null; give control models";
    test.method = "none (no controls)";
    e.note = "p needs controls";
  } else {
    const double n = static_cast<double>(controls.size());
    std::int64_t at_least = 0;
    double mean = 0.0;
    for (double r : result.control_correlations) {
      at_least += r >= result.correlation;
      mean += r / n;
    }
    if (controls.size() >= 2) {
      double ss = 0.0;
      for (double r : result.control_correlations) ss += (r - mean) * (r - mean);
      const double sd = std::sqrt(ss / (n - 1.0));
      if (sd > 0.0) result.z = (result.correlation - mean) / sd;
    }
    test.log10_p = std::log10((1.0 + at_least) / (1.0 + n));
    std::ostringstream method, note;
    method << "empirical over " << controls.size() << " controls (+1)";
    note << "controls mean r " << mean << ", z " << result.z;
    test.method = method.str();
    e.note = note.str();
    e.log10_p = test.log10_p;
  }
  test.layers.push_back(std::move(e));
  return result;
}

}  // namespace libtransfer::detect
