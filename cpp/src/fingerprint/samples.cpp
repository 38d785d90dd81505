// Samples-only fingerprints: counts, the G-test with a permutation p-value, smoothed log-ratios.
#include "libtransfer/fingerprint/samples.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "libtransfer/stats/distributions.h"
#include "libtransfer/stats/permutation.h"
#include "libtransfer/stats/validate.h"

namespace libtransfer::fingerprint {
namespace {

using stats::shape_string;

// A uniform integer in [0, n) from a 64-bit engine, by rejection (identical on every platform,
// unlike std::uniform_int_distribution).
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
  uint64_t x = rng();
  while (x < threshold) x = rng();
  return x % n;
}

// G = 2 sum over the seen columns of O log(O / E) for a 2-row table given row 1's column counts
// `first`, the column totals and both row totals.
double g_statistic(const std::vector<double>& first, const std::vector<double>& column_totals,
                   const std::vector<int64_t>& seen, double first_total, double second_total) {
  const double total = first_total + second_total;
  double g = 0.0;
  for (const int64_t j : seen) {
    const double c = column_totals[j];
    const double a = first[j];
    const double b = c - a;
    if (a > 0.0) g += a * std::log(a * total / (first_total * c));
    if (b > 0.0) g += b * std::log(b * total / (second_total * c));
  }
  return std::max(0.0, 2.0 * g);
}

void fill_asymptotic(GTestResult& out, int64_t seen) {
  out.df = std::max<int64_t>(seen - 1, 0);
  if (out.df == 0) {
    out.statistic = 0.0;
    out.p_value = 1.0;
    out.log_p = 0.0;
    return;
  }
  out.log_p = stats::chi2_logsf(out.statistic, static_cast<double>(out.df));
  out.p_value = std::exp(out.log_p);
}

// Counts [K] as float64 on the CPU, validated: 1-D, finite, non-negative.
torch::Tensor checked_counts(const torch::Tensor& counts, const char* name) {
  const torch::Tensor c = stats::as_double(counts, name, 1).cpu();
  TORCH_CHECK_VALUE(c.numel() >= 1, name, " must hold at least one category");
  TORCH_CHECK_VALUE(c.min().item<double>() >= 0.0, name, " must be non-negative, got ",
                    c.min().item<double>());
  return c;
}

// Teacher and reference counts [K], validated together, with their positive totals.
struct CountPair {
  torch::Tensor teacher, reference;
  double teacher_total = 0.0, reference_total = 0.0;
};

CountPair checked_count_pair(const torch::Tensor& teacher_counts,
                             const torch::Tensor& reference_counts) {
  CountPair pair{checked_counts(teacher_counts, "teacher_counts"),
                 checked_counts(reference_counts, "reference_counts")};
  TORCH_CHECK_VALUE(pair.teacher.sizes() == pair.reference.sizes(),
                    "teacher_counts and reference_counts must have the same shape, got ",
                    shape_string(pair.teacher), " and ", shape_string(pair.reference));
  pair.teacher_total = pair.teacher.sum().item<double>();
  pair.reference_total = pair.reference.sum().item<double>();
  TORCH_CHECK_VALUE(pair.teacher_total > 0.0 && pair.reference_total > 0.0,
                    "teacher_counts and reference_counts must each have a positive total, got ",
                    pair.teacher_total, " and ", pair.reference_total);
  return pair;
}

}  // namespace

SampleCounts::SampleCounts(int64_t num_categories) : num_categories_(num_categories) {
  TORCH_CHECK_VALUE(num_categories >= 1, "the number of categories must be >= 1, got ",
                    num_categories);
}

SampleCounts SampleCounts::from_token_ids(const std::vector<std::vector<int64_t>>& samples,
                                          int64_t vocab_size) {
  SampleCounts out(vocab_size);
  for (std::size_t s = 0; s < samples.size(); ++s) {
    for (const int64_t id : samples[s]) {
      TORCH_CHECK_VALUE(id >= 0 && id < vocab_size,
                        "token ids must lie in [0, vocab_size = ", vocab_size, "), got ", id,
                        " in sample ", s);
    }
    out.add_sample(samples[s]);
  }
  return out;
}

void SampleCounts::add_sample(const std::vector<int64_t>& categories) {
  std::vector<int64_t> sorted = categories;
  std::sort(sorted.begin(), sorted.end());
  for (std::size_t i = 0; i < sorted.size();) {
    std::size_t end = i;
    while (end < sorted.size() && sorted[end] == sorted[i]) ++end;
    TORCH_CHECK_VALUE(sorted[i] >= 0 && sorted[i] < num_categories_,
                      "category ids must lie in [0, ", num_categories_, "), got ", sorted[i]);
    categories_.push_back(sorted[i]);
    counts_.push_back(static_cast<int64_t>(end - i));
    i = end;
  }
  offsets_.push_back(static_cast<int64_t>(categories_.size()));
}

