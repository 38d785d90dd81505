// The fingerprint accumulator file format: validation and reading, torch-free (fuzzed as
// fuzz_fingerprint_file). The messages are those Accumulator::load has always given.
#include "libtransfer/io/fingerprint_file.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_set>

#include "libtransfer/errors.h"

namespace libtransfer::io {
namespace {

// The reserved metadata keys, in the order they are checked.
constexpr const char* kFormatKey = "format";
constexpr const char* kVersionKey = "format_version";

// "[3, 4]", as torch prints shapes (the messages predate this torch-free reader).
std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// A double as std::ostream prints it by default ("0.5", "inf", "-1e+300").
std::string stream_text(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

// Reads the file's metadata and tensors with strict checks; every failure names the file.
class Reader {
 public:
  explicit Reader(const SafetensorsFile& file) : file_(file), quoted_("'" + file.path() + "'") {}

  [[noreturn]] void fail(const std::string& problem) const {
    throw InvalidInput(quoted_ + problem);
  }

  const std::string& metadata(const std::string& key) const {
    const auto& metadata = file_.metadata();
    const auto found = metadata.find(key);
    if (found == metadata.end()) {
      fail(" is not a fingerprint accumulator file: its metadata lacks '" + key + "'");
    }
    return found->second;
  }

  // std::stoll's grammar (leading spaces and a sign accepted), the whole text used.
  std::int64_t metadata_int(const std::string& key) const {
    const std::string& text = metadata(key);
    std::size_t used = 0;
    std::int64_t value = -1;
    try {
      value = std::stoll(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != text.size() || text.empty()) {
      fail(": metadata '" + key + "' must be an integer, got '" + text + "'");
    }
    return value;
  }

  // Checks presence, dtype and shape; returns the entry.
  const TensorInfo& info(const std::string& name, Dtype dtype,
                         const std::vector<std::int64_t>& shape) const {
    const TensorInfo& i = present(name);
    if (i.dtype != dtype) {
      fail(": tensor '" + name + "' must have dtype " + dtype_name(dtype) + ", got " +
           dtype_name(i.dtype));
    }
    if (i.shape != shape) {
      fail(": tensor '" + name + "' must have shape " + shape_text(shape) + ", got " +
           shape_text(i.shape));
    }
    return i;
  }

  // The length of a 1-D tensor of `dtype`.
  std::int64_t length(const std::string& name, Dtype dtype) const {
    const TensorInfo& i = present(name);
    if (i.shape.size() != 1) {
      fail(": tensor '" + name + "' must be 1-D, got shape " + shape_text(i.shape));
    }
    return info(name, dtype, i.shape).shape[0];
  }

  // A copy of a tensor whose dtype and shape were checked (memcpy: the data may be unaligned).
  template <typename T>
  std::vector<T> read(const std::string& name, Dtype dtype,
                      const std::vector<std::int64_t>& shape) const {
    const TensorInfo& i = info(name, dtype, shape);
    std::vector<T> out(static_cast<std::size_t>(i.nbytes() / sizeof(T)));
    if (!out.empty()) std::memcpy(out.data(), file_.data(i), out.size() * sizeof(T));
    return out;
  }
  double scalar_f64(const std::string& name) const {
    return read<double>(name, Dtype::kF64, {})[0];
  }
  std::int64_t scalar_i64(const std::string& name) const {
    return read<std::int64_t>(name, Dtype::kI64, {})[0];
  }

 private:
  const TensorInfo& present(const std::string& name) const {
    if (!file_.contains(name)) {
      fail(" is not a complete fingerprint accumulator: tensor '" + name + "' is missing");
    }
    return file_.info(name);
  }

  const SafetensorsFile& file_;
  std::string quoted_;
};

}  // namespace

FingerprintFileState read_fingerprint_file(const SafetensorsFile& file,
                                           std::optional<std::int64_t> expected_vocab_size,
                                           const std::optional<std::string>& expected_hash) {
  const Reader reader(file);
  const std::string& path = file.path();
  FingerprintFileState state;
  const auto& meta = file.metadata();

  const auto format = meta.find(kFormatKey);
  if (format == meta.end() || format->second != kFingerprintFileFormat) {
    reader.fail(std::string(" is not a fingerprint accumulator file: metadata 'format' is ") +
                (format == meta.end() ? std::string("missing") : "'" + format->second + "'") +
                ", expected '" + kFingerprintFileFormat + "'");
  }
  const std::string& version = reader.metadata(kVersionKey);
  if (version != kFingerprintFileFormatVersion) {
    reader.fail(": unsupported fingerprint accumulator format_version '" + version +
                "' (this library reads version " + kFingerprintFileFormatVersion + ")");
  }
  state.vocab_size = reader.metadata_int("vocab_size");
  if (expected_vocab_size && state.vocab_size != *expected_vocab_size) {
    throw InvalidInput("fingerprint file from another vocabulary: '" + path +
                       "' has vocab_size=" + std::to_string(state.vocab_size) + ", expected " +
                       std::to_string(*expected_vocab_size));
  }
  if (expected_hash) {
    const auto hash = meta.find("tokenizer_hash");
    if (hash == meta.end()) {
      throw InvalidInput("fingerprint file from another vocabulary? '" + path +
                         "' records no tokenizer_hash, expected " + *expected_hash);
    }
    if (hash->second != *expected_hash) {
      throw InvalidInput("fingerprint file from another vocabulary: '" + path +
                         "' has tokenizer_hash=" + hash->second + ", expected " + *expected_hash);
    }
  }
  try {
    const auto options = nlohmann::json::parse(reader.metadata("options"));
    state.skip_nonfinite = options.at("skip_nonfinite").get<bool>();
    state.per_sequence = options.at("per_sequence").get<bool>();
  } catch (const nlohmann::json::exception& e) {
    reader.fail(std::string(": metadata 'options' is not valid: ") + e.what());
  }
  const std::string& temperature_text = reader.metadata("temperature");
  char* end = nullptr;
  state.temperature = std::strtod(temperature_text.c_str(), &end);
  if (end == nullptr || *end != '\0' || temperature_text.empty()) {
    reader.fail(": metadata 'temperature' must be a number, got '" + temperature_text + "'");
  }

  // The accumulator's own settings checks, before anything of size V is allocated.
  if (state.vocab_size < 1) {
    reader.fail(": vocab_size: expected at least 1, got " + std::to_string(state.vocab_size));
  }
  if (!std::isfinite(state.temperature) || state.temperature <= 0.0) {
    reader.fail(": temperature: expected a finite value > 0, got " +
                stream_text(state.temperature));
  }
  const std::int64_t width = reader.length("subset", Dtype::kI64);
  state.subset = reader.read<std::int64_t>("subset", Dtype::kI64, {width});
  for (const std::int64_t id : state.subset) {
    if (id < 0 || id >= state.vocab_size) {
      reader.fail(": subset: token id " + std::to_string(id) +
                  " is out of range for a vocabulary of V=" + std::to_string(state.vocab_size));
    }
  }
  std::vector<std::int64_t> sorted = state.subset;
  std::sort(sorted.begin(), sorted.end());
  const auto duplicate = std::adjacent_find(sorted.begin(), sorted.end());
  if (duplicate != sorted.end()) {
    reader.fail(": subset: token id " + std::to_string(*duplicate) + " appears more than once");
  }
  if (sorted != state.subset) reader.fail(": tensor 'subset' must be sorted");

  // Every other tensor's dtype and shape, before any copy: the file must hold what V promises.
  const std::vector<std::int64_t> vocab_shape = {state.vocab_size};
  for (const char* name : {"sum_delta", "sum_delta_sq", "sum_grad"}) {
    reader.info(name, Dtype::kF64, vocab_shape);
  }
  reader.info("sum_centered", Dtype::kF64, {width});
  for (const char* name : {"sum_kl_teacher_reference", "sum_kl_reference_teacher", "sum_mass_shift",
                           "sum_mass_shift_sq"}) {
    reader.info(name, Dtype::kF64, {});
  }
  for (const char* name : {"positions", "skipped_nonfinite", "next_sequence_id"}) {
    reader.info(name, Dtype::kI64, {});
  }
  const std::int64_t n_seq = reader.length("sequence_ids", Dtype::kI64);
  reader.info("sequence_counts", Dtype::kI64, {n_seq});
  const std::vector<std::int64_t> sums_shape = {state.per_sequence ? n_seq : 0, width};
  reader.info("sequence_sum_centered", Dtype::kF64, sums_shape);

  state.sum_delta = reader.read<double>("sum_delta", Dtype::kF64, vocab_shape);
  state.sum_delta_sq = reader.read<double>("sum_delta_sq", Dtype::kF64, vocab_shape);
  state.sum_grad = reader.read<double>("sum_grad", Dtype::kF64, vocab_shape);
  state.sum_centered = reader.read<double>("sum_centered", Dtype::kF64, {width});
  state.sum_kl_teacher_reference = reader.scalar_f64("sum_kl_teacher_reference");
  state.sum_kl_reference_teacher = reader.scalar_f64("sum_kl_reference_teacher");
  state.sum_mass_shift = reader.scalar_f64("sum_mass_shift");
  state.sum_mass_shift_sq = reader.scalar_f64("sum_mass_shift_sq");
  state.positions = reader.scalar_i64("positions");
  state.skipped_nonfinite = reader.scalar_i64("skipped_nonfinite");
  state.next_sequence_id = reader.scalar_i64("next_sequence_id");
  if (state.positions < 0 || state.skipped_nonfinite < 0) {
    reader.fail(": negative counts (positions " + std::to_string(state.positions) +
                ", skipped_nonfinite " + std::to_string(state.skipped_nonfinite) + ")");
  }
  if (std::to_string(state.positions) != reader.metadata("positions")) {
    reader.fail(": metadata 'positions' disagrees with tensor 'positions'");
  }
  state.sequence_ids = reader.read<std::int64_t>("sequence_ids", Dtype::kI64, {n_seq});
  state.sequence_counts = reader.read<std::int64_t>("sequence_counts", Dtype::kI64, {n_seq});
  state.sequence_sum_centered =
      reader.read<double>("sequence_sum_centered", Dtype::kF64, sums_shape);

  std::unordered_set<std::int64_t> seen;
  std::int64_t total = 0;
  for (std::size_t i = 0; i < state.sequence_ids.size(); ++i) {
    const std::int64_t id = state.sequence_ids[i];
    const std::int64_t count = state.sequence_counts[i];
    if (count <= 0) {
      reader.fail(": sequence " + std::to_string(id) + " has count " + std::to_string(count));
    }
    if (!seen.insert(id).second) {
      reader.fail(": sequence id " + std::to_string(id) + " appears more than once");
    }
    // Counts are positive, so the sum can only overflow upwards: past positions, which it must
    // equal. Stop there instead of overflowing int64.
    if (__builtin_add_overflow(total, count, &total)) {
      reader.fail(": sequence counts add up to more than 2^63 - 1, but positions is " +
                  std::to_string(state.positions));
    }
  }
  if (total != state.positions) {
    reader.fail(": sequence counts add up to " + std::to_string(total) + ", but positions is " +
                std::to_string(state.positions));
  }
  state.metadata = meta;
  return state;
}

FingerprintFileState read_fingerprint_file(const std::string& path,
                                           std::optional<std::int64_t> expected_vocab_size,
                                           const std::optional<std::string>& expected_hash) {
  return read_fingerprint_file(SafetensorsFile::open(path), expected_vocab_size, expected_hash);
}

}  // namespace libtransfer::io
