// biastransfer._C: the weight test (libtransfer/detect/weight_test.h): sources from dicts of
// tensors or safetensors paths, explicit groups as dicts, results as dicts (the Python module
// turns them into dataclasses, so no C++ class is registered here).
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "detect_dicts.h"
#include "device.h"
#include "libtransfer/detect/grouping.h"
#include "libtransfer/detect/state_source.h"
#include "libtransfer/detect/weight_test.h"
#include "libtransfer/errors.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using detect::StateSourcePtr;
using Metadata = std::map<std::string, std::string>;

std::string type_name(const py::handle& value) { return Py_TYPE(value.ptr())->tp_name; }

// A dict {str: Tensor} (insertion order kept) or a path / list of paths to safetensors files.
StateSourcePtr make_source(const py::object& object, const std::string& argument,
                           const Metadata& metadata) {
  if (py::isinstance<py::str>(object)) {
    const auto path = object.cast<std::string>();
    py::gil_scoped_release release;
    return detect::state_from_safetensors({path});
  }
  if (py::isinstance<py::list>(object) || py::isinstance<py::tuple>(object)) {
    std::vector<std::string> paths;
    for (const auto& item : object) {
      if (!py::isinstance<py::str>(item)) {
        throw WrongType(argument +
                        ": expected a list of safetensors paths (str), got an item of "
                        "type " +
                        type_name(item));
      }
      paths.push_back(item.cast<std::string>());
    }
    py::gil_scoped_release release;
    return detect::state_from_safetensors(paths);
  }
  if (py::isinstance<py::dict>(object)) {
    models::NamedTensors tensors;
    for (const auto& [key, value] : object.cast<py::dict>()) {
      if (!py::isinstance<py::str>(key)) {
        throw WrongType(argument + ": keys must be str, got " + type_name(key));
      }
      if (!THPVariable_Check(value.ptr())) {
        throw WrongType(argument + "['" + key.cast<std::string>() +
                        "']: expected a torch.Tensor, "
                        "got " +
                        type_name(value));
      }
      tensors.emplace_back(key.cast<std::string>(), value.cast<torch::Tensor>());
    }
    return detect::state_from_tensors(std::move(tensors), metadata, "model " + argument);
  }
  throw WrongType(argument + ": expected a dict of tensors or safetensors path(s), got " +
                  type_name(object));
}

// [{"name": str, "kind": str, "units": int, "members": [(tensor, axis), ...]}, ...]
std::vector<detect::UnitGroup> parse_groups(const std::optional<py::list>& groups) {
  std::vector<detect::UnitGroup> out;
  if (!groups) return out;
  for (const auto& item : *groups) {
    if (!py::isinstance<py::dict>(item)) {
      throw WrongType("groups: expected dicts with name, kind, units, members; got " +
                      type_name(item));
    }
    const auto d = item.cast<py::dict>();
    detect::UnitGroup g;
    if (d.contains("name")) g.name = d["name"].cast<std::string>();
    if (d.contains("kind")) g.kind = d["kind"].cast<std::string>();
    if (d.contains("units") && !d["units"].is_none()) g.units = d["units"].cast<std::int64_t>();
    if (!d.contains("members")) throw InvalidInput("groups: group '" + g.name + "' has no members");
    for (const auto& m : d["members"]) {
      const auto pair = m.cast<std::pair<std::string, std::int64_t>>();
      g.members.push_back({pair.first, pair.second});
    }
    out.push_back(std::move(g));
  }
  return out;
}

torch::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return torch::kFloat;
  if (name == "float64") return torch::kDouble;
  throw InvalidInput("compute_dtype: expected 'float32' or 'float64', got '" + name + "'");
}

std::optional<torch::Device> parse_device(const std::optional<std::string>& device) {
  if (!device) return std::nullopt;
  return parse_available_device(*device);
}

py::dict group_dict(const detect::UnitGroup& g) {
  py::dict d;
  d["name"] = g.name;
  d["kind"] = g.kind;
  d["units"] = g.units;
  py::list members;
  for (const auto& m : g.members) members.append(py::make_tuple(m.tensor, m.axis));
  d["members"] = members;
  d["skip_reason"] = g.skip_reason;
  return d;
}

}  // namespace

