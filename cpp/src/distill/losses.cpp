#include "libtransfer/distill/losses.h"

#include <c10/util/accumulate.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "libtransfer/errors.h"

namespace libtransfer::distill {
namespace {

// Offline teacher log-probabilities may exceed 0 by rounding (APIs round to a few digits); more
// than this is a caller error (probabilities, not logits, were passed in).
constexpr double kLogProbSlack = 1e-3;

// Tempered logits and recorded log-probs are clamped from below to this value, so that -inf
// (forbidden tokens) becomes a finite number whose probability is exactly 0 in float32 and
// float64 alike. With every log-probability finite, p (log p - log q) is 0 where p underflows
// and no NaN can reach a value or a gradient, without masking passes over [N, V]. (A student
// -inf where the teacher has mass, an infinite KL, becomes a huge finite loss instead.)
constexpr double kLowestLogit = -1e30;

std::string shape_of(const torch::Tensor& t) { return c10::str(t.sizes()); }

void check_logits(const torch::Tensor& logits, const char* name) {
  if (!logits.defined()) throw InvalidInput(std::string(name) + ": expected a tensor, got none");
  if (!at::isFloatingType(logits.scalar_type())) {
    throw WrongType(std::string(name) + ": expected floating logits, got " +
                    c10::toString(logits.scalar_type()));
  }
  if (logits.dim() < 1 || logits.size(-1) < 1) {
    throw InvalidInput(std::string(name) + ": expected shape [..., V] with V >= 1, got " +
                       shape_of(logits));
  }
}

void check_integral(const torch::Tensor& t, const char* name) {
  if (!t.defined()) throw InvalidInput(std::string(name) + ": expected a tensor, got none");
  if (!at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    throw WrongType(std::string(name) + ": expected an integer tensor, got " +
                    c10::toString(t.scalar_type()));
  }
}

// Losses are computed in float32, or float64 when any input is float64 (so gradcheck and
// high-precision callers get what they ask for); bf16/f16 logits are upcast.
torch::ScalarType compute_dtype(const torch::Tensor& a, const torch::Tensor& b) {
  const bool wide =
      a.scalar_type() == torch::kDouble || (b.defined() && b.scalar_type() == torch::kDouble);
  return wide ? torch::kDouble : torch::kFloat;
}

// The positions a loss averages over, as a flat bool selector over logits.shape[:-1], or an
// undefined tensor for "all positions". Throws when nothing is selected.
torch::Tensor selected_positions(const torch::Tensor& mask, const torch::Tensor& logits,
                                 const char* logits_name) {
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  if (!mask.defined()) {
    if (c10::multiply_integers(lead) == 0) {
      throw InvalidInput(std::string(logits_name) + " has no positions (shape " + shape_of(logits) +
                         "): the loss would average over nothing");
    }
    return {};
  }
  if (mask.sizes() != lead) {
    throw InvalidInput("mask: expected shape " + c10::str(lead) + " (" + logits_name +
                       " without its last dimension " + shape_of(logits) + "), got " +
                       shape_of(mask));
  }
  auto selector = (mask.to(logits.device()) != 0).reshape({-1});
  const auto selected = selector.sum().item<int64_t>();
  if (selected == 0) {
    throw InvalidInput("mask selects no position (shape " + shape_of(mask) +
                       "): the loss would average over nothing");
  }
  // All selected: skip the gather (a copy of the logits).
  return selected == selector.numel() ? torch::Tensor() : selector;
}

// x reshaped to [P, last] and restricted to the selected rows.
torch::Tensor rows(const torch::Tensor& x, const torch::Tensor& selector) {
  auto flat = x.reshape({-1, x.size(-1)});
  return selector.defined() ? flat.index({selector}) : flat;
}

torch::Tensor flat_rows(const torch::Tensor& x, const torch::Tensor& selector) {
  auto flat = x.reshape({-1});
  return selector.defined() ? flat.index({selector}) : flat;
}

// sum over the last dim of p (la - lb) with p = exp(logp); all log-probs finite (see
// kLowestLogit), so p = 0 gives 0.
torch::Tensor p_log_ratio(const torch::Tensor& logp, const torch::Tensor& la,
                          const torch::Tensor& lb) {
  return (logp.exp() * (la - lb)).sum(-1);
}

// Per-row divergence between teacher log-probs lt and student log-probs ls, both [N, K].
torch::Tensor divergence_rows(const torch::Tensor& lt, const torch::Tensor& ls,
                              const KDConfig& config) {
  switch (config.divergence) {
    case Divergence::kForwardKL:
      return p_log_ratio(lt, lt, ls);
    case Divergence::kReverseKL:
      return p_log_ratio(ls, ls, lt);
    case Divergence::kJSD: {
      // log m = log(beta p_T + (1 - beta) p_S) in log space (finite: both inputs are finite).
      const auto lm = torch::logaddexp(lt + std::log(config.beta), ls + std::log1p(-config.beta));
      return config.beta * p_log_ratio(lt, lt, lm) + (1.0 - config.beta) * p_log_ratio(ls, ls, lm);
    }
  }
  throw InvalidInput("unknown divergence");
}

void check_config(const KDConfig& config) {
  if (!(config.temperature > 0) || !std::isfinite(config.temperature)) {
    throw InvalidInput("temperature: expected a finite value > 0, got " +
                       c10::str(config.temperature));
  }
  if (config.divergence == Divergence::kJSD && !(config.beta > 0 && config.beta < 1)) {
    throw InvalidInput("beta: expected a value in (0, 1) for jsd, got " + c10::str(config.beta));
  }
  if (config.top_k < 0) {
    throw InvalidInput("top_k: expected >= 0 (0 disables it), got " + c10::str(config.top_k));
  }
}

// Validates logit_subset against V and returns it as an index tensor on `device`.
torch::Tensor subset_index(const std::vector<int64_t>& subset, int64_t vocab,
                           torch::Device device) {
  std::vector<int64_t> sorted = subset;
  std::sort(sorted.begin(), sorted.end());
  if (sorted.front() < 0 || sorted.back() >= vocab) {
    throw InvalidInput("logit_subset: indices must be in [0, " + c10::str(vocab) + "), got " +
                       c10::str(sorted.front() < 0 ? sorted.front() : sorted.back()));
  }
  const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end()) {
    throw InvalidInput("logit_subset: indices must be unique, got " + c10::str(*dup) + " twice");
  }
  return torch::tensor(subset, torch::TensorOptions().dtype(torch::kLong)).to(device);
}

// log-probs [N, V] -> [N, k + 1]: the entries at `ids` [N, k] and the log of the remaining mass,
// computed directly as a logsumexp over the other entries (exact, no cancellation).
torch::Tensor with_tail_bucket(const torch::Tensor& logp, const torch::Tensor& ids) {
  const auto kept = logp.gather(-1, ids);
  const auto rest = logp.scatter(-1, ids, -std::numeric_limits<double>::infinity());
  return torch::cat({kept, rest.logsumexp(-1, /*keepdim=*/true)}, -1);
}

// log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler's log1mexp).
torch::Tensor log1mexp(const torch::Tensor& x) {
  const double log_half = -std::log(2.0);
  return torch::where(x > log_half, torch::log(-torch::expm1(x)), torch::log1p(-torch::exp(x)));
}

}  // namespace

