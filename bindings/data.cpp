// Bindings of the data readers and writers: IDX files as tensors, JSON lines records as
// (prompt, completion, extra_json) tuples. biastransfer/data.py is the documented surface.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/idx.h"
#include "libtransfer/io/jsonl.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using RecordTuple = std::tuple<std::string, std::string, std::string>;

torch::Dtype dtype_of(io::IdxType type) {
  switch (type) {
    case io::IdxType::kU8:
      return torch::kUInt8;
    case io::IdxType::kI8:
      return torch::kInt8;
    case io::IdxType::kI16:
      return torch::kInt16;
    case io::IdxType::kI32:
      return torch::kInt32;
    case io::IdxType::kF32:
      return torch::kFloat32;
    case io::IdxType::kF64:
      return torch::kFloat64;
  }
  throw InvalidInput("unknown IDX type");
}

io::IdxType idx_type_of(const torch::Tensor& tensor) {
  for (const auto type : {io::IdxType::kU8, io::IdxType::kI8, io::IdxType::kI16, io::IdxType::kI32,
                          io::IdxType::kF32, io::IdxType::kF64}) {
    if (dtype_of(type) == tensor.scalar_type()) return type;
  }
  throw WrongType(
      "write_idx: IDX files hold uint8, int8, int16, int32, float32 or float64 tensors, got " +
      std::string(c10::toString(tensor.scalar_type())));
}

torch::Tensor read_idx(const std::string& path) {
  io::IdxArray array;
  {
    py::gil_scoped_release release;
    array = io::read_idx(path);
  }
  const auto options = torch::TensorOptions().dtype(dtype_of(array.type));
  if (array.data.empty()) return torch::empty(array.shape, options);
  // The tensor takes over the vector's buffer: no copy, freed with the tensor.
  auto* owner = new std::vector<std::uint8_t>(std::move(array.data));
  return torch::from_blob(
      owner->data(), array.shape, [owner](void*) { delete owner; }, options);
}

void write_idx(const std::string& path, const torch::Tensor& tensor, bool gzip) {
  const io::IdxType type = idx_type_of(tensor);
  const torch::Tensor cpu = tensor.detach().to(torch::kCPU).contiguous();
  py::gil_scoped_release release;
  io::write_idx(path, type, cpu.sizes().vec(), cpu.data_ptr(), cpu.nbytes(), gzip);
}

py::tuple to_tuple(const io::Record& r) {
  return py::make_tuple(r.prompt, r.completion, r.extra_json);
}

io::Record to_record(const RecordTuple& t) {
  return {std::get<0>(t), std::get<1>(t), std::get<2>(t)};
}

}  // namespace

void bind_data(py::module_& m) {
  m.def("read_idx", &read_idx, py::arg("path"),
        "Reads a plain or gzip IDX file into a CPU tensor of the file's shape and dtype "
        "(uint8, int8, int16, int32, float32 or float64).");
  m.def("write_idx", &write_idx, py::arg("path"), py::arg("tensor"), py::arg("gzip") = false,
        "Writes a tensor (1 to 8 dimensions; uint8, int8, int16, int32, float32 or float64) as an "
        "IDX file, atomically, gzip-compressed if gzip.");

  m.def(
      "read_jsonl",
      [](const std::string& path) {
        std::vector<io::Record> records;
        {
          py::gil_scoped_release release;
          records = io::read_jsonl(path);
        }
        py::list out;
        for (const io::Record& r : records) out.append(to_tuple(r));
        return out;
      },
      py::arg("path"),
      "Reads a JSON lines file into a list of (prompt, completion, extra_json) tuples; "
      "extra_json is '' or a JSON object of the other keys.");
  m.def(
      "write_jsonl",
      [](const std::string& path, const std::vector<RecordTuple>& tuples) {
        std::vector<io::Record> records;
        records.reserve(tuples.size());
        for (const RecordTuple& t : tuples) records.push_back(to_record(t));
        py::gil_scoped_release release;
        io::write_jsonl(path, records);
      },
      py::arg("path"), py::arg("records"),
      "Writes (prompt, completion, extra_json) tuples as JSON lines, atomically.");

  py::class_<io::JsonlReader>(m, "JsonlReader",
                              "Iterates over the (prompt, completion, extra_json) records of a "
                              "JSON lines file, one line in memory at a time.")
      .def(py::init<std::string>(), py::arg("path"))
      .def("__iter__", [](io::JsonlReader& self) -> io::JsonlReader& { return self; })
      .def("__next__",
           [](io::JsonlReader& self) {
             io::Record record;
             bool more = false;
             {
               py::gil_scoped_release release;
               more = self.next(record);
             }
             if (!more) throw py::stop_iteration();
             return to_tuple(record);
           })
      .def_property_readonly("line_number", &io::JsonlReader::line_number,
                             "1-based line of the last record returned (0 before the first).")
      .def_property_readonly("path", &io::JsonlReader::path);

  py::class_<io::JsonlWriter>(m, "JsonlWriter",
                              "Writes JSON lines records one at a time; the file appears at "
                              "commit(), and not at all if the writer is dropped before.")
      .def(py::init<std::string>(), py::arg("path"))
      .def(
          "write",
          [](io::JsonlWriter& self, std::string prompt, std::string completion,
             std::string extra_json) {
            self.write({std::move(prompt), std::move(completion), std::move(extra_json)});
          },
          py::arg("prompt"), py::arg("completion"), py::arg("extra_json") = "")
      .def("commit", &io::JsonlWriter::commit)
      .def_property_readonly("count", &io::JsonlWriter::count);
}

}  // namespace libtransfer::bindings
