// biastransfer._C: activation, output and susceptibility tests and the detection report
// (libtransfer/detect/{activation_test,output_test,susceptibility,report}.h). Results cross as
// dicts (like the weight test's), which biastransfer.detect_api turns into dataclasses.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "detect_dicts.h"
#include "libtransfer/detect/activation_test.h"
#include "libtransfer/detect/output_test.h"
#include "libtransfer/detect/report.h"
#include "libtransfer/detect/susceptibility.h"
#include "libtransfer/errors.h"
#include "model_caster.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

std::string type_name(const py::handle& value) { return Py_TYPE(value.ptr())->tp_name; }

torch::Tensor optional_tensor(const std::optional<torch::Tensor>& t) {
  return t ? *t : torch::Tensor();
}

std::vector<models::ModelPtr> to_models(const std::optional<py::sequence>& objects,
                                        const std::string& argument) {
  std::vector<models::ModelPtr> out;
  if (!objects) return out;
  for (std::size_t i = 0; i < objects->size(); ++i) {
    out.push_back(to_model((*objects)[i], argument + "[" + std::to_string(i) + "]"));
  }
  return out;
}

template <typename T>
T get(const py::dict& d, const char* key, const T& fallback, const std::string& where) {
  if (!d.contains(key) || d[key].is_none()) return fallback;
  try {
    return d[key].cast<T>();
  } catch (const py::cast_error&) {
    throw WrongType(where + "['" + key + "']: unexpected type " + type_name(d[key]));
  }
}

// The inverse of result_dict (unknown keys are ignored; missing ones take their defaults).
detect::TestResult result_from(const py::handle& item, std::size_t index) {
  const std::string where = "tests[" + std::to_string(index) + "]";
  if (!py::isinstance<py::dict>(item)) {
    throw WrongType(where + ": expected a dict, got " + type_name(item));
  }
  const auto d = item.cast<py::dict>();
  detect::TestResult r;
  r.test = get<std::string>(d, "test", "", where);
  r.ran = get<bool>(d, "ran", false, where);
  r.skipped_reason = get<std::string>(d, "skipped_reason", "", where);
  r.statistic = get<double>(d, "statistic", 0.0, where);
  r.statistic_name = get<std::string>(d, "statistic_name", "", where);
  r.log10_p = get<double>(d, "log10_p", 0.0, where);
  r.method = get<std::string>(d, "method", "", where);
  if (d.contains("layers") && !d["layers"].is_none()) {
    std::size_t j = 0;
    for (const auto& layer : d["layers"]) {
      const std::string lw = where + "['layers'][" + std::to_string(j++) + "]";
      if (!py::isinstance<py::dict>(layer)) throw WrongType(lw + ": expected a dict");
      const auto l = layer.cast<py::dict>();
      detect::LayerEvidence e;
      e.name = get<std::string>(l, "name", "", lw);
      e.kind = get<std::string>(l, "kind", "", lw);
      e.units = get<std::int64_t>(l, "units", 0, lw);
      e.statistic = get<double>(l, "statistic", 0.0, lw);
      e.statistic_name = get<std::string>(l, "statistic_name", "", lw);
      e.log10_p = get<double>(l, "log10_p", 0.0, lw);
      e.matched_fraction = get<double>(l, "matched_fraction", 0.0, lw);
      e.note = get<std::string>(l, "note", "", lw);
      r.layers.push_back(std::move(e));
    }
  }
  return r;
}

py::object optional_number(const std::optional<double>& x) { return x ? py::cast(*x) : py::none(); }

}  // namespace

