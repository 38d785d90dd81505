// Accumulator: validation, dispatch to the kernels, merge, finalize, save and load.
#include "libtransfer/fingerprint/accumulator.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>
#include <string_view>

#include "accumulator_kernel.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/fingerprint_file.h"
#include "libtransfer/io/safetensors.h"

namespace libtransfer::fingerprint {

// save() writes what the torch-free reader (io/fingerprint_file.h) reads.
static_assert(std::string_view(kAccumulatorFormat) == io::kFingerprintFileFormat);
static_assert(std::string_view(kAccumulatorFormatVersion) == io::kFingerprintFileFormatVersion);

namespace {

std::string format_double(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.17g", value);
  return buffer;
}

void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature: expected a finite value > 0, got ", temperature);
}

// Sorted copy of the subset; ValueError for ids out of [0, V) or duplicated.
std::vector<int64_t> checked_subset(std::vector<int64_t> subset, int64_t vocab_size) {
  for (const int64_t id : subset) {
    TORCH_CHECK_VALUE(id >= 0 && id < vocab_size, "subset: token id ", id,
                      " is out of range for a vocabulary of V=", vocab_size);
  }
  std::sort(subset.begin(), subset.end());
  const auto duplicate = std::adjacent_find(subset.begin(), subset.end());
  TORCH_CHECK_VALUE(duplicate == subset.end(), "subset: token id ", *duplicate,
                    " appears more than once");
  return subset;
}

bool is_logit_dtype(at::ScalarType type) {
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf || type == at::kDouble;
}

// The mask as [rows] bool on the CPU; ValueError for a wrong shape or non-0/1 integers.
torch::Tensor checked_mask(const torch::Tensor& mask, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(mask.sizes() == expected, "mask: expected shape ", expected,
                    " (the logits' shape without V), got ", mask.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || !at::isFloatingType(mask.scalar_type()),
                   "mask: expected a bool or 0/1 integer tensor, got ", mask.scalar_type());
  auto cpu = mask.to(torch::kCPU).reshape({-1});
  if (cpu.scalar_type() != at::kBool) {
    TORCH_CHECK_VALUE(cpu.numel() == 0 || torch::logical_or(cpu == 0, cpu == 1).all().item<bool>(),
                      "mask: integer masks must hold only 0 and 1");
    cpu = cpu.to(at::kBool);
  }
  return cpu.contiguous();
}

torch::Tensor tensor_of(const std::vector<double>& values, std::vector<int64_t> shape) {
  return torch::tensor(values, torch::kDouble).reshape(shape);
}
torch::Tensor tensor_of(const std::vector<int64_t>& values, std::vector<int64_t> shape) {
  return torch::tensor(values, torch::kLong).reshape(shape);
}

// Mean and standard error (sample std / sqrt(n)) from a sum and a sum of squares; NaN SE if n < 2.
std::pair<double, double> mean_and_stderr(double sum, double sum_sq, int64_t n) {
  const double count = static_cast<double>(n);
  const double mean = sum / count;
  if (n < 2) return {mean, std::numeric_limits<double>::quiet_NaN()};
  const double variance = std::max(0.0, (sum_sq - count * mean * mean) / (count - 1.0));
  return {mean, std::sqrt(variance / count)};
}

const std::set<std::string>& reserved_metadata_keys() {
  static const std::set<std::string> keys = {"format",      "format_version", "vocab_size",
                                             "temperature", "positions",      "options"};
  return keys;
}

}  // namespace

Accumulator::Accumulator(int64_t vocab_size, AccumulatorOptions options)
    : vocab_size_(vocab_size), options_(std::move(options)) {
  TORCH_CHECK_VALUE(vocab_size >= 1, "vocab_size: expected at least 1, got ", vocab_size);
  check_temperature(options_.temperature);
  options_.subset = checked_subset(std::move(options_.subset), vocab_size);
  sum_delta_.assign(static_cast<size_t>(vocab_size), 0.0);
  sum_delta_sq_.assign(static_cast<size_t>(vocab_size), 0.0);
  sum_grad_.assign(static_cast<size_t>(vocab_size), 0.0);
  sum_centered_.assign(options_.subset.size(), 0.0);
}