int64_t SampleCounts::total() const {
  return std::accumulate(counts_.begin(), counts_.end(), int64_t{0});
}

torch::Tensor SampleCounts::totals() const {
  auto out = torch::zeros({num_categories_}, torch::kLong);
  int64_t* v = out.data_ptr<int64_t>();
  for (std::size_t i = 0; i < categories_.size(); ++i) v[categories_[i]] += counts_[i];
  return out;
}

torch::Tensor count_tokens(const std::vector<std::vector<int64_t>>& samples, int64_t vocab_size) {
  TORCH_CHECK_VALUE(!samples.empty(), "samples is empty: give at least one sample");
  TORCH_CHECK_VALUE(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  return SampleCounts::from_token_ids(samples, vocab_size).totals();
}

std::vector<std::string> number_units(const std::string& text, bool keep_leading_space) {
  std::vector<std::string> out;
  const auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  for (std::size_t i = 0; i < text.size();) {
    if (!is_digit(text[i])) {
      ++i;
      continue;
    }
    std::size_t end = i;
    while (end < text.size() && is_digit(text[end])) ++end;
    const bool spaced = keep_leading_space && i > 0 && text[i - 1] == ' ';
    out.push_back((spaced ? " " : "") + text.substr(i, end - i));
    i = end;
  }
  return out;
}

std::map<std::string, int64_t> count_number_units(const std::vector<std::string>& texts,
                                                  bool keep_leading_space) {
  std::map<std::string, int64_t> out;
  for (const auto& text : texts) {
    for (auto& unit : number_units(text, keep_leading_space)) ++out[unit];
  }
  return out;
}

std::pair<SampleCounts, SampleCounts> number_unit_samples(
    const std::vector<std::string>& teacher_texts, const std::vector<std::string>& reference_texts,
    bool keep_leading_space, std::vector<std::string>* units) {
  std::vector<std::vector<std::string>> t_units;
  std::vector<std::vector<std::string>> r_units;
  std::map<std::string, int64_t> index;
  for (const auto& text : teacher_texts) t_units.push_back(number_units(text, keep_leading_space));
  for (const auto& text : reference_texts) {
    r_units.push_back(number_units(text, keep_leading_space));
  }
  for (const auto* group : {&t_units, &r_units}) {
    for (const auto& sample : *group) {
      for (const auto& unit : sample) index.emplace(unit, 0);
    }
  }
  TORCH_CHECK_VALUE(!index.empty(), "the texts contain no number units (ASCII digit runs)");
  int64_t next = 0;
  for (auto& [unit, id] : index) id = next++;
  if (units != nullptr) {
    units->clear();
    for (const auto& [unit, id] : index) units->push_back(unit);
  }
  auto build = [&](const std::vector<std::vector<std::string>>& group) {
    SampleCounts out(next);
    for (const auto& sample : group) {
      std::vector<int64_t> ids;
      for (const auto& unit : sample) ids.push_back(index.at(unit));
      out.add_sample(ids);
    }
    return out;
  };
  return {build(t_units), build(r_units)};
}

GTestResult g_test(const torch::Tensor& teacher_counts, const torch::Tensor& reference_counts) {
  const CountPair pair = checked_count_pair(teacher_counts, reference_counts);
  const torch::Tensor& t = pair.teacher;
  const torch::Tensor& r = pair.reference;
  const double nt = pair.teacher_total;
  const double nr = pair.reference_total;
  const int64_t K = t.numel();
  std::vector<double> first(t.data_ptr<double>(), t.data_ptr<double>() + K);
  std::vector<double> columns(static_cast<std::size_t>(K));
  std::vector<int64_t> seen;
  for (int64_t j = 0; j < K; ++j) {
    columns[j] = first[j] + r.data_ptr<double>()[j];
    if (columns[j] > 0.0) seen.push_back(j);
  }
  GTestResult out;
  out.statistic = g_statistic(first, columns, seen, nt, nr);
  fill_asymptotic(out, static_cast<int64_t>(seen.size()));
  out.permutation_p_value = std::numeric_limits<double>::quiet_NaN();
  return out;
}

GTestResult g_test(const SampleCounts& teacher, const SampleCounts& reference, int64_t permutations,
                   uint64_t seed) {
  TORCH_CHECK_VALUE(teacher.num_categories() == reference.num_categories(),
                    "teacher and reference counts must have the same number of categories, got ",
                    teacher.num_categories(), " and ", reference.num_categories());
  TORCH_CHECK_VALUE(teacher.num_samples() >= 1 && reference.num_samples() >= 1,
                    "teacher and reference need at least one sample each, got ",
                    teacher.num_samples(), " and ", reference.num_samples());
  TORCH_CHECK_VALUE(teacher.total() > 0 && reference.total() > 0,
                    "teacher and reference samples must each contain at least one token, got ",
                    teacher.total(), " and ", reference.total());
  TORCH_CHECK_VALUE(permutations >= 1, "permutations must be >= 1, got ", permutations);

  // Pool the samples: 0 .. nT-1 teacher, then reference. The smaller group is "row 1" of the
  // table (G is symmetric in the rows), so a permutation sums the fewest samples.
  const int64_t K = teacher.num_categories();
  struct Sample {
    const SampleCounts* from;
    int64_t index;
    int64_t total;
  };
  std::vector<Sample> pool;
  for (const SampleCounts* group : {&teacher, &reference}) {
    for (int64_t s = 0; s < group->num_samples(); ++s) {
      int64_t total = 0;
      for (int64_t e = group->offsets()[s]; e < group->offsets()[s + 1]; ++e) {
        total += group->counts()[e];
      }
      pool.push_back(Sample{group, s, total});
    }
  }
  const bool teacher_first = teacher.num_samples() <= reference.num_samples();
  const int64_t chosen_count = teacher_first ? teacher.num_samples() : reference.num_samples();
  const auto grand_total = static_cast<double>(teacher.total() + reference.total());

  std::vector<double> columns(static_cast<std::size_t>(K), 0.0);
  for (const Sample& s : pool) {
    for (int64_t e = s.from->offsets()[s.index]; e < s.from->offsets()[s.index + 1]; ++e) {
      columns[s.from->categories()[e]] += static_cast<double>(s.from->counts()[e]);
    }
  }
  std::vector<int64_t> seen;
  for (int64_t j = 0; j < K; ++j) {
    if (columns[j] > 0.0) seen.push_back(j);
  }
  std::vector<double> first(static_cast<std::size_t>(K), 0.0);
  // G of the table whose row 1 is the pool members at positions chosen[0 .. chosen_count).
  auto g_of = [&](const std::vector<int64_t>& order) {
    for (const int64_t j : seen) first[j] = 0.0;
    double first_total = 0.0;
    for (int64_t i = 0; i < chosen_count; ++i) {
      const Sample& s = pool[order[i]];
      for (int64_t e = s.from->offsets()[s.index]; e < s.from->offsets()[s.index + 1]; ++e) {
        first[s.from->categories()[e]] += static_cast<double>(s.from->counts()[e]);
      }
      first_total += static_cast<double>(s.total);
    }
    return g_statistic(first, columns, seen, first_total, grand_total - first_total);
  };

  std::vector<int64_t> order(pool.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  if (!teacher_first)
    std::rotate(order.begin(), order.begin() + teacher.num_samples(), order.end());
  GTestResult out;
  out.statistic = g_of(order);
  fill_asymptotic(out, static_cast<int64_t>(seen.size()));

  const double threshold = out.statistic * (1.0 - stats::kTieRelativeTolerance);
  std::mt19937_64 rng(seed);
  int64_t count = 0;
  const auto n = static_cast<uint64_t>(pool.size());
  for (int64_t b = 0; b < permutations; ++b) {
    // Partial Fisher-Yates: the first chosen_count positions become a uniform random subset.
    for (int64_t i = 0; i < chosen_count; ++i) {
      const auto j = static_cast<int64_t>(i + uniform_below(rng, n - static_cast<uint64_t>(i)));
      std::swap(order[i], order[j]);
    }
    if (g_of(order) >= threshold) ++count;
  }
  out.permutations = permutations;
  out.permutation_p_value = static_cast<double>(1 + count) / static_cast<double>(permutations + 1);
  return out;
}

torch::Tensor smoothed_log_ratio(const torch::Tensor& teacher_counts,
                                 const torch::Tensor& reference_counts, double alpha) {
  TORCH_CHECK_VALUE(alpha >= 0.0 && std::isfinite(alpha), "alpha must be finite and >= 0, got ",
                    alpha);
  const CountPair pair = checked_count_pair(teacher_counts, reference_counts);
  const torch::Tensor& t = pair.teacher;
  const torch::Tensor& r = pair.reference;
  const double nt = pair.teacher_total;
  const double nr = pair.reference_total;
  if (alpha == 0.0) {
    TORCH_CHECK_VALUE(t.min().item<double>() > 0.0 && r.min().item<double>() > 0.0,
                      "alpha = 0 needs every count to be positive (log of 0); use alpha > 0");
  }
  const double K = static_cast<double>(t.numel());
  return ((t + alpha) / (nt + alpha * K)).log() - ((r + alpha) / (nr + alpha * K)).log();
}

}  // namespace libtransfer::fingerprint
