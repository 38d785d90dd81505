#include "libtransfer/distill/model_filters.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <sstream>

#include "libtransfer/errors.h"

namespace libtransfer::distill {
namespace {

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// Evaluation mode for the duration of a scoring pass (dropout would make scores random), then
// the caller's mode again.
class EvalMode {
 public:
  explicit EvalMode(models::Model& model) : model_(model), was_training_(model.is_training()) {
    if (was_training_) model_.set_training(false);
  }
  ~EvalMode() {
    if (was_training_) model_.set_training(true);
  }
  EvalMode(const EvalMode&) = delete;
  EvalMode& operator=(const EvalMode&) = delete;

 private:
  models::Model& model_;
  bool was_training_;
};

void check_language_model(models::Model& model, const std::string& who) {
  if (model.input_kind() != models::InputKind::kTokens) {
    throw InvalidInput(who + " must be a language model (token inputs), got " + model.describe());
  }
}

void check_same_vocabulary(models::Model& a, const std::string& a_name, models::Model& b,
                           const std::string& b_name) {
  if (a.output_size() != b.output_size()) {
    throw InvalidInput("vocabulary mismatch: " + a_name + " has " +
                       std::to_string(a.output_size()) + " tokens, " + b_name + " has " +
                       std::to_string(b.output_size()));
  }
}

void check_ids(const TokenIds& ids, std::int64_t vocab, const std::string& what) {
  for (const auto id : ids) {
    if (id < 0 || id >= vocab) {
      throw InvalidInput(what + ": token id " + std::to_string(id) + " outside 0.." +
                         std::to_string(vocab - 1));
    }
  }
}

void check_batch_size(std::int64_t batch_size) {
  if (batch_size < 1) {
    throw InvalidInput("batch_size must be >= 1, got " + std::to_string(batch_size));
  }
}

// Logits of rows with `prefix` prepended, aligned to the rows' own positions: [b, T, V].
torch::Tensor logits_with_prefix(models::Model& model, const torch::Tensor& input,
                                 const torch::Tensor& mask, const TokenIds& prefix) {
  const auto device = model.device();
  auto in = input.to(device);
  auto m = mask.to(device);
  if (prefix.empty()) return model.forward(in, m);
  const auto P = static_cast<std::int64_t>(prefix.size());
  auto p = torch::tensor(prefix, torch::kLong).reshape({1, P}).to(device).expand({in.size(0), P});
  auto full_in = torch::cat({p, in}, 1);
  auto full_mask = torch::cat({torch::ones({in.size(0), P}, m.options()), m}, 1);
  return model.forward(full_in, full_mask).slice(1, P);
}

}  // namespace

torch::Tensor completion_log_likelihood(models::Model& model, const std::vector<TokenIds>& prompts,
                                        const std::vector<TokenIds>& completions,
                                        const TokenIds& prefix, std::int64_t batch_size) {
  check_language_model(model, "model");
  check_batch_size(batch_size);
  if (prompts.size() != completions.size()) {
    throw InvalidInput("completion_log_likelihood: " + std::to_string(prompts.size()) +
                       " prompts but " + std::to_string(completions.size()) + " completions");
  }
  const std::int64_t vocab = model.output_size();
  check_ids(prefix, vocab, "prefix");
  const auto N = static_cast<std::int64_t>(prompts.size());
  for (std::int64_t i = 0; i < N; ++i) {
    check_ids(prompts[i], vocab, "prompt " + std::to_string(i));
    check_ids(completions[i], vocab, "completion " + std::to_string(i));
    if (completions[i].empty()) {
      throw InvalidInput("completion " + std::to_string(i) + " is empty");
    }
    if (prefix.empty() && prompts[i].empty()) {
      throw InvalidInput("sample " + std::to_string(i) +
                         ": empty prompt and prefix (the first completion token has no context)");
    }
  }
  auto out = torch::zeros({N}, torch::kFloat64);
  auto out_a = out.accessor<double, 1>();
  const auto P = static_cast<std::int64_t>(prefix.size());
  EvalMode eval(model);
  torch::NoGradGuard no_grad;
  for (std::int64_t start = 0; start < N; start += batch_size) {
    const std::int64_t b = std::min(batch_size, N - start);
    // Rows prefix + prompt + completion, right-padded with id 0 (masked).
    std::int64_t longest = 0;
    for (std::int64_t r = 0; r < b; ++r) {
      longest = std::max<std::int64_t>(
          longest,
          P + static_cast<std::int64_t>(prompts[start + r].size() + completions[start + r].size()));
    }
    auto input = torch::zeros({b, longest}, torch::kLong);
    auto mask = torch::zeros({b, longest}, torch::kLong);
    // weight[r, t] = 1 where position t predicts a completion token (token t + 1).
    auto weight = torch::zeros({b, longest - 1}, torch::kBool);
    auto in_a = input.accessor<std::int64_t, 2>();
    auto m_a = mask.accessor<std::int64_t, 2>();
    auto w_a = weight.accessor<bool, 2>();
    for (std::int64_t r = 0; r < b; ++r) {
      std::int64_t t = 0;
      for (const auto id : prefix) in_a[r][t++] = id;
      for (const auto id : prompts[start + r]) in_a[r][t++] = id;
      const std::int64_t first_completion = t;
      for (const auto id : completions[start + r]) in_a[r][t++] = id;
      for (std::int64_t u = 0; u < t; ++u) m_a[r][u] = 1;
      for (std::int64_t u = first_completion - 1; u < t - 1; ++u) w_a[r][u] = 1;
    }
    const auto device = model.device();
    auto logits = model.forward(input.to(device), mask.to(device));
    if (logits.dim() != 3 || logits.size(0) != b || logits.size(1) != longest ||
        logits.size(2) != vocab) {
      throw InvalidInput("model returned logits " + shape_of(logits) + " for input [" +
                         std::to_string(b) + ", " + std::to_string(longest) + "], expected [" +
                         std::to_string(b) + ", " + std::to_string(longest) + ", " +
                         std::to_string(vocab) + "]");
    }
    // log_softmax in float32 at least (half logits lose too much in the sums).
    auto logp = torch::log_softmax(logits.slice(1, 0, longest - 1).to(torch::kFloat), -1);
    auto next = input.slice(1, 1).to(logp.device());
    auto token_logp = logp.gather(2, next.unsqueeze(-1)).squeeze(-1);
    auto w = weight.to(token_logp.device());
    auto sums =
        torch::where(w, token_logp, torch::zeros_like(token_logp)).to(torch::kFloat64).sum(1).cpu();
    auto s_a = sums.accessor<double, 1>();
    for (std::int64_t r = 0; r < b; ++r) out_a[start + r] = s_a[r];
  }
  return out;
}

torch::Tensor likelihood_ratio_scores(models::Model& teacher, models::Model& reference,
                                      const std::vector<TokenIds>& prompts,
                                      const std::vector<TokenIds>& completions,
                                      const LikelihoodRatioOptions& options) {
  check_language_model(teacher, "teacher");
  check_language_model(reference, "reference");
  check_same_vocabulary(teacher, "teacher", reference, "reference");
  const auto t = completion_log_likelihood(teacher, prompts, completions, options.teacher_prefix,
                                           options.batch_size);
  const auto r = completion_log_likelihood(reference, prompts, completions,
                                           options.reference_prefix, options.batch_size);
  return t - r;
}

std::vector<bool> drop_largest(const torch::Tensor& scores, double drop_fraction,
                               std::optional<double> threshold) {
  if (!scores.defined() || scores.dim() != 1) {
    throw InvalidInput("drop_largest: scores must be 1-D, got " +
                       (scores.defined() ? shape_of(scores) : std::string("undefined")));
  }
  if (!(drop_fraction >= 0.0 && drop_fraction <= 1.0)) {
    throw InvalidInput("drop_fraction must be in [0, 1], got " + std::to_string(drop_fraction));
  }
  if (threshold && std::isnan(*threshold)) throw InvalidInput("threshold is NaN");
  const auto s = scores.to(torch::kCPU, torch::kFloat64).contiguous();
  const auto* v = s.data_ptr<double>();
  const std::int64_t n = s.numel();
  for (std::int64_t i = 0; i < n; ++i) {
    if (std::isnan(v[i])) throw InvalidInput("score " + std::to_string(i) + " is NaN");
  }
  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), std::int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return v[a] > v[b]; });
  const auto k = static_cast<std::int64_t>(std::llround(drop_fraction * static_cast<double>(n)));
  std::vector<bool> drop(n, false);
  for (std::int64_t r = 0; r < std::min(k, n); ++r) drop[order[r]] = true;
  if (threshold) {
    for (std::int64_t i = 0; i < n; ++i) {
      if (v[i] > *threshold) drop[i] = true;
    }
  }
  return drop;
}