void Accumulator::update(const torch::Tensor& teacher, const torch::Tensor& reference,
                         const c10::optional<torch::Tensor>& mask,
                         const c10::optional<torch::Tensor>& sequence_ids) {
  TORCH_CHECK_VALUE(teacher.defined() && reference.defined(),
                    "update: teacher and reference logits are required");
  TORCH_CHECK_VALUE(teacher.dim() == 2 || teacher.dim() == 3,
                    "teacher logits: expected a [B, T, V] or [N, V] tensor, got shape ",
                    teacher.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == reference.sizes(),
                    "teacher and reference logits must have the same shape, got teacher ",
                    teacher.sizes(), " and reference ", reference.sizes());
  TORCH_CHECK_TYPE(is_logit_dtype(teacher.scalar_type()),
                   "teacher logits: expected float32, bfloat16, float16 or float64, got ",
                   teacher.scalar_type());
  TORCH_CHECK_TYPE(teacher.scalar_type() == reference.scalar_type(),
                   "teacher and reference logits must have the same dtype, got teacher ",
                   teacher.scalar_type(), " and reference ", reference.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == reference.device(),
                    "teacher and reference logits must be on the same device, got teacher ",
                    teacher.device(), " and reference ", reference.device());
  TORCH_CHECK_VALUE(teacher.size(-1) == vocab_size_,
                    "vocabulary size mismatch: accumulator has V=", vocab_size_,
                    ", teacher logits have ", teacher.size(-1), " (shape ", teacher.sizes(), ")");
  const bool batched = teacher.dim() == 3;
  const auto row_shape = teacher.sizes().slice(0, teacher.dim() - 1);
  const int64_t rows =
      std::accumulate(row_shape.begin(), row_shape.end(), int64_t{1}, std::multiplies<int64_t>());
  const int64_t sequences = teacher.size(0);

  detail::RowsInput input;
  input.teacher = teacher.detach().reshape({rows, vocab_size_});
  input.reference = reference.detach().reshape({rows, vocab_size_});
  if (input.teacher.stride(1) != 1) input.teacher = input.teacher.contiguous();
  if (input.reference.stride(1) != 1) input.reference = input.reference.contiguous();
  if (mask.has_value() && mask->defined()) input.mask = checked_mask(*mask, row_shape);

  int64_t next_id = next_sequence_id_;
  torch::Tensor ids;
  if (sequence_ids.has_value() && sequence_ids->defined()) {
    const auto& given = *sequence_ids;
    TORCH_CHECK_TYPE(at::isIntegralType(given.scalar_type(), /*includeBool=*/false),
                     "sequence_ids: expected an int64 tensor, got ", given.scalar_type());
    TORCH_CHECK_VALUE(given.dim() == 1 && given.size(0) == sequences,
                      "sequence_ids: expected shape [", sequences, "] (one id per ",
                      batched ? "batch row" : "row", " of the logits), got ", given.sizes());
    ids = given.to(torch::kCPU, torch::kLong).contiguous();
    if (ids.numel() > 0) next_id = std::max(next_id, ids.max().item<int64_t>() + 1);
  } else {
    ids = torch::arange(next_id, next_id + sequences, torch::kLong);
    next_id += sequences;
  }
  input.sequence_ids = batched ? ids.repeat_interleave(teacher.size(1)).contiguous() : ids;
  input.positions_per_batch = batched ? teacher.size(1) : 0;
  input.temperature = options_.temperature;
  input.subset = &options_.subset;
  input.skip_nonfinite = options_.skip_nonfinite;
  input.per_sequence_sums = options_.per_sequence;

  detail::PartialSums sums(vocab_size_, 0, 0);
  if (options_.backend == Backend::kTorch || !teacher.device().is_cpu()) {
    sums = detail::accumulate_torch(input);
  } else {
    sums = detail::accumulate_cpu(input, options_.backend == Backend::kScalar);
  }

  // Commit (nothing above changed the state).
  for (int64_t v = 0; v < vocab_size_; ++v) {
    sum_delta_[v] += sums.sum_delta[v];
    sum_delta_sq_[v] += sums.sum_delta_sq[v];
    sum_grad_[v] += sums.sum_grad[v];
  }
  for (size_t i = 0; i < sum_centered_.size(); ++i) sum_centered_[i] += sums.sum_centered[i];
  sum_kl_teacher_reference_ += sums.kl_teacher_reference;
  sum_kl_reference_teacher_ += sums.kl_reference_teacher;
  sum_mass_shift_ += sums.mass_shift;
  sum_mass_shift_sq_ += sums.mass_shift_sq;
  positions_ += sums.positions;
  skipped_nonfinite_ += sums.skipped_nonfinite;
  next_sequence_id_ = next_id;
  for (const auto& run : sums.runs) {
    add_sequence(run.id, run.count, run.sum.empty() ? nullptr : run.sum.data());
  }
}