Divergence parse_divergence(const std::string& name) {
  if (name == "forward_kl") return Divergence::kForwardKL;
  if (name == "reverse_kl") return Divergence::kReverseKL;
  if (name == "jsd") return Divergence::kJSD;
  throw InvalidInput("divergence: expected 'forward_kl', 'reverse_kl' or 'jsd', got '" + name +
                     "'");
}

std::string to_string(Divergence d) {
  switch (d) {
    case Divergence::kForwardKL:
      return "forward_kl";
    case Divergence::kReverseKL:
      return "reverse_kl";
    case Divergence::kJSD:
      return "jsd";
  }
  return "unknown";
}

torch::Tensor completion_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                                       const torch::Tensor& mask) {
  check_logits(logits, "logits");
  check_integral(targets, "targets");
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  if (targets.sizes() != lead) {
    throw InvalidInput("targets: expected shape " + c10::str(lead) + " (logits " +
                       shape_of(logits) + " without its last dimension), got " + shape_of(targets));
  }
  const auto selector = selected_positions(mask, logits, "logits");
  const int64_t vocab = logits.size(-1);
  const auto ids = flat_rows(targets.to(logits.device(), torch::kLong), selector);
  const auto lo = ids.min().item<int64_t>();
  const auto hi = ids.max().item<int64_t>();
  if (lo < 0 || hi >= vocab) {
    throw InvalidInput("targets: expected ids in [0, " + c10::str(vocab) +
                       ") where the mask is set, got " + c10::str(lo < 0 ? lo : hi));
  }
  const auto logp = rows(logits.to(compute_dtype(logits, {})), selector).log_softmax(-1);
  return -logp.gather(-1, ids.unsqueeze(-1)).mean();
}

