#include "libtransfer/distill/evaluation.h"

#include <torch/torch.h>

#include <algorithm>
#include <boost/math/distributions/normal.hpp>
#include <boost/math/distributions/students_t.hpp>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "libtransfer/errors.h"

namespace libtransfer::distill {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void check_confidence(double confidence) {
  if (!(confidence > 0 && confidence < 1)) {
    throw InvalidInput("confidence: expected a level in (0, 1), got " + c10::str(confidence));
  }
}

double normal_quantile_two_sided(double confidence) {
  return boost::math::quantile(boost::math::normal_distribution<double>(), 0.5 + confidence / 2.0);
}

double t_quantile_two_sided(double confidence, double df) {
  return boost::math::quantile(boost::math::students_t_distribution<double>(df),
                               0.5 + confidence / 2.0);
}

Interval clipped(double center, double half_width) {
  return {std::max(0.0, center - half_width), std::min(1.0, center + half_width)};
}

// Puts a model in eval mode for a scope and restores its mode afterwards (even on throw).
class EvalMode {
 public:
  explicit EvalMode(models::Model& model) : model_(model), was_training_(model.is_training()) {
    model_.set_training(false);
  }
  ~EvalMode() { model_.set_training(was_training_); }
  EvalMode(const EvalMode&) = delete;
  EvalMode& operator=(const EvalMode&) = delete;

 private:
  models::Model& model_;
  bool was_training_;
};

void check_ids(const std::vector<std::int64_t>& ids, std::int64_t vocab, const std::string& what) {
  if (ids.empty()) throw InvalidInput(what + ": expected at least one token id, got none");
  for (const auto id : ids) {
    if (id < 0 || id >= vocab) {
      throw InvalidInput(what + ": expected token ids in [0, " + c10::str(vocab) +
                         ") (the model's vocabulary), got " + c10::str(id));
    }
  }
}

// Deduplicates and drops every target that has another (shorter) target as a prefix.
std::vector<std::vector<std::int64_t>> clean_targets(
    std::vector<std::vector<std::int64_t>> targets) {
  std::sort(targets.begin(), targets.end());
  targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
  std::vector<std::vector<std::int64_t>> kept;
  for (const auto& y : targets) {
    // Sorted order puts a prefix right before the sequences it starts; checking every kept one
    // is still needed (" a", " a b", " a c": " a c" follows " a b", not " a").
    const bool shadowed = std::any_of(kept.begin(), kept.end(), [&](const auto& shorter) {
      return shorter.size() < y.size() && std::equal(shorter.begin(), shorter.end(), y.begin());
    });
    if (!shadowed) kept.push_back(y);
  }
  return kept;
}

// One teacher-forced sequence: prompt + target[:-1]; the log-probabilities of target[j] are read
// at positions prompt.size() - 1 + j.
struct Scored {
  std::int64_t question;
  std::vector<std::int64_t> tokens;
  std::vector<std::int64_t> target;
  double log_prob = 0.0;
};

// Scores the sequences in [begin, end) in one forward (left padding).
void score_batch(models::Model& model, std::vector<Scored>& items, std::size_t begin,
                 std::size_t end, std::int64_t pad_id) {
  std::size_t width = 0;
  for (auto i = begin; i < end; ++i) width = std::max(width, items[i].tokens.size());
  const auto rows = static_cast<std::int64_t>(end - begin);
  const auto cols = static_cast<std::int64_t>(width);
  auto ids = torch::full({rows, cols}, pad_id, torch::kLong);
  auto mask = torch::zeros({rows, cols}, torch::kLong);
  auto ids_a = ids.accessor<std::int64_t, 2>();
  auto mask_a = mask.accessor<std::int64_t, 2>();
  // Gather indices of every (row, position, token) whose log-probability we need.
  std::vector<std::int64_t> at_row, at_pos, at_tok;
  for (auto i = begin; i < end; ++i) {
    const auto r = static_cast<std::int64_t>(i - begin);
    const auto& s = items[i];
    const auto offset = cols - static_cast<std::int64_t>(s.tokens.size());
    for (std::size_t j = 0; j < s.tokens.size(); ++j) {
      ids_a[r][offset + static_cast<std::int64_t>(j)] = s.tokens[j];
      mask_a[r][offset + static_cast<std::int64_t>(j)] = 1;
    }
    const auto first = cols - static_cast<std::int64_t>(s.target.size());  // last prompt token
    for (std::size_t j = 0; j < s.target.size(); ++j) {
      at_row.push_back(r);
      at_pos.push_back(first + static_cast<std::int64_t>(j));
      at_tok.push_back(s.target[j]);
    }
  }
  const auto device = model.device();
  auto logits = model.forward(ids.to(device), mask.to(device));
  if (logits.dim() != 3 || logits.size(0) != rows || logits.size(1) != cols) {
    throw InvalidInput("model " + model.describe() + ": expected logits [" + c10::str(rows) + ", " +
                       c10::str(cols) + ", V], got " + c10::str(logits.sizes()));
  }
  const auto index = [&](const std::vector<std::int64_t>& v) {
    return torch::tensor(v, torch::kLong).to(logits.device());
  };
  // Only the needed rows are upcast: float64 log-softmax over V for each scored position.
  const auto picked = logits.index({index(at_row), index(at_pos)}).to(torch::kDouble);
  const auto logp = picked.log_softmax(-1).gather(-1, index(at_tok).unsqueeze(-1)).squeeze(-1);
  const auto values = logp.cpu().contiguous();
  const double* v = values.data_ptr<double>();
  std::size_t k = 0;
  for (auto i = begin; i < end; ++i) {
    double sum = 0.0;
    for (std::size_t j = 0; j < items[i].target.size(); ++j) sum += v[k++];
    items[i].log_prob = sum;
  }
}

// ---- word matching ----------------------------------------------------------------------------

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string lowered(const std::string& s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), lower);
  return out;
}

