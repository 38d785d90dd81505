// biastransfer._C: the sampler (libtransfer/distill/sampler.h).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "libtransfer/distill/sampler.h"
#include "model_caster.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_sampler(py::module_& m) {
  using distill::SamplerConfig;
  py::class_<SamplerConfig>(
      m, "SamplerConfig",
      "How to sample: filters in the order temperature -> threshold -> top_k -> top_p -> min_p\n"
      "(each on the renormalized result of the previous); temperature 0 = greedy.")
      .def(py::init([](double temperature, std::int64_t top_k, double top_p, double min_p,
                       double threshold, std::vector<std::int64_t> stop_tokens,
                       std::int64_t max_new_tokens, std::int64_t pad_id, std::int64_t batch_size,
                       std::uint64_t seed, bool use_cache) {
             SamplerConfig c;
             c.temperature = temperature;
             c.top_k = top_k;
             c.top_p = top_p;
             c.min_p = min_p;
             c.threshold = threshold;
             c.stop_tokens = std::move(stop_tokens);
             c.max_new_tokens = max_new_tokens;
             c.pad_id = pad_id;
             c.batch_size = batch_size;
             c.seed = seed;
             c.use_cache = use_cache;
             c.validate();
             return c;
           }),
           py::kw_only(), py::arg("temperature") = 1.0, py::arg("top_k") = 0,
           py::arg("top_p") = 1.0, py::arg("min_p") = 0.0, py::arg("threshold") = 0.0,
           py::arg("stop_tokens") = std::vector<std::int64_t>{}, py::arg("max_new_tokens") = 32,
           py::arg("pad_id") = 0, py::arg("batch_size") = 32, py::arg("seed") = 0,
           py::arg("use_cache") = true)
      .def_readwrite("temperature", &SamplerConfig::temperature)
      .def_readwrite("top_k", &SamplerConfig::top_k)
      .def_readwrite("top_p", &SamplerConfig::top_p)
      .def_readwrite("min_p", &SamplerConfig::min_p)
      .def_readwrite("threshold", &SamplerConfig::threshold)
      .def_readwrite("stop_tokens", &SamplerConfig::stop_tokens)
      .def_readwrite("max_new_tokens", &SamplerConfig::max_new_tokens)
      .def_readwrite("pad_id", &SamplerConfig::pad_id)
      .def_readwrite("batch_size", &SamplerConfig::batch_size)
      .def_readwrite("seed", &SamplerConfig::seed)
      .def_readwrite("use_cache", &SamplerConfig::use_cache)
      .def("validate", &SamplerConfig::validate);

  m.def(
      "sample",
      [](const py::object& model, const std::vector<std::vector<std::int64_t>>& prompts,
         const SamplerConfig& config) {
        const auto native = to_model(model, "model");
        distill::SampleResult result;
        {
          py::gil_scoped_release release;
          result = distill::sample_with_details(*native, prompts, config);
        }
        std::vector<std::string> reasons;
        for (const auto reason : result.stop_reasons) {
          reasons.push_back(distill::stop_reason_name(reason));
        }
        py::dict out;
        out["tokens"] = result.tokens;
        out["stop_reasons"] = reasons;
        out["logprobs"] = result.logprobs;
        return out;
      },
      py::arg("model"), py::arg("prompts"), py::arg("config"),
      "Completions of token-id prompts: {'tokens': [[int]] (without the prompt, the stop token\n"
      "included), 'stop_reasons': ['stop_token' | 'max_tokens'], 'logprobs': [[float]] (log p\n"
      "of each sampled token under the unmodified model)}. Seeded per prompt index: independent\n"
      "of batch_size and of the other prompts.");
  m.def(
      "filtered_probabilities",
      [](const torch::Tensor& logits, const SamplerConfig& config) {
        py::gil_scoped_release release;
        return distill::filtered_probabilities(logits, config);
      },
      py::arg("logits"), py::arg("config"),
      "The distribution the sampler draws from for each row of logits [B, V]: float64 [B, V].");
  m.def("sampler_uniform", &distill::sampler_uniform, py::arg("seed"), py::arg("index"),
        py::arg("step"), "The uniform number in [0, 1) used for token `step` of prompt `index`.");
}

}  // namespace libtransfer::bindings
