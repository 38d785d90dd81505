// biastransfer._C: training losses (libtransfer/distill/losses.h) and trait evaluation
// (libtransfer/distill/evaluation.h).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "libtransfer/distill/evaluation.h"
#include "libtransfer/distill/losses.h"
#include "libtransfer/errors.h"
#include "model_caster.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using distill::KDConfig;

torch::Tensor or_undefined(const std::optional<torch::Tensor>& t) {
  return t.has_value() ? *t : torch::Tensor();
}

// None, a sequence of ints or a 1-D integer tensor.
std::vector<int64_t> index_list(const py::object& object, const char* name) {
  if (object.is_none()) return {};
  if (THPVariable_Check(object.ptr())) {
    const auto tensor = object.cast<torch::Tensor>();
    if (!at::isIntegralType(tensor.scalar_type(), /*includeBool=*/false) || tensor.dim() != 1) {
      throw WrongType(std::string(name) + ": expected a 1-D integer tensor, got " +
                      std::string(c10::toString(tensor.scalar_type())) + " of shape " +
                      c10::str(tensor.sizes()));
    }
    const auto ids = tensor.to(torch::kCPU, torch::kLong).contiguous();
    return {ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel()};
  }
  try {
    return object.cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw WrongType(std::string(name) +
                    ": expected None, a list of ints or a 1-D integer tensor, got " +
                    std::string(Py_TYPE(object.ptr())->tp_name));
  }
}

