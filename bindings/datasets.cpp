// biastransfer._C: datasets (libtransfer/distill/dataset.h and batch.h): Batch, the BatchSource
// base class and its sources (TokenDataset, TensorDataset, NoiseSource), tokenization with
// completion-only masks, padding, packing and the seeded epoch order.
// biastransfer/datasets.py is the documented surface. Examples cross as (tokens, completion
// flags) pairs of int lists.
#include <pybind11/stl.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings.h"
#include "device.h"
#include "libtransfer/distill/batch.h"
#include "libtransfer/distill/dataset.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/tokenizer.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using distill::Batch;
using distill::BatchSource;
using distill::BatchSourcePtr;
using distill::TokenizedExample;

using ExampleTuple = std::pair<std::vector<std::int64_t>, std::vector<std::uint8_t>>;

std::vector<TokenizedExample> to_examples(const std::vector<ExampleTuple>& tuples) {
  std::vector<TokenizedExample> out(tuples.size());
  for (std::size_t i = 0; i < tuples.size(); ++i) {
    out[i].tokens = tuples[i].first;
    out[i].completion = tuples[i].second;
  }
  return out;
}

ExampleTuple to_tuple(const TokenizedExample& ex) { return {ex.tokens, ex.completion}; }

py::object tensor_or_none(const torch::Tensor& t) {
  return t.defined() ? py::cast(t) : py::object(py::none());
}

torch::Tensor optional_tensor(const std::optional<torch::Tensor>& t) {
  return t.value_or(torch::Tensor());
}

distill::TokenizeOptions tokenize_options(std::optional<std::int64_t> eos_id,
                                          std::int64_t max_tokens, const std::string& truncation) {
  distill::TokenizeOptions options;
  options.eos_id = eos_id;
  options.max_tokens = max_tokens;
  options.truncation = distill::parse_truncation(truncation);
  return options;
}

distill::ShuffleConfig shuffle_config(std::int64_t batch_size, std::uint64_t seed, bool shuffle,
                                      bool drop_last) {
  distill::ShuffleConfig c;
  c.batch_size = batch_size;
  c.seed = seed;
  c.shuffle = shuffle;
  c.drop_last = drop_last;
  return c;
}

py::dict blocks_dict(const distill::PackedBlocks& b) {
  py::dict out;
  out["input"] = b.input;
  out["targets"] = b.targets;
  out["attention_mask"] = b.attention_mask;
  out["loss_mask"] = b.loss_mask;
  return out;
}

void bind_batch(py::module_& m) {
  if (py::detail::get_type_info(typeid(Batch))) return;
  py::class_<Batch>(m, "Batch",
                    "One training batch (libtransfer/distill/batch.h). Language models: input\n"
                    "[B, T] int64, attention_mask [B, T], targets [B, T] (already shifted),\n"
                    "loss_mask [B, T] float (1 on completion targets). Feature models: input\n"
                    "[B, F], targets [B] labels. Undefined tensors are None.")
      .def(py::init([](const torch::Tensor& input, const std::optional<torch::Tensor>& mask,
                       const std::optional<torch::Tensor>& targets,
                       const std::optional<torch::Tensor>& loss_mask,
                       const std::optional<torch::Tensor>& teacher_logits,
                       const std::optional<torch::Tensor>& topk_ids,
                       const std::optional<torch::Tensor>& topk_logprobs) {
             Batch b;
             b.input = input;
             b.attention_mask = optional_tensor(mask);
             b.targets = optional_tensor(targets);
             b.loss_mask = optional_tensor(loss_mask);
             b.teacher_logits = optional_tensor(teacher_logits);
             b.teacher_topk_ids = optional_tensor(topk_ids);
             b.teacher_topk_logprobs = optional_tensor(topk_logprobs);
             return b;
           }),
           py::arg("input"), py::arg("attention_mask") = py::none(),
           py::arg("targets") = py::none(), py::arg("loss_mask") = py::none(),
           py::arg("teacher_logits") = py::none(), py::arg("teacher_topk_ids") = py::none(),
           py::arg("teacher_topk_logprobs") = py::none())
      .def_property_readonly("input", [](const Batch& b) { return tensor_or_none(b.input); })
      .def_property_readonly("attention_mask",
                             [](const Batch& b) { return tensor_or_none(b.attention_mask); })
      .def_property_readonly("targets", [](const Batch& b) { return tensor_or_none(b.targets); })
      .def_property_readonly("loss_mask",
                             [](const Batch& b) { return tensor_or_none(b.loss_mask); })
      .def_property_readonly("teacher_logits",
                             [](const Batch& b) { return tensor_or_none(b.teacher_logits); })
      .def_property_readonly("teacher_topk_ids",
                             [](const Batch& b) { return tensor_or_none(b.teacher_topk_ids); })
      .def_property_readonly("teacher_topk_logprobs",
                             [](const Batch& b) { return tensor_or_none(b.teacher_topk_logprobs); })
      .def("size", &Batch::size, "Rows (B).")
      .def(
          "to",
          [](const Batch& b, const py::object& device) {
            if (THPDevice_Check(device.ptr())) {
              return b.to(available_device(reinterpret_cast<THPDevice*>(device.ptr())->device));
            }
            return b.to(parse_available_device(device.cast<std::string>()));
          },
          py::arg("device"), "Every tensor moved to device (a torch.device or a string).")
      .def("__repr__", [](const Batch& b) {
        return "<Batch size=" + std::to_string(b.size()) +
               (b.input.defined() ? " input=" + c10::str(b.input.sizes()) : std::string()) + ">";
      });
}

