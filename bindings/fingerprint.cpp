// biastransfer._C: the streaming fingerprint accumulator and the finalized Fingerprint
// (libtransfer/fingerprint/accumulator.h, fingerprint.h).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "libtransfer/errors.h"
#include "libtransfer/fingerprint/accumulator.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using fingerprint::Accumulator;
using fingerprint::AccumulatorOptions;
using fingerprint::Backend;
using fingerprint::Fingerprint;

// None, a list of ints or a 1-D integer tensor.
std::vector<int64_t> subset_ids(const py::object& subset) {
  if (subset.is_none()) return {};
  if (THPVariable_Check(subset.ptr())) {
    const auto tensor = subset.cast<torch::Tensor>();
    if (!at::isIntegralType(tensor.scalar_type(), /*includeBool=*/false) || tensor.dim() != 1) {
      throw WrongType("subset: expected a 1-D integer tensor, got " +
                      std::string(c10::toString(tensor.scalar_type())) + " of shape " +
                      c10::str(tensor.sizes()));
    }
    const auto ids = tensor.to(torch::kCPU, torch::kLong).contiguous();
    return {ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel()};
  }
  try {
    return subset.cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw WrongType("subset: expected None, a list of ints or a 1-D integer tensor, got " +
                    std::string(Py_TYPE(subset.ptr())->tp_name));
  }
}

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "scalar") return Backend::kScalar;
  if (name == "torch") return Backend::kTorch;
  throw InvalidInput("backend: expected 'auto', 'scalar' or 'torch', got '" + name + "'");
}

Accumulator make_accumulator(int64_t vocab_size, double temperature, const py::object& subset,
                             bool skip_nonfinite, bool per_sequence, const std::string& backend) {
  AccumulatorOptions options;
  options.temperature = temperature;
  options.subset = subset_ids(subset);
  options.skip_nonfinite = skip_nonfinite;
  options.per_sequence = per_sequence;
  options.backend = parse_backend(backend);
  return Accumulator(vocab_size, std::move(options));
}

py::dict state_dict(const Accumulator& acc) {
  py::dict out;
  for (const auto& [name, tensor] : acc.state()) out[py::str(name)] = tensor;
  return out;
}

}  // namespace

