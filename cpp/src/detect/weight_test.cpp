// The weight test and its exact permutation test (weight_test.h).
#include "libtransfer/detect/weight_test.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <sstream>
#include <tuple>
#include <utility>

#include "libtransfer/detect/activation_test.h"
#include "libtransfer/detect/linear_assignment.h"
#include "libtransfer/errors.h"
#include "libtransfer/stats/distributions.h"
#include "libtransfer/stats/multiple_testing.h"
#include "libtransfer/stats/permutation.h"

namespace libtransfer::detect {
namespace {

using TensorMap = std::map<std::string, torch::Tensor>;

const double kLn10 = std::log(10.0);

// Units whose norm is below this are treated as zero vectors (cosine 0 with everything).
constexpr double kZeroNorm = 1e-30;

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  std::iota(row.begin(), row.end(), std::size_t{0});
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1] ? 1 : 0)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

// Up to `count` names of `source` closest to `name` (edit distance), for "did you mean".
std::string similar_names(const StateSource& source, const std::string& name,
                          std::size_t count = 5) {
  std::vector<std::pair<std::size_t, std::string>> scored;
  for (const auto& t : source.tensors()) scored.push_back({edit_distance(name, t.name), t.name});
  std::sort(scored.begin(), scored.end());
  std::string out;
  for (std::size_t i = 0; i < scored.size() && i < count; ++i) {
    out += (i ? ", " : "") + ("'" + scored[i].second + "'");
  }
  return out.empty() ? "(none: it has no tensors)" : out;
}

std::string mapped(const std::map<std::string, std::string>& mapping, const std::string& name) {
  const auto it = mapping.find(name);
  return it == mapping.end() ? name : it->second;
}

// The groups of A, detected or explicit (metadata: A's, then B's for keys A lacks).
ModelLayout layout_of(const StateSource& a, const StateSource& b,
                      const std::vector<UnitGroup>& groups, std::int64_t n_heads) {
  if (!groups.empty()) return explicit_layout(groups, a.tensors());
  auto metadata = a.metadata();
  for (const auto& [key, value] : b.metadata()) metadata.emplace(key, value);
  return detect_layout(a.tensors(), metadata, LayoutOptions{n_heads});
}

// Every tensor the test reads must exist in B (after mapping) with A's shape.
void check_pairing(const StateSource& a, const StateSource& b, const ModelLayout& layout,
                   const std::map<std::string, std::string>& mapping, bool with_residual) {
  for (const auto& [from, to] : mapping) {
    if (!a.contains(from)) {
      throw InvalidInput("mapping: model A (" + a.describe() + ") has no tensor '" + from +
                         "' (mapped to '" + to +
                         "'); similar names in A: " + similar_names(a, from));
    }
  }
  // In group order, so the first complaint is about the first tensor a user would look at.
  std::vector<std::string> needed;
  std::set<std::string> seen;
  auto need = [&](const std::string& name) {
    if (seen.insert(name).second) needed.push_back(name);
  };
  if (with_residual) {
    for (const auto& m : layout.residual.members) need(m.tensor);
  }
  for (const auto& g : layout.groups) {
    if (!g.skip_reason.empty()) continue;
    for (const auto& m : g.members) need(m.tensor);
  }
  for (const auto& name : needed) {
    const auto& ta = a.meta(name);
    const std::string name_b = mapped(mapping, name);
    if (!b.contains(name_b)) {
      throw InvalidInput(
          "model B (" + b.describe() + ") has no tensor '" + name_b + "'" +
          (name_b != name ? " (mapped from '" + name + "')" : "") +
          ", which the weight test needs; similar names in B: " + similar_names(b, name_b) +
          "; pass mapping={name in A: name in B} for renamed layers");
    }
    const auto& tb = b.meta(name_b);
    if (ta.shape != tb.shape) {
      throw InvalidInput("tensor '" + name + "' has shape " + shape_text(ta.shape) +
                         " in model A but " + shape_text(tb.shape) + " in model B" +
                         (name_b != name ? " ('" + name_b + "')" : "") +
                         ": the models differ in architecture or size");
    }
    if (!tb.floating) {
      throw WrongType("tensor '" + name_b + "' of model B has dtype " + tb.dtype +
                      "; the weight test reads floating weights only");
    }
  }
}

void check_finite(const torch::Tensor& t, const std::string& name, const std::string& model) {
  const auto bad = torch::isfinite(t).logical_not().sum().item<std::int64_t>();
  if (bad > 0) {
    throw InvalidInput("tensor '" + name + "' of model " + model + " has " + std::to_string(bad) +
                       " non-finite values (NaN or inf) out of " + std::to_string(t.numel()) +
                       "; the weight test needs finite weights");
  }
}

// Loads what a group needs from one model under A's names, checked finite. residual: a
// permutation of the residual basis to apply to B's residual axes (undefined: none).
struct Loader {
  const StateSource& source;
  std::string model;                                  // "A" or "B"
  const std::map<std::string, std::string>* mapping;  // null for A
  torch::ScalarType dtype;
  torch::Device device;
  const std::map<std::string, std::vector<std::int64_t>>* residual_axes = nullptr;
  torch::Tensor residual_perm;

