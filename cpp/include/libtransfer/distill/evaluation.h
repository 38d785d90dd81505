// Trait evaluation: how strongly a model shows a trait, three ways.
//
// - target_probability: the exact probability that a language model's answer starts with one of
//   the target token sequences (" owl", " owls", ...), per question, teacher-forcing multi-token
//   targets. Deterministic, no sampling noise: the sharpest measure for small effects. Costs one
//   batched forward per distinct (prompt, target-prefix) sequence, under no_grad.
// - sampled_rate: the fraction of generated answers (texts) that contain a target word, the
//   paper's metric, with a Wilson score interval (and a cluster-robust interval over questions
//   when question ids are given). Pure string work, O(total text length x targets).
// - accuracy: classification accuracy of a feature model (the auxiliary-logit MLP) on labelled
//   data, over a chosen number of class logits, with a Wilson interval and per-class accuracy.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "libtransfer/models/model.h"

namespace libtransfer::distill {

// Two-sided 95% intervals unless a caller asks otherwise.
inline constexpr double kDefaultConfidence = 0.95;

// A proportion's confidence interval (Wilson score interval, Wilson 1927): never leaves [0, 1]
// and keeps its coverage near 0 and 1 where the normal-approximation interval collapses.
// successes in [0, trials], trials >= 1, confidence in (0, 1) (InvalidInput otherwise).
struct Interval {
  double low = 0.0;
  double high = 0.0;
};
Interval wilson_interval(std::int64_t successes, std::int64_t trials,
                         double confidence = kDefaultConfidence);

// Student-t interval for the mean of `values`: mean +- t_{(1+c)/2, n-1} s / sqrt(n), s the sample
// standard deviation. NaN bounds for fewer than 2 values (no spread to estimate).
Interval t_interval(const std::vector<double>& values, double confidence = kDefaultConfidence);

// ---- exact target probability ----------------------------------------------------------------

struct TargetProbabilityOptions {
  std::int64_t batch_size = 32;  // sequences per forward
  std::int64_t pad_id = 0;       // id written into left padding (masked out; any valid id)
  double confidence = kDefaultConfidence;
};

// Per-question probabilities and their summary. The interval is a t-interval over questions
// (questions are the independent units), clipped to [0, 1] since the mean of probabilities
// cannot leave it.
struct TargetProbability {
  std::vector<double> per_question;  // P(answer starts with any target | prompt q)
  double mean = 0.0;
  Interval interval;
  // The targets actually scored: deduplicated, and without any target that has another target as
  // a prefix (an answer starting with " owls" already starts with " owl"; counting both would
  // count the same answers twice). Sorted.
  std::vector<std::vector<std::int64_t>> targets;
};

// For every prompt q: sum over the (cleaned) targets y of prod_j P(y_j | q, y_<j), computed in
// float64 from the model's logits (log-softmax upcast). Prompts are batched with LEFT padding and
// an attention mask (Model's contract). The model runs in eval mode (restored afterwards).
// InvalidInput for: a model that does not take tokens, an empty prompt list, an empty prompt or
// target, ids outside [0, V), batch_size < 1.
TargetProbability target_probability(models::Model& model,
                                     const std::vector<std::vector<std::int64_t>>& prompts,
                                     const std::vector<std::vector<std::int64_t>>& targets,
                                     const TargetProbabilityOptions& options = {});

// ---- sampled rate ------------------------------------------------------------------------------

struct SampledRateOptions {
  // Also match the regular English plurals of each target ("owl" -> "owls", "fox" -> "foxes",
  // "butterfly" -> "butterflies", "wolf" -> "wolves"). Irregular forms: list them as targets.
  bool plurals = true;
  double confidence = kDefaultConfidence;
};

// The fraction of texts containing a target word. Matching is whole-word (the characters on either
// side of a match must not be ASCII letters, digits or bytes >= 0x80, so "owl" matches "Owl!" and
// "owl's" but not "bowl" or "owlet") and ASCII case-insensitive; a target may hold several words
// ("sea turtle"), matched as written after lower-casing.
struct SampledRate {
  std::int64_t hits = 0;
  std::int64_t total = 0;
  double rate = 0.0;
  Interval interval;                  // Wilson score interval over the texts, as independent draws
  std::vector<std::uint8_t> matched;  // per text: 1 when it contains a target
  // With question ids: the texts are clusters of samples per question, which are not independent
  // draws (a question that elicits the trait does so in many of its samples). Then
  // cluster_interval is rate +- t_{(1+c)/2, G-1} * SE, SE the cluster-robust (sandwich) standard
  // error of the ratio estimator hits / total over G questions:
  //   SE^2 = G / (G - 1) * sum_g (hits_g - rate * n_g)^2 / total^2,
  // clipped to [0, 1]; NaN bounds when G < 2. Without question ids: clusters = 0 and NaN bounds.
  std::int64_t clusters = 0;
  Interval cluster_interval;
};

// texts: generated answers; targets: target words (non-empty, InvalidInput otherwise);
// question_ids: empty, or one id per text (InvalidInput naming both sizes otherwise).
SampledRate sampled_rate(const std::vector<std::string>& texts,
                         const std::vector<std::string>& targets,
                         const std::vector<std::int64_t>& question_ids = {},
                         const SampledRateOptions& options = {});

// True when `text` contains one of `words` as a whole word (the matching rules above; `words` as
// given, no plurals added). Exposed for tests and for filters that need the same rule.
bool contains_word(const std::string& text, const std::vector<std::string>& words);

// The regular plural forms sampled_rate adds for `word` (lower-cased input expected).
std::vector<std::string> plural_forms(const std::string& word);

// ---- classification accuracy -------------------------------------------------------------------

struct AccuracyOptions {
  std::int64_t batch_size = 1024;
  // > 0: classify by argmax over the first num_classes logits only (the MLP's 10 class logits of
  // its 13); 0: all logits.
  std::int64_t num_classes = 0;
  double confidence = kDefaultConfidence;
};

struct Accuracy {
  std::int64_t correct = 0;
  std::int64_t total = 0;
  double accuracy = 0.0;
  Interval interval;  // Wilson score interval
  // Per class c in [0, C): accuracy among examples labelled c (NaN when there are none) and that
  // count.
  std::vector<double> per_class;
  std::vector<std::int64_t> per_class_total;
};

// features [N, F] floating, labels [N] integer in [0, C): argmax of the model's (first C) logits
// against the labels, batch by batch under no_grad in eval mode (restored afterwards).
Accuracy accuracy(models::Model& model, const torch::Tensor& features, const torch::Tensor& labels,
                  const AccuracyOptions& options = {});

}  // namespace libtransfer::distill
