// Top-k log-prob accumulation with tail mass (see topk.h).
#include "libtransfer/fingerprint/topk.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "libtransfer/stats/validate.h"

namespace libtransfer::fingerprint {
namespace {

using stats::shape_string;

// One model's top-k list at one position, sorted by id, with its bound for unlisted tokens.
struct Row {
  std::vector<std::pair<int64_t, double>> entries;  // (id, logprob) sorted by id
  double tail = 0.0;                                // 1 - sum exp(logprobs), clipped at 0
  double bound = 0.0;                               // min(k-th logprob, log max(tail, floor))
};

torch::Tensor ids_as_long(const torch::Tensor& ids, const char* name) {
  TORCH_CHECK_VALUE(ids.defined(), name, " must be a tensor");
  TORCH_CHECK_TYPE(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false), name,
                   " must be an integer tensor (int64), got dtype ", ids.scalar_type());
  return ids.to(torch::kCPU, torch::kLong).contiguous();
}

torch::Tensor logprobs_as_double(const torch::Tensor& lp, const char* name) {
  TORCH_CHECK_VALUE(lp.defined(), name, " must be a tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(lp.scalar_type()), name,
                   " must be a floating tensor, got dtype ", lp.scalar_type());
  return lp.to(torch::kCPU, torch::kDouble).contiguous();
}

// Reads and validates row r of one model's [N, k] ids and logprobs.
void read_row(const int64_t* ids, const double* lps, int64_t r, int64_t k, int64_t vocab_size,
              const char* who, Row& row) {
  row.entries.clear();
  double mass = 0.0;
  double smallest = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t id = ids[r * k + j];
    const double lp = lps[r * k + j];
    TORCH_CHECK_VALUE(id >= 0 && id < vocab_size, who, "_ids must lie in [0, ", vocab_size,
                      "), got ", id, " in row ", r);
    TORCH_CHECK_VALUE(std::isfinite(lp) && lp <= 0.0, who,
                      "_logprobs must be finite and <= 0, got ", lp, " in row ", r);
    row.entries.emplace_back(id, lp);
    mass += std::exp(lp);
    smallest = j == 0 ? lp : std::min(smallest, lp);
  }
  std::sort(row.entries.begin(), row.entries.end());
  for (int64_t j = 1; j < k; ++j) {
    TORCH_CHECK_VALUE(row.entries[j].first != row.entries[j - 1].first, who,
                      "_ids must be distinct within a row, got ", row.entries[j].first,
                      " twice in row ", r);
  }
  row.tail = std::max(0.0, 1.0 - mass);
  row.bound = std::min(smallest, std::log(std::max(row.tail, kMinTailMass)));
}

}  // namespace

TopKAccumulator::TopKAccumulator(int64_t vocab_size, int64_t k) : vocab_size_(vocab_size), k_(k) {
  TORCH_CHECK_VALUE(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab_size, "k must lie in [1, vocab_size = ", vocab_size,
                    "], got ", k);
  const auto v = static_cast<std::size_t>(vocab_size);
  sum_delta_.assign(v, 0.0);
  sum_delta_exact_.assign(v, 0.0);
  counts_exact_.assign(v, 0);
  counts_bounded_.assign(v, 0);
}

