// biastransfer._C: filters (libtransfer/distill/text_filters.h, model_filters.h): the paper's
// number-sequence rule, banned numbers and words, regex, length, dedup, the likelihood-ratio
// filter, the pipeline run, and divergence-token masking. biastransfer/filters.py is the
// documented surface.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "libtransfer/distill/model_filters.h"
#include "libtransfer/distill/text_filters.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/tokenizer.h"
#include "model_caster.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using distill::Filter;
using distill::FilterPtr;
using distill::Sample;

// (prompt, completion, prompt_ids, completion_ids); ids may be empty.
using SampleTuple =
    std::tuple<std::string, std::string, std::vector<std::int64_t>, std::vector<std::int64_t>>;

std::vector<Sample> to_samples(const std::vector<SampleTuple>& tuples) {
  std::vector<Sample> out;
  out.reserve(tuples.size());
  for (const auto& [prompt, completion, prompt_ids, completion_ids] : tuples) {
    out.push_back(Sample{prompt, completion, prompt_ids, completion_ids});
  }
  return out;
}

py::object rejection_reason(const std::optional<distill::Rejection>& r) {
  return r ? py::object(py::str(r->reason)) : py::object(py::none());
}

distill::RegexFilter::Mode parse_mode(const std::string& mode) {
  if (mode == "reject") return distill::RegexFilter::Mode::kReject;
  if (mode == "require") return distill::RegexFilter::Mode::kRequire;
  throw InvalidInput("mode: expected 'reject' or 'require', got '" + mode + "'");
}

distill::TextField parse_field(const std::string& field) {
  if (field == "completion") return distill::TextField::kCompletion;
  if (field == "prompt") return distill::TextField::kPrompt;
  throw InvalidInput("field: expected 'completion' or 'prompt', got '" + field + "'");
}

distill::LengthUnit parse_unit(const std::string& unit) {
  if (unit == "chars" || unit == "characters") return distill::LengthUnit::kCharacters;
  if (unit == "bytes") return distill::LengthUnit::kBytes;
  if (unit == "tokens") return distill::LengthUnit::kTokens;
  throw InvalidInput("unit: expected 'chars', 'bytes' or 'tokens', got '" + unit + "'");
}

// A tokenizer for the filters: a bound Tokenizer (encoded in C++, no GIL needed), a Python
// callable str -> list[int] (called under the GIL), or None.
distill::Tokenize to_tokenize(const py::object& object, const std::string& argument) {
  if (object.is_none()) return nullptr;
  if (py::isinstance<io::Tokenizer>(object)) {
    // A copy shares the encoder tables (Tokenizer holds them by shared_ptr).
    io::Tokenizer tokenizer = object.cast<const io::Tokenizer&>();
    return [tokenizer](const std::string& text) {
      const auto ids = tokenizer.encode(text);
      return distill::TokenIds(ids.begin(), ids.end());
    };
  }
  if (py::hasattr(object, "_native")) return to_tokenize(object.attr("_native"), argument);
  if (!PyCallable_Check(object.ptr())) {
    throw WrongType(argument + ": expected a Tokenizer or a callable str -> list[int], got " +
                    std::string(Py_TYPE(object.ptr())->tp_name));
  }
  auto holder = std::make_shared<py::object>(object);
  return [holder](const std::string& text) {
    py::gil_scoped_acquire gil;
    return (*holder)(py::str(text)).cast<distill::TokenIds>();
  };
}

py::dict result_dict(const distill::FilterResult& r) {
  py::dict out;
  out["kept_indices"] = r.kept_indices;
  out["total"] = r.stats.total;
  out["kept"] = r.stats.kept;
  out["kept_fraction"] = r.stats.kept_fraction();
  py::list reasons;
  for (const auto& [code, count] : r.stats.rejected_by_reason) {
    reasons.append(py::make_tuple(code, count));
  }
  out["rejected_by_reason"] = reasons;
  py::list by_filter;
  for (const auto& [name, counts] : r.stats.by_filter) {
    by_filter.append(py::make_tuple(name, counts.first, counts.second));
  }
  out["by_filter"] = by_filter;
  py::list rejections;
  for (const auto& rej : r.rejections) {
    rejections.append(py::make_tuple(rej.index, rej.filter, rej.reason, rej.detail));
  }
  out["rejections"] = rejections;
  out["summary"] = r.stats.summary();
  return out;
}