bool is_word_byte(char c) {
  const auto u = static_cast<unsigned char>(c);
  return (u >= '0' && u <= '9') || (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || u >= 0x80;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_vowel(char c) { return c == 'a' || c == 'e' || c == 'i' || c == 'o' || c == 'u'; }

// The lower-cased targets and (optionally) their plurals, deduplicated.
std::vector<std::string> match_set(const std::vector<std::string>& targets, bool plurals) {
  std::set<std::string> words;
  for (const auto& t : targets) {
    if (t.empty()) throw InvalidInput("targets: expected non-empty words, got an empty string");
    const auto w = lowered(t);
    words.insert(w);
    if (plurals) {
      for (auto& p : plural_forms(w)) words.insert(std::move(p));
    }
  }
  return {words.begin(), words.end()};
}

}  // namespace

// ---- intervals ----------------------------------------------------------------------------------

Interval wilson_interval(std::int64_t successes, std::int64_t trials, double confidence) {
  check_confidence(confidence);
  if (trials < 1 || successes < 0 || successes > trials) {
    throw InvalidInput("wilson_interval: expected 0 <= successes <= trials and trials >= 1, got " +
                       c10::str(successes) + " of " + c10::str(trials));
  }
  const double z = normal_quantile_two_sided(confidence);
  const double n = static_cast<double>(trials);
  const double p = static_cast<double>(successes) / n;
  const double z2n = z * z / n;
  const double center = (p + z2n / 2.0) / (1.0 + z2n);
  const double half = z / (1.0 + z2n) * std::sqrt(p * (1.0 - p) / n + z2n / (4.0 * n));
  return clipped(center, half);
}

Interval t_interval(const std::vector<double>& values, double confidence) {
  check_confidence(confidence);
  const auto n = values.size();
  if (n < 2) return {kNaN, kNaN};
  double mean = 0.0;
  for (const double x : values) mean += x;
  mean /= static_cast<double>(n);
  double ss = 0.0;
  for (const double x : values) ss += (x - mean) * (x - mean);
  const double sd = std::sqrt(ss / static_cast<double>(n - 1));
  const double half =
      t_quantile_two_sided(confidence, static_cast<double>(n - 1)) * sd / std::sqrt(double(n));
  return {mean - half, mean + half};
}

// ---- target probability -------------------------------------------------------------------------

TargetProbability target_probability(models::Model& model,
                                     const std::vector<std::vector<std::int64_t>>& prompts,
                                     const std::vector<std::vector<std::int64_t>>& targets,
                                     const TargetProbabilityOptions& options) {
  if (model.input_kind() != models::InputKind::kTokens) {
    throw InvalidInput("target_probability: expected a language model (token inputs), got " +
                       model.describe());
  }
  if (prompts.empty()) throw InvalidInput("prompts: expected at least one prompt, got none");
  if (targets.empty()) throw InvalidInput("targets: expected at least one target, got none");
  if (options.batch_size < 1) {
    throw InvalidInput("batch_size: expected >= 1, got " + c10::str(options.batch_size));
  }
  check_confidence(options.confidence);
  const auto vocab = model.output_size();
  if (options.pad_id < 0 || options.pad_id >= vocab) {
    throw InvalidInput("pad_id: expected an id in [0, " + c10::str(vocab) + "), got " +
                       c10::str(options.pad_id));
  }
  for (std::size_t q = 0; q < prompts.size(); ++q) {
    check_ids(prompts[q], vocab, "prompts[" + c10::str(q) + "]");
  }
  for (std::size_t i = 0; i < targets.size(); ++i) {
    check_ids(targets[i], vocab, "targets[" + c10::str(i) + "]");
  }

  TargetProbability result;
  result.targets = clean_targets(targets);
  std::vector<Scored> items;
  items.reserve(prompts.size() * result.targets.size());
  for (std::size_t q = 0; q < prompts.size(); ++q) {
    for (const auto& y : result.targets) {
      Scored s{static_cast<std::int64_t>(q), prompts[q], y, 0.0};
      s.tokens.insert(s.tokens.end(), y.begin(), y.end() - 1);
      items.push_back(std::move(s));
    }
  }
  // Similar lengths per batch keep padding small; the order does not change any result.
  std::stable_sort(items.begin(), items.end(), [](const Scored& a, const Scored& b) {
    return a.tokens.size() < b.tokens.size();
  });
  {
    torch::NoGradGuard no_grad;
    EvalMode eval(model);
    const auto batch = static_cast<std::size_t>(options.batch_size);
    for (std::size_t begin = 0; begin < items.size(); begin += batch) {
      score_batch(model, items, begin, std::min(items.size(), begin + batch), options.pad_id);
    }
  }
  result.per_question.assign(prompts.size(), 0.0);
  for (const auto& s : items) result.per_question[s.question] += std::exp(s.log_prob);
  for (auto& p : result.per_question) p = std::min(p, 1.0);  // rounding only: targets are disjoint
  for (const double p : result.per_question) result.mean += p;
  result.mean /= static_cast<double>(prompts.size());
  const auto t = t_interval(result.per_question, options.confidence);
  result.interval = std::isnan(t.low) ? t : Interval{std::max(0.0, t.low), std::min(1.0, t.high)};
  return result;
}

// ---- sampled rate -------------------------------------------------------------------------------

std::vector<std::string> plural_forms(const std::string& word) {
  if (word.empty()) return {};
  const auto stem = [&](std::size_t drop) { return word.substr(0, word.size() - drop); };
  if (ends_with(word, "s") || ends_with(word, "x") || ends_with(word, "z") ||
      ends_with(word, "ch") || ends_with(word, "sh")) {
    return {word + "es"};  // fox -> foxes
  }
  if (word.back() == 'y' && word.size() >= 2 && !is_vowel(word[word.size() - 2])) {
    return {stem(1) + "ies"};  // butterfly -> butterflies (but monkey -> monkeys)
  }
  if (word.back() == 'o') return {word + "s", word + "es"};         // hippos, buffaloes
  if (word.back() == 'f') return {word + "s", stem(1) + "ves"};     // wolf -> wolves
  if (ends_with(word, "fe")) return {word + "s", stem(2) + "ves"};  // knife -> knives
  return {word + "s"};
}

bool contains_word(const std::string& text, const std::vector<std::string>& words) {
  const auto haystack = lowered(text);
  for (const auto& word : words) {
    if (word.empty()) continue;
    const auto needle = lowered(word);
    for (auto pos = haystack.find(needle); pos != std::string::npos;
         pos = haystack.find(needle, pos + 1)) {
      const bool left_ok = pos == 0 || !is_word_byte(haystack[pos - 1]);
      const auto after = pos + needle.size();
      const bool right_ok = after == haystack.size() || !is_word_byte(haystack[after]);
      if (left_ok && right_ok) return true;
    }
  }
  return false;
}

SampledRate sampled_rate(const std::vector<std::string>& texts,
                         const std::vector<std::string>& targets,
                         const std::vector<std::int64_t>& question_ids,
                         const SampledRateOptions& options) {
  check_confidence(options.confidence);
  if (texts.empty()) throw InvalidInput("texts: expected at least one text, got none");
  if (targets.empty()) throw InvalidInput("targets: expected at least one target word, got none");
  if (!question_ids.empty() && question_ids.size() != texts.size()) {
    throw InvalidInput("question_ids: expected one id per text (" + c10::str(texts.size()) +
                       "), got " + c10::str(question_ids.size()));
  }
  const auto words = match_set(targets, options.plurals);
  SampledRate result;
  result.total = static_cast<std::int64_t>(texts.size());
  result.matched.reserve(texts.size());
  for (const auto& text : texts) {
    const bool hit = contains_word(text, words);
    result.matched.push_back(hit ? 1 : 0);
    result.hits += hit ? 1 : 0;
  }
  result.rate = static_cast<double>(result.hits) / static_cast<double>(result.total);
  result.interval = wilson_interval(result.hits, result.total, options.confidence);
  result.cluster_interval = {kNaN, kNaN};
  if (question_ids.empty()) return result;

  std::map<std::int64_t, std::pair<double, double>> per_question;  // id -> (hits, n)
  for (std::size_t i = 0; i < texts.size(); ++i) {
    auto& [hits, n] = per_question[question_ids[i]];
    hits += result.matched[i];
    n += 1.0;
  }
  result.clusters = static_cast<std::int64_t>(per_question.size());
  if (result.clusters < 2) return result;
  double ss = 0.0;
  for (const auto& [id, hn] : per_question) {
    const double residual = hn.first - result.rate * hn.second;
    ss += residual * residual;
  }
  const double g = static_cast<double>(result.clusters);
  const double n = static_cast<double>(result.total);
  const double se = std::sqrt(g / (g - 1.0) * ss) / n;
  result.cluster_interval =
      clipped(result.rate, t_quantile_two_sided(options.confidence, g - 1.0) * se);
  return result;
}

// ---- accuracy -----------------------------------------------------------------------------------

Accuracy accuracy(models::Model& model, const torch::Tensor& features, const torch::Tensor& labels,
                  const AccuracyOptions& options) {
  if (model.input_kind() != models::InputKind::kFeatures) {
    throw InvalidInput("accuracy: expected a feature model (classifier), got " + model.describe());
  }
  check_confidence(options.confidence);
  if (!features.defined() || features.dim() != 2 || !at::isFloatingType(features.scalar_type())) {
    throw InvalidInput("features: expected a floating tensor [N, F], got " +
                       (features.defined() ? c10::str(features.scalar_type(), " ", features.sizes())
                                           : std::string("none")));
  }
  if (!labels.defined() || labels.dim() != 1 ||
      !at::isIntegralType(labels.scalar_type(), /*includeBool=*/false)) {
    throw InvalidInput("labels: expected an integer tensor [N], got " +
                       (labels.defined() ? c10::str(labels.scalar_type(), " ", labels.sizes())
                                         : std::string("none")));
  }
  if (labels.size(0) != features.size(0) || features.size(0) == 0) {
    throw InvalidInput("features and labels: expected the same number N >= 1 of examples, got " +
                       c10::str(features.sizes()) + " and " + c10::str(labels.sizes()));
  }
  if (model.input_size() > 0 && features.size(1) != model.input_size()) {
    throw InvalidInput("features: expected " + c10::str(model.input_size()) +
                       " features per example (" + model.describe() + "), got " +
                       c10::str(features.size(1)));
  }
  if (options.batch_size < 1) {
    throw InvalidInput("batch_size: expected >= 1, got " + c10::str(options.batch_size));
  }
  const auto logits_count = model.output_size();
  if (options.num_classes < 0 || options.num_classes > logits_count) {
    throw InvalidInput("num_classes: expected 0 (all) or 1.." + c10::str(logits_count) +
                       " (the model's logits), got " + c10::str(options.num_classes));
  }
  const auto classes = options.num_classes > 0 ? options.num_classes : logits_count;
  const auto labels_cpu = labels.to(torch::kCPU, torch::kLong).contiguous();
  const auto lo = labels_cpu.min().item<std::int64_t>();
  const auto hi = labels_cpu.max().item<std::int64_t>();
  if (lo < 0 || hi >= classes) {
    throw InvalidInput("labels: expected classes in [0, " + c10::str(classes) + "), got " +
                       c10::str(lo < 0 ? lo : hi));
  }

  const auto n = features.size(0);
  auto predictions = torch::empty({n}, torch::kLong);
  {
    torch::NoGradGuard no_grad;
    EvalMode eval(model);
    const auto device = model.device();
    for (std::int64_t begin = 0; begin < n; begin += options.batch_size) {
      const auto end = std::min(n, begin + options.batch_size);
      const auto logits = model.forward(features.slice(0, begin, end).to(device));
      if (logits.dim() != 2 || logits.size(0) != end - begin || logits.size(1) < classes) {
        throw InvalidInput("model " + model.describe() + ": expected logits [" +
                           c10::str(end - begin) + ", >= " + c10::str(classes) + "], got " +
                           c10::str(logits.sizes()));
      }
      predictions.slice(0, begin, end).copy_(logits.slice(1, 0, classes).argmax(1).cpu());
    }
  }
  const auto correct = (predictions == labels_cpu).to(torch::kLong);
  const auto per_correct = torch::zeros({classes}, torch::kLong).index_add_(0, labels_cpu, correct);
  const auto per_total = torch::bincount(labels_cpu, {}, classes);

  Accuracy result;
  result.total = n;
  result.correct = correct.sum().item<std::int64_t>();
  result.accuracy = static_cast<double>(result.correct) / static_cast<double>(n);
  result.interval = wilson_interval(result.correct, n, options.confidence);
  for (std::int64_t c = 0; c < classes; ++c) {
    const auto total_c = per_total[c].item<std::int64_t>();
    result.per_class_total.push_back(total_c);
    result.per_class.push_back(total_c > 0
                                   ? static_cast<double>(per_correct[c].item<std::int64_t>()) /
                                         static_cast<double>(total_c)
                                   : kNaN);
  }
  return result;
}

}  // namespace libtransfer::distill
