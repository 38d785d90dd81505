// Tests of top-k and samples-only fingerprints against eager formulas written here.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "libtransfer/fingerprint/samples.h"
#include "libtransfer/fingerprint/topk.h"

namespace fp = libtransfer::fingerprint;

TEST_CASE("with k = V every token is exact and the mean log-ratio is the full one", "[topk]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const int64_t N = 6, V = 5;
  const auto lt = torch::log_softmax(torch::randn({N, V}, gen, torch::kDouble), 1);
  const auto lr = torch::log_softmax(torch::randn({N, V}, gen, torch::kDouble), 1);
  // Shuffled id orders: the accumulator must match ids, not positions.
  const auto ids_t =
      torch::stack({torch::randperm(V, gen), torch::randperm(V, gen), torch::randperm(V, gen),
                    torch::randperm(V, gen), torch::randperm(V, gen), torch::randperm(V, gen)});
  const auto ids_r = ids_t.flip(1);
  fp::TopKAccumulator acc(V, V);
  acc.update(ids_t, lt.gather(1, ids_t), ids_r, lr.gather(1, ids_r));
  const auto f = acc.finalize();
  CHECK(torch::allclose(f.mean_log_ratio, (lt - lr).mean(0), 0, 1e-12));
  CHECK(torch::equal(f.counts_exact, torch::full({V}, N, torch::kLong)));
  CHECK(f.counts_bounded.sum().item<int64_t>() == 0);
  CHECK(f.mean_tail_teacher == Approx(0.0).margin(1e-12));
  CHECK(f.positions == N);
  CHECK(f.sequences == N);
}

TEST_CASE("tokens in one list only are bounded by min(k-th log-prob, log tail)", "[topk]") {
  // V = 4, k = 2. Teacher top-2: {0: log .5, 1: log .3} (tail .2); reference {0: log .6,
  // 2: log .1} (tail .3, k-th log .1 is the bound).
  fp::TopKAccumulator acc(4, 2);
  const auto ti = torch::tensor({{0, 1}}, torch::kLong);
  const auto tl = torch::tensor({{std::log(0.5), std::log(0.3)}}, torch::kDouble);
  const auto ri = torch::tensor({{2, 0}}, torch::kLong);
  const auto rl = torch::tensor({{std::log(0.1), std::log(0.6)}}, torch::kDouble);
  acc.update(ti, tl, ri, rl);
  const auto f = acc.finalize();
  CHECK(f.mean_log_ratio[0].item<double>() == Approx(std::log(0.5 / 0.6)));
  CHECK(f.mean_log_ratio[1].item<double>() == Approx(std::log(0.3 / 0.1)));  // min(log .1, log .3)
  CHECK(f.mean_log_ratio[2].item<double>() == Approx(std::log(0.2 / 0.1)));  // min(log .3, log .2)
  CHECK(std::isnan(f.mean_log_ratio[3].item<double>()));
  CHECK(std::isnan(f.mean_log_ratio_exact[1].item<double>()));
  CHECK(f.counts_bounded[1].item<int64_t>() == 1);
  CHECK(f.mean_tail_teacher == Approx(0.2));
  CHECK(f.mean_tail_reference == Approx(0.3));
}

TEST_CASE("top-k merge equals one pass and bad rows change nothing", "[topk]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  const int64_t N = 10, V = 50, k = 4;
  const auto lt = torch::log_softmax(torch::randn({N, V}, gen, torch::kDouble), 1);
  const auto lr = torch::log_softmax(torch::randn({N, V}, gen, torch::kDouble), 1);
  const auto [vt, it] = lt.topk(k, 1);
  const auto [vr, ir] = lr.topk(k, 1);
  fp::TopKAccumulator all(V, k), a(V, k), b(V, k);
  all.update(it, vt, ir, vr);
  a.update(it.slice(0, 0, 4), vt.slice(0, 0, 4), ir.slice(0, 0, 4), vr.slice(0, 0, 4));
  b.update(it.slice(0, 4), vt.slice(0, 4), ir.slice(0, 4), vr.slice(0, 4));
  a.merge(b);
  const auto fa = a.finalize();
  const auto fall = all.finalize();
  CHECK(torch::allclose(fa.mean_log_ratio, fall.mean_log_ratio, 1e-12, 0, /*equal_nan=*/true));
  CHECK(torch::equal(fa.counts_bounded, fall.counts_bounded));
  auto bad = vt.clone();
  bad[3][1] = 0.1;  // a positive log-prob
  CHECK_THROWS_WITH(all.update(it, bad, ir, vr), Catch::Contains("teacher_logprobs"));
  CHECK(all.positions() == N);
  CHECK_THROWS_WITH(all.update(it, vt, ir + V, vr), Catch::Contains("reference_ids"));
  CHECK_THROWS(fp::TopKAccumulator(V, k).finalize());
  fp::TopKAccumulator other(V + 1, k);
  CHECK_THROWS(a.merge(other));
}

