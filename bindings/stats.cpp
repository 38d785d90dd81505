// biastransfer._C: statistical tests, corrections and distribution tails (libtransfer/stats).
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "libtransfer/stats/distributions.h"
#include "libtransfer/stats/ks.h"
#include "libtransfer/stats/multiple_testing.h"
#include "libtransfer/stats/permutation.h"
#include "libtransfer/stats/ranks.h"
#include "libtransfer/stats/t_test.h"

namespace py = pybind11;

namespace libtransfer::bindings {

void bind_stats(py::module_& m) {
  namespace st = libtransfer::stats;
  m.def(
      "benjamini_hochberg",
      [](const torch::Tensor& p, double q) {
        auto r = st::benjamini_hochberg(p, q);
        return py::make_tuple(r.rejected, r.adjusted);
      },
      py::arg("p"), py::arg("q") = st::kDefaultFdr,
      "Benjamini-Hochberg step-up at FDR q: (rejected bool, adjusted float64), shapes of p.");
  m.def(
      "sign_flip_test",
      [](const torch::Tensor& diffs, const std::string& statistic, int64_t permutations,
         uint64_t seed) {
        const auto kind = st::parse_sign_flip_statistic(statistic);
        st::PermutationResult r;
        {
          py::gil_scoped_release release;
          r = st::sign_flip_test(diffs, kind, permutations, seed);
        }
        py::dict out;
        out["statistic"] = r.statistic;
        out["p_value"] = r.p_value;
        out["permutations"] = r.permutations;
        out["exact"] = r.exact;
        return out;
      },
      py::arg("diffs"), py::arg("statistic") = "sumsq",
      py::arg("permutations") = st::kDefaultPermutations, py::arg("seed") = 0,
      "Sign-flip permutation test that the rows of diffs [n, d] are symmetric around 0.\n"
      "statistic: 'sumsq' (||row mean||^2) or 'maxt' (max |t_j|). Exact enumeration when\n"
      "2^n <= permutations + 1. Returns {statistic, p_value, permutations, exact}.");
  m.def(
      "one_sample_t",
      [](const torch::Tensor& diffs) {
        auto r = st::one_sample_t(diffs);
        return py::make_tuple(r.t, r.p);
      },
      py::arg("diffs"),
      "Column-wise one-sample t tests of diffs [n, d]: (t [d], two-sided p [d]), df = n - 1.");
  m.def(
      "one_sample_t_log",
      [](const torch::Tensor& diffs) {
        auto r = st::one_sample_t(diffs);
        return py::make_tuple(r.t, r.p, r.log_p);
      },
      py::arg("diffs"), "As one_sample_t, plus log p [d] (finite where p underflows).");
  auto fisher_dict = [](const st::FisherResult& r) {
    py::dict out;
    out["statistic"] = r.statistic;
    out["p_value"] = r.p_value;
    out["log_p"] = r.log_p;
    out["df"] = r.df;
    return out;
  };
  m.def(
      "fisher_combine",
      [fisher_dict](const torch::Tensor& p) { return fisher_dict(st::fisher_combine(p)); },
      py::arg("p"),
      "Fisher's method: X = -2 sum log p ~ chi2(2L). Returns {statistic, p_value, log_p, df}.");
  m.def(
      "fisher_combine_log",
      [fisher_dict](const torch::Tensor& log_p) {
        return fisher_dict(st::fisher_combine_log(log_p));
      },
      py::arg("log_p"), "Fisher's method from log p-values (each <= 0).");
  m.def("rankdata", &st::rankdata, py::arg("a"),
        "Average ranks (1-based, ties share their mean rank) of a 1-D tensor: float64.");
  m.def("spearman", &st::spearman, py::arg("a"), py::arg("b"),
        "Spearman's rho with average ranks for ties (NaN if either input is constant).");
  m.def("pearson", &st::pearson, py::arg("a"), py::arg("b"),
        "Pearson correlation = cosine of the centered vectors (NaN if either is constant).");
  m.def("normal_sf", &st::normal_sf, py::arg("x"), "P(Z >= x), Z standard normal.");
  m.def("normal_logsf", &st::normal_logsf, py::arg("x"), "log P(Z >= x), finite in the tail.");
  m.def("t_sf", &st::t_sf, py::arg("x"), py::arg("df"), "P(T >= x), Student t with df.");
  m.def("t_logsf", &st::t_logsf, py::arg("x"), py::arg("df"), "log P(T >= x), finite in the tail.");
  m.def("chi2_sf", &st::chi2_sf, py::arg("x"), py::arg("df"), "P(X >= x), chi-squared with df.");
  m.def("chi2_logsf", &st::chi2_logsf, py::arg("x"), py::arg("df"),
        "log P(X >= x), finite in the tail.");
  m.def("kolmogorov_sf", &st::kolmogorov_sf, py::arg("x"),
        "P(K >= x) for Kolmogorov's limiting distribution (scipy.stats.kstwobign.sf).");
  m.def("ks_sf", &st::ks_sf, py::arg("d"), py::arg("n"),
        "P(D_n >= d), two-sided one-sample KS statistic of n draws (scipy.stats.kstwo.sf).");
  m.def("smirnov_sf", &st::smirnov_sf, py::arg("d"), py::arg("n"),
        "P(D_n^+ >= d), one-sided KS statistic (scipy.special.smirnov).");
  m.def(
      "ks_uniform",
      [](const torch::Tensor& p) {
        auto r = st::ks_uniform(p);
        py::dict out;
        out["statistic"] = r.statistic;
        out["p_value"] = r.p_value;
        return out;
      },
      py::arg("p"), "One-sample KS test of p against U(0, 1): {statistic, p_value}.");
  m.def("permutation_p_value", &st::permutation_p_value, py::arg("observed"),
        py::arg("null_samples"), py::arg("greater") = true,
        "(1 + #{null >= observed}) / (B + 1) (or <= when greater is False).");
}

}  // namespace libtransfer::bindings