  torch::Tensor load(const std::string& name) const {
    const std::string stored = mapping ? mapped(*mapping, name) : name;
    auto t = source.load(stored, dtype, device);
    check_finite(t, stored, model);
    if (residual_perm.defined() && residual_axes != nullptr) {
      const auto it = residual_axes->find(name);
      if (it != residual_axes->end()) {
        for (const auto axis : it->second) {
          t = t.index_select(axis, residual_perm.to(t.device()));
        }
      }
    }
    return t;
  }

  TensorMap load_group(const UnitGroup& group) const {
    TensorMap out;
    for (const auto& m : group.members) {
      if (!out.count(m.tensor)) out.emplace(m.tensor, load(m.tensor));
    }
    return out;
  }
};

torch::Tensor normalized_rows(torch::Tensor units) {
  const auto norms = units.norm(2, 1, /*keepdim=*/true).clamp_min(kZeroNorm);
  return units.div_(norms);
}

// solver must be resolved (kExact or kGreedy).
Assignment solve(const torch::Tensor& similarity, AssignmentSolver solver) {
  return solver == AssignmentSolver::kExact ? linear_sum_assignment(similarity, true)
                                            : greedy_assignment(similarity, true);
}

// "exact assignment" / "greedy assignment (auto: 8192 units > 4096)": for the per-group note.
std::string solver_note(AssignmentSolver requested, AssignmentSolver used, std::int64_t units,
                        std::int64_t auto_exact_max_units) {
  std::string out = assignment_solver_name(used) + " assignment";
  if (requested == AssignmentSolver::kAuto && used == AssignmentSolver::kGreedy) {
    out += " (auto: " + std::to_string(units) + " units > " + std::to_string(auto_exact_max_units) +
           ")";
  }
  return out;
}

std::string join_note(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  return a + "; " + b;
}

// pi(i) for i = 0..n-1 from an assignment of a square matrix.
std::vector<std::int64_t> as_permutation(const Assignment& assignment, std::int64_t n) {
  std::vector<std::int64_t> perm(static_cast<std::size_t>(n), -1);
  for (std::size_t k = 0; k < assignment.rows.size(); ++k) {
    perm[static_cast<std::size_t>(assignment.rows[k])] = assignment.cols[k];
  }
  return perm;
}

// Matches the units of A to B: the permutation pi (pi[i] = B's unit for A's unit i). solver may
// be kAuto; `used` receives the solver that ran.
std::vector<std::int64_t> match_units(torch::Tensor units_a, torch::Tensor units_b,
                                      AssignmentSolver solver, std::int64_t auto_exact_max_units,
                                      AssignmentSolver* used = nullptr) {
  const auto n = units_a.size(0);
  const auto resolved = resolve_solver(solver, n, auto_exact_max_units);
  if (used != nullptr) *used = resolved;
  const auto similarity =
      torch::mm(normalized_rows(std::move(units_a)), normalized_rows(std::move(units_b)).t());
  return as_permutation(solve(similarity, resolved), n);
}

LayerEvidence evidence_for(const UnitGroup& group, const std::vector<std::int64_t>& perm,
                           WeightStatistic statistic) {
  LayerEvidence e;
  e.name = group.name;
  e.kind = group.kind;
  e.units = static_cast<std::int64_t>(perm.size());
  std::int64_t fixed = 0;
  for (std::size_t i = 0; i < perm.size(); ++i) fixed += perm[i] == static_cast<std::int64_t>(i);
  e.matched_fraction = perm.empty() ? 0.0 : static_cast<double>(fixed) / perm.size();
  e.statistic_name = weight_statistic_name(statistic);
  if (statistic == WeightStatistic::kFixedPoints) {
    e.statistic = static_cast<double>(fixed);
    e.log10_p = fixed_points_log10_p(fixed);
  } else {
    const auto s = spearman_identity_test(perm);
    e.statistic = s.rho;
    e.log10_p = s.log10_p;
    e.note = s.exact ? "exact null" : "t approximation";
  }
  return e;
}

LayerEvidence skipped_evidence(const UnitGroup& group, const std::string& statistic_name) {
  LayerEvidence e;
  e.name = group.name;
  e.kind = group.kind;
  e.units = group.units;
  e.statistic_name = statistic_name;
  e.note = group.skip_reason;
  return e;
}

torch::Device compute_device(const StateSource& a, const std::optional<torch::Device>& device) {
  return device ? *device : a.device();
}

void check_compute_dtype(torch::ScalarType dtype) {
  if (dtype != torch::kFloat && dtype != torch::kDouble) {
    throw WrongType(std::string("compute_dtype: expected float32 or float64, got ") +
                    c10::toString(dtype));
  }
}

std::int64_t tested_groups(const ModelLayout& layout) {
  std::int64_t n = 0;
  for (const auto& g : layout.groups) n += g.skip_reason.empty();
  return n;
}

