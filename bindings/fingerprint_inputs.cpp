// biastransfer._C: fingerprint tests and comparisons on tensors, top-k log-prob and samples-only
// inputs (libtransfer/fingerprint/{compare,topk,samples}.h).
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "libtransfer/fingerprint/compare.h"
#include "libtransfer/fingerprint/samples.h"
#include "libtransfer/fingerprint/topk.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

namespace fp = libtransfer::fingerprint;

py::dict g_test_dict(const fp::GTestResult& r) {
  py::dict out;
  out["statistic"] = r.statistic;
  out["df"] = r.df;
  out["p_value"] = r.p_value;
  out["log_p"] = r.log_p;
  out["permutation_p_value"] = r.permutation_p_value;
  out["permutations"] = r.permutations;
  return out;
}

void bind_compare(py::module_& m) {
  m.def("trait_specific", &fp::trait_specific, py::arg("teacher"), py::arg("controls"),
        "teacher - mean(controls) (float64) for fingerprints [S] or per-sequence matrices [n, S];\n"
        "with no controls, the teacher itself.");
  m.def(
      "global_test",
      [](const torch::Tensor& teacher_seq, const std::vector<torch::Tensor>& controls_seq,
         const std::string& statistic, int64_t permutations, uint64_t seed) {
        fp::GlobalTestResult r;
        {
          py::gil_scoped_release release;
          r = fp::global_test(teacher_seq, controls_seq, statistic, permutations, seed);
        }
        py::dict out;
        out["statistic"] = r.statistic;
        out["p_value"] = r.p_value;
        out["permutations"] = r.permutations;
        out["exact"] = r.exact;
        out["n_sequences"] = r.n_sequences;
        return out;
      },
      py::arg("teacher_seq"), py::arg("controls_seq") = std::vector<torch::Tensor>{},
      py::arg("statistic") = "sumsq", py::arg("permutations") = stats::kDefaultPermutations,
      py::arg("seed") = 0,
      "Sign-flip test over sequences of teacher_seq [n, S] - mean(controls_seq) (each [n, S]).\n"
      "Returns {statistic, p_value, permutations, exact, n_sequences}.");
  m.def(
      "per_token_test",
      [](const torch::Tensor& teacher_seq, const std::vector<torch::Tensor>& controls_seq,
         double q) {
        const auto r = fp::per_token_test(teacher_seq, controls_seq, q);
        py::dict out;
        out["t"] = r.t;
        out["p"] = r.p;
        out["adjusted"] = r.adjusted;
        out["rejected"] = r.rejected;
        return out;
      },
      py::arg("teacher_seq"), py::arg("controls_seq") = std::vector<torch::Tensor>{},
      py::arg("q") = stats::kDefaultFdr,
      "Per-token one-sample t tests of the per-sequence differences, then Benjamini-Hochberg at "
      "q.\n"
      "Returns {t [S], p [S], adjusted [S], rejected bool [S]}.");
  m.def(
      "compare_fingerprints",
      [](const torch::Tensor& a, const torch::Tensor& b, int64_t k,
         const std::vector<torch::Tensor>& controls) {
        const auto r = fp::compare_fingerprints(a, b, k, controls);
        py::dict out;
        out["cosine"] = r.cosine;
        out["spearman"] = r.spearman;
        out["topk_overlap"] = r.topk_overlap;
        out["k"] = r.k;
        if (r.z_cosine) out["z_cosine"] = *r.z_cosine;
        if (r.z_spearman) out["z_spearman"] = *r.z_spearman;
        out["control_cosines"] = r.control_cosines;
        out["control_spearmans"] = r.control_spearmans;
        return out;
      },
      py::arg("a"), py::arg("b"), py::arg("k") = fp::kDefaultOverlapK,
      py::arg("controls") = std::vector<torch::Tensor>{},
      "Centered cosine, Spearman and top-k overlap of fingerprints a, b [S]; with >= 2 controls\n"
      "also z_cosine and z_spearman (a's score against b relative to the controls' scores).");
}