// A loss that comes out NaN because an input holds NaN is refused naming that input, instead of
// being returned for a training loop to stumble on later. Costs one scalar read (a device sync)
// per call; the inputs are scanned only when the loss is NaN.
torch::Tensor refuse_nan(
    torch::Tensor loss,
    std::initializer_list<std::pair<const char*, const torch::Tensor*>> inputs) {
  if (!loss.defined() || !loss.detach().isnan().any().item<bool>()) return loss;
  for (const auto& [name, tensor] : inputs) {
    if (tensor == nullptr || !tensor->defined() || !tensor->is_floating_point()) continue;
    const auto nan = tensor->detach().isnan().reshape(-1);
    const auto count = nan.sum().item<int64_t>();
    if (count == 0) continue;
    const auto first = nan.nonzero().select(1, 0)[0].item<int64_t>();
    throw InvalidInput(std::string(name) + ": holds " + std::to_string(count) +
                       " NaN value(s) (the first at flat index " + std::to_string(first) +
                       " of shape " + c10::str(tensor->sizes()) +
                       "), so the loss is NaN; mask those positions out or fix the model");
  }
  std::string names;
  for (const auto& [name, tensor] : inputs) {
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  throw InvalidInput("the loss is NaN although " + names +
                     " hold no NaN: +inf logits (or -inf at every token of a position) make "
                     "the divergence undefined");
}

KDConfig make_config(const std::string& divergence, double temperature, double beta, int64_t top_k,
                     const py::object& logit_subset) {
  KDConfig config;
  config.divergence = distill::parse_divergence(divergence);
  config.temperature = temperature;
  config.beta = beta;
  config.top_k = top_k;
  config.logit_subset = index_list(logit_subset, "logit_subset");
  return config;
}

void bind_kd_config(py::module_& m) {
  py::class_<KDConfig>(m, "KDConfig",
                       "Logit distillation settings (see biastransfer.losses.KDConfig).")
      .def(py::init(&make_config), py::arg("divergence") = "forward_kl",
           py::arg("temperature") = 1.0, py::arg("beta") = 0.5, py::arg("top_k") = 0,
           py::arg("logit_subset") = py::none())
      .def_property(
          "divergence", [](const KDConfig& c) { return distill::to_string(c.divergence); },
          [](KDConfig& c, const std::string& name) {
            c.divergence = distill::parse_divergence(name);
          },
          "'forward_kl' | 'reverse_kl' | 'jsd'.")
      .def_readwrite("temperature", &KDConfig::temperature)
      .def_readwrite("beta", &KDConfig::beta)
      .def_readwrite("top_k", &KDConfig::top_k)
      .def_readwrite("logit_subset", &KDConfig::logit_subset)
      .def("__repr__", [](const KDConfig& c) {
        return "KDConfig(divergence='" + distill::to_string(c.divergence) +
               "', temperature=" + c10::str(c.temperature) + ", beta=" + c10::str(c.beta) +
               ", top_k=" + c10::str(c.top_k) +
               ", logit_subset=" + c10::str(c.logit_subset.size()) + " indices)";
      });
}

void bind_loss_functions(py::module_& m) {
  m.def(
      "completion_cross_entropy",
      [](const torch::Tensor& logits, const torch::Tensor& targets,
         const std::optional<torch::Tensor>& mask) {
        py::gil_scoped_release release;
        return refuse_nan(distill::completion_cross_entropy(logits, targets, or_undefined(mask)),
                          {{"logits", &logits}});
      },
      py::arg("logits"), py::arg("targets"), py::arg("mask") = py::none(),
      "Mean cross-entropy of logits [..., V] against int targets [...] over positions where\n"
      "mask [...] != 0 (None: all). float32 result (float64 for float64 logits); differentiable.\n"
      "ValueError naming the input when NaN logits make the loss NaN.");
  m.def(
      "kd_loss",
      [](const torch::Tensor& student_logits, const torch::Tensor& teacher_logits,
         const std::optional<torch::Tensor>& mask, const std::string& divergence,
         double temperature, double beta, int64_t top_k, const py::object& logit_subset) {
        const auto config = make_config(divergence, temperature, beta, top_k, logit_subset);
        py::gil_scoped_release release;
        return refuse_nan(
            distill::kd_loss(student_logits, teacher_logits, or_undefined(mask), config),
            {{"student_logits", &student_logits}, {"teacher_logits", &teacher_logits}});
      },
      py::arg("student_logits"), py::arg("teacher_logits"), py::arg("mask") = py::none(),
      py::arg("divergence") = "forward_kl", py::arg("temperature") = 1.0, py::arg("beta") = 0.5,
      py::arg("top_k") = 0, py::arg("logit_subset") = py::none(),
      "tau^2 * D(p_T^tau, p_S^tau) averaged over positions where mask != 0. Logits [..., V]\n"
      "(same shape); divergence 'forward_kl' (KL(T||S)), 'reverse_kl' (KL(S||T)) or 'jsd'\n"
      "(generalized JSD(beta)); top_k > 0: the teacher's top-k tokens plus a tail bucket;\n"
      "logit_subset: softmax over only those logits. Differentiable in the student only.\n"
      "ValueError naming the input when NaN logits make the loss NaN.");
  m.def(
      "topk_kd_loss",
      [](const torch::Tensor& student_logits, const torch::Tensor& topk_ids,
         const torch::Tensor& topk_logprobs, const std::optional<torch::Tensor>& mask,
         const std::string& divergence, double beta, double temperature, int64_t top_k,
         const py::object& logit_subset) {
        const auto config = make_config(divergence, temperature, beta, top_k, logit_subset);
        py::gil_scoped_release release;
        return refuse_nan(distill::topk_kd_loss(student_logits, topk_ids, topk_logprobs,
                                                or_undefined(mask), config),
                          {{"student_logits", &student_logits}, {"topk_logprobs", &topk_logprobs}});
      },
      py::arg("student_logits"), py::arg("topk_ids"), py::arg("topk_logprobs"),
      py::arg("mask") = py::none(), py::arg("divergence") = "forward_kl", py::arg("beta") = 0.5,
      py::arg("temperature") = 1.0, py::arg("top_k") = 0, py::arg("logit_subset") = py::none(),
      "KD from offline teacher top-k log-probabilities (temperature 1): student_logits [..., V],\n"
      "topk_ids int [..., k], topk_logprobs [..., k]; the k tokens plus a tail bucket holding\n"
      "the remaining mass of each distribution. Averaged over positions where mask != 0.\n"
      "temperature must be 1 and top_k / logit_subset unset (accepted only to be refused).");
}

py::tuple interval(const distill::Interval& i) { return py::make_tuple(i.low, i.high); }

void bind_evaluation(py::module_& m) {
  m.def(
      "wilson_interval",
      [](int64_t successes, int64_t trials, double confidence) {
        return interval(distill::wilson_interval(successes, trials, confidence));
      },
      py::arg("successes"), py::arg("trials"), py::arg("confidence") = distill::kDefaultConfidence,
      "Wilson score interval (low, high) of a proportion successes / trials.");
  m.def(
      "t_interval",
      [](const std::vector<double>& values, double confidence) {
        return interval(distill::t_interval(values, confidence));
      },
      py::arg("values"), py::arg("confidence") = distill::kDefaultConfidence,
      "Student-t interval (low, high) for the mean of values (NaN for fewer than 2).");
  m.def(
      "target_probability",
      [](const py::object& model, const std::vector<std::vector<int64_t>>& prompts,
         const std::vector<std::vector<int64_t>>& targets, int64_t batch_size, int64_t pad_id,
         double confidence) {
        const auto lm = to_model(model, "model");
        distill::TargetProbabilityOptions options;
        options.batch_size = batch_size;
        options.pad_id = pad_id;
        options.confidence = confidence;
        distill::TargetProbability r;
        {
          py::gil_scoped_release release;
          r = distill::target_probability(*lm, prompts, targets, options);
        }
        py::dict out;
        out["per_question"] = r.per_question;
        out["mean"] = r.mean;
        out["interval"] = interval(r.interval);
        out["targets"] = r.targets;
        return out;
      },
      py::arg("model"), py::arg("prompts"), py::arg("targets"), py::arg("batch_size") = 32,
      py::arg("pad_id") = 0, py::arg("confidence") = distill::kDefaultConfidence,
      "Exact P(answer starts with any target) per prompt (token id lists), teacher-forcing\n"
      "multi-token targets; prompts left-padded in batches. Returns a dict: per_question, mean,\n"
      "interval (t-interval over questions, clipped to [0, 1]), targets (deduplicated, without\n"
      "targets that extend another target).");
  m.def(
      "sampled_rate",
      [](const std::vector<std::string>& texts, const std::vector<std::string>& targets,
         const std::vector<int64_t>& question_ids, bool plurals, double confidence) {
        distill::SampledRateOptions options;
        options.plurals = plurals;
        options.confidence = confidence;
        distill::SampledRate r;
        {
          py::gil_scoped_release release;
          r = distill::sampled_rate(texts, targets, question_ids, options);
        }
        py::dict out;
        out["hits"] = r.hits;
        out["total"] = r.total;
        out["rate"] = r.rate;
        out["interval"] = interval(r.interval);
        out["matched"] = std::vector<bool>(r.matched.begin(), r.matched.end());
        out["clusters"] = r.clusters;
        out["cluster_interval"] = interval(r.cluster_interval);
        return out;
      },
      py::arg("texts"), py::arg("targets"), py::arg("question_ids") = std::vector<int64_t>{},
      py::arg("plurals") = true, py::arg("confidence") = distill::kDefaultConfidence,
      "Fraction of texts containing a target word (whole word, ASCII case-insensitive, regular\n"
      "plurals added unless plurals=False) with a Wilson interval; with question_ids also a\n"
      "cluster-robust t-interval over questions. Returns a dict.");
  m.def("contains_word", &distill::contains_word, py::arg("text"), py::arg("words"),
        "True when text contains one of words as a whole word (ASCII case-insensitive).");
  m.def("plural_forms", &distill::plural_forms, py::arg("word"),
        "The regular English plurals sampled_rate adds for a (lower-case) word.");
  m.def(
      "accuracy",
      [](const py::object& model, const torch::Tensor& features, const torch::Tensor& labels,
         int64_t batch_size, int64_t num_classes, double confidence) {
        const auto classifier = to_model(model, "model");
        distill::AccuracyOptions options;
        options.batch_size = batch_size;
        options.num_classes = num_classes;
        options.confidence = confidence;
        distill::Accuracy r;
        {
          py::gil_scoped_release release;
          r = distill::accuracy(*classifier, features, labels, options);
        }
        py::dict out;
        out["correct"] = r.correct;
        out["total"] = r.total;
        out["accuracy"] = r.accuracy;
        out["interval"] = interval(r.interval);
        out["per_class"] = r.per_class;
        out["per_class_total"] = r.per_class_total;
        return out;
      },
      py::arg("model"), py::arg("features"), py::arg("labels"), py::arg("batch_size") = 1024,
      py::arg("num_classes") = 0, py::arg("confidence") = distill::kDefaultConfidence,
      "Classification accuracy of a feature model on features [N, F] and labels [N], argmax\n"
      "over the first num_classes logits (0: all), with a Wilson interval and per-class\n"
      "accuracy. Returns a dict.");
}

}  // namespace

void bind_losses(py::module_& m) {
  bind_kd_config(m);
  bind_loss_functions(m);
  bind_evaluation(m);
}

}  // namespace libtransfer::bindings