void require_testable(const ModelLayout& layout, bool residual) {
  if (tested_groups(layout) > 0 || residual) return;
  std::string reasons;
  for (const auto& g : layout.groups) reasons += "\n  " + g.name + ": " + g.skip_reason;
  throw InvalidInput("nothing testable remains: every unit group was skipped" + reasons);
}

}  // namespace

WeightStatistic parse_weight_statistic(const std::string& name) {
  if (name == "fixed_points") return WeightStatistic::kFixedPoints;
  if (name == "spearman") return WeightStatistic::kSpearman;
  if (name == "agreement") return WeightStatistic::kAgreement;
  throw InvalidInput("statistic: expected 'fixed_points', 'spearman' or 'agreement', got '" + name +
                     "'");
}

std::string weight_statistic_name(WeightStatistic statistic) {
  switch (statistic) {
    case WeightStatistic::kFixedPoints:
      return "fixed_points";
    case WeightStatistic::kSpearman:
      return "spearman";
    case WeightStatistic::kAgreement:
      return "agreement";
  }
  return "fixed_points";
}

AssignmentSolver parse_assignment_solver(const std::string& name) {
  if (name == "exact") return AssignmentSolver::kExact;
  if (name == "greedy") return AssignmentSolver::kGreedy;
  if (name == "auto") return AssignmentSolver::kAuto;
  throw InvalidInput("solver: expected 'exact', 'greedy' or 'auto', got '" + name + "'");
}

std::string assignment_solver_name(AssignmentSolver solver) {
  switch (solver) {
    case AssignmentSolver::kExact:
      return "exact";
    case AssignmentSolver::kGreedy:
      return "greedy";
    case AssignmentSolver::kAuto:
      return "auto";
  }
  return "auto";
}

AssignmentSolver resolve_solver(AssignmentSolver solver, std::int64_t units,
                                std::int64_t auto_exact_max_units) {
  if (solver != AssignmentSolver::kAuto) return solver;
  return units <= auto_exact_max_units ? AssignmentSolver::kExact : AssignmentSolver::kGreedy;
}

PermutationStatistic parse_permutation_statistic(const std::string& name) {
  if (name == "identity_cosine") return PermutationStatistic::kIdentityCosine;
  if (name == "matched_similarity") return PermutationStatistic::kMatchedSimilarity;
  throw InvalidInput(
      "statistic: expected 'identity_cosine', 'matched_similarity' or a callable, "
      "got '" +
      name + "'");
}

std::string permutation_statistic_name(PermutationStatistic statistic) {
  return statistic == PermutationStatistic::kIdentityCosine ? "identity_cosine"
                                                            : "matched_similarity";
}

double fixed_points_log10_p(std::int64_t fixed_points) {
  if (fixed_points < 0) {
    throw InvalidInput("fixed_points: expected >= 0, got " + std::to_string(fixed_points));
  }
  return -std::lgamma(static_cast<double>(fixed_points) + 1.0) / kLn10;
}

double fixed_points_tail_log10_p(std::int64_t k, std::int64_t n) {
  if (n < 0 || k < 0 || k > n) {
    throw InvalidInput("fixed points: expected 0 <= k <= n, got k = " + std::to_string(k) +
                       ", n = " + std::to_string(n));
  }
  if (k == 0) return 0.0;
  // P(K = j) = S(n - j) / j!, S(m) = sum_{i <= m} (-1)^i / i! (derangements of the rest):
  // S(1) = 0, S(m) -> 1/e; summed in log space so that 1/n! survives for any n.
  constexpr std::int64_t kConverged = 30;  // S(m) = 1/e to double precision beyond this
  std::vector<double> partial(static_cast<std::size_t>(std::min(n, kConverged) + 1));
  double term = 1.0, sum = 0.0;
  for (std::size_t m = 0; m < partial.size(); ++m) {
    if (m > 0) term *= -1.0 / static_cast<double>(m);
    sum += term;
    partial[m] = sum;
  }
  double top = -std::numeric_limits<double>::infinity();
  std::vector<double> logs;
  for (std::int64_t j = k; j <= n; ++j) {
    const double s = partial[static_cast<std::size_t>(std::min(n - j, kConverged))];
    if (s <= 0.0) continue;
    logs.push_back(std::log(s) - std::lgamma(static_cast<double>(j) + 1.0));
    top = std::max(top, logs.back());
  }
  double acc = 0.0;
  for (const double l : logs) acc += std::exp(l - top);
  return std::min(0.0, (top + std::log(acc)) / kLn10);
}