void bind_sources(py::module_& m) {
  // trainer.cpp registers the base class only if this did not (the module binds datasets first).
  if (!py::detail::get_type_info(typeid(BatchSource))) {
    py::class_<BatchSource, BatchSourcePtr>(
        m, "BatchSource",
        "Produces the training batch of a step: batch(step) depends only on the source's\n"
        "configuration (seed included) and step.")
        .def(
            "batch",
            [](BatchSource& s, std::int64_t step) {
              py::gil_scoped_release release;
              return s.batch(step);
            },
            py::arg("step"))
        .def("steps_per_epoch", &BatchSource::steps_per_epoch);
  }

  py::class_<distill::TokenDataset, BatchSource, std::shared_ptr<distill::TokenDataset>>(
      m, "TokenDataset",
      "Language-model batches from tokenized examples, right-padded per batch or packed into\n"
      "blocks; shuffled per epoch with a permutation seeded by (seed, epoch).")
      .def(py::init([](const std::vector<ExampleTuple>& examples, std::int64_t batch_size,
                       std::uint64_t seed, bool shuffle, bool drop_last, std::int64_t pad_id,
                       std::int64_t pack_length, std::int64_t pad_to) {
             distill::TokenDatasetConfig config;
             config.shuffle = shuffle_config(batch_size, seed, shuffle, drop_last);
             config.pad_id = pad_id;
             config.pack_length = pack_length;
             config.pad_to = pad_to;
             return std::make_shared<distill::TokenDataset>(to_examples(examples), config);
           }),
           py::arg("examples"), py::kw_only(), py::arg("batch_size") = 32, py::arg("seed") = 0,
           py::arg("shuffle") = true, py::arg("drop_last") = false, py::arg("pad_id") = 0,
           py::arg("pack_length") = 0, py::arg("pad_to") = 0)
      .def_property_readonly("size", &distill::TokenDataset::size,
                             "Examples (blocks when packing).")
      .def("__len__", &distill::TokenDataset::size);

  py::class_<distill::TensorDataset, BatchSource, std::shared_ptr<distill::TensorDataset>>(
      m, "TensorDataset",
      "Feature-model batches: features [N, F] floating, labels [N] int64 (batches stay on\n"
      "their device); shuffled per epoch, seeded.")
      .def(py::init([](const torch::Tensor& features, const torch::Tensor& labels,
                       std::int64_t batch_size, std::uint64_t seed, bool shuffle, bool drop_last) {
             return std::make_shared<distill::TensorDataset>(
                 features, labels, shuffle_config(batch_size, seed, shuffle, drop_last));
           }),
           py::arg("features"), py::arg("labels"), py::kw_only(), py::arg("batch_size") = 32,
           py::arg("seed") = 0, py::arg("shuffle") = true, py::arg("drop_last") = false)
      .def_property_readonly("size", &distill::TensorDataset::size)
      .def("__len__", &distill::TensorDataset::size);

  py::class_<distill::NoiseSource, BatchSource, std::shared_ptr<distill::NoiseSource>>(
      m, "NoiseSource",
      "Uniform noise inputs [batch_size, features] in [low, high] for auxiliary-logit KD,\n"
      "seeded by (seed, step); targets undefined.")
      .def(py::init([](std::int64_t features, std::int64_t batch_size, double low, double high,
                       std::uint64_t seed, std::int64_t steps_per_epoch, const py::object& dtype,
                       const py::object& device) {
             distill::NoiseConfig c;
             c.features = features;
             c.batch_size = batch_size;
             c.low = low;
             c.high = high;
             c.seed = seed;
             c.steps_per_epoch = steps_per_epoch;
             if (!dtype.is_none()) {
               if (!THPDtype_Check(dtype.ptr())) {
                 throw WrongType("dtype: expected a torch.dtype");
               }
               c.dtype = reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
             }
             if (!device.is_none()) {
               c.device = THPDevice_Check(device.ptr())
                              ? available_device(reinterpret_cast<THPDevice*>(device.ptr())->device)
                              : parse_available_device(device.cast<std::string>());
             }
             return std::make_shared<distill::NoiseSource>(c);
           }),
           py::arg("features"), py::kw_only(), py::arg("batch_size") = 32, py::arg("low") = -1.0,
           py::arg("high") = 1.0, py::arg("seed") = 0, py::arg("steps_per_epoch") = 1,
           py::arg("dtype") = py::none(), py::arg("device") = py::none());
}

}  // namespace