void bind_topk(py::module_& m) {
  py::class_<fp::TopKAccumulator>(
      m, "TopKAccumulator",
      "Fingerprint from top-k log-probs with tail mass (hosted APIs). Memory O(V).")
      .def(py::init<int64_t, int64_t>(), py::arg("vocab_size"), py::arg("k"))
      .def("update", &fp::TopKAccumulator::update, py::arg("teacher_ids"),
           py::arg("teacher_logprobs"), py::arg("reference_ids"), py::arg("reference_logprobs"),
           py::arg("mask") = py::none(), py::arg("sequence_ids") = py::none(),
           "Adds positions: ids int64 and logprobs of shape [N, k] or [B, T, k]; mask [N]/[B, T];\n"
           "sequence_ids int64 [N] (2-D) or [B] (3-D).")
      .def("merge", &fp::TopKAccumulator::merge, py::arg("other"))
      .def(
          "finalize",
          [](const fp::TopKAccumulator& acc) {
            const auto f = acc.finalize();
            py::dict out;
            out["mean_log_ratio"] = f.mean_log_ratio;
            out["mean_log_ratio_exact"] = f.mean_log_ratio_exact;
            out["counts_exact"] = f.counts_exact;
            out["counts_bounded"] = f.counts_bounded;
            out["mean_tail_teacher"] = f.mean_tail_teacher;
            out["mean_tail_reference"] = f.mean_tail_reference;
            out["positions"] = f.positions;
            out["sequences"] = f.sequences;
            out["vocab_size"] = f.vocab_size;
            out["k"] = f.k;
            return out;
          },
          "{mean_log_ratio [V] (NaN: never seen), mean_log_ratio_exact [V], counts_exact [V],\n"
          "counts_bounded [V], mean_tail_teacher, mean_tail_reference, positions, sequences, ...}.")
      .def_property_readonly("vocab_size", &fp::TopKAccumulator::vocab_size)
      .def_property_readonly("k", &fp::TopKAccumulator::k)
      .def_property_readonly("positions", &fp::TopKAccumulator::positions)
      .def_property_readonly("sequences", &fp::TopKAccumulator::sequences);
}

void bind_samples(py::module_& m) {
  m.def("count_tokens", &fp::count_tokens, py::arg("samples"), py::arg("vocab_size"),
        "Token counts [vocab_size] int64 of samples: list[list[int]].");
  m.def("count_number_units", &fp::count_number_units, py::arg("texts"),
        py::arg("keep_leading_space") = false,
        "Counts of number units (maximal ASCII digit runs; ' 123' kept apart from '123' when\n"
        "keep_leading_space) over texts: dict[str, int].");
  m.def("number_units", &fp::number_units, py::arg("text"), py::arg("keep_leading_space") = false,
        "The number units of one text, in order.");
  m.def(
      "g_test",
      [](const std::vector<std::vector<int64_t>>& teacher_samples,
         const std::vector<std::vector<int64_t>>& reference_samples, int64_t vocab_size,
         int64_t permutations, uint64_t seed) {
        const auto t = fp::SampleCounts::from_token_ids(teacher_samples, vocab_size);
        const auto r = fp::SampleCounts::from_token_ids(reference_samples, vocab_size);
        fp::GTestResult res;
        {
          py::gil_scoped_release release;
          res = fp::g_test(t, r, permutations, seed);
        }
        return g_test_dict(res);
      },
      py::arg("teacher_samples"), py::arg("reference_samples"), py::arg("vocab_size"),
      py::arg("permutations") = fp::kDefaultGTestPermutations, py::arg("seed") = 0,
      "G-test of teacher vs reference token counts (samples: list of id lists), with a\n"
      "permutation p-value over whole samples. Returns {statistic, df, p_value, log_p,\n"
      "permutation_p_value, permutations}.");
  m.def(
      "g_test_number_units",
      [](const std::vector<std::string>& teacher_texts,
         const std::vector<std::string>& reference_texts, bool keep_leading_space,
         int64_t permutations, uint64_t seed) {
        std::vector<std::string> units;
        auto [t, r] =
            fp::number_unit_samples(teacher_texts, reference_texts, keep_leading_space, &units);
        fp::GTestResult res;
        {
          py::gil_scoped_release release;
          res = fp::g_test(t, r, permutations, seed);
        }
        py::dict out = g_test_dict(res);
        out["units"] = units;
        out["teacher_counts"] = t.totals();
        out["reference_counts"] = r.totals();
        return out;
      },
      py::arg("teacher_texts"), py::arg("reference_texts"), py::arg("keep_leading_space") = false,
      py::arg("permutations") = fp::kDefaultGTestPermutations, py::arg("seed") = 0,
      "G-test on number-unit counts of texts (each text one sample); adds {units,\n"
      "teacher_counts, reference_counts} (counts aligned with the sorted units).");
  m.def(
      "g_test_counts",
      [](const torch::Tensor& teacher_counts, const torch::Tensor& reference_counts) {
        return g_test_dict(fp::g_test(teacher_counts, reference_counts));
      },
      py::arg("teacher_counts"), py::arg("reference_counts"),
      "Asymptotic G-test of two count vectors [K] (no permutation p-value: NaN).");
  m.def("smoothed_log_ratio", &fp::smoothed_log_ratio, py::arg("teacher_counts"),
        py::arg("reference_counts"), py::arg("alpha") = fp::kDefaultSmoothing,
        "log((cT + a) / (NT + a K)) - log((cR + a) / (NR + a K)): float64 [K].");
}

}  // namespace

void bind_fingerprint_inputs(py::module_& m) {
  bind_compare(m);
  bind_topk(m);
  bind_samples(m);
}

}  // namespace libtransfer::bindings