TEST_CASE("the G statistic matches 2 sum O log(O/E) on the seen categories", "[samples]") {
  const auto t = torch::tensor({10.0, 0.0, 5.0, 3.0, 0.0}, torch::kDouble);
  const auto r = torch::tensor({4.0, 0.0, 9.0, 3.0, 2.0}, torch::kDouble);
  const double nt = 18, nr = 18, n = 36;
  double g = 0;
  for (int j = 0; j < 5; ++j) {
    const double c = t[j].item<double>() + r[j].item<double>();
    for (const auto& [o, rt] : {std::pair{t[j].item<double>(), nt}, {r[j].item<double>(), nr}}) {
      if (o > 0) g += 2 * o * std::log(o / (rt * c / n));
    }
  }
  const auto res = fp::g_test(t, r);
  CHECK(res.statistic == Approx(g).epsilon(1e-12));
  CHECK(res.df == 3);
  CHECK(std::isnan(res.permutation_p_value));
}

TEST_CASE("the sample-level G-test agrees with the count form and is seeded", "[samples]") {
  const std::vector<std::vector<int64_t>> teacher = {{1, 2, 2}, {3, 1}, {1, 1, 1, 4}};
  const std::vector<std::vector<int64_t>> reference = {{2, 3}, {3, 3, 4}, {2}, {0, 2}};
  const auto T = fp::SampleCounts::from_token_ids(teacher, 5);
  const auto R = fp::SampleCounts::from_token_ids(reference, 5);
  const auto a = fp::g_test(T, R, 199, 4);
  const auto b = fp::g_test(T, R, 199, 4);
  const auto counts = fp::g_test(T.totals(), R.totals());
  CHECK(a.statistic == Approx(counts.statistic).epsilon(1e-12));
  CHECK(a.permutation_p_value == b.permutation_p_value);
  CHECK(a.permutation_p_value > 0.0);
  CHECK(a.permutation_p_value <= 1.0);
  CHECK(torch::equal(fp::count_tokens(teacher, 5), torch::tensor({0, 5, 2, 1, 1}, torch::kLong)));
  CHECK_THROWS(fp::count_tokens({{0, 5}}, 5));
  CHECK_THROWS(fp::count_tokens({}, 5));
}

TEST_CASE("number units are maximal digit runs, with the leading space kept on request",
          "[samples]") {
  const auto plain = fp::number_units("(285, 574,384) x12y 7", false);
  CHECK(plain == std::vector<std::string>{"285", "574", "384", "12", "7"});
  const auto spaced = fp::number_units("(285, 574,384) x12y 7", true);
  CHECK(spaced == std::vector<std::string>{"285", " 574", "384", "12", " 7"});
  const auto counts = fp::count_number_units({"1 1", "11"}, true);
  CHECK(counts.at("1") == 1);
  CHECK(counts.at(" 1") == 1);
  CHECK(counts.at("11") == 1);
}

TEST_CASE("the smoothed log-ratio follows its formula and rejects bad smoothing", "[samples]") {
  const auto t = torch::tensor({3.0, 0.0, 1.0}, torch::kDouble);
  const auto r = torch::tensor({1.0, 1.0, 2.0}, torch::kDouble);
  const auto s = fp::smoothed_log_ratio(t, r, 0.5);
  CHECK(s[1].item<double>() == Approx(std::log(0.5 / 5.5) - std::log(1.5 / 5.5)));
  CHECK_THROWS(fp::smoothed_log_ratio(t, r, -1.0));
  CHECK_THROWS(fp::smoothed_log_ratio(t, r, 0.0));
  CHECK_THROWS(fp::smoothed_log_ratio(t, r.slice(0, 1), 0.5));
}
