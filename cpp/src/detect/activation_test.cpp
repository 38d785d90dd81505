#include "libtransfer/detect/activation_test.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>
#include <utility>

#include "libtransfer/detect/linear_assignment.h"
#include "libtransfer/errors.h"
#include "libtransfer/stats/multiple_testing.h"

namespace libtransfer::detect {
namespace {

constexpr double kLn10 = 2.302585092994045684;
const std::string kGateSuffix = ".gate";
const std::string kUpSuffix = ".up";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

double log_add(double a, double b) {
  if (a == -std::numeric_limits<double>::infinity()) return b;
  if (b == -std::numeric_limits<double>::infinity()) return a;
  const double hi = std::max(a, b);
  return hi + std::log1p(std::exp(std::min(a, b) - hi));
}

// A group of hidden units: one projection (single form) or a gate/up pair (sibling form).
struct Group {
  std::string name;
  torch::Tensor first;   // [N, n]
  torch::Tensor second;  // [N, n]; undefined for the single form
};

std::vector<Group> make_groups(const models::NamedTensors& acts, const std::string& argument) {
  std::map<std::string, torch::Tensor> by_name(acts.begin(), acts.end());
  std::vector<Group> groups;
  for (const auto& [name, tensor] : acts) {
    if (tensor.dim() != 2) {
      std::ostringstream msg;
      msg << argument << ": hidden activations '" << name << "' must be [N, units], got shape "
          << tensor.sizes();
      throw InvalidInput(msg.str());
    }
    if (ends_with(name, kUpSuffix)) {
      const std::string base = name.substr(0, name.size() - kUpSuffix.size());
      if (by_name.count(base + kGateSuffix)) continue;  // paired with its gate below
      groups.push_back({name, tensor, {}});
    } else if (ends_with(name, kGateSuffix)) {
      const std::string base = name.substr(0, name.size() - kGateSuffix.size());
      auto up = by_name.find(base + kUpSuffix);
      if (up == by_name.end()) {
        groups.push_back({name, tensor, {}});
      } else {
        groups.push_back({base, tensor, up->second});
      }
    } else {
      groups.push_back({name, tensor, {}});
    }
  }
  return groups;
}

void check_same_groups(const std::vector<Group>& a, const std::vector<Group>& b,
                       const std::string& b_argument) {
  std::map<std::string, const Group*> b_by_name;
  for (const auto& g : b) b_by_name[g.name] = &g;
  for (const auto& g : a) {
    auto it = b_by_name.find(g.name);
    if (it == b_by_name.end()) {
      throw InvalidInput("activation test: group '" + g.name + "' of a has no counterpart in " +
                         b_argument + " (mismatched architectures)");
    }
    const Group& h = *it->second;
    if (g.first.size(0) != h.first.size(0)) {
      std::ostringstream msg;
      msg << "activation test: group '" << g.name << "' has " << g.first.size(0)
          << " rows in a but " << h.first.size(0) << " in " << b_argument;
      throw InvalidInput(msg.str());
    }
    if (g.first.size(1) != h.first.size(1) || g.second.defined() != h.second.defined()) {
      std::ostringstream msg;
      msg << "activation test: group '" << g.name << "' has " << g.first.size(1)
          << " units in a but " << h.first.size(1) << " in " << b_argument;
      throw InvalidInput(msg.str());
    }
  }
  if (a.size() != b.size()) {
    std::ostringstream msg;
    msg << "activation test: a has " << a.size() << " groups of hidden units, " << b_argument
        << " has " << b.size() << " (mismatched architectures)";
    throw InvalidInput(msg.str());
  }
}

torch::Tensor match(const torch::Tensor& x, const torch::Tensor& y, bool greedy) {
  const torch::Tensor corr = column_correlations(x, y);
  const Assignment asg = greedy ? greedy_assignment(corr, true) : linear_sum_assignment(corr, true);
  torch::Tensor pi = torch::empty({x.size(1)}, torch::kLong);
  auto p = pi.accessor<std::int64_t, 1>();
  for (std::size_t k = 0; k < asg.rows.size(); ++k) p[asg.rows[k]] = asg.cols[k];
  return pi;
}

// Per-group evidence of a (in a's group order) against b's groups.
std::vector<LayerEvidence> compare_groups(const std::vector<Group>& a, const std::vector<Group>& b,
                                          bool greedy) {
  std::map<std::string, const Group*> b_by_name;
  for (const auto& g : b) b_by_name[g.name] = &g;
  std::vector<LayerEvidence> out;
  for (const auto& g : a) {
    const Group& h = *b_by_name.at(g.name);
    LayerEvidence e;
    e.name = g.name;
    e.units = g.first.size(1);
    const torch::Tensor pi = match(g.first, h.first, greedy);
    const torch::Tensor identity = torch::arange(e.units, torch::kLong);
    const std::int64_t fixed = pi.eq(identity).sum().item<std::int64_t>();
    if (g.second.defined()) {
      const torch::Tensor pi_up = match(g.second, h.second, greedy);
      e.kind = "glu_hidden";
      e.statistic_name = "agreements";
      e.statistic = static_cast<double>(pi.eq(pi_up).sum().item<std::int64_t>());
      e.note = "gate/up matchings agree";
    } else {
      e.kind = "hidden";
      e.statistic_name = "fixed_points";
      e.statistic = static_cast<double>(fixed);
    }
    e.matched_fraction = e.units > 0 ? static_cast<double>(fixed) / e.units : 0.0;
    e.log10_p = fixed_points_log10_sf(e.units, static_cast<std::int64_t>(e.statistic));
    out.push_back(std::move(e));
  }
  return out;
}

double fisher_x(const std::vector<LayerEvidence>& layers) {
  double x = 0.0;
  for (const auto& e : layers) x += -2.0 * e.log10_p * kLn10;
  return x;
}

std::vector<Group> groups_of(models::Model& model, const torch::Tensor& input,
                             const torch::Tensor& mask, const std::string& argument) {
  torch::NoGradGuard no_grad;
  std::vector<Group> groups = make_groups(model.hidden_activations(input, mask), argument);
  if (groups.empty()) {
    throw InvalidInput(argument + ": the model (" + model.describe() +
                       ") exposes no hidden activations");
  }
  return groups;
}

}  // namespace

double fixed_points_log10_sf(std::int64_t n, std::int64_t k) {
  if (n < 0) throw InvalidInput("fixed_points_log10_sf: n must be >= 0, got " + std::to_string(n));
  if (k <= 0) return 0.0;
  if (k > n) return -std::numeric_limits<double>::infinity();
  // s(m) = sum_{i=0}^{m} (-1)^i / i!: 1, 0, 1/2, 1/3, 3/8, ... -> 1/e; no cancellation trouble
  // (terms shrink factorially, the sum stays >= 1/3 for m != 1).
  std::vector<double> s(static_cast<std::size_t>(n - k + 1));
  double term = 1.0, sum = 0.0;
  for (std::int64_t m = 0; m <= n - k; ++m) {
    if (m > 0) term *= -1.0 / static_cast<double>(m);
    sum += term;
    s[static_cast<std::size_t>(m)] = sum;
  }
  double log_p = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = k; j <= n; ++j) {
    const double sm = s[static_cast<std::size_t>(n - j)];
    if (sm <= 0.0) continue;  // P(K = n - 1) = 0
    log_p = log_add(log_p, std::log(sm) - std::lgamma(static_cast<double>(j) + 1.0));
  }
  return std::min(0.0, log_p / kLn10);
}

