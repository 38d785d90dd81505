// Tests of libtransfer::detect's assignment solvers against a brute force over all matchings
// written here, and against properties (validity, equivariance, greedy <= exact).
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "libtransfer/detect/linear_assignment.h"

namespace dt = libtransfer::detect;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The best objective over every matching of min(n, m) pairs (+inf when only forbidden ones
// exist), by enumerating the permutations of the longer side. n, m <= 8.
double brute_force(const torch::Tensor& cost, bool maximize) {
  auto c = cost.to(torch::kDouble);
  if (c.size(0) > c.size(1)) c = c.t();
  c = c.contiguous();
  const int64_t n = c.size(0), m = c.size(1);
  const auto a = c.accessor<double, 2>();
  std::vector<int64_t> perm(m);
  std::iota(perm.begin(), perm.end(), 0);
  double best = maximize ? -kInf : kInf;
  do {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += a[i][perm[i]];
    if (std::isnan(total)) continue;  // inf - inf cannot happen: one sign is rejected
    best = maximize ? std::max(best, total) : std::min(best, total);
  } while (std::next_permutation(perm.begin(), perm.end()));
  return best;
}

// A valid matching of min(n, m) pairs, rows increasing, columns distinct, objective = their sum.
void check_valid(const dt::Assignment& a, const torch::Tensor& cost) {
  const int64_t n = cost.size(0), m = cost.size(1);
  REQUIRE(a.rows.size() == static_cast<size_t>(std::min(n, m)));
  REQUIRE(a.cols.size() == a.rows.size());
  std::set<int64_t> cols(a.cols.begin(), a.cols.end());
  CHECK(cols.size() == a.cols.size());
  double total = 0.0;
  const auto c = cost.to(torch::kDouble).contiguous();
  for (size_t k = 0; k < a.rows.size(); ++k) {
    if (k > 0) CHECK(a.rows[k] > a.rows[k - 1]);
    REQUIRE(a.rows[k] >= 0);
    REQUIRE(a.rows[k] < n);
    REQUIRE(a.cols[k] >= 0);
    REQUIRE(a.cols[k] < m);
    total += c[a.rows[k]][a.cols[k]].item<double>();
  }
  CHECK(a.objective == Approx(total).epsilon(1e-12));
}

void check_optimal(const torch::Tensor& cost, bool maximize) {
  const auto a = dt::linear_sum_assignment(cost, maximize);
  check_valid(a, cost);
  CHECK(a.objective == Approx(brute_force(cost, maximize)).epsilon(1e-9).margin(1e-12));
}

}  // namespace

TEST_CASE("the exact solver finds the brute-force optimum of small random matrices", "[lap]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    for (int64_t n = 1; n <= 7; ++n) {
      for (const int64_t m : {n, n + 1, std::max<int64_t>(1, n - 2)}) {
        for (const bool maximize : {false, true}) {
          const auto cost = torch::randn({n, m}, gen, torch::TensorOptions().dtype(dtype));
          check_optimal(cost, maximize);
        }
      }
    }
  }
  const auto square8 = torch::rand({8, 8}, gen, torch::kDouble);
  check_optimal(square8, false);
  check_optimal(square8, true);
}

TEST_CASE("the exact solver is optimal on integer, tied and constant matrices", "[lap]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  for (int rep = 0; rep < 20; ++rep) {
    const int64_t n = 2 + rep % 6, m = 2 + (rep * 5) % 7;
    const auto ints = torch::randint(0, 3, {n, m}, gen, torch::kDouble);
    check_optimal(ints, rep % 2 == 0);
  }
  check_optimal(torch::full({5, 5}, 3.25, torch::kDouble), false);
  check_optimal(torch::full({4, 6}, -1.0, torch::kFloat), true);
  check_optimal(torch::zeros({6, 3}, torch::kDouble), false);
}