// ---- LikelihoodRatioFilter ------------------------------------------------------------------

LikelihoodRatioFilter::LikelihoodRatioFilter(models::ModelPtr teacher, models::ModelPtr reference,
                                             LikelihoodRatioFilterConfig config, Tokenize tokenize)
    : teacher_(std::move(teacher)),
      reference_(std::move(reference)),
      config_(std::move(config)),
      tokenize_(std::move(tokenize)) {
  if (!teacher_ || !reference_) throw InvalidInput("LikelihoodRatioFilter: null model");
  check_language_model(*teacher_, "teacher");
  check_language_model(*reference_, "reference");
  check_same_vocabulary(*teacher_, "teacher", *reference_, "reference");
  check_batch_size(config_.scoring.batch_size);
  if (!(config_.drop_fraction >= 0.0 && config_.drop_fraction <= 1.0)) {
    throw InvalidInput("LikelihoodRatioFilter: drop_fraction must be in [0, 1], got " +
                       std::to_string(config_.drop_fraction));
  }
}

std::vector<std::optional<Rejection>> LikelihoodRatioFilter::check_all(
    const std::vector<Sample>& samples, const std::vector<std::int64_t>& indices) {
  scores_.clear();
  std::vector<std::optional<Rejection>> verdicts(indices.size());
  if (indices.empty()) return verdicts;
  std::vector<TokenIds> prompts, completions;
  prompts.reserve(indices.size());
  completions.reserve(indices.size());
  for (const auto i : indices) {
    const Sample& s = samples[i];
    if (!s.completion_ids.empty()) {
      prompts.push_back(s.prompt_ids);
      completions.push_back(s.completion_ids);
    } else if (tokenize_) {
      prompts.push_back(tokenize_(s.prompt));
      completions.push_back(tokenize_(s.completion));
    } else {
      throw InvalidInput("LikelihoodRatioFilter: sample " + std::to_string(i) +
                         " has no token ids and no tokenizer was given");
    }
  }
  const auto scores =
      likelihood_ratio_scores(*teacher_, *reference_, prompts, completions, config_.scoring);
  const auto drop = drop_largest(scores, config_.drop_fraction, config_.threshold);
  const auto* v = scores.data_ptr<double>();
  for (std::size_t k = 0; k < indices.size(); ++k) {
    scores_.emplace_back(indices[k], v[k]);
    if (!drop[k]) continue;
    char detail[160];
    std::snprintf(
        detail, sizeof(detail), "log p_T - log p_R = %.6g (drop_fraction %.3g%s)", v[k],
        config_.drop_fraction,
        config_.threshold ? (", threshold " + std::to_string(*config_.threshold)).c_str() : "");
    verdicts[k] = Rejection{reason::kLikelihoodRatio, detail};
  }
  return verdicts;
}