SpearmanIdentity spearman_identity_test(const std::vector<std::int64_t>& perm) {
  const auto n = static_cast<std::int64_t>(perm.size());
  if (n < 2) throw InvalidInput("spearman: expected at least 2 units, got " + std::to_string(n));
  std::vector<bool> seen(static_cast<std::size_t>(n), false);
  std::int64_t d2 = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto p = perm[static_cast<std::size_t>(i)];
    if (p < 0 || p >= n || seen[static_cast<std::size_t>(p)]) {
      throw InvalidInput("spearman: expected a permutation of 0.." + std::to_string(n - 1) +
                         ", got entry " + std::to_string(p) + " at " + std::to_string(i));
    }
    seen[static_cast<std::size_t>(p)] = true;
    d2 += (p - i) * (p - i);
  }
  const double nd = static_cast<double>(n);
  SpearmanIdentity out;
  out.rho = 1.0 - 6.0 * static_cast<double>(d2) / (nd * (nd * nd - 1.0));
  const double log_floor = -std::lgamma(nd + 1.0);  // P(pi = identity) = 1/n!
  if (n <= kSpearmanExactMaxUnits) {
    // rho* >= rho  <=>  sum d*^2 <= sum d^2 (integers: no rounding).
    std::vector<std::int64_t> q(static_cast<std::size_t>(n));
    std::iota(q.begin(), q.end(), std::int64_t{0});
    std::int64_t at_least = 0, total = 0;
    do {
      std::int64_t s = 0;
      for (std::int64_t i = 0; i < n; ++i) s += (q[i] - i) * (q[i] - i);
      at_least += s <= d2;
      ++total;
    } while (std::next_permutation(q.begin(), q.end()));
    out.exact = true;
    out.log10_p = std::log10(static_cast<double>(at_least) / static_cast<double>(total));
    return out;
  }
  double log_p;
  if (d2 == 0) {
    log_p = log_floor;
  } else if (out.rho <= -1.0) {
    log_p = 0.0;
  } else {
    // scipy.stats.spearmanr(alternative="greater"): t with n - 2 degrees of freedom.
    const double t = out.rho * std::sqrt((nd - 2.0) / ((out.rho + 1.0) * (1.0 - out.rho)));
    log_p = std::max(stats::t_logsf(t, nd - 2.0), log_floor);
  }
  out.log10_p = std::min(0.0, log_p / kLn10);
  return out;
}