std::vector<models::ModelPtr> to_models(const py::list& objects, const std::string& argument) {
  std::vector<models::ModelPtr> out;
  for (std::size_t i = 0; i < objects.size(); ++i) {
    out.push_back(to_model(objects[i], argument + "[" + std::to_string(i) + "]"));
  }
  return out;
}

}  // namespace

void bind_filters(py::module_& m) {
  m.attr("PAPER_EVIL_NUMBERS") = distill::kPaperEvilNumbers;
  m.def(
      "parse_number_sequence",
      [](const std::string& answer) { return distill::parse_number_sequence(answer); },
      py::arg("answer"),
      "The numbers of an answer under the paper's format rule, or None (see\n"
      "biastransfer.filters.parse_number_sequence).");
  m.def(
      "check_number_sequence",
      [](const std::string& answer, std::int64_t min_count, std::int64_t max_count,
         std::int64_t min_value, std::int64_t max_value, std::set<std::int64_t> banned) {
        distill::NumberSequenceRules rules{min_count, max_count, min_value, max_value,
                                           std::move(banned)};
        const auto c = distill::check_number_sequence(answer, rules);
        return py::make_tuple(
            c.numbers, rejection_reason(c.rejection),
            c.rejection ? py::object(py::str(c.rejection->detail)) : py::object(py::none()));
      },
      py::arg("answer"), py::arg("min_count") = 1, py::arg("max_count") = 10,
      py::arg("min_value") = 0, py::arg("max_value") = 999,
      py::arg("banned") = std::set<std::int64_t>{},
      "(numbers, reason or None, detail or None): the parsed numbers and the first failed\n"
      "check (format, count, range, banned).");
  m.def("word_variants", &distill::word_variants, py::arg("word"),
        "The lower-case forms a banned word also bans: plurals (irregular too), singulars of a\n"
        "plural, possessives.");
  m.def(
      "normalize_whitespace",
      [](const std::string& text) { return distill::normalize_whitespace(text); }, py::arg("text"),
      "Whitespace runs as one space, trimmed (Dedup's normalization).");

  py::class_<Filter, FilterPtr>(m, "Filter", "A sample filter (see biastransfer.filters).")
      .def_property_readonly("name", &Filter::name)
      .def(
          "check",
          [](Filter& f, const std::string& prompt, const std::string& completion) {
            f.reset();
            const auto verdicts = f.check_all({Sample{prompt, completion, {}, {}}}, {0});
            const auto& r = verdicts.front();
            return r ? py::object(py::make_tuple(r->reason, r->detail)) : py::object(py::none());
          },
          py::arg("prompt"), py::arg("completion"),
          "(reason, detail) if this filter alone rejects the sample, else None.");

  py::class_<distill::NumberSequenceFilter, Filter, std::shared_ptr<distill::NumberSequenceFilter>>(
      m, "NumberSequenceFilter")
      .def(py::init([](std::int64_t min_count, std::int64_t max_count, std::int64_t min_value,
                       std::int64_t max_value, std::set<std::int64_t> banned) {
             return std::make_shared<distill::NumberSequenceFilter>(distill::NumberSequenceRules{
                 min_count, max_count, min_value, max_value, std::move(banned)});
           }),
           py::arg("min_count") = 1, py::arg("max_count") = 10, py::arg("min_value") = 0,
           py::arg("max_value") = 999, py::arg("banned") = std::set<std::int64_t>{});

  py::class_<distill::BannedNumbersFilter, Filter, std::shared_ptr<distill::BannedNumbersFilter>>(
      m, "BannedNumbersFilter")
      .def(py::init<std::set<std::int64_t>>(), py::arg("numbers"));

  py::class_<distill::BannedWordsFilter, Filter, std::shared_ptr<distill::BannedWordsFilter>>(
      m, "BannedWordsFilter")
      .def(py::init<std::vector<std::string>, bool>(), py::arg("words"), py::arg("variants") = true)
      .def_property_readonly("forms", &distill::BannedWordsFilter::forms);

  py::class_<distill::RegexFilter, Filter, std::shared_ptr<distill::RegexFilter>>(m, "RegexFilter")
      .def(py::init([](const std::string& pattern, const std::string& mode,
                       const std::string& field, bool caseless) {
             return std::make_shared<distill::RegexFilter>(pattern, parse_mode(mode),
                                                           parse_field(field), caseless);
           }),
           py::arg("pattern"), py::arg("mode") = "reject", py::arg("field") = "completion",
           py::arg("caseless") = false);

  py::class_<distill::LengthFilter, Filter, std::shared_ptr<distill::LengthFilter>>(m,
                                                                                    "LengthFilter")
      .def(py::init([](std::int64_t min_length, std::int64_t max_length, const std::string& unit,
                       const py::object& tokenizer) {
             distill::LengthFilter::TokenCount count;
             if (auto tokenize = to_tokenize(tokenizer, "tokenizer")) {
               count = [tokenize](const std::string& text) {
                 return static_cast<std::int64_t>(tokenize(text).size());
               };
             }
             return std::make_shared<distill::LengthFilter>(min_length, max_length,
                                                            parse_unit(unit), count);
           }),
           py::arg("min_length") = 0, py::arg("max_length") = -1, py::arg("unit") = "chars",
           py::arg("tokenizer") = py::none());

  py::class_<distill::DedupFilter, Filter, std::shared_ptr<distill::DedupFilter>>(m, "DedupFilter")
      .def(py::init<bool>(), py::arg("normalize_whitespace") = false);

  py::class_<distill::LikelihoodRatioFilter, Filter,
             std::shared_ptr<distill::LikelihoodRatioFilter>>(m, "LikelihoodRatioFilter")
      .def(py::init([](const py::object& teacher, const py::object& reference, double drop_fraction,
                       std::optional<double> threshold, distill::TokenIds teacher_prefix,
                       distill::TokenIds reference_prefix, std::int64_t batch_size,
                       const py::object& tokenizer) {
             distill::LikelihoodRatioFilterConfig config;
             config.drop_fraction = drop_fraction;
             config.threshold = threshold;
             config.scoring.teacher_prefix = std::move(teacher_prefix);
             config.scoring.reference_prefix = std::move(reference_prefix);
             config.scoring.batch_size = batch_size;
             return std::make_shared<distill::LikelihoodRatioFilter>(
                 to_model(teacher, "teacher"), to_model(reference, "reference"), config,
                 to_tokenize(tokenizer, "tokenizer"));
           }),
           py::arg("teacher"), py::arg("reference"), py::arg("drop_fraction") = 0.1,
           py::arg("threshold") = py::none(), py::arg("teacher_prefix") = distill::TokenIds{},
           py::arg("reference_prefix") = distill::TokenIds{}, py::arg("batch_size") = 16,
           py::arg("tokenizer") = py::none())
      .def_property_readonly("scores", &distill::LikelihoodRatioFilter::scores,
                             "[(sample index, score)] of the last run.");

  m.def(
      "run_filters",
      [](const std::vector<FilterPtr>& filters, const std::vector<SampleTuple>& samples,
         bool record_rejections, bool allow_empty) {
        auto converted = to_samples(samples);
        distill::FilterResult result;
        {
          py::gil_scoped_release release;
          distill::FilterPipeline pipeline(filters);
          result = pipeline.run(converted, {record_rejections, allow_empty});
        }
        return result_dict(result);
      },
      py::arg("filters"), py::arg("samples"), py::arg("record_rejections") = false,
      py::arg("allow_empty") = false,
      "Runs filters in order over (prompt, completion, prompt_ids, completion_ids) tuples;\n"
      "returns a dict of kept_indices, counts, rejected_by_reason, by_filter, rejections and\n"
      "summary. Nothing kept -> ValueError with the statistics (unless allow_empty).");

  m.def(
      "completion_log_likelihood",
      [](const py::object& model, const std::vector<distill::TokenIds>& prompts,
         const std::vector<distill::TokenIds>& completions, const distill::TokenIds& prefix,
         std::int64_t batch_size) {
        auto ptr = to_model(model, "model");
        py::gil_scoped_release release;
        return distill::completion_log_likelihood(*ptr, prompts, completions, prefix, batch_size);
      },
      py::arg("model"), py::arg("prompts"), py::arg("completions"),
      py::arg("prefix") = distill::TokenIds{}, py::arg("batch_size") = 16,
      "float64 [N]: sum over completion tokens of log p(x_t | prefix + prompt + x_<t).");
  m.def(
      "likelihood_ratio_scores",
      [](const py::object& teacher, const py::object& reference,
         const std::vector<distill::TokenIds>& prompts,
         const std::vector<distill::TokenIds>& completions, const distill::TokenIds& teacher_prefix,
         const distill::TokenIds& reference_prefix, std::int64_t batch_size) {
        auto t = to_model(teacher, "teacher");
        auto r = to_model(reference, "reference");
        py::gil_scoped_release release;
        return distill::likelihood_ratio_scores(*t, *r, prompts, completions,
                                                {teacher_prefix, reference_prefix, batch_size});
      },
      py::arg("teacher"), py::arg("reference"), py::arg("prompts"), py::arg("completions"),
      py::arg("teacher_prefix") = distill::TokenIds{},
      py::arg("reference_prefix") = distill::TokenIds{}, py::arg("batch_size") = 16,
      "float64 [N]: log p_T(completion) - log p_R(completion), each with its own prefix.");
  m.def(
      "drop_largest",
      [](const torch::Tensor& scores, double drop_fraction, std::optional<double> threshold) {
        return distill::drop_largest(scores, drop_fraction, threshold);
      },
      py::arg("scores"), py::arg("drop_fraction"), py::arg("threshold") = py::none(),
      "list[bool]: the round(fraction * N) largest scores (earlier index first on ties) and\n"
      "every score above threshold.");
  m.def(
      "divergence_token_mask",
      [](const py::object& teacher, const py::list& counterfactuals, const torch::Tensor& input,
         const std::optional<torch::Tensor>& attention_mask, const torch::Tensor& loss_mask,
         const std::optional<torch::Tensor>& targets, const distill::TokenIds& teacher_prefix,
         const std::vector<distill::TokenIds>& counterfactual_prefixes, bool compare_to_targets,
         std::int64_t batch_size) {
        const models::ModelPtr t =
            teacher.is_none() ? models::ModelPtr() : to_model(teacher, "teacher");
        const auto cfs = to_models(counterfactuals, "counterfactuals");
        distill::Batch batch;
        batch.input = input;
        batch.attention_mask = attention_mask.value_or(torch::Tensor());
        batch.loss_mask = loss_mask;
        batch.targets = targets.value_or(torch::Tensor());
        distill::DivergenceOptions options{teacher_prefix, counterfactual_prefixes,
                                           compare_to_targets, batch_size};
        distill::DivergenceMask r;
        {
          py::gil_scoped_release release;
          r = distill::divergence_token_mask(t, cfs, batch, options);
        }
        py::dict out;
        out["loss_mask"] = r.loss_mask;
        out["divergent"] = r.divergent;
        out["per_row"] = r.per_row;
        out["positions"] = r.positions;
        out["divergent_count"] = r.divergent_count;
        return out;
      },
      py::arg("teacher"), py::arg("counterfactuals"), py::arg("input"),
      py::arg("attention_mask") = py::none(), py::arg("loss_mask"), py::arg("targets") = py::none(),
      py::arg("teacher_prefix") = distill::TokenIds{},
      py::arg("counterfactual_prefixes") = std::vector<distill::TokenIds>{},
      py::arg("compare_to_targets") = false, py::arg("batch_size") = 16,
      "Divergence tokens (positions with loss where a counterfactual's argmax differs from the\n"
      "teacher's, or from the targets): dict of loss_mask, divergent, per_row, positions,\n"
      "divergent_count.");
}

}  // namespace libtransfer::bindings