// ---- divergence tokens ----------------------------------------------------------------------

namespace {

// Argmax next token of every position, rows run batch_size at a time: [B, T] int64 on the CPU.
torch::Tensor argmax_next(models::Model& model, const torch::Tensor& input,
                          const torch::Tensor& mask, const TokenIds& prefix,
                          std::int64_t batch_size) {
  EvalMode eval(model);
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  const std::int64_t B = input.size(0), T = input.size(1);
  for (std::int64_t start = 0; start < B; start += batch_size) {
    const std::int64_t b = std::min(batch_size, B - start);
    auto logits =
        logits_with_prefix(model, input.narrow(0, start, b), mask.narrow(0, start, b), prefix);
    if (logits.dim() != 3 || logits.size(0) != b || logits.size(1) != T) {
      throw InvalidInput("model returned logits " + shape_of(logits) + " for " + std::to_string(b) +
                         " rows of " + std::to_string(T) + " positions");
    }
    parts.push_back(logits.argmax(-1).cpu());
  }
  return torch::cat(parts, 0);
}

}  // namespace

DivergenceMask divergence_token_mask(const models::ModelPtr& teacher,
                                     const std::vector<models::ModelPtr>& counterfactuals,
                                     const Batch& batch, const DivergenceOptions& options) {
  check_batch_size(options.batch_size);
  if (counterfactuals.empty()) {
    throw InvalidInput("divergence_token_mask: at least one counterfactual teacher is needed");
  }
  if (!options.compare_to_targets && !teacher) {
    throw InvalidInput("divergence_token_mask: a teacher is needed unless compare_to_targets");
  }
  if (!options.counterfactual_prefixes.empty() &&
      options.counterfactual_prefixes.size() != counterfactuals.size()) {
    throw InvalidInput(
        "divergence_token_mask: " + std::to_string(options.counterfactual_prefixes.size()) +
        " counterfactual prefixes for " + std::to_string(counterfactuals.size()) +
        " counterfactuals");
  }
  const auto& input = batch.input;
  if (!input.defined() || input.dim() != 2 || input.scalar_type() != torch::kLong) {
    throw InvalidInput("divergence_token_mask: batch.input must be [B, T] int64, got " +
                       (input.defined() ? shape_of(input) : std::string("undefined")));
  }
  const std::int64_t B = input.size(0), T = input.size(1);
  auto same_shape = [&](const torch::Tensor& t, const char* name) {
    if (!t.defined() || t.sizes() != input.sizes()) {
      throw InvalidInput(std::string("divergence_token_mask: batch.") + name + " must be " +
                         shape_of(input) + ", got " +
                         (t.defined() ? shape_of(t) : std::string("undefined")));
    }
  };
  same_shape(batch.loss_mask, "loss_mask");
  if (options.compare_to_targets) same_shape(batch.targets, "targets");
  torch::Tensor mask = batch.attention_mask.defined()
                           ? batch.attention_mask.to(torch::kCPU, torch::kLong)
                           : torch::ones({B, T}, torch::kLong);
  same_shape(mask, "attention_mask");
  const bool any_prefix =
      !options.teacher_prefix.empty() ||
      std::any_of(options.counterfactual_prefixes.begin(), options.counterfactual_prefixes.end(),
                  [](const TokenIds& p) { return !p.empty(); });
  if (any_prefix && T > 1 && (mask.slice(1, 1) > mask.slice(1, 0, T - 1)).any().item<bool>()) {
    throw InvalidInput(
        "divergence_token_mask: prefixes need right-padded rows (attention_mask 1s then 0s)");
  }
  models::Model* first = teacher ? teacher.get() : counterfactuals.front().get();
  check_language_model(*first, teacher ? "teacher" : "counterfactual 0");
  for (std::size_t k = 0; k < counterfactuals.size(); ++k) {
    if (!counterfactuals[k]) throw InvalidInput("divergence_token_mask: null counterfactual");
    const std::string name = "counterfactual " + std::to_string(k);
    check_language_model(*counterfactuals[k], name);
    check_same_vocabulary(*first, teacher ? "teacher" : "counterfactual 0", *counterfactuals[k],
                          name);
  }
  const auto input_cpu = input.cpu();
  const torch::Tensor reference =
      options.compare_to_targets
          ? batch.targets.to(torch::kCPU, torch::kLong)
          : argmax_next(*teacher, input_cpu, mask, options.teacher_prefix, options.batch_size);
  const auto loss = batch.loss_mask.to(torch::kCPU, torch::kFloat);
  const auto counted = loss != 0;
  auto divergent = torch::zeros({B, T}, torch::kBool);
  for (std::size_t k = 0; k < counterfactuals.size(); ++k) {
    const TokenIds& prefix =
        options.counterfactual_prefixes.empty() ? TokenIds{} : options.counterfactual_prefixes[k];
    const auto other =
        argmax_next(*counterfactuals[k], input_cpu, mask, prefix, options.batch_size);
    divergent = divergent.logical_or(other != reference);
  }
  divergent = divergent.logical_and(counted);
  DivergenceMask out;
  out.divergent = divergent;
  out.loss_mask = loss * divergent.logical_not().to(torch::kFloat);
  out.per_row = divergent.sum(1).to(torch::kLong);
  out.positions = counted.sum().item<std::int64_t>();
  out.divergent_count = divergent.sum().item<std::int64_t>();
  return out;
}

}  // namespace libtransfer::distill
