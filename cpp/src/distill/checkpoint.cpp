#include "libtransfer/distill/checkpoint.h"

#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <regex>
#include <sstream>
#include <unordered_map>

#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"
#include "libtransfer/torch_dtype.h"

namespace libtransfer::distill {
namespace {

namespace fs = std::filesystem;

constexpr const char* kModelPrefix = "model.";
constexpr const char* kOptimizerPrefix = "optimizer.";
constexpr const char* kCrcKey = "libtransfer.crc32";
constexpr const char* kStepKey = "trainer.step";
constexpr const char* kSeedKey = "trainer.seed";
constexpr const char* kAccumulationKey = "trainer.accumulation";
constexpr const char* kTotalStepsKey = "trainer.total_steps";
constexpr const char* kElapsedKey = "trainer.elapsed_s";
constexpr const char* kModelKey = "trainer.model";

io::Dtype to_io_dtype(torch::ScalarType type, const std::string& name) {
  const auto dtype = safetensors_dtype(type);
  if (!dtype) {
    throw WrongType("checkpoint: tensor '" + name + "' has dtype " +
                    std::string(c10::toString(type)) + ", which safetensors cannot hold");
  }
  return *dtype;
}

torch::ScalarType to_torch_dtype(io::Dtype dtype, const std::string& name) {
  const auto type = torch_dtype(dtype);
  if (!type) {
    throw InvalidInput("checkpoint: tensor '" + name + "' has dtype " + io::dtype_name(dtype) +
                       ", which torch 1.13 cannot hold");
  }
  return *type;
}

std::string shape_string(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

std::string shape_string(const std::vector<std::int64_t>& sizes) {
  return shape_string(c10::IntArrayRef(sizes));
}

// Every tensor the checkpoint of this model and optimizer holds, by file name.
models::NamedTensors expected_tensors(models::Model& model, const AdamW& optimizer) {
  models::NamedTensors out;
  for (const auto& [name, t] : model.named_parameters()) out.emplace_back(kModelPrefix + name, t);
  for (const auto& [name, t] : model.named_buffers()) out.emplace_back(kModelPrefix + name, t);
  for (const auto& [name, t] : optimizer.state()) out.emplace_back(kOptimizerPrefix + name, t);
  return out;
}

// CRC-32 of the tensors' bytes, in name order (independent of the file's layout).
std::uint32_t checksum(
    std::vector<std::pair<std::string, std::pair<const void*, std::uint64_t>>> blobs) {
  std::sort(blobs.begin(), blobs.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  uLong crc = crc32(0L, Z_NULL, 0);
  for (const auto& [name, blob] : blobs) {
    const auto* bytes = static_cast<const Bytef*>(blob.first);
    std::uint64_t left = blob.second;
    while (left > 0) {  // zlib takes uInt lengths
      const uInt chunk = static_cast<uInt>(std::min<std::uint64_t>(left, 1u << 30));
      crc = crc32(crc, bytes, chunk);
      bytes += chunk;
      left -= chunk;
    }
  }
  return static_cast<std::uint32_t>(crc);
}

std::string format_double(double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.17g", value);
  return buffer;
}

const std::string& metadata_value(const std::map<std::string, std::string>& metadata,
                                  const std::string& key, const std::string& path) {
  const auto it = metadata.find(key);
  if (it == metadata.end()) {
    throw InvalidInput("checkpoint '" + path + "': metadata has no '" + key + "'");
  }
  return it->second;
}

std::int64_t parse_int(const std::map<std::string, std::string>& metadata, const std::string& key,
                       const std::string& path) {
  const std::string& text = metadata_value(metadata, key, path);
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw InvalidInput("checkpoint '" + path + "': metadata '" + key +
                       "' must be an integer, got '" + text + "'");
  }
  return value;
}

std::uint64_t parse_uint(const std::map<std::string, std::string>& metadata, const std::string& key,
                         const std::string& path) {
  const std::string& text = metadata_value(metadata, key, path);
  std::size_t used = 0;
  unsigned long long value = 0;
  try {
    // stoull accepts a leading '-' (and wraps): only plain digits are a seed.
    if (!text.empty() && text[0] != '-') value = std::stoull(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw InvalidInput("checkpoint '" + path + "': metadata '" + key +
                       "' must be a non-negative integer, got '" + text + "'");
  }
  return value;
}

double parse_double(const std::map<std::string, std::string>& metadata, const std::string& key,
                    const std::string& path) {
  const std::string& text = metadata_value(metadata, key, path);
  std::size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw InvalidInput("checkpoint '" + path + "': metadata '" + key + "' must be a number, got '" +
                       text + "'");
  }
  return value;
}

}  // namespace

std::string checkpoint_path(const std::string& dir, std::int64_t step) {
  char name[64];
  std::snprintf(name, sizeof name, "step-%08" PRId64 ".safetensors", step);
  return (fs::path(dir) / name).string();
}

void save_checkpoint(const std::string& path, models::Model& model, const AdamW& optimizer,
                     const TrainerState& state) {
  const auto tensors = expected_tensors(model, optimizer);
  std::vector<torch::Tensor> cpu;  // keeps the bytes alive until the file is written
  cpu.reserve(tensors.size());
  std::vector<io::TensorView> views;
  views.reserve(tensors.size());
  std::vector<std::pair<std::string, std::pair<const void*, std::uint64_t>>> blobs;
  for (const auto& [name, t] : tensors) {
    cpu.push_back(t.detach().to(torch::kCPU).contiguous());
    const auto& c = cpu.back();
    io::TensorView view;
    view.name = name;
    view.dtype = to_io_dtype(c.scalar_type(), name);
    view.shape.assign(c.sizes().begin(), c.sizes().end());
    view.data = c.data_ptr();
    view.nbytes = static_cast<std::uint64_t>(c.numel()) * c.element_size();
    blobs.push_back({name, {view.data, view.nbytes}});
    views.push_back(std::move(view));
  }
  std::map<std::string, std::string> metadata = {
      {kCheckpointFormatKey, kCheckpointFormatVersion},
      {kCrcKey, std::to_string(checksum(blobs))},
      {kStepKey, std::to_string(state.step)},
      {kSeedKey, std::to_string(state.seed)},
      {kAccumulationKey, std::to_string(state.accumulation)},
      {kTotalStepsKey, std::to_string(state.total_steps)},
      {kElapsedKey, format_double(state.elapsed_s)},
      {kModelKey, model.describe()},
  };
  io::write_safetensors(path, views, metadata);
}

TrainerState load_checkpoint(const std::string& path, models::Model& model, AdamW& optimizer) {
  const auto file = io::SafetensorsFile::open(path);  // truncated / garbage files fail here
  const auto& metadata = file.metadata();
  const auto format = metadata.find(kCheckpointFormatKey);
  if (format == metadata.end()) {
    throw InvalidInput("checkpoint '" + path + "': not a libtransfer checkpoint (no '" +
                       kCheckpointFormatKey + "' metadata)");
  }
  if (format->second != kCheckpointFormatVersion) {
    throw InvalidInput("checkpoint '" + path + "': format version '" + format->second +
                       "', expected '" + kCheckpointFormatVersion + "'");
  }

  std::vector<std::pair<std::string, std::pair<const void*, std::uint64_t>>> blobs;
  for (const auto& info : file.tensors()) {
    blobs.push_back({info.name, {file.data(info), info.nbytes()}});
  }
  const std::int64_t stored_crc = parse_int(metadata, kCrcKey, path);
  const std::uint32_t crc = checksum(blobs);
  if (static_cast<std::int64_t>(crc) != stored_crc) {
    throw InvalidInput("checkpoint '" + path + "': checksum mismatch (stored " +
                       std::to_string(stored_crc) + ", computed " + std::to_string(crc) +
                       "): the file is damaged");
  }

  TrainerState state;
  state.step = parse_int(metadata, kStepKey, path);
  state.seed = parse_uint(metadata, kSeedKey, path);
  state.accumulation = parse_int(metadata, kAccumulationKey, path);
  state.total_steps = parse_int(metadata, kTotalStepsKey, path);
  state.elapsed_s = parse_double(metadata, kElapsedKey, path);
  if (state.step < 0) {
    throw InvalidInput("checkpoint '" + path + "': negative step " + std::to_string(state.step));
  }

  // Validate every name and shape before touching the model or the optimizer.
  const auto expected = expected_tensors(model, optimizer);
  for (const auto& [name, t] : expected) {
    if (!file.contains(name)) {
      throw InvalidInput("checkpoint '" + path + "': tensor '" + name +
                         "' is missing (does the checkpoint belong to this model? it was saved "
                         "from " +
                         (metadata.count(kModelKey) ? metadata.at(kModelKey) : "?") + ", this is " +
                         model.describe() + ")");
    }
    const auto& info = file.info(name);
    if (!t.sizes().equals(info.shape)) {
      throw InvalidInput("checkpoint '" + path + "': tensor '" + name + "' has shape " +
                         shape_string(info.shape) + ", the model's has shape " +
                         shape_string(t.sizes()));
    }
    to_torch_dtype(info.dtype, name);
  }
  if (file.size() != expected.size()) {
    std::unordered_map<std::string, bool> known;
    for (const auto& entry : expected) known[entry.first] = true;
    for (const auto& info : file.tensors()) {
      if (!known.count(info.name)) {
        throw InvalidInput("checkpoint '" + path + "': unexpected tensor '" + info.name +
                           "' (not in this model or optimizer)");
      }
    }
  }

  // Copy from the mapping into the model (parameters keep their identity, dtype and device).
  torch::NoGradGuard no_grad;
  auto view = [&](const std::string& name) {
    const auto& info = file.info(name);
    return torch::from_blob(const_cast<std::uint8_t*>(file.data(info)), info.shape,
                            torch::TensorOptions().dtype(to_torch_dtype(info.dtype, name)));
  };
  std::size_t model_tensors = 0;
  for (auto& [name, t] : model.named_parameters()) {
    t.copy_(view(kModelPrefix + name));
    ++model_tensors;
  }
  for (auto& [name, t] : model.named_buffers()) {
    t.copy_(view(kModelPrefix + name));
    ++model_tensors;
  }
  models::NamedTensors optimizer_state;
  for (const auto& [name, t] : optimizer.state()) {
    optimizer_state.emplace_back(name, view(kOptimizerPrefix + name));
  }
  optimizer.load_state(optimizer_state, state.step);
  return state;
}

std::vector<CheckpointEntry> list_checkpoints(const std::string& dir) {
  std::vector<CheckpointEntry> out;
  std::error_code error;
  if (!fs::is_directory(dir, error)) return out;
  static const std::regex pattern(R"(step-(\d+)\.safetensors)");
  for (const auto& entry : fs::directory_iterator(dir, error)) {
    const std::string name = entry.path().filename().string();
    std::smatch match;
    if (!std::regex_match(name, match, pattern)) continue;
    try {
      out.push_back({entry.path().string(), std::stoll(match[1].str())});
    } catch (const std::out_of_range&) {
      continue;  // a step number no run can reach: not ours
    }
  }
  if (error) throw FileError("cannot list checkpoint directory '" + dir + "': " + error.message());
  std::sort(out.begin(), out.end(),
            [](const CheckpointEntry& a, const CheckpointEntry& b) { return a.step < b.step; });
  return out;
}

void prune_checkpoints(const std::string& dir, std::int64_t keep) {
  if (keep <= 0) return;
  const auto entries = list_checkpoints(dir);
  const std::int64_t excess = static_cast<std::int64_t>(entries.size()) - keep;
  for (std::int64_t i = 0; i < excess; ++i) {
    if (std::remove(entries[i].path.c_str()) != 0 && errno != ENOENT) {
      throw FileError("cannot delete old checkpoint '" + entries[i].path +
                      "': " + std::strerror(errno));
    }
  }
}

}  // namespace libtransfer::distill