void TopKAccumulator::update(const torch::Tensor& teacher_ids,
                             const torch::Tensor& teacher_logprobs,
                             const torch::Tensor& reference_ids,
                             const torch::Tensor& reference_logprobs,
                             const c10::optional<torch::Tensor>& mask,
                             const c10::optional<torch::Tensor>& sequence_ids) {
  const torch::Tensor t_ids = ids_as_long(teacher_ids, "teacher_ids");
  const torch::Tensor r_ids = ids_as_long(reference_ids, "reference_ids");
  const torch::Tensor t_lp = logprobs_as_double(teacher_logprobs, "teacher_logprobs");
  const torch::Tensor r_lp = logprobs_as_double(reference_logprobs, "reference_logprobs");
  TORCH_CHECK_VALUE(t_ids.dim() == 2 || t_ids.dim() == 3,
                    "teacher_ids must have shape [N, k] or [B, T, k], got ", shape_string(t_ids));
  TORCH_CHECK_VALUE(t_ids.size(-1) == k_, "the last dimension of teacher_ids must be k = ", k_,
                    ", got shape ", shape_string(t_ids));
  for (const auto& [name, t] :
       {std::pair<const char*, const torch::Tensor&>{"teacher_logprobs", t_lp},
        {"reference_ids", r_ids},
        {"reference_logprobs", r_lp}}) {
    TORCH_CHECK_VALUE(t.sizes() == t_ids.sizes(), name, " must have the shape of teacher_ids ",
                      shape_string(t_ids), ", got ", shape_string(t));
  }
  const auto lead = t_ids.sizes().slice(0, t_ids.dim() - 1);
  const int64_t rows = t_ids.numel() / k_;

  std::vector<bool> scored(static_cast<std::size_t>(rows), true);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK_VALUE(mask->sizes() == lead, "mask must have shape ", lead, ", got ",
                      shape_string(*mask));
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool ||
                         at::isIntegralType(mask->scalar_type(), /*includeBool=*/false),
                     "mask must be bool or integer 0/1, got dtype ", mask->scalar_type());
    const torch::Tensor m = mask->to(torch::kCPU, torch::kLong).contiguous().reshape({-1});
    TORCH_CHECK_VALUE(((m == 0) | (m == 1)).all().item<bool>(), "mask values must be 0 or 1");
    const int64_t* mv = m.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) scored[r] = mv[r] != 0;
  }
  // Sequence id of each row.
  const int64_t per_sequence = t_ids.dim() == 3 ? t_ids.size(1) : 1;
  const int64_t n_seq = t_ids.dim() == 3 ? t_ids.size(0) : rows;
  std::vector<int64_t> seq(static_cast<std::size_t>(n_seq));
  if (sequence_ids.has_value() && sequence_ids->defined()) {
    TORCH_CHECK_TYPE(sequence_ids->scalar_type() == at::kLong, "sequence_ids must be int64, got ",
                     sequence_ids->scalar_type());
    TORCH_CHECK_VALUE(sequence_ids->dim() == 1 && sequence_ids->size(0) == n_seq,
                      "sequence_ids must have shape [", n_seq, "], got ",
                      shape_string(*sequence_ids));
    const torch::Tensor s = sequence_ids->cpu().contiguous();
    std::copy(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + n_seq, seq.begin());
  } else {
    for (int64_t i = 0; i < n_seq; ++i) seq[i] = next_sequence_ + i;
  }

  // Pass 1: validate every scored row (nothing is accumulated if one is bad).
  std::vector<Row> teacher(static_cast<std::size_t>(rows));
  std::vector<Row> reference(static_cast<std::size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    if (!scored[r]) continue;
    read_row(t_ids.data_ptr<int64_t>(), t_lp.data_ptr<double>(), r, k_, vocab_size_, "teacher",
             teacher[r]);
    read_row(r_ids.data_ptr<int64_t>(), r_lp.data_ptr<double>(), r, k_, vocab_size_, "reference",
             reference[r]);
  }
  // Pass 2: accumulate, walking both id-sorted lists at once.
  for (int64_t r = 0; r < rows; ++r) {
    if (!scored[r]) continue;
    const Row& T = teacher[r];
    const Row& R = reference[r];
    std::size_t i = 0;
    std::size_t j = 0;
    while (i < T.entries.size() || j < R.entries.size()) {
      const int64_t ti = i < T.entries.size() ? T.entries[i].first : vocab_size_;
      const int64_t rj = j < R.entries.size() ? R.entries[j].first : vocab_size_;
      if (ti == rj) {
        const double delta = T.entries[i].second - R.entries[j].second;
        sum_delta_[ti] += delta;
        sum_delta_exact_[ti] += delta;
        ++counts_exact_[ti];
        ++i;
        ++j;
      } else if (ti < rj) {  // teacher only: reference log-prob <= R.bound
        sum_delta_[ti] += T.entries[i].second - R.bound;
        ++counts_bounded_[ti];
        ++i;
      } else {  // reference only: teacher log-prob <= T.bound
        sum_delta_[rj] += T.bound - R.entries[j].second;
        ++counts_bounded_[rj];
        ++j;
      }
    }
    sum_tail_teacher_ += T.tail;
    sum_tail_reference_ += R.tail;
    ++positions_;
    sequence_set_.insert(seq[r / per_sequence]);
  }
  next_sequence_ += n_seq;
}

void TopKAccumulator::merge(const TopKAccumulator& other) {
  TORCH_CHECK_VALUE(other.vocab_size_ == vocab_size_,
                    "cannot merge top-k accumulators of different vocabulary sizes: ", vocab_size_,
                    " and ", other.vocab_size_);
  TORCH_CHECK_VALUE(other.k_ == k_, "cannot merge top-k accumulators of different k: ", k_, " and ",
                    other.k_);
  for (std::size_t v = 0; v < sum_delta_.size(); ++v) {
    sum_delta_[v] += other.sum_delta_[v];
    sum_delta_exact_[v] += other.sum_delta_exact_[v];
    counts_exact_[v] += other.counts_exact_[v];
    counts_bounded_[v] += other.counts_bounded_[v];
  }
  positions_ += other.positions_;
  sum_tail_teacher_ += other.sum_tail_teacher_;
  sum_tail_reference_ += other.sum_tail_reference_;
  sequence_set_.insert(other.sequence_set_.begin(), other.sequence_set_.end());
  next_sequence_ = std::max(next_sequence_, other.next_sequence_);
}

TopKFingerprint TopKAccumulator::finalize() const {
  TORCH_CHECK_VALUE(positions_ > 0,
                    "no scored positions: update the top-k accumulator with at "
                    "least one unmasked row before finalize()");
  const int64_t V = vocab_size_;
  TopKFingerprint out;
  out.vocab_size = V;
  out.k = k_;
  out.positions = positions_;
  out.sequences = sequences();
  out.counts_exact =
      torch::from_blob(const_cast<int64_t*>(counts_exact_.data()), {V}, torch::kLong).clone();
  out.counts_bounded =
      torch::from_blob(const_cast<int64_t*>(counts_bounded_.data()), {V}, torch::kLong).clone();
  const auto sum = torch::from_blob(const_cast<double*>(sum_delta_.data()), {V}, torch::kDouble);
  const auto sum_exact =
      torch::from_blob(const_cast<double*>(sum_delta_exact_.data()), {V}, torch::kDouble);
  const auto nan = std::numeric_limits<double>::quiet_NaN();
  const auto total = (out.counts_exact + out.counts_bounded).to(torch::kDouble);
  const auto exact = out.counts_exact.to(torch::kDouble);
  out.mean_log_ratio = (sum / total).masked_fill(total == 0, nan);
  out.mean_log_ratio_exact = (sum_exact / exact).masked_fill(exact == 0, nan);
  out.mean_tail_teacher = sum_tail_teacher_ / static_cast<double>(positions_);
  out.mean_tail_reference = sum_tail_reference_ / static_cast<double>(positions_);
  return out;
}

}  // namespace libtransfer::fingerprint