void bind_datasets(py::module_& m) {
  bind_batch(m);
  bind_sources(m);

  m.def(
      "make_example",
      [](const std::vector<std::int64_t>& prompt_ids,
         const std::vector<std::int64_t>& completion_ids, std::optional<std::int64_t> eos_id,
         std::int64_t max_tokens, const std::string& truncation) -> std::optional<ExampleTuple> {
        const auto ex = distill::make_example(prompt_ids, completion_ids,
                                              tokenize_options(eos_id, max_tokens, truncation));
        if (!ex) return std::nullopt;
        return to_tuple(*ex);
      },
      py::arg("prompt_ids"), py::arg("completion_ids"), py::arg("eos_id") = py::none(),
      py::arg("max_tokens") = 0, py::arg("truncation") = "error",
      "(tokens, completion flags) of prompt + completion (+ EOS), truncated by policy; None\n"
      "when 'drop' skips it.");
  m.def(
      "tokenize_records",
      [](const io::Tokenizer& tokenizer,
         const std::vector<std::pair<std::string, std::string>>& records,
         std::optional<std::int64_t> eos_id, std::int64_t max_tokens, const std::string& truncation,
         int num_threads) {
        std::vector<io::Record> rs;
        rs.reserve(records.size());
        for (const auto& [p, c] : records) rs.push_back(io::Record{p, c, ""});
        const auto options = tokenize_options(eos_id, max_tokens, truncation);
        distill::TokenizeStats stats;
        std::vector<TokenizedExample> examples;
        {
          py::gil_scoped_release release;
          examples = distill::tokenize_records(tokenizer, rs, options, &stats, num_threads);
        }
        std::vector<ExampleTuple> out;
        out.reserve(examples.size());
        for (const auto& ex : examples) out.push_back(to_tuple(ex));
        py::dict counts;
        counts["examples"] = stats.examples;
        counts["truncated"] = stats.truncated;
        counts["dropped"] = stats.dropped;
        return py::make_tuple(out, counts);
      },
      py::arg("tokenizer"), py::arg("records"), py::arg("eos_id") = py::none(),
      py::arg("max_tokens") = 0, py::arg("truncation") = "error", py::arg("num_threads") = 0,
      "([(tokens, completion flags)], {examples, truncated, dropped}) from (prompt, completion)\n"
      "pairs, prompt and completion encoded separately.");
  m.def(
      "collate",
      [](const std::vector<ExampleTuple>& examples, std::int64_t pad_id, std::int64_t pad_to) {
        return distill::collate(to_examples(examples), pad_id, pad_to);
      },
      py::arg("examples"), py::arg("pad_id") = 0, py::arg("pad_to") = 0,
      "A right-padded Batch: input tokens[:-1], targets tokens[1:], loss on completion targets.");
  m.def(
      "pack_examples",
      [](const std::vector<ExampleTuple>& examples, std::int64_t block_length,
         std::int64_t pad_id) {
        return blocks_dict(distill::pack_examples(to_examples(examples), block_length, pad_id));
      },
      py::arg("examples"), py::arg("block_length"), py::arg("pad_id") = 0,
      "Examples concatenated and cut into blocks of block_length positions: dict of input,\n"
      "targets, attention_mask, loss_mask [N_blocks, block_length].");
  m.def("epoch_permutation", &distill::epoch_permutation, py::arg("n"), py::arg("seed"),
        py::arg("epoch"),
        "The order of epoch `epoch`: a permutation of 0..n-1 from (seed, epoch).");
  m.def(
      "batch_indices",
      [](std::int64_t n, std::int64_t step, std::int64_t batch_size, std::uint64_t seed,
         bool shuffle, bool drop_last) {
        return distill::batch_indices(n, shuffle_config(batch_size, seed, shuffle, drop_last),
                                      step);
      },
      py::arg("n"), py::arg("step"), py::kw_only(), py::arg("batch_size") = 32, py::arg("seed") = 0,
      py::arg("shuffle") = true, py::arg("drop_last") = false,
      "The example indices of batch `step`.");
}

}  // namespace libtransfer::bindings