void bind_detect_weights(py::module_& m) {
  m.def(
      "weight_test",
      [](const py::object& a, const py::object& b, const Metadata& mapping,
         const std::optional<py::list>& groups, const std::string& statistic, bool align_embeddings,
         std::int64_t n_heads, const std::string& solver, const std::string& compute_dtype,
         const std::optional<std::string>& device, const Metadata& metadata_a,
         const Metadata& metadata_b, bool robust, std::int64_t auto_exact_max_units) {
        detect::WeightTestOptions options;
        options.robust = robust;
        options.auto_exact_max_units = auto_exact_max_units;
        options.mapping = mapping;
        options.groups = parse_groups(groups);
        options.statistic = detect::parse_weight_statistic(statistic);
        options.align_embeddings = align_embeddings;
        options.n_heads = n_heads;
        options.solver = detect::parse_assignment_solver(solver);
        options.compute_dtype = parse_dtype(compute_dtype);
        options.device = parse_device(device);
        const auto source_a = make_source(a, "a", metadata_a);
        const auto source_b = make_source(b, "b", metadata_b);
        detect::TestResult result;
        {
          py::gil_scoped_release release;
          result = detect::weight_test(*source_a, *source_b, options);
        }
        return result_dict(result);
      },
      py::arg("a"), py::arg("b"), py::arg("mapping") = Metadata{}, py::arg("groups") = py::none(),
      py::arg("statistic") = "fixed_points", py::arg("align_embeddings") = false,
      py::arg("n_heads") = 0, py::arg("solver") = "auto", py::arg("compute_dtype") = "float32",
      py::arg("device") = py::none(), py::arg("metadata_a") = Metadata{},
      py::arg("metadata_b") = Metadata{}, py::arg("robust") = false,
      py::arg("auto_exact_max_units") = detect::kAutoExactMaxUnits,
      "The weight test of shared initialization on two models given as dicts {name: Tensor} or\n"
      "safetensors path(s): per-group unit matching (solver 'auto': exact up to\n"
      "auto_exact_max_units units, greedy above), per-group p-values (fixed points, one-sided\n"
      "Spearman, or agreement of two independent matchings; robust=True adds agreement rows to an\n"
      "identity statistic), Fisher's combination. Returns a dict\n"
      "(test, ran, statistic, log10_p, method, layers: [dict per group]). See weight_test.h.");
  m.def(
      "weight_agreement_test",
      [](const py::object& a, const py::object& b, const py::list& controls,
         const Metadata& mapping, std::int64_t n_heads, bool align_embeddings,
         const std::string& solver, const Metadata& metadata_a, const Metadata& metadata_b,
         const std::vector<Metadata>& metadata_controls) {
        detect::WeightTestOptions options;
        options.mapping = mapping;
        options.n_heads = n_heads;
        options.align_embeddings = align_embeddings;
        options.solver = detect::parse_assignment_solver(solver);
        const auto source_a = make_source(a, "a", metadata_a);
        const auto source_b = make_source(b, "b", metadata_b);
        std::vector<StateSourcePtr> owned;
        std::vector<const detect::StateSource*> control_sources;
        for (std::size_t i = 0; i < controls.size(); ++i) {
          const Metadata meta = i < metadata_controls.size() ? metadata_controls[i] : Metadata{};
          owned.push_back(make_source(controls[i], "controls[" + std::to_string(i) + "]", meta));
          control_sources.push_back(owned.back().get());
        }
        detect::TestResult result;
        {
          py::gil_scoped_release release;
          result = detect::weight_agreement_test(*source_a, *source_b, control_sources, options);
        }
        return result_dict(result);
      },
      py::arg("a"), py::arg("b"), py::arg("controls"), py::arg("mapping") = Metadata{},
      py::arg("n_heads") = 0, py::arg("align_embeddings") = false, py::arg("solver") = "auto",
      py::arg("metadata_a") = Metadata{}, py::arg("metadata_b") = Metadata{},
      py::arg("metadata_controls") = std::vector<Metadata>{},
      "The agreement statistic of the weight test calibrated by control models (dicts or\n"
      "safetensors paths, like a and b): p = (1 + #{X_control >= X}) / (1 + n). Detects copies\n"
      "whose hidden units were permuted. See weight_test.h.");
  m.def(
      "weight_permutation_test",
      [](const py::object& a, const py::object& b, const py::object& statistic,
         std::int64_t permutations, std::uint64_t seed, const Metadata& mapping,
         const std::optional<py::list>& groups, std::int64_t n_heads, const std::string& solver,
         const std::string& compute_dtype, const std::optional<std::string>& device,
         const Metadata& metadata_a, const Metadata& metadata_b,
         std::int64_t auto_exact_max_units) {
        detect::PermutationTestOptions options;
        options.auto_exact_max_units = auto_exact_max_units;
        options.mapping = mapping;
        options.groups = parse_groups(groups);
        options.n_heads = n_heads;
        options.permutations = permutations;
        options.seed = seed;
        options.solver = detect::parse_assignment_solver(solver);
        options.compute_dtype = parse_dtype(compute_dtype);
        options.device = parse_device(device);
        if (py::isinstance<py::str>(statistic)) {
          options.statistic = detect::parse_permutation_statistic(statistic.cast<std::string>());
        } else if (PyCallable_Check(statistic.ptr())) {
          const py::object fn = statistic;
          options.custom_name =
              py::hasattr(fn, "__name__") ? fn.attr("__name__").cast<std::string>() : "custom";
          options.custom = [fn](const models::NamedTensors& x, const models::NamedTensors& y) {
            py::gil_scoped_acquire acquire;
            py::dict dx, dy;
            for (const auto& [n, t] : x) dx[py::str(n)] = t;
            for (const auto& [n, t] : y) dy[py::str(n)] = t;
            return fn(dx, dy).cast<double>();
          };
        } else {
          throw WrongType(
              "statistic: expected 'identity_cosine', 'matched_similarity' or a "
              "callable(a: dict, b: dict) -> float, got " +
              type_name(statistic));
        }
        const auto source_a = make_source(a, "a", metadata_a);
        const auto source_b = make_source(b, "b", metadata_b);
        detect::TestResult result;
        {
          py::gil_scoped_release release;
          result = detect::weight_permutation_test(*source_a, *source_b, options);
        }
        return result_dict(result);
      },
      py::arg("a"), py::arg("b"), py::arg("statistic") = "identity_cosine",
      py::arg("permutations") = detect::kDefaultWeightPermutations, py::arg("seed") = 0,
      py::arg("mapping") = Metadata{}, py::arg("groups") = py::none(), py::arg("n_heads") = 0,
      py::arg("solver") = "auto", py::arg("compute_dtype") = "float32",
      py::arg("device") = py::none(), py::arg("metadata_a") = Metadata{},
      py::arg("metadata_b") = Metadata{},
      py::arg("auto_exact_max_units") = detect::kAutoExactMaxUnits,
      "Exact permutation test (PERMTEST) of a statistic of two states: p = (1 + #{phi(sigma A,\n"
      "B) >= phi(A, B)}) / (T + 1), sigma permuting A's units in every group (seeded). statistic:\n"
      "'identity_cosine', 'matched_similarity' or callable(a: dict, b: dict) -> float.");
  m.def(
      "weight_groups",
      [](const py::object& a, const std::optional<py::list>& groups, std::int64_t n_heads,
         const Metadata& metadata) {
        const auto source = make_source(a, "a", metadata);
        const auto parsed = parse_groups(groups);
        const auto layout = parsed.empty()
                                ? detect::detect_layout(source->tensors(), source->metadata(),
                                                        detect::LayoutOptions{n_heads})
                                : detect::explicit_layout(parsed, source->tensors());
        py::dict d;
        d["architecture"] = layout.architecture;
        py::list list;
        for (const auto& g : layout.groups) list.append(group_dict(g));
        d["groups"] = list;
        d["residual"] = group_dict(layout.residual);
        d["notes"] = layout.notes;
        return d;
      },
      py::arg("a"), py::arg("groups") = py::none(), py::arg("n_heads") = 0,
      py::arg("metadata") = Metadata{},
      "The unit groups the weight test would use for a model (dict or safetensors path(s)):\n"
      "{architecture, groups: [{name, kind, units, members: [(tensor, axis)], skip_reason}],\n"
      "residual, notes}. Names and shapes only; no tensor data is read.");
  m.def(
      "spearman_identity_test",
      [](const std::vector<std::int64_t>& perm) {
        const auto s = detect::spearman_identity_test(perm);
        return py::make_tuple(s.rho, s.log10_p, s.exact);
      },
      py::arg("perm"),
      "Spearman's rho between a permutation and the identity and the one-sided log10 p-value\n"
      "P(rho* >= rho) under uniform random permutations: (rho, log10_p, exact).");
  m.def("fixed_points_log10_p", &detect::fixed_points_log10_p, py::arg("fixed_points"),
        "log10 min(1, 1/k!): the weight test's fixed-point p-value bound.");
  m.def("fixed_points_tail_log10_p", &detect::fixed_points_tail_log10_p, py::arg("k"), py::arg("n"),
        "log10 P(K >= k) exactly for the fixed points K of a uniform random permutation of n:\n"
        "the agreement statistic's null.");
}

}  // namespace libtransfer::bindings
