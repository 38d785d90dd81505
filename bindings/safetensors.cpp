// biastransfer._C: safetensors files as dicts of torch tensors (libtransfer/io/safetensors.h).
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "device.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/safetensors.h"
#include "libtransfer/torch_dtype.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using io::Dtype;

// The names a Python user knows (torch.float32, not c10's Float).
constexpr const char* kSupportedTorchDtypes =
    "torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, "
    "torch.bfloat16, torch.float32, torch.float64";

torch::Device parse_device(const std::string& device) { return parse_available_device(device); }

// The tensor aliases the mapping when its address suits the element size (always true for files
// our writer made), else it is a copy; the deleter's captured shared_ptr keeps the mapping alive.
torch::Tensor load_tensor(const io::SafetensorsFile& file, const io::TensorInfo& info,
                          const torch::Device& device) {
  const auto type = torch_dtype(info.dtype);
  if (!type) {
    throw WrongType("tensor '" + info.name + "' in '" + file.path() + "' has dtype " +
                    io::dtype_name(info.dtype) + ", which torch " + TORCH_VERSION +
                    " cannot represent (torch has " + kSupportedTorchDtypes + ")");
  }
  const auto options = torch::TensorOptions().dtype(*type);
  std::uint8_t* bytes = file.mutable_data(info);
  const auto address = reinterpret_cast<std::uintptr_t>(bytes);
  torch::Tensor tensor;
  if (info.nbytes() > 0 && address % io::dtype_size(info.dtype) == 0) {
    tensor = torch::from_blob(
        bytes, info.shape, [keep = file.mapping()](void*) {}, options);
  } else {
    tensor = torch::empty(info.shape, options);
    if (info.nbytes() > 0) std::memcpy(tensor.data_ptr(), bytes, info.nbytes());
  }
  return device.is_cpu() ? tensor : tensor.to(device);
}

// Parsing a large header takes a while; other Python threads may run meanwhile.
io::SafetensorsFile open_file(const std::string& path) {
  py::gil_scoped_release release;
  return io::SafetensorsFile::open(path);
}

std::string python_type_name(const py::handle& value) { return Py_TYPE(value.ptr())->tp_name; }

py::dict load(const std::string& path, const std::string& device) {
  const torch::Device target = parse_device(device);
  const auto file = open_file(path);
  py::dict out;
  for (const auto& info : file.tensors()) out[py::str(info.name)] = load_tensor(file, info, target);
  return out;
}

void save(const std::string& path, const py::dict& tensors,
          const std::optional<std::map<std::string, std::string>>& metadata) {
  std::vector<torch::Tensor> keep_alive;  // contiguous CPU copies, where a copy was needed
  std::vector<io::TensorView> views;
  for (const auto& [key, value] : tensors) {
    if (!py::isinstance<py::str>(key)) {
      throw WrongType("tensors: keys must be str, got " + python_type_name(key));
    }
    const auto name = key.cast<std::string>();
    const std::string where = "tensors['" + name + "']: ";
    if (!THPVariable_Check(value.ptr())) {
      throw WrongType(where + "expected a torch.Tensor, got " + python_type_name(value));
    }
    auto tensor = value.cast<torch::Tensor>();
    if (tensor.layout() != torch::kStrided) {
      throw WrongType(where + "expected a dense (strided) tensor, got layout " +
                      c10::str(tensor.layout()));
    }
    const auto dtype = safetensors_dtype(tensor.scalar_type());
    if (!dtype) {
      throw WrongType(where + "dtype " + py::str(value.attr("dtype")).cast<std::string>() +
                      " cannot be stored in safetensors; supported: " + kSupportedTorchDtypes);
    }
    tensor = tensor.detach().to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
    keep_alive.push_back(tensor);
    views.push_back({name, *dtype, tensor.sizes().vec(), tensor.data_ptr(),
                     static_cast<std::uint64_t>(tensor.numel()) * tensor.element_size()});
  }
  py::gil_scoped_release release;
  io::write_safetensors(path, views, metadata.value_or(std::map<std::string, std::string>{}));
}

py::tuple info_tuple(const io::TensorInfo& info) {
  return py::make_tuple(io::dtype_name(info.dtype), py::tuple(py::cast(info.shape)),
                        py::make_tuple(info.begin, info.end));
}

}  // namespace

void bind_safetensors(py::module_& m) {
  m.def("safetensors_load", &load, py::arg("path"), py::arg("device") = "cpu",
        "Reads a safetensors file into {name: tensor}, in data-offset order. Tensors whose bytes\n"
        "are aligned alias the private (copy-on-write) mapping of the file; others are copied.\n"
        "ValueError for a malformed file, OSError if it cannot be opened, TypeError for dtypes\n"
        "torch lacks (U16, U32, U64, F8_*).");
  m.def("safetensors_save", &save, py::arg("path"), py::arg("tensors"),
        py::arg("metadata") = py::none(),
        "Writes {name: tensor} (made contiguous, on CPU) and optional {str: str} metadata to a\n"
        "safetensors file, atomically. TypeError for a dtype safetensors cannot store.");

  py::class_<io::SafetensorsFile>(m, "SafetensorsFile",
                                  "An opened, validated safetensors file (memory-mapped).")
      .def(py::init(&open_file), py::arg("path"))
      .def_property_readonly("path", &io::SafetensorsFile::path)
      .def(
          "keys",
          [](const io::SafetensorsFile& f) {
            std::vector<std::string> names;
            for (const auto& info : f.tensors()) names.push_back(info.name);
            return names;
          },
          "Tensor names in data-offset order.")
      .def_property_readonly("metadata", &io::SafetensorsFile::metadata,
                             "The header's __metadata__ as a dict (empty if absent).")
      .def(
          "get_tensor",
          [](const io::SafetensorsFile& f, const std::string& name, const std::string& device) {
            return load_tensor(f, f.info(name), parse_device(device));
          },
          py::arg("name"), py::arg("device") = "cpu",
          "One tensor; zero-copy when aligned (see safetensors_load).")
      .def(
          "info",
          [](const io::SafetensorsFile& f, const std::string& name) {
            return info_tuple(f.info(name));
          },
          py::arg("name"), "(dtype name, shape tuple, (begin, end) data offsets) of one tensor.")
      .def("__contains__", &io::SafetensorsFile::contains, py::arg("name"))
      .def("__len__", &io::SafetensorsFile::size)
      .def(
          "_mapping_range",
          [](const io::SafetensorsFile& f) {
            const auto mapping = f.mapping();
            const auto start = reinterpret_cast<std::uintptr_t>(mapping->data());
            return py::make_tuple(start, start + mapping->size());
          },
          "(first, one past last) address of the file's mapping, to test zero-copy loads.");
}

}  // namespace libtransfer::bindings