void Accumulator::add_sequence(int64_t id, int64_t count, const double* sums) {
  const size_t width = options_.subset.size();
  auto found = sequence_slot_.find(id);
  if (found == sequence_slot_.end()) {
    found = sequence_slot_.emplace(id, sequence_ids_.size()).first;
    sequence_ids_.push_back(id);
    sequence_counts_.push_back(0);
    if (options_.per_sequence) sequence_sums_.resize(sequence_sums_.size() + width, 0.0);
  }
  const size_t slot = found->second;
  sequence_counts_[slot] += count;
  if (options_.per_sequence && sums != nullptr) {
    double* target = sequence_sums_.data() + slot * width;
    for (size_t i = 0; i < width; ++i) target[i] += sums[i];
  }
}

void Accumulator::merge(const Accumulator& other_in) {
  c10::optional<Accumulator> self_copy;  // a.merge(a) doubles a
  if (&other_in == this) self_copy.emplace(other_in);
  const Accumulator& other = self_copy.has_value() ? *self_copy : other_in;
  TORCH_CHECK_VALUE(other.vocab_size_ == vocab_size_,
                    "merge: vocabulary sizes differ: this accumulator has V=", vocab_size_,
                    ", the other has V=", other.vocab_size_);
  TORCH_CHECK_VALUE(other.options_.temperature == options_.temperature,
                    "merge: temperatures differ: this accumulator has ",
                    format_double(options_.temperature), ", the other has ",
                    format_double(other.options_.temperature));
  TORCH_CHECK_VALUE(
      other.options_.subset == options_.subset,
      "merge: token subsets differ: this accumulator has ", options_.subset.size(), " ids ",
      c10::IntArrayRef(options_.subset).slice(0, std::min<size_t>(8, options_.subset.size())),
      "..., the other has ", other.options_.subset.size(), " ids ",
      c10::IntArrayRef(other.options_.subset)
          .slice(0, std::min<size_t>(8, other.options_.subset.size())),
      "...");
  TORCH_CHECK_VALUE(other.options_.per_sequence == options_.per_sequence,
                    "merge: per_sequence differs: this accumulator has ", options_.per_sequence,
                    ", the other has ", other.options_.per_sequence);
  for (int64_t v = 0; v < vocab_size_; ++v) {
    sum_delta_[v] += other.sum_delta_[v];
    sum_delta_sq_[v] += other.sum_delta_sq_[v];
    sum_grad_[v] += other.sum_grad_[v];
  }
  for (size_t i = 0; i < sum_centered_.size(); ++i) sum_centered_[i] += other.sum_centered_[i];
  sum_kl_teacher_reference_ += other.sum_kl_teacher_reference_;
  sum_kl_reference_teacher_ += other.sum_kl_reference_teacher_;
  sum_mass_shift_ += other.sum_mass_shift_;
  sum_mass_shift_sq_ += other.sum_mass_shift_sq_;
  positions_ += other.positions_;
  skipped_nonfinite_ += other.skipped_nonfinite_;
  next_sequence_id_ = std::max(next_sequence_id_, other.next_sequence_id_);
  const size_t width = options_.subset.size();
  for (size_t i = 0; i < other.sequence_ids_.size(); ++i) {
    add_sequence(other.sequence_ids_[i], other.sequence_counts_[i],
                 options_.per_sequence ? other.sequence_sums_.data() + i * width : nullptr);
  }
}