torch::Tensor column_correlations(const torch::Tensor& x, const torch::Tensor& y) {
  TORCH_CHECK_VALUE(x.defined() && y.defined() && x.dim() == 2 && y.dim() == 2,
                    "column_correlations: x and y must be 2-D [N, units], got ",
                    x.defined() ? c10::str(x.sizes()) : "undefined", " and ",
                    y.defined() ? c10::str(y.sizes()) : "undefined");
  TORCH_CHECK_VALUE(x.size(0) == y.size(0), "column_correlations: x has ", x.size(0),
                    " rows, y has ", y.size(0));
  TORCH_CHECK_VALUE(x.size(0) >= 2, "column_correlations: need at least 2 rows, got ", x.size(0));
  auto standardize = [](const torch::Tensor& t) {
    torch::Tensor c = t.to(torch::kDouble);
    c = c - c.mean(0, true);
    const torch::Tensor norm = c.norm(2, 0, true);
    // A column without spread (a dead unit) gets zero correlation with everything.
    return torch::where(norm > 0, c / norm.clamp_min(1e-300), torch::zeros_like(c));
  };
  return standardize(x).t().matmul(standardize(y.to(x.device())));
}

torch::Tensor match_on_correlation(const torch::Tensor& x, const torch::Tensor& y) {
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
                    "match_on_correlation: x and y must be [N, n] with the same n, got ", x.sizes(),
                    " and ", y.sizes());
  return match(x, y, false);
}

