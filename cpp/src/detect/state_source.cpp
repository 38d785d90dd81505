// Tensor sources of the weight test (see state_source.h).
#include "libtransfer/detect/state_source.h"

#include <sys/mman.h>
#include <unistd.h>

#include <torch/torch.h>

#include <cstring>
#include <optional>
#include <set>
#include <utility>

#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"
#include "libtransfer/torch_dtype.h"

namespace libtransfer::detect {
namespace {

bool is_weight_dtype(at::ScalarType type) {
  return type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble;
}

void check_compute_dtype(torch::ScalarType dtype) {
  if (!at::isFloatingType(dtype)) {
    throw WrongType(std::string("compute dtype: expected a floating dtype, got ") +
                    c10::toString(dtype));
  }
}

// The safetensors dtypes the weight test reads (f16, bf16, f32, f64); others have no weights.
std::optional<at::ScalarType> weight_dtype(io::Dtype dtype) {
  const auto type = torch_dtype(dtype);
  if (type && at::isFloatingType(*type)) return type;
  return std::nullopt;
}

class TensorSource final : public StateSource {
 public:
  TensorSource(models::NamedTensors tensors, std::map<std::string, std::string> metadata,
               std::string description)
      : tensors_(std::move(tensors)) {
    std::vector<TensorMeta> listing;
    listing.reserve(tensors_.size());
    for (const auto& [name, tensor] : tensors_) {
      if (!tensor.defined())
        throw InvalidInput(description + ": tensor '" + name + "' is undefined");
      listing.push_back({name, tensor.sizes().vec(), c10::toString(tensor.scalar_type()),
                         is_weight_dtype(tensor.scalar_type())});
      lookup_.emplace(name, tensor);
    }
    metadata_ = std::move(metadata);
    description_ = std::move(description);
    set_listing(std::move(listing));
  }

  torch::Tensor load(const std::string& name, torch::ScalarType dtype,
                     const torch::Device& device) const override {
    check_compute_dtype(dtype);
    const auto& info = meta(name);
    if (!info.floating) {
      throw WrongType(description_ + ": tensor '" + name + "' has dtype " + info.dtype +
                      "; the weight test reads float16, bfloat16, float32 and float64 only");
    }
    return lookup_.at(name).detach().to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
  }

  torch::Device device() const override {
    return tensors_.empty() ? torch::Device(torch::kCPU) : tensors_.front().second.device();
  }

 private:
  models::NamedTensors tensors_;
  std::map<std::string, torch::Tensor> lookup_;
};

class SafetensorsSource final : public StateSource {
 public:
  explicit SafetensorsSource(const std::vector<std::string>& paths) {
    if (paths.empty())
      throw InvalidInput("safetensors paths: expected at least one file, got none");
    std::vector<TensorMeta> listing;
    for (const auto& path : paths) {
      files_.push_back(io::SafetensorsFile::open(path));
      const auto& file = files_.back();
      for (const auto& info : file.tensors()) {
        if (owner_.count(info.name)) {
          throw InvalidInput("tensor '" + info.name + "' appears in both '" +
                             files_[owner_.at(info.name)].path() + "' and '" + path + "'");
        }
        owner_.emplace(info.name, files_.size() - 1);
        listing.push_back({info.name, info.shape, io::dtype_name(info.dtype),
                           weight_dtype(info.dtype).has_value()});
      }
      for (const auto& [key, value] : file.metadata()) metadata_.emplace(key, value);
    }
    description_ = paths.size() == 1
                       ? paths.front()
                       : paths.front() + " (+" + std::to_string(paths.size() - 1) + " more files)";
    set_listing(std::move(listing));
  }

  torch::Tensor load(const std::string& name, torch::ScalarType dtype,
                     const torch::Device& device) const override {
    check_compute_dtype(dtype);
    const auto& file = files_.at(owner_.at(meta(name).name));
    const auto& info = file.info(name);
    const auto stored = weight_dtype(info.dtype);
    if (!stored) {
      throw WrongType("tensor '" + name + "' in '" + file.path() + "' has dtype " +
                      io::dtype_name(info.dtype) +
                      "; the weight test reads F16, BF16, F32 and F64 only");
    }
    const auto options = torch::TensorOptions().dtype(*stored);
    const std::uint8_t* bytes = file.data(info);
    torch::Tensor out;
    if (info.nbytes() == 0) {
      out = torch::empty(info.shape, torch::TensorOptions().dtype(dtype).device(device));
    } else if (reinterpret_cast<std::uintptr_t>(bytes) % io::dtype_size(info.dtype) == 0) {
      const auto view = torch::from_blob(const_cast<std::uint8_t*>(bytes), info.shape, options);
      out = view.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
    } else {
      auto staged = torch::empty(info.shape, options);
      std::memcpy(staged.data_ptr(), bytes, info.nbytes());
      out = staged.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
    }
    release_pages(bytes, info.nbytes());
    return out;
  }

 private:
  // The converted copy is all we keep: drop the mapped pages from this process's resident set
  // (they reload from the file if touched again). Our mapping is private to this source and never
  // written, so nothing is lost; without this, reading two 2 GB files would add 4 GB of RSS.
  static void release_pages(const std::uint8_t* bytes, std::uint64_t nbytes) {
    static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto begin = reinterpret_cast<std::uintptr_t>(bytes) / page * page;
    const auto end = reinterpret_cast<std::uintptr_t>(bytes) + nbytes;
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  }

  std::vector<io::SafetensorsFile> files_;
  std::map<std::string, std::size_t> owner_;
};

}  // namespace

void StateSource::set_listing(std::vector<TensorMeta> tensors) {
  tensors_ = std::move(tensors);
  index_.clear();
  for (std::size_t i = 0; i < tensors_.size(); ++i) {
    if (!index_.emplace(tensors_[i].name, i).second) {
      throw InvalidInput(description_ + ": tensor name '" + tensors_[i].name + "' appears twice");
    }
  }
}

const TensorMeta& StateSource::meta(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) {
    throw InvalidInput(description_ + " has no tensor '" + name + "'");
  }
  return tensors_[it->second];
}

StateSourcePtr state_from_tensors(models::NamedTensors tensors,
                                  std::map<std::string, std::string> metadata,
                                  std::string description) {
  return std::make_shared<TensorSource>(std::move(tensors), std::move(metadata),
                                        std::move(description));
}

StateSourcePtr state_from_safetensors(const std::vector<std::string>& paths) {
  return std::make_shared<SafetensorsSource>(paths);
}

}  // namespace libtransfer::detect