void bind_fingerprint(py::module_& m) {
  py::class_<Fingerprint>(m, "Fingerprint",
                          "A finalized logit fingerprint (float64 CPU tensors). See\n"
                          "FingerprintAccumulator.finalize().")
      .def_readonly("vocab_size", &Fingerprint::vocab_size)
      .def_readonly("positions", &Fingerprint::positions, "Scored positions accumulated (n).")
      .def_readonly("sequences", &Fingerprint::sequences, "Distinct sequence ids.")
      .def_readonly("skipped_nonfinite", &Fingerprint::skipped_nonfinite)
      .def_readonly("temperature", &Fingerprint::temperature)
      .def_readonly("mean_log_ratio", &Fingerprint::mean_log_ratio,
                    "[V] mean over positions of log_softmax(T/tau) - log_softmax(R/tau).")
      .def_readonly("stderr_log_ratio", &Fingerprint::stderr_log_ratio,
                    "[V] sample std over positions / sqrt(n) (NaN if n < 2); optimistic,\n"
                    "since positions within a sequence are correlated.")
      .def_readonly("grad", &Fingerprint::grad, "[V] mean of p_T - p_R (gradient fingerprint).")
      .def_readonly("kl_teacher_reference", &Fingerprint::kl_teacher_reference,
                    "Mean KL(p_T || p_R) per position, nats.")
      .def_readonly("kl_reference_teacher", &Fingerprint::kl_reference_teacher,
                    "Mean KL(p_R || p_T) per position, nats.")
      .def_readonly("subset", &Fingerprint::subset, "[S] int64 subset token ids (sorted).")
      .def_readonly("centered", &Fingerprint::centered,
                    "[S] mean of delta[S] - mean(delta[S]) over positions.")
      .def_readonly("mass_shift", &Fingerprint::mass_shift,
                    "Mean of logsumexp_S l_T - logsumexp_S l_R (NaN without a subset).")
      .def_readonly("mass_shift_stderr", &Fingerprint::mass_shift_stderr)
      .def_readonly("sequence_ids", &Fingerprint::sequence_ids, "[n_seq] int64, sorted.")
      .def_readonly("sequence_counts", &Fingerprint::sequence_counts, "[n_seq] int64.")
      .def_readonly("sequence_centered", &Fingerprint::sequence_centered,
                    "[n_seq, S] per-sequence mean of the centered subset log-ratio\n"
                    "([0, S] when per_sequence=False).")
      .def("top_tokens", &Fingerprint::top_tokens, py::arg("k"),
           py::arg("field") = "mean_log_ratio", py::arg("largest") = true,
           "(ids int64 [k], values float64 [k]) of the k largest (or smallest) entries of\n"
           "'mean_log_ratio', 'grad' or 'centered' (ids from the subset); k is clamped.");

  py::class_<Accumulator>(m, "FingerprintAccumulator",
                          "Streaming float64 sums of a teacher-vs-reference logit fingerprint.\n"
                          "Memory O(V + #sequences x |S|); merge() combines shards.")
      .def(py::init(&make_accumulator), py::arg("vocab_size"), py::arg("temperature") = 1.0,
           py::arg("subset") = py::none(), py::arg("skip_nonfinite") = false,
           py::arg("per_sequence") = true, py::arg("backend") = "auto",
           "subset: token ids (list or 1-D integer tensor; kept sorted). skip_nonfinite: skip\n"
           "and count scored rows with a non-finite logit instead of raising. per_sequence:\n"
           "keep per-sequence sums of the centered subset fingerprint. backend: 'auto'\n"
           "(fused CPU kernel / torch ops off the CPU), 'scalar' (float64 loop, CPU) or\n"
           "'torch' (float64 torch ops on the tensors' device).")
      .def(
          "update",
          [](Accumulator& acc, const torch::Tensor& teacher, const torch::Tensor& reference,
             const std::optional<torch::Tensor>& mask,
             const std::optional<torch::Tensor>& sequence_ids) {
            c10::optional<torch::Tensor> m, s;
            if (mask) m = *mask;
            if (sequence_ids) s = *sequence_ids;
            py::gil_scoped_release release;
            acc.update(teacher, reference, m, s);
          },
          py::arg("teacher"), py::arg("reference"), py::arg("mask") = py::none(),
          py::arg("sequence_ids") = py::none(),
          "Adds a batch: logits [B, T, V] or [N, V] (float32/bfloat16/float16/float64, same\n"
          "shape, dtype and device); mask bool or 0/1 [B, T] / [N]; sequence_ids int64 [B]\n"
          "(3-D) or [N] (2-D). Default ids: each batch row (3-D) or row (2-D) is a new\n"
          "sequence, numbered from a running counter. Errors leave the state unchanged.")
      .def("merge", &Accumulator::merge, py::arg("other"),
           "Adds another accumulator's sums (same V, temperature, subset, per_sequence).")
      .def("finalize", &Accumulator::finalize, "The Fingerprint; ValueError if no positions.")
      .def(
          "save",
          [](const Accumulator& acc, const std::string& path,
             const std::map<std::string, std::string>& metadata) {
            py::gil_scoped_release release;
            acc.save(path, metadata);
          },
          py::arg("path"), py::arg("metadata") = std::map<std::string, std::string>{},
          "Writes a safetensors file; metadata (e.g. tokenizer_hash, teacher, reference) is\n"
          "stored next to the reserved keys.")
      .def_static(
          "load",
          [](const std::string& path, std::optional<int64_t> expected_vocab_size,
             std::optional<std::string> expected_tokenizer_hash) {
            std::map<std::string, std::string> metadata;
            c10::optional<int64_t> vocab;
            c10::optional<std::string> hash;
            if (expected_vocab_size) vocab = *expected_vocab_size;
            if (expected_tokenizer_hash) hash = *expected_tokenizer_hash;
            auto acc = [&] {
              py::gil_scoped_release release;
              return Accumulator::load(path, &metadata, vocab, hash);
            }();
            return py::make_tuple(std::move(acc), metadata);
          },
          py::arg("path"), py::arg("expected_vocab_size") = py::none(),
          py::arg("expected_tokenizer_hash") = py::none(),
          "(accumulator, metadata dict) from a file written by save(); ValueError for a file\n"
          "that is not a fingerprint, is damaged, or comes from another vocabulary.")
      .def_property_readonly("vocab_size", &Accumulator::vocab_size)
      .def_property_readonly("temperature", &Accumulator::temperature)
      .def_property_readonly(
          "subset",
          [](const Accumulator& acc) { return torch::tensor(acc.subset(), torch::kLong); })
      .def_property_readonly("positions", &Accumulator::positions)
      .def_property_readonly("sequences", &Accumulator::sequences)
      .def_property_readonly("skipped_nonfinite", &Accumulator::skipped_nonfinite)
      .def_property_readonly(
          "skip_nonfinite", [](const Accumulator& a) { return a.options().skip_nonfinite; },
          "Whether rows with non-finite logits are skipped and counted (else they raise).")
      .def_property_readonly(
          "per_sequence", [](const Accumulator& a) { return a.options().per_sequence; },
          "Whether per-sequence sums of the centered fingerprint are kept.")
      .def("state", &state_dict, "The raw float64/int64 sums, by the names the file uses.");
}

}  // namespace libtransfer::bindings