namespace {

// A permutation of B's units to apply before matching: B's slice pi[i] of `axis` moves to i.
struct AxisAlignment {
  std::int64_t axis = 0;
  torch::Tensor perm;
};
using Alignments = std::map<std::string, std::vector<AxisAlignment>>;

// The [units, features] matrix of one side of a group for A, and for B after `align`.
std::pair<torch::Tensor, torch::Tensor> side_units(const UnitGroup& side, const Loader& load_a,
                                                   const Loader& load_b, const Alignments& align) {
  auto tensors_b = load_b.load_group(side);
  for (auto& [name, t] : tensors_b) {
    const auto it = align.find(name);
    if (it == align.end()) continue;
    for (const auto& al : it->second) t = t.index_select(al.axis, al.perm.to(t.device()));
  }
  return {unit_matrix(side, load_a.load_group(side)), unit_matrix(side, tensors_b)};
}

// "x.bias" -> "x.weight": a bias belongs to the side of its weight.
std::string weight_of(const std::string& name) {
  const std::string suffix = "bias";
  if (name.size() > suffix.size() &&
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
    return name.substr(0, name.size() - suffix.size()) + "weight";
  }
  return name;
}

// The two halves of a transformer group whose weights are independent at initialization:
// glu_hidden: gate rows (+ bias) | up rows (+ bias); mlp_hidden: in-rows (+ bias) | out-columns;
// attention_heads: q, k rows (+ biases) | v rows (+ bias), o columns. Empty when undefined.
struct Sides {
  UnitGroup first, second;
  std::string description;
};
std::optional<Sides> transformer_sides(const UnitGroup& group) {
  Sides s;
  s.first = s.second = group;
  s.first.members.clear();
  s.second.members.clear();
  const auto& m = group.members;
  if (group.kind == "glu_hidden" && m.size() >= 3) {
    for (const auto& member : m) {
      if (member.axis != 0) continue;  // down columns: not used (two sides suffice)
      const auto w = weight_of(member.tensor);
      if (w == m[0].tensor) s.first.members.push_back(member);
      if (w == m[1].tensor) s.second.members.push_back(member);
    }
    s.description = "gate rows vs up rows";
  } else if (group.kind == "mlp_hidden") {
    for (const auto& member : m) (member.axis == 0 ? s.first : s.second).members.push_back(member);
    s.description = "in-rows vs out-columns";
  } else if (group.kind == "attention_heads" && m.size() >= 4) {
    for (const auto& member : m) {
      const auto w = weight_of(member.tensor);
      if (w == m[0].tensor || w == m[1].tensor) s.first.members.push_back(member);
      if (w == m[2].tensor || w == m[3].tensor) s.second.members.push_back(member);
    }
    s.description = "q,k rows vs v rows,o columns";
  } else {
    return std::nullopt;
  }
  if (s.first.members.empty() || s.second.members.empty()) return std::nullopt;
  return s;
}

LayerEvidence agreement_evidence(const UnitGroup& group, const std::vector<std::int64_t>& first,
                                 const std::vector<std::int64_t>& second,
                                 const std::string& description) {
  LayerEvidence e;
  e.name = group.name;
  e.kind = group.kind;
  e.units = static_cast<std::int64_t>(first.size());
  std::int64_t agree = 0;
  for (std::size_t i = 0; i < first.size(); ++i) agree += first[i] == second[i];
  e.statistic = static_cast<double>(agree);
  e.statistic_name = "agreement";
  e.log10_p = fixed_points_tail_log10_p(agree, e.units);
  e.matched_fraction = first.empty() ? 0.0 : static_cast<double>(agree) / first.size();
  e.note = "agreement: " + description;
  return e;
}

// The agreement rows of every group (layout order). MLP chains propagate the matchings: the
// forward matching of hidden layer l aligns B's columns of W_{l+1} before matching its rows
// (layer 1's columns are the fixed inputs); the backward matching of layer l aligns B's rows of
// W_{l+1} by layer l+1's backward matching (the last weight's rows are the fixed classes).
std::vector<LayerEvidence> agreement_rows(const ModelLayout& layout, const Loader& load_a,
                                          const Loader& load_b, const WeightTestOptions& options) {
  const auto& groups = layout.groups;
  const std::size_t n = groups.size();
  std::vector<LayerEvidence> rows(n);
  auto solve_note = [&](std::int64_t units) {
    return solver_note(options.solver,
                       resolve_solver(options.solver, units, options.auto_exact_max_units), units,
                       options.auto_exact_max_units);
  };
  auto match = [&](std::pair<torch::Tensor, torch::Tensor> units) {
    return match_units(std::move(units.first), std::move(units.second), options.solver,
                       options.auto_exact_max_units);
  };
  if (layout.architecture == "mlp_chain") {
    // in[g]: the axis-0 members (W_l, b_l); out[g]: the axis-1 member (W_{l+1}).
    std::vector<UnitGroup> in(n), out(n);
    for (std::size_t g = 0; g < n; ++g) {
      in[g] = out[g] = groups[g];
      in[g].members.clear();
      out[g].members.clear();
      for (const auto& m : groups[g].members) {
        (m.axis == 0 ? in[g] : out[g]).members.push_back(m);
      }
    }
    // A skipped group has one unit (its matching is the identity) or no usable matching.
    auto known = [&](std::size_t g) {
      return groups[g].skip_reason.empty() || groups[g].units == 1;
    };
    std::vector<std::vector<std::int64_t>> forward(n), backward(n);
    for (std::size_t g = 0; g < n; ++g) {
      if (!groups[g].skip_reason.empty()) {
        forward[g] = std::vector<std::int64_t>(static_cast<std::size_t>(groups[g].units), 0);
        continue;
      }
      Alignments align;
      if (g > 0 && known(g - 1) && !out[g - 1].members.empty() && !in[g].members.empty() &&
          out[g - 1].members.front().tensor == in[g].members.front().tensor) {
        align[in[g].members.front().tensor].push_back(
            {1, torch::tensor(forward[g - 1], torch::kLong)});
      }
      forward[g] = match(side_units(in[g], load_a, load_b, align));
    }
    for (std::size_t g = n; g-- > 0;) {
      if (!groups[g].skip_reason.empty()) {
        backward[g] = std::vector<std::int64_t>(static_cast<std::size_t>(groups[g].units), 0);
        continue;
      }
      Alignments align;
      if (g + 1 < n && known(g + 1) && !out[g].members.empty() && !in[g + 1].members.empty() &&
          out[g].members.front().tensor == in[g + 1].members.front().tensor) {
        align[out[g].members.front().tensor].push_back(
            {0, torch::tensor(backward[g + 1], torch::kLong)});
      }
      backward[g] = match(side_units(out[g], load_a, load_b, align));
    }
    for (std::size_t g = 0; g < n; ++g) {
      if (!groups[g].skip_reason.empty()) {
        rows[g] = skipped_evidence(groups[g], "agreement");
        continue;
      }
      rows[g] = agreement_evidence(groups[g], forward[g], backward[g],
                                   "forward (in-rows) vs backward (out-columns) matching");
      rows[g].note = join_note(rows[g].note, solve_note(groups[g].units));
    }
    return rows;
  }
  for (std::size_t g = 0; g < n; ++g) {
    const auto& group = groups[g];
    if (!group.skip_reason.empty()) {
      rows[g] = skipped_evidence(group, "agreement");
      continue;
    }
    const auto sides = layout.architecture == "explicit" ? std::nullopt : transformer_sides(group);
    if (!sides) {
      rows[g] = skipped_evidence(group, "agreement");
      rows[g].note =
          "skipped: agreement needs two independently initialized halves of each unit "
          "(detected MLP chains and transformer blocks only)";
      continue;
    }
    const auto first = match(side_units(sides->first, load_a, load_b, {}));
    const auto second = match(side_units(sides->second, load_a, load_b, {}));
    rows[g] = agreement_evidence(group, first, second, sides->description);
    rows[g].note = join_note(rows[g].note, solve_note(group.units));
  }
  return rows;
}

// Fisher over the layers' natural-log p-values: (statistic, log10 p).
std::pair<double, double> fisher_log10(const std::vector<double>& log_p) {
  const auto fisher =
      stats::fisher_combine_log(torch::tensor(log_p, torch::kDouble).clamp_max(0.0));
  return {fisher.statistic, fisher.log_p / kLn10};
}

}  // namespace