TEST_CASE("forbidden entries are avoided and an infeasible matrix is a ValueError", "[lap]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  for (int rep = 0; rep < 20; ++rep) {
    const int64_t n = 3 + rep % 4, m = 3 + (rep * 3) % 5;
    auto cost = torch::rand({n, m}, gen, torch::kDouble);
    const bool maximize = rep % 2 == 1;
    const auto mask = torch::rand({n, m}, gen, torch::kDouble) < 0.3;
    cost.masked_fill_(mask, maximize ? -kInf : kInf);
    const double best = brute_force(cost, maximize);
    if (std::isfinite(best)) {
      check_optimal(cost, maximize);
    } else {
      CHECK_THROWS_AS(dt::linear_sum_assignment(cost, maximize), c10::ValueError);
    }
  }
  auto blocked = torch::rand({4, 4}, gen, torch::kDouble);
  blocked.index_put_({2}, kInf);  // row 2 has no allowed column
  CHECK_THROWS_WITH(dt::linear_sum_assignment(blocked),
                    Catch::Contains("cost") && Catch::Contains("infeasible cost matrix"));
  // Rectangular: only 2 columns reachable for 3 rows.
  auto narrow = torch::rand({3, 5}, gen, torch::kDouble);
  narrow.index_put_({torch::indexing::Slice(), torch::indexing::Slice(2)}, kInf);
  CHECK_THROWS_AS(dt::linear_sum_assignment(narrow), c10::ValueError);
  CHECK_THROWS_AS(dt::linear_sum_assignment(narrow.t()), c10::ValueError);
}

TEST_CASE("bad cost matrices are rejected with messages naming cost", "[lap]") {
  using Catch::Contains;
  CHECK_THROWS_AS(dt::linear_sum_assignment(torch::rand({4})), c10::ValueError);
  CHECK_THROWS_WITH(dt::linear_sum_assignment(torch::rand({2, 2, 2})), Contains("cost"));
  CHECK_THROWS_AS(dt::linear_sum_assignment(torch::ones({3, 3}, torch::kLong)), c10::TypeError);
  CHECK_THROWS_WITH(dt::greedy_assignment(torch::ones({3, 3}, torch::kInt)), Contains("cost"));
  auto nan = torch::rand({3, 3}, torch::kDouble);
  nan[1][2] = std::nan("");
  CHECK_THROWS_WITH(dt::linear_sum_assignment(nan), Contains("cost") && Contains("NaN"));
  auto neg_inf = torch::rand({3, 3}, torch::kDouble);
  neg_inf[0][0] = -kInf;
  CHECK_THROWS_WITH(dt::linear_sum_assignment(neg_inf), Contains("cost") && Contains("-inf"));
  CHECK_NOTHROW(dt::linear_sum_assignment(neg_inf, /*maximize=*/true));
  CHECK_THROWS_AS(dt::linear_sum_assignment(-neg_inf, /*maximize=*/true), c10::ValueError);
  auto pos_inf = torch::rand({3, 3}, torch::kDouble);
  pos_inf[0][0] = kInf;
  CHECK_THROWS_WITH(dt::greedy_assignment(pos_inf), Contains("cost") && Contains("finite"));
}

TEST_CASE("empty matrices give empty assignments", "[lap]") {
  for (const auto& shape : {std::vector<int64_t>{0, 0}, {0, 4}, {4, 0}}) {
    const auto a = dt::linear_sum_assignment(torch::zeros(shape));
    CHECK(a.rows.empty());
    CHECK(a.cols.empty());
    CHECK(a.objective == 0.0);
    CHECK(dt::greedy_assignment(torch::zeros(shape), true).rows.empty());
  }
}

TEST_CASE("both solvers are equivariant under permutations of rows and columns", "[lap]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  for (const auto& [n, m] : {std::pair<int64_t, int64_t>{30, 30}, {20, 35}, {35, 20}}) {
    const auto cost = torch::randn({n, m}, gen, torch::kDouble);
    const auto pr = torch::randperm(n, gen, torch::kLong);
    const auto pc = torch::randperm(m, gen, torch::kLong);
    const auto permuted = cost.index_select(0, pr).index_select(1, pc);  // permuted[i][j] =
                                                                         // cost[pr[i]][pc[j]]
    for (const bool greedy : {false, true}) {
      const auto a = greedy ? dt::greedy_assignment(cost) : dt::linear_sum_assignment(cost);
      const auto b = greedy ? dt::greedy_assignment(permuted) : dt::linear_sum_assignment(permuted);
      std::set<std::pair<int64_t, int64_t>> expected, got;
      for (size_t k = 0; k < a.rows.size(); ++k) expected.insert({a.rows[k], a.cols[k]});
      for (size_t k = 0; k < b.rows.size(); ++k) {
        got.insert({pr[b.rows[k]].item<int64_t>(), pc[b.cols[k]].item<int64_t>()});
      }
      CHECK(got == expected);  // continuous random costs: the matching is unique a.s.
    }
  }
}