torch::Tensor kd_loss(const torch::Tensor& student_logits, const torch::Tensor& teacher_logits,
                      const torch::Tensor& mask, const KDConfig& config) {
  check_logits(student_logits, "student_logits");
  check_logits(teacher_logits, "teacher_logits");
  if (student_logits.sizes() != teacher_logits.sizes()) {
    const bool same_lead = student_logits.dim() == teacher_logits.dim() &&
                           student_logits.sizes().slice(0, student_logits.dim() - 1) ==
                               teacher_logits.sizes().slice(0, teacher_logits.dim() - 1);
    if (same_lead) {
      throw InvalidInput("teacher and student vocabulary sizes differ: student_logits have " +
                         c10::str(student_logits.size(-1)) + " logits per position, " +
                         "teacher_logits " + c10::str(teacher_logits.size(-1)) + " (shapes " +
                         shape_of(student_logits) + " and " + shape_of(teacher_logits) +
                         "); KD needs one shared vocabulary");
    }
    throw InvalidInput("student_logits and teacher_logits: expected the same shape, got " +
                       shape_of(student_logits) + " and " + shape_of(teacher_logits));
  }
  if (student_logits.device() != teacher_logits.device()) {
    throw InvalidInput("student_logits and teacher_logits: expected one device, got " +
                       student_logits.device().str() + " and " + teacher_logits.device().str());
  }
  check_config(config);
  const auto selector = selected_positions(mask, student_logits, "student_logits");
  const auto dtype = compute_dtype(student_logits, teacher_logits);
  const double tau = config.temperature;

  auto s = rows(student_logits.to(dtype), selector);
  auto t = rows(teacher_logits.detach().to(dtype), selector);
  if (!config.logit_subset.empty()) {
    const auto index = subset_index(config.logit_subset, s.size(-1), s.device());
    s = s.index_select(-1, index);
    t = t.index_select(-1, index);
  }
  auto ls = (s / tau).clamp_min(kLowestLogit).log_softmax(-1);
  auto lt = (t / tau).clamp_min(kLowestLogit).log_softmax(-1);
  // k >= V leaves no tail: the full distributions are used as they are.
  if (config.top_k > 0 && config.top_k < ls.size(-1)) {
    const auto ids = std::get<1>(lt.topk(config.top_k, -1));
    lt = with_tail_bucket(lt, ids);
    ls = with_tail_bucket(ls, ids);
  }
  return tau * tau * divergence_rows(lt, ls, config).mean();
}