Fingerprint Accumulator::finalize() const {
  TORCH_CHECK_VALUE(positions_ > 0,
                    "finalize: no scored positions (every update was empty, masked out or "
                    "skipped as non-finite)");
  const int64_t n = positions_;
  const double count = static_cast<double>(n);
  const int64_t width = static_cast<int64_t>(options_.subset.size());
  Fingerprint fp;
  fp.vocab_size = vocab_size_;
  fp.positions = n;
  fp.sequences = sequences();
  fp.skipped_nonfinite = skipped_nonfinite_;
  fp.temperature = options_.temperature;
  fp.mean_log_ratio = torch::empty({vocab_size_}, torch::kDouble);
  fp.stderr_log_ratio = torch::empty({vocab_size_}, torch::kDouble);
  fp.grad = torch::empty({vocab_size_}, torch::kDouble);
  double* mean = fp.mean_log_ratio.data_ptr<double>();
  double* se = fp.stderr_log_ratio.data_ptr<double>();
  double* grad = fp.grad.data_ptr<double>();
  for (int64_t v = 0; v < vocab_size_; ++v) {
    std::tie(mean[v], se[v]) = mean_and_stderr(sum_delta_[v], sum_delta_sq_[v], n);
    grad[v] = sum_grad_[v] / count;
  }
  fp.kl_teacher_reference = sum_kl_teacher_reference_ / count;
  fp.kl_reference_teacher = sum_kl_reference_teacher_ / count;
  fp.subset = tensor_of(options_.subset, {width});
  fp.centered = tensor_of(sum_centered_, {width}) / count;
  if (width > 0) {
    std::tie(fp.mass_shift, fp.mass_shift_stderr) =
        mean_and_stderr(sum_mass_shift_, sum_mass_shift_sq_, n);
  } else {
    fp.mass_shift = fp.mass_shift_stderr = std::numeric_limits<double>::quiet_NaN();
  }
  std::vector<size_t> order(sequence_ids_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return sequence_ids_[a] < sequence_ids_[b]; });
  const int64_t n_seq = static_cast<int64_t>(order.size());
  fp.sequence_ids = torch::empty({n_seq}, torch::kLong);
  fp.sequence_counts = torch::empty({n_seq}, torch::kLong);
  fp.sequence_centered = torch::empty({options_.per_sequence ? n_seq : 0, width}, torch::kDouble);
  for (int64_t i = 0; i < n_seq; ++i) {
    const size_t slot = order[static_cast<size_t>(i)];
    fp.sequence_ids.data_ptr<int64_t>()[i] = sequence_ids_[slot];
    fp.sequence_counts.data_ptr<int64_t>()[i] = sequence_counts_[slot];
    if (!options_.per_sequence) continue;
    double* row = fp.sequence_centered.data_ptr<double>() + i * width;
    const double c = static_cast<double>(sequence_counts_[slot]);
    for (int64_t s = 0; s < width; ++s) row[s] = sequence_sums_[slot * width + s] / c;
  }
  return fp;
}

std::map<std::string, torch::Tensor> Accumulator::state() const {
  const int64_t width = static_cast<int64_t>(options_.subset.size());
  const int64_t n_seq = static_cast<int64_t>(sequence_ids_.size());
  std::map<std::string, torch::Tensor> out;
  out["sum_delta"] = tensor_of(sum_delta_, {vocab_size_});
  out["sum_delta_sq"] = tensor_of(sum_delta_sq_, {vocab_size_});
  out["sum_grad"] = tensor_of(sum_grad_, {vocab_size_});
  out["subset"] = tensor_of(options_.subset, {width});
  out["sum_centered"] = tensor_of(sum_centered_, {width});
  out["sum_kl_teacher_reference"] = torch::tensor(sum_kl_teacher_reference_, torch::kDouble);
  out["sum_kl_reference_teacher"] = torch::tensor(sum_kl_reference_teacher_, torch::kDouble);
  out["sum_mass_shift"] = torch::tensor(sum_mass_shift_, torch::kDouble);
  out["sum_mass_shift_sq"] = torch::tensor(sum_mass_shift_sq_, torch::kDouble);
  out["positions"] = torch::tensor(positions_, torch::kLong);
  out["skipped_nonfinite"] = torch::tensor(skipped_nonfinite_, torch::kLong);
  out["next_sequence_id"] = torch::tensor(next_sequence_id_, torch::kLong);
  out["sequence_ids"] = tensor_of(sequence_ids_, {n_seq});
  out["sequence_counts"] = tensor_of(sequence_counts_, {n_seq});
  out["sequence_sum_centered"] =
      tensor_of(sequence_sums_, {options_.per_sequence ? n_seq : 0, width});
  return out;
}