TestResult weight_test(const StateSource& a, const StateSource& b,
                       const WeightTestOptions& options) {
  check_compute_dtype(options.compute_dtype);
  if (options.auto_exact_max_units < 1) {
    throw InvalidInput("auto_exact_max_units: expected >= 1, got " +
                       std::to_string(options.auto_exact_max_units));
  }
  const auto device = compute_device(a, options.device);
  const ModelLayout layout = layout_of(a, b, options.groups, options.n_heads);
  const bool has_residual = !layout.residual.members.empty();
  if (options.align_embeddings && !has_residual) {
    throw InvalidInput("align_embeddings: the model has no embedding matrix to align through (" +
                       layout.architecture + " layout); the option applies to transformers");
  }
  require_testable(layout, has_residual);
  check_pairing(a, b, layout, options.mapping, has_residual);
  const bool agreement_only = options.statistic == WeightStatistic::kAgreement;
  const bool with_identity = !agreement_only;
  const bool with_agreement = agreement_only || options.robust;
  // The identity statistic of the identity rows (and of the residual row).
  const WeightStatistic identity =
      agreement_only ? WeightStatistic::kFixedPoints : options.statistic;
  const std::string identity_name = weight_statistic_name(identity);

  Loader load_a{a, "A", nullptr, options.compute_dtype, device, nullptr, {}};
  Loader load_b{b, "B", &options.mapping, options.compute_dtype, device, nullptr, {}};
  std::map<std::string, std::vector<std::int64_t>> residual_axes;
  TestResult result;
  result.test = "weights";
  result.statistic_name = "fisher";
  std::vector<double> log_p;            // natural log, combined identity rows
  std::vector<double> log_p_agreement;  // natural log, combined agreement rows

  if (has_residual) {
    // The residual basis: columns of the embeddings are the units.
    const auto& embed = layout.residual.members.front().tensor;
    // Exact unless auto finds the basis too wide: the alignment feeds every later matching.
    const auto residual_solver = options.solver == AssignmentSolver::kAuto
                                     ? AssignmentSolver::kAuto
                                     : AssignmentSolver::kExact;
    AssignmentSolver used = AssignmentSolver::kExact;
    auto perm =
        match_units(load_a.load(embed).t().contiguous(), load_b.load(embed).t().contiguous(),
                    residual_solver, options.auto_exact_max_units, &used);
    auto e = evidence_for(layout.residual, perm, identity);
    e.name = "residual_basis (" + embed + " columns)";
    e.note = join_note(e.note,
                       solver_note(residual_solver, used, e.units, options.auto_exact_max_units));
    if (options.align_embeddings) {
      e.note = join_note("aligned B's residual basis to A's; not combined", e.note);
      for (const auto& m : layout.residual.members) residual_axes[m.tensor].push_back(m.axis);
      load_b.residual_axes = &residual_axes;
      load_b.residual_perm = torch::tensor(perm, torch::kLong);
    } else if (agreement_only) {
      e.note = join_note("identity statistic; not combined under statistic=agreement", e.note);
    } else {
      log_p.push_back(e.log10_p * kLn10);
    }
    result.layers.push_back(std::move(e));
  }

  if (with_identity) {
    for (const auto& group : layout.groups) {
      if (!group.skip_reason.empty()) {
        result.layers.push_back(skipped_evidence(group, identity_name));
        continue;
      }
      auto units_a = unit_matrix(group, load_a.load_group(group));
      auto units_b = unit_matrix(group, load_b.load_group(group));
      AssignmentSolver used = AssignmentSolver::kExact;
      const auto perm = match_units(std::move(units_a), std::move(units_b), options.solver,
                                    options.auto_exact_max_units, &used);
      auto e = evidence_for(group, perm, identity);
      e.note = join_note(e.note,
                         solver_note(options.solver, used, e.units, options.auto_exact_max_units));
      log_p.push_back(e.log10_p * kLn10);
      result.layers.push_back(std::move(e));
    }
  }
  if (with_agreement) {
    for (auto& e : agreement_rows(layout, load_a, load_b, options)) {
      if (e.note.rfind("skipped", 0) != 0) log_p_agreement.push_back(e.log10_p * kLn10);
      result.layers.push_back(std::move(e));
    }
  }
  if ((with_identity && log_p.empty()) || (agreement_only && log_p_agreement.empty())) {
    throw InvalidInput("nothing testable remains: every unit group was skipped" +
                       std::string(options.align_embeddings
                                       ? " and the residual basis served as the alignment"
                                       : ""));
  }
  result.ran = true;
  std::ostringstream method;
  const std::string solver_text =
      assignment_solver_name(options.solver) + " assignment" +
      (options.solver == AssignmentSolver::kAuto
           ? " (exact up to " + std::to_string(options.auto_exact_max_units) + " units)"
           : std::string());
  const std::string agreement_text =
      "agreement of independent matchings, fixed-point null exact at initialization only";
  if (agreement_only) {
    std::tie(result.statistic, result.log10_p) = fisher_log10(log_p_agreement);
    method << kApproximateMethodPrefix << "fisher over " << log_p_agreement.size() << " groups ("
           << agreement_text;
  } else if (with_agreement && !log_p_agreement.empty()) {
    // Bonferroni over the two families: each is a valid (or approximately valid) p-value.
    const auto identity_fisher = fisher_log10(log_p);
    const auto agreement_fisher = fisher_log10(log_p_agreement);
    result.statistic_name = "bonferroni";
    result.statistic = std::min(identity_fisher.second, agreement_fisher.second);
    result.log10_p = std::min(0.0, std::log10(2.0) + result.statistic);
    method << kApproximateMethodPrefix << "bonferroni over fisher of " << log_p.size() << " "
           << identity_name << " groups (log10 p " << identity_fisher.second << ") and fisher of "
           << log_p_agreement.size() << " agreement groups (log10 p " << agreement_fisher.second
           << "; " << agreement_text;
  } else {
    std::tie(result.statistic, result.log10_p) = fisher_log10(log_p);
    method << "fisher over " << log_p.size() << " groups (" << identity_name;
  }
  method << ", " << solver_text << ", " << layout.architecture << " layout";
  if (options.align_embeddings) method << ", residual basis aligned through embeddings";
  for (const auto& note : layout.notes) method << "; " << note;
  method << ")";
  result.method = method.str();
  return result;
}