torch::Tensor topk_kd_loss(const torch::Tensor& student_logits, const torch::Tensor& topk_ids,
                           const torch::Tensor& topk_logprobs, const torch::Tensor& mask,
                           const KDConfig& config) {
  check_logits(student_logits, "student_logits");
  check_integral(topk_ids, "topk_ids");
  check_logits(topk_logprobs, "topk_logprobs");
  check_config(config);
  if (config.temperature != 1.0) {
    throw InvalidInput(
        "temperature: offline top-k KD needs 1 (a tempered teacher cannot be "
        "recovered from its top-k log-probabilities at temperature 1), got " +
        c10::str(config.temperature));
  }
  if (config.top_k != 0 || !config.logit_subset.empty()) {
    throw InvalidInput(
        "top_k and logit_subset: expected unset for offline top-k KD (the teacher's "
        "top-k is given), got top_k " +
        c10::str(config.top_k) + " and " + c10::str(config.logit_subset.size()) +
        " subset indices");
  }
  if (topk_ids.sizes() != topk_logprobs.sizes()) {
    throw InvalidInput("topk_ids and topk_logprobs: expected the same shape, got " +
                       shape_of(topk_ids) + " and " + shape_of(topk_logprobs));
  }
  const auto lead = student_logits.sizes().slice(0, student_logits.dim() - 1);
  if (topk_ids.dim() != student_logits.dim() ||
      topk_ids.sizes().slice(0, topk_ids.dim() - 1) != lead) {
    throw InvalidInput("topk_ids: expected shape " + c10::str(lead) + " + [k] (student_logits " +
                       shape_of(student_logits) + "), got " + shape_of(topk_ids));
  }
  const int64_t vocab = student_logits.size(-1);
  const int64_t k = topk_ids.size(-1);
  if (k > vocab) {
    throw InvalidInput("topk_ids: k must not exceed the student's vocabulary size " +
                       c10::str(vocab) + ", got k = " + c10::str(k));
  }
  const auto selector = selected_positions(mask, student_logits, "student_logits");
  const auto dtype = compute_dtype(student_logits, topk_logprobs);
  const auto device = student_logits.device();

  const auto ids = rows(topk_ids.to(device, torch::kLong), selector);
  const auto lo = ids.min().item<int64_t>();
  const auto hi = ids.max().item<int64_t>();
  if (lo < 0 || hi >= vocab) {
    throw InvalidInput("topk_ids: expected ids in [0, " + c10::str(vocab) +
                       ") (the student's vocabulary) where the mask is set, got " +
                       c10::str(lo < 0 ? lo : hi));
  }
  if (k > 1) {
    const auto sorted = std::get<0>(ids.sort(-1));
    const auto repeats = (sorted.slice(-1, 1) == sorted.slice(-1, 0, k - 1)).any().item<bool>();
    if (repeats) throw InvalidInput("topk_ids: expected distinct ids within each position");
  }
  auto lt = rows(topk_logprobs.detach().to(device, dtype), selector);
  if (lt.isnan().any().item<bool>() || (lt > kLogProbSlack).any().item<bool>()) {
    throw InvalidInput("topk_logprobs: expected log-probabilities (<= 0, no NaN), got max " +
                       c10::str(lt.max().item<double>()));
  }
  lt = lt.clamp_min(kLowestLogit);
  const auto ls_full =
      rows(student_logits.to(dtype), selector).clamp_min(kLowestLogit).log_softmax(-1);
  auto ls = ls_full.gather(-1, ids);
  if (k < vocab) {
    // Rounded log-probs may sum to slightly more than 1: renormalize those rows. The teacher's
    // tail is then 1 - sum, floored at the smallest normal number so that reverse KL and JSD stay
    // finite when the top-k hold all the recorded mass.
    const auto mass = lt.logsumexp(-1, /*keepdim=*/true);
    lt = lt - mass.clamp_min(0);
    const double floor = std::log(dtype == torch::kDouble ? std::numeric_limits<double>::min()
                                                          : std::numeric_limits<float>::min());
    const auto tail_t = log1mexp(mass.clamp_max(0)).clamp_min(floor);
    const auto rest = ls_full.scatter(-1, ids, -std::numeric_limits<double>::infinity());
    lt = torch::cat({lt, tail_t}, -1);
    ls = torch::cat({ls, rest.logsumexp(-1, /*keepdim=*/true)}, -1);
  }
  return divergence_rows(lt, ls, config).mean();
}

}  // namespace libtransfer::distill