ActivationTestResult activation_test(models::Model& a, models::Model& b, const torch::Tensor& input,
                                     const torch::Tensor& attention_mask,
                                     const std::vector<models::ModelPtr>& controls,
                                     const ActivationTestConfig& config) {
  if (!input.defined() || input.numel() == 0) {
    throw InvalidInput("activation test: input must hold at least 2 examples, got none");
  }
  if (a.input_kind() != b.input_kind()) {
    throw InvalidInput("activation test: a (" + a.describe() + ") and b (" + b.describe() +
                       ") take different kinds of input");
  }
  ActivationTestResult result;
  TestResult& test = result.test;
  test.test = "activations";
  const std::vector<Group> ga = groups_of(a, input, attention_mask, "a");
  const std::vector<Group> gb = groups_of(b, input, attention_mask, "b");
  check_same_groups(ga, gb, "b");
  test.layers = compare_groups(ga, gb, config.greedy);
  result.fisher_statistic = fisher_x(test.layers);

  bool any_sibling = false;
  double total = 0.0;
  std::vector<double> log_p;
  for (const auto& e : test.layers) {
    any_sibling = any_sibling || e.kind == "glu_hidden";
    total += e.statistic;
    log_p.push_back(e.log10_p * kLn10);
  }
  test.statistic = total;
  test.statistic_name = any_sibling ? "agreements" : "fixed_points";
  test.ran = true;

  for (std::size_t j = 0; j < controls.size(); ++j) {
    if (!controls[j])
      throw InvalidInput("activation test: controls[" + std::to_string(j) + "] is null");
    const std::string name = "controls[" + std::to_string(j) + "]";
    const std::vector<Group> gc = groups_of(*controls[j], input, attention_mask, name);
    check_same_groups(ga, gc, name);
    result.control_statistics.push_back(fisher_x(compare_groups(ga, gc, config.greedy)));
  }
  std::ostringstream method;
  if (!controls.empty()) {
    std::int64_t at_least = 0;
    for (double x : result.control_statistics) at_least += x >= result.fisher_statistic;
    const double n = static_cast<double>(controls.size());
    test.log10_p = std::log10((1.0 + at_least) / (1.0 + n));
    method << "empirical over " << controls.size() << " control pairs (+1) of Fisher's X over "
           << test.layers.size() << " groups";
  } else {
    const stats::FisherResult f = stats::fisher_combine_log(torch::tensor(log_p, torch::kDouble));
    test.log10_p = f.log_p / kLn10;
    if (any_sibling) method << kApproximateMethodPrefix;
    method << "fisher over " << test.layers.size() << " groups; "
           << (any_sibling ? "gate/up agreements as fixed points of a uniform permutation "
                             "(give controls to calibrate)"
                           : "fixed points of the activation matching (exact under "
                             "permutation-invariant initialization)");
  }
  test.method = method.str();
  return result;
}

}  // namespace libtransfer::detect