TestResult weight_test(const models::NamedTensors& a, const models::NamedTensors& b,
                       const WeightTestOptions& options) {
  const auto source_a = state_from_tensors(a, {}, "model A");
  const auto source_b = state_from_tensors(b, {}, "model B");
  return weight_test(*source_a, *source_b, options);
}

namespace {

// Per-group values of a built-in statistic for A (possibly permuted) against B.
std::vector<double> group_statistics(const std::vector<UnitGroup>& groups, const TensorMap& a,
                                     const std::vector<torch::Tensor>& units_b_hat,
                                     PermutationStatistic statistic, AssignmentSolver solver,
                                     std::int64_t auto_exact_max_units,
                                     std::vector<double>* matched_fraction = nullptr) {
  std::vector<double> out;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const auto units_a_hat = normalized_rows(unit_matrix(groups[g], a).clone());
    const auto& units_b = units_b_hat[g];
    if (statistic == PermutationStatistic::kIdentityCosine) {
      out.push_back((units_a_hat * units_b).sum(1).mean().item<double>());
    } else {
      const auto similarity = torch::mm(units_a_hat, units_b.t());
      const auto assignment =
          solve(similarity, resolve_solver(solver, groups[g].units, auto_exact_max_units));
      out.push_back(assignment.objective / static_cast<double>(groups[g].units));
      if (matched_fraction != nullptr) {
        const auto perm = as_permutation(assignment, groups[g].units);
        std::int64_t fixed = 0;
        for (std::size_t i = 0; i < perm.size(); ++i) fixed += perm[i] == std::int64_t(i);
        matched_fraction->push_back(static_cast<double>(fixed) / perm.size());
      }
    }
  }
  return out;
}

double mean_of(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

models::NamedTensors as_named(const TensorMap& map, const std::vector<TensorMeta>& order) {
  models::NamedTensors out;
  for (const auto& t : order) {
    const auto it = map.find(t.name);
    if (it != map.end()) out.emplace_back(t.name, it->second);
  }
  return out;
}

}  // namespace