TEST_CASE("greedy is valid, never better than the optimum, exact on dominant matrices", "[lap]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  for (int rep = 0; rep < 30; ++rep) {
    const int64_t n = 2 + rep % 6, m = 2 + (rep * 3) % 7;
    const auto cost = torch::rand({n, m}, gen, torch::kDouble);
    for (const bool maximize : {false, true}) {
      const auto g = dt::greedy_assignment(cost, maximize);
      check_valid(g, cost);
      const double best = brute_force(cost, maximize);
      if (maximize) {
        CHECK(g.objective <= best + 1e-12);
      } else {
        CHECK(g.objective >= best - 1e-12);
      }
    }
  }
  // A permuted diagonal that dominates every row and column: greedy takes exactly it, and the
  // similarity version (maximize) too.
  for (const int64_t n : {5, 64, 200}) {
    const auto perm = torch::randperm(n, gen, torch::kLong);
    auto sim = 0.5 * torch::rand({n, n}, gen, torch::kDouble);
    sim.index_put_({torch::arange(n), perm}, 1.0 + torch::rand({n}, gen, torch::kDouble));
    const auto g = dt::greedy_assignment(sim, /*maximize=*/true);
    const auto e = dt::linear_sum_assignment(sim, /*maximize=*/true);
    CHECK(g.cols == e.cols);
    CHECK(g.objective == Approx(e.objective).epsilon(1e-12));
    for (int64_t i = 0; i < n; ++i) CHECK(g.cols[i] == perm[i].item<int64_t>());
  }
}

TEST_CASE("greedy breaks ties by the smallest original row, then column", "[lap]") {
  // All entries equal: greedy pairs row i with column i in both orientations.
  for (const auto& shape : {std::vector<int64_t>{3, 5}, {5, 3}}) {
    const auto g = dt::greedy_assignment(torch::ones(shape), false);
    for (size_t k = 0; k < g.rows.size(); ++k) {
      CHECK(g.rows[k] == static_cast<int64_t>(k));
      CHECK(g.cols[k] == static_cast<int64_t>(k));
    }
  }
}

TEST_CASE("the exact solver reads tensors of any layout and float precision", "[lap]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
  const auto cost = torch::randn({7, 5}, gen, torch::kDouble);
  const auto a = dt::linear_sum_assignment(cost);
  const auto t = dt::linear_sum_assignment(cost.t().contiguous().t());  // non-contiguous view
  CHECK(a.cols == t.cols);
  const auto bf = cost.to(torch::kBFloat16);
  check_optimal(bf, false);
}

TEST_CASE("greedy equals a naive global greedy when rows exhaust their candidates", "[lap]") {
  // Every row ranks the columns alike, so most rows find all their best columns taken.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (const auto& [n, m] : {std::pair<int64_t, int64_t>{80, 100}, {100, 80}, {90, 90}}) {
    auto cost = torch::arange(m, torch::kDouble).unsqueeze(0).expand({n, m}) +
                0.01 * torch::rand({n, m}, gen, torch::kDouble);
    if (n > m)
      cost = torch::arange(n, torch::kDouble).unsqueeze(1).expand({n, m}) +
             0.01 * torch::rand({n, m}, gen, torch::kDouble);
    // Naive reference: the smallest remaining entry of a masked copy, one pair at a time.
    auto work = cost.clone();
    std::set<std::pair<int64_t, int64_t>> expected;
    for (int64_t k = 0; k < std::min(n, m); ++k) {
      const int64_t flat = work.argmin().item<int64_t>();
      const int64_t i = flat / m, j = flat % m;
      expected.insert({i, j});
      work.index_put_({i}, kInf);
      work.index_put_({torch::indexing::Slice(), j}, kInf);
    }
    const auto g = dt::greedy_assignment(cost);
    check_valid(g, cost);
    std::set<std::pair<int64_t, int64_t>> got;
    for (size_t k = 0; k < g.rows.size(); ++k) got.insert({g.rows[k], g.cols[k]});
    CHECK(got == expected);
  }
}