void Accumulator::save(const std::string& path,
                       const std::map<std::string, std::string>& metadata) const {
  std::map<std::string, std::string> header = metadata;
  for (const auto& key : reserved_metadata_keys()) {
    TORCH_CHECK_VALUE(metadata.count(key) == 0, "save: metadata key '", key,
                      "' is reserved for the accumulator's own description");
  }
  const nlohmann::json options = {{"temperature", options_.temperature},
                                  {"skip_nonfinite", options_.skip_nonfinite},
                                  {"per_sequence", options_.per_sequence},
                                  {"subset_size", options_.subset.size()}};
  header["format"] = kAccumulatorFormat;
  header["format_version"] = kAccumulatorFormatVersion;
  header["vocab_size"] = std::to_string(vocab_size_);
  header["temperature"] = format_double(options_.temperature);
  header["positions"] = std::to_string(positions_);
  header["options"] = options.dump();
  const auto tensors = state();
  std::vector<io::TensorView> views;
  for (const auto& [name, tensor] : tensors) {
    const auto dtype = tensor.scalar_type() == at::kDouble ? io::Dtype::kF64 : io::Dtype::kI64;
    views.push_back({name, dtype, tensor.sizes().vec(), tensor.data_ptr(),
                     static_cast<uint64_t>(tensor.numel()) * 8});
  }
  io::write_safetensors(path, views, header);
}

Accumulator Accumulator::load(const std::string& path, std::map<std::string, std::string>* metadata,
                              c10::optional<int64_t> expected_vocab_size,
                              c10::optional<std::string> expected_tokenizer_hash) {
  // The format is validated torch-free (io/fingerprint_file.h, fuzzed); its errors stay
  // ValueErrors here. The safetensors layer's own errors pass through as they are.
  const auto file = io::SafetensorsFile::open(path);
  io::FingerprintFileState state;
  try {
    state = io::read_fingerprint_file(
        file, expected_vocab_size ? std::optional<int64_t>(*expected_vocab_size) : std::nullopt,
        expected_tokenizer_hash ? std::optional<std::string>(*expected_tokenizer_hash)
                                : std::nullopt);
  } catch (const InvalidInput& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  AccumulatorOptions options;
  options.temperature = state.temperature;
  options.skip_nonfinite = state.skip_nonfinite;
  options.per_sequence = state.per_sequence;
  options.subset = std::move(state.subset);
  Accumulator acc = [&] {
    try {
      return Accumulator(state.vocab_size, options);
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, "'", path, "': ", e.msg());
    }
  }();
  acc.sum_delta_ = std::move(state.sum_delta);
  acc.sum_delta_sq_ = std::move(state.sum_delta_sq);
  acc.sum_grad_ = std::move(state.sum_grad);
  acc.sum_centered_ = std::move(state.sum_centered);
  acc.sum_kl_teacher_reference_ = state.sum_kl_teacher_reference;
  acc.sum_kl_reference_teacher_ = state.sum_kl_reference_teacher;
  acc.sum_mass_shift_ = state.sum_mass_shift;
  acc.sum_mass_shift_sq_ = state.sum_mass_shift_sq;
  acc.positions_ = state.positions;
  acc.skipped_nonfinite_ = state.skipped_nonfinite;
  acc.next_sequence_id_ = state.next_sequence_id;
  acc.sequence_ids_ = std::move(state.sequence_ids);
  acc.sequence_counts_ = std::move(state.sequence_counts);
  acc.sequence_sums_ = std::move(state.sequence_sum_centered);
  for (size_t i = 0; i < acc.sequence_ids_.size(); ++i) {
    acc.sequence_slot_.emplace(acc.sequence_ids_[i], i);  // unique: checked by the reader
  }
  if (metadata != nullptr) *metadata = std::move(state.metadata);
  return acc;
}

}  // namespace libtransfer::fingerprint