void bind_detect_probes(py::module_& m) {
  m.def("fixed_points_log10_sf", &detect::fixed_points_log10_sf, py::arg("n"), py::arg("k"),
        "log10 P(K >= k) for the fixed points K of a uniform random permutation of n items\n"
        "(exact, rencontres numbers in log space).");
  m.def("column_correlations", &detect::column_correlations, py::arg("x"), py::arg("y"),
        "Pearson correlations [n, m] (float64) of the columns of x [N, n] with those of y [N, m].");
  m.def("random_direction_cosine_log10_sf", &detect::random_direction_cosine_log10_sf,
        py::arg("cosine"), py::arg("dimension"),
        "log10 P(cos >= c) for the cosine of a fixed vector with a uniform random direction in\n"
        "R^D: (cos + 1) / 2 ~ Beta((D-1)/2, (D-1)/2). Finite far below 1e-308.");
  m.def(
      "random_direction_cosines",
      [](const torch::Tensor& direction, std::int64_t count, std::uint64_t seed) {
        py::gil_scoped_release release;
        return detect::random_direction_cosines(direction, count, seed);
      },
      py::arg("direction"), py::arg("count"), py::arg("seed") = 0,
      "Cosines float64 [count] of `direction` with seeded Gaussian random directions.");

  m.def(
      "default_probe_inputs",
      [](const py::object& model, std::int64_t rows, std::int64_t length, std::uint64_t seed) {
        const auto m = to_model(model, "model");
        py::gil_scoped_release release;
        return detect::default_probe_inputs(*m, rows, length, seed);
      },
      py::arg("model"), py::arg("rows") = detect::kDefaultProbeRows,
      py::arg("length") = detect::kDefaultProbeLength, py::arg("seed") = 0,
      "Seeded probe inputs for `model` on its device: features [rows, F] uniform in [-1, 1) or\n"
      "token ids [rows, length] uniform over the vocabulary.");

  m.def(
      "activation_test",
      [](const py::object& a, const py::object& b, const torch::Tensor& input,
         const std::optional<torch::Tensor>& attention_mask,
         const std::optional<py::sequence>& controls, bool greedy) {
        const auto ma = to_model(a, "a");
        const auto mb = to_model(b, "b");
        const auto mc = to_models(controls, "controls");
        detect::ActivationTestConfig config;
        config.greedy = greedy;
        detect::ActivationTestResult r;
        {
          py::gil_scoped_release release;
          r = detect::activation_test(*ma, *mb, input, optional_tensor(attention_mask), mc, config);
        }
        py::dict d = result_dict(r.test);
        d["control_statistics"] = r.control_statistics;
        d["fisher_statistic"] = r.fisher_statistic;
        return d;
      },
      py::arg("a"), py::arg("b"), py::arg("input"), py::arg("attention_mask") = py::none(),
      py::arg("controls") = py::none(), py::arg("greedy") = false,
      "Activation test of a and b (models exposing hidden_activations) on `input`: per group,\n"
      "gate/up matching agreements (GLU) or fixed points of the activation matching. Controls:\n"
      "models independent of a (empirical p with +1). Returns a TestResult dict plus\n"
      "control_statistics and fisher_statistic.");

  m.def(
      "output_test",
      [](const py::object& a, const py::object& b, const std::optional<torch::Tensor>& input,
         const std::optional<torch::Tensor>& attention_mask,
         const std::optional<py::sequence>& controls, std::uint64_t seed) {
        const auto ma = to_model(a, "a");
        const auto mb = to_model(b, "b");
        const auto mc = to_models(controls, "controls");
        detect::OutputTestResult r;
        {
          py::gil_scoped_release release;
          r = detect::output_test(*ma, *mb, optional_tensor(input), optional_tensor(attention_mask),
                                  mc, seed);
        }
        py::dict d = result_dict(r.test);
        d["correlation"] = r.correlation;
        d["control_correlations"] = r.control_correlations;
        d["z"] = std::isnan(r.z) ? py::object(py::none()) : py::cast(r.z);
        return d;
      },
      py::arg("a"), py::arg("b"), py::arg("input") = py::none(),
      py::arg("attention_mask") = py::none(), py::arg("controls") = py::none(), py::arg("seed") = 0,
      "Correlation of a's and b's per-position-centered logits on `input` (default: seeded\n"
      "noise features or random tokens). p only with controls: (1 + #{r_c >= r}) / (1 + n).\n"
      "Returns a TestResult dict plus correlation, control_correlations and z.");

  m.def(
      "susceptibility_probe",
      [](const py::object& student, const py::object& teacher,
         const std::optional<torch::Tensor>& input,
         const std::optional<torch::Tensor>& attention_mask,
         const std::optional<py::sequence>& controls, const py::object& trait_loss,
         const std::string& divergence, double temperature,
         const std::vector<std::int64_t>& logit_subset, double step_size,
         std::int64_t random_directions, std::uint64_t seed) {
        const auto ms = to_model(student, "student");
        const auto mt = to_model(teacher, "teacher");
        const auto mc = to_models(controls, "controls");
        detect::SusceptibilityConfig config;
        config.kd.divergence = distill::parse_divergence(divergence);
        config.kd.temperature = temperature;
        config.kd.logit_subset = logit_subset;
        config.step_size = step_size;
        config.random_directions = random_directions;
        config.seed = seed;
        detect::TraitLoss trait;
        if (!trait_loss.is_none()) {
          if (!PyCallable_Check(trait_loss.ptr())) {
            throw WrongType("trait_loss: expected a callable (model -> scalar tensor), got " +
                            type_name(trait_loss));
          }
          // Called with the student as the caller gave it (their module or bound model), whose
          // parameters are the ones the probe differentiates.
          trait = [trait_loss, student](models::Model&) {
            py::gil_scoped_acquire gil;
            const py::object out = trait_loss(student);
            if (!THPVariable_Check(out.ptr())) {
              throw WrongType("trait_loss: must return a scalar torch.Tensor, got " +
                              type_name(out));
            }
            return out.cast<torch::Tensor>();
          };
        }
        detect::SusceptibilityResult r;
        {
          py::gil_scoped_release release;
          r = detect::susceptibility_probe(*ms, *mt, optional_tensor(input),
                                           optional_tensor(attention_mask), mc, trait, config);
        }
        py::dict d = result_dict(r.test);
        d["cosine"] = r.cosine;
        d["gradient_norm"] = r.gradient_norm;
        d["difference_norm"] = r.difference_norm;
        d["dimension"] = r.dimension;
        py::list tensors;
        for (const auto& t : r.tensors) {
          tensors.append(py::make_tuple(t.name, t.numel, t.cosine));
        }
        d["tensors"] = tensors;
        d["control_cosines"] = r.control_cosines;
        d["predicted_trait_change"] = optional_number(r.predicted_trait_change);
        d["trait_loss"] = optional_number(r.trait_loss);
        d["random_cosines"] =
            r.random_cosines.defined() ? py::cast(r.random_cosines) : py::object(py::none());
        d["random_direction_log10_p"] = r.random_direction_log10_p;
        return d;
      },
      py::arg("student"), py::arg("teacher"), py::arg("input") = py::none(),
      py::arg("attention_mask") = py::none(), py::arg("controls") = py::none(),
      py::arg("trait_loss") = py::none(), py::arg("divergence") = "forward_kl",
      py::arg("temperature") = 1.0, py::arg("logit_subset") = std::vector<std::int64_t>{},
      py::arg("step_size") = 1e-3, py::arg("random_directions") = 0, py::arg("seed") = 0,
      "cos(-g, theta_T - theta_S) for the student's KD gradient g toward the teacher on `input`\n"
      "(default: seeded probes), over all parameters and per tensor; with trait_loss (student\n"
      "-> scalar) the predicted trait-loss change -step_size <grad L_trait, g>. Controls:\n"
      "teachers independent of the student (empirical p with +1); otherwise the approximate\n"
      "random-direction p. Returns a TestResult dict plus the numbers above.");

  m.def(
      "detection_report",
      [](const py::sequence& tests, double alpha) {
        std::vector<detect::TestResult> parsed;
        for (std::size_t i = 0; i < tests.size(); ++i) parsed.push_back(result_from(tests[i], i));
        const detect::DetectionReport r = detect::make_report(std::move(parsed), alpha);
        py::dict d;
        d["alpha"] = r.alpha;
        d["verdict"] = detect::to_string(r.verdict);
        d["combined_log10_p"] = r.combined_log10_p;
        d["combination"] = r.combination;
        d["combined_tests"] = r.combined_tests;
        py::list out;
        for (const auto& t : r.tests) out.append(result_dict(t));
        d["tests"] = out;
        d["text"] = r.to_text();
        d["json"] = r.to_json();
        return d;
      },
      py::arg("tests"), py::arg("alpha") = detect::kDefaultAlpha,
      "The detection report of TestResult dicts: Bonferroni min-p over the calibrated tests,\n"
      "the verdict at alpha ('shared', 'not shared', 'inconclusive'), its text and JSON.");
}

}  // namespace libtransfer::bindings