TestResult weight_permutation_test(const StateSource& a, const StateSource& b,
                                   const PermutationTestOptions& options) {
  check_compute_dtype(options.compute_dtype);
  if (options.permutations < 1) {
    throw InvalidInput("permutations: expected >= 1, got " + std::to_string(options.permutations));
  }
  const auto device = compute_device(a, options.device);
  ModelLayout layout = layout_of(a, b, options.groups, options.n_heads);
  require_testable(layout, false);
  check_pairing(a, b, layout, options.mapping, false);
  std::vector<UnitGroup> groups;
  for (const auto& g : layout.groups) {
    if (g.skip_reason.empty()) groups.push_back(g);
  }
  const bool custom = static_cast<bool>(options.custom);
  const std::string name =
      custom ? options.custom_name : permutation_statistic_name(options.statistic);

  // Materialize the tensors: group members (built-in) or every floating tensor (custom).
  Loader load_a{a, "A", nullptr, options.compute_dtype, device, nullptr, {}};
  Loader load_b{b, "B", &options.mapping, options.compute_dtype, device, nullptr, {}};
  TensorMap tensors_a, tensors_b;
  if (custom) {
    std::map<std::string, std::string> a_name_of;  // B name -> A name
    for (const auto& t : a.tensors()) a_name_of[mapped(options.mapping, t.name)] = t.name;
    for (const auto& t : a.tensors()) {
      if (t.floating) tensors_a.emplace(t.name, load_a.load(t.name));
    }
    for (const auto& t : b.tensors()) {
      if (!t.floating) continue;
      const auto it = a_name_of.find(t.name);
      const std::string as_a = it == a_name_of.end() ? t.name : it->second;
      auto loaded = b.load(t.name, options.compute_dtype, device);
      check_finite(loaded, t.name, "B");
      tensors_b.emplace(as_a, std::move(loaded));
    }
  } else {
    for (const auto& g : groups) {
      for (auto& [n, t] : load_a.load_group(g)) tensors_a.emplace(n, t);
      for (auto& [n, t] : load_b.load_group(g)) tensors_b.emplace(n, t);
    }
  }
  std::vector<torch::Tensor> units_b_hat;
  if (!custom) {
    for (const auto& g : groups)
      units_b_hat.push_back(normalized_rows(unit_matrix(g, tensors_b).clone()));
  }
  const auto named_b = custom ? as_named(tensors_b, a.tensors()) : models::NamedTensors{};

  std::vector<double> matched_fraction;
  auto evaluate = [&](const TensorMap& state_a, std::vector<double>* fractions) {
    if (custom) return std::vector<double>{options.custom(as_named(state_a, a.tensors()), named_b)};
    return group_statistics(groups, state_a, units_b_hat, options.statistic, options.solver,
                            options.auto_exact_max_units, fractions);
  };
  const auto observed = evaluate(tensors_a, &matched_fraction);
  const std::size_t columns = observed.size();
  auto null =
      torch::empty({options.permutations, static_cast<std::int64_t>(columns)}, torch::kDouble);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  for (std::int64_t t = 0; t < options.permutations; ++t) {
    TensorMap permuted = tensors_a;
    for (const auto& g : groups) {
      const auto sigma = torch::randperm(g.units, generator, torch::kLong);
      permute_units(g, sigma, permuted);
    }
    const auto values = evaluate(permuted, nullptr);
    for (std::size_t c = 0; c < columns; ++c) null[t][static_cast<std::int64_t>(c)] = values[c];
  }

  TestResult result;
  result.test = "weights_permutation";
  result.statistic_name = name;
  result.ran = true;
  if (custom) {
    result.statistic = observed.front();
    result.log10_p = std::log10(stats::permutation_p_value(observed.front(), null.select(1, 0)));
  } else {
    result.statistic = mean_of(observed);
    const auto overall_null = null.mean(1);
    result.log10_p = std::log10(stats::permutation_p_value(result.statistic, overall_null));
    for (std::size_t g = 0; g < groups.size(); ++g) {
      LayerEvidence e;
      e.name = groups[g].name;
      e.kind = groups[g].kind;
      e.units = groups[g].units;
      e.statistic = observed[g];
      e.statistic_name = name;
      e.log10_p = std::log10(
          stats::permutation_p_value(observed[g], null.select(1, static_cast<std::int64_t>(g))));
      if (!matched_fraction.empty()) e.matched_fraction = matched_fraction[g];
      result.layers.push_back(std::move(e));
    }
  }
  for (const auto& g : layout.groups) {
    if (!g.skip_reason.empty()) result.layers.push_back(skipped_evidence(g, name));
  }
  std::ostringstream method;
  method << "permutation test of " << name << " over " << options.permutations
         << " random unit permutations of A (seed " << options.seed << ") in " << groups.size()
         << " groups, " << layout.architecture << " layout";
  result.method = method.str();
  return result;
}

namespace {

// Fisher's X over the agreement rows (skipped rows carry log10 p = 0 and add nothing).
double agreement_fisher_x(const TestResult& r) {
  double x = 0.0;
  for (const auto& layer : r.layers) {
    if (layer.statistic_name == "agreement") x += -2.0 * layer.log10_p * std::log(10.0);
  }
  return x;
}

}  // namespace

TestResult weight_agreement_test(const StateSource& a, const StateSource& b,
                                 const std::vector<const StateSource*>& controls,
                                 WeightTestOptions options) {
  if (controls.empty()) {
    throw InvalidInput(
        "weight_agreement_test: needs control models (independently initialized, trained like "
        "b) to calibrate the agreement statistic; got none");
  }
  options.statistic = WeightStatistic::kAgreement;
  options.robust = false;
  TestResult observed = weight_test(a, b, options);
  const double x = agreement_fisher_x(observed);
  std::int64_t at_least = 0;
  for (std::size_t i = 0; i < controls.size(); ++i) {
    if (controls[i] == nullptr) {
      throw InvalidInput("weight_agreement_test: control " + std::to_string(i) + " is null");
    }
    if (agreement_fisher_x(weight_test(a, *controls[i], options)) >= x) ++at_least;
  }
  const auto n = static_cast<double>(controls.size());
  TestResult out;
  out.test = "weights_agreement";
  out.ran = true;
  out.statistic = x;
  out.statistic_name = "agreement_fisher_x";
  out.log10_p = std::log10((1.0 + static_cast<double>(at_least)) / (1.0 + n));
  out.layers = std::move(observed.layers);
  out.method = "empirical null from " + std::to_string(controls.size()) +
               " control models: p = (1 + #{X_control >= X}) / (1 + n), X = Fisher's X over "
               "the agreement rows (" +
               std::to_string(at_least) + " controls >= X)";
  return out;
}

}  // namespace libtransfer::detect
