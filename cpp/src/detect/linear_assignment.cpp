// Dense linear assignment: the exact shortest-augmenting-path solver (Crouse, "On implementing
// 2D rectangular assignment algorithms", IEEE TAES 2016; the algorithm behind scipy's
// linear_sum_assignment) and the greedy approximation. See the header for the trade between them.
#include "libtransfer/detect/linear_assignment.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <queue>
#include <utility>
#include <vector>

namespace libtransfer::detect {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// greedy_assignment keeps each row's best kGreedyCandidates columns (a linear-time selection);
// only a row whose candidates all get taken scans its row again. 32 makes rescans rare on random
// matrices (a candidate is taken with probability ~ rank / n) while the selection stays cheap.
constexpr int64_t kGreedyCandidates = 32;
// Rows of the initial selection handed to one parallel task.
constexpr int64_t kGreedyGrain = 16;

// The cost matrix as a minimization problem over rows <= columns, in float64 on the CPU.
struct Problem {
  torch::Tensor original;  // [n, m] float64 CPU contiguous, as given (not negated)
  torch::Tensor work;      // [r, c] float64 CPU contiguous, r <= c; negated when maximizing
  bool transposed = false;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Checks cost and builds the minimization problem. Forbidden entries are +inf in `work`.
Problem prepare(const torch::Tensor& cost, bool maximize, bool allow_forbidden) {
  TORCH_CHECK_VALUE(cost.dim() == 2, "cost must be a 2-D matrix, got ", cost.dim(),
                    "-D tensor of shape ", cost.sizes());
  TORCH_CHECK_TYPE(cost.is_floating_point(), "cost must have a floating dtype (float32 or ",
                   "float64), got ", cost.scalar_type());
  Problem p;
  p.original = cost.detach().to(torch::kCPU, torch::kDouble).contiguous();
  p.transposed = cost.size(0) > cost.size(1);
  torch::Tensor work = maximize ? -p.original : p.original;
  if (p.transposed) work = work.t();
  p.work = work.contiguous();
  p.rows = p.work.size(0);
  p.cols = p.work.size(1);
  const double* w = p.work.data_ptr<double>();
  const int64_t total = p.rows * p.cols;
  for (int64_t k = 0; k < total; ++k) {
    TORCH_CHECK_VALUE(!std::isnan(w[k]), "cost must not contain NaN");
    TORCH_CHECK_VALUE(w[k] != -kInf, "cost must not contain ", maximize ? "+inf" : "-inf", " when ",
                      maximize ? "maximizing" : "minimizing", " (", maximize ? "-inf" : "+inf",
                      " marks a forbidden pair)");
    TORCH_CHECK_VALUE(allow_forbidden || w[k] != kInf,
                      "cost must be finite for greedy_assignment, got an infinite entry (use "
                      "linear_sum_assignment for forbidden pairs)");
  }
  return p;
}

// Turns col_of_row (over the work matrix's rows) into the sorted pairs of the original matrix
// and sums the original costs.
Assignment finish(const Problem& p, const std::vector<int64_t>& col_of_row) {
  std::vector<std::pair<int64_t, int64_t>> pairs(col_of_row.size());
  for (size_t r = 0; r < col_of_row.size(); ++r) {
    const auto i = static_cast<int64_t>(r);
    pairs[r] = p.transposed ? std::make_pair(col_of_row[r], i) : std::make_pair(i, col_of_row[r]);
  }
  if (p.transposed) std::sort(pairs.begin(), pairs.end());
  Assignment a;
  a.rows.reserve(pairs.size());
  a.cols.reserve(pairs.size());
  const double* c = p.original.data_ptr<double>();
  const int64_t m = p.original.size(1);
  for (const auto& [i, j] : pairs) {
    a.rows.push_back(i);
    a.cols.push_back(j);
    a.objective += c[i * m + j];
  }
  return a;
}

// Workspace of the shortest augmenting path search (names as in Crouse's paper).
struct Solver {
  const double* cost;
  int64_t nr, nc;
  std::vector<double> u, v, shortest;
  std::vector<int64_t> path, col4row, row4col, remaining;
  std::vector<char> sr, sc;

  Solver(const double* c, int64_t rows, int64_t cols)
      : cost(c),
        nr(rows),
        nc(cols),
        u(rows, 0.0),
        v(cols, 0.0),
        shortest(cols),
        path(cols, -1),
        col4row(rows, -1),
        row4col(cols, -1),
        remaining(cols),
        sr(rows),
        sc(cols) {}

  // Dijkstra over reduced costs from the free row cur to the nearest free column; returns that
  // column (or -1 when every reachable column is forbidden) and its distance in min_val.
  int64_t augmenting_path(int64_t cur, double& min_val) {
    min_val = 0.0;
    int64_t num_remaining = nc;
    // Filled in reverse so that ties prefer the lowest column index, as scipy does.
    for (int64_t it = 0; it < nc; ++it) remaining[it] = nc - it - 1;
    std::fill(sr.begin(), sr.end(), 0);
    std::fill(sc.begin(), sc.end(), 0);
    std::fill(shortest.begin(), shortest.end(), kInf);
    int64_t sink = -1;
    int64_t i = cur;
    while (sink == -1) {
      int64_t index = -1;
      double lowest = kInf;
      sr[i] = 1;
      const double* row = cost + i * nc;
      const double base = min_val - u[i];
      for (int64_t it = 0; it < num_remaining; ++it) {
        const int64_t j = remaining[it];
        const double r = base + row[j] - v[j];
        if (r < shortest[j]) {
          path[j] = i;
          shortest[j] = r;
        }
        if (shortest[j] < lowest || (shortest[j] == lowest && row4col[j] == -1)) {
          lowest = shortest[j];
          index = it;
        }
      }
      min_val = lowest;
      if (min_val == kInf) return -1;
      const int64_t j = remaining[index];
      if (row4col[j] == -1) {
        sink = j;
      } else {
        i = row4col[j];
      }
      sc[j] = 1;
      remaining[index] = remaining[--num_remaining];
    }
    return sink;
  }

  // Jonker-Volgenant's column reduction (square matrices only: in the rectangular case the
  // columns left unmatched must keep v = 0): v[j] = min_i cost[i][j] keeps every reduced cost
  // >= 0, and each column's argmin row, if still free, is matched at reduced cost 0. On random
  // matrices this matches most rows before any path search.
  void reduce_columns() {
    std::vector<int64_t> argmin(nc, -1);
    for (int64_t j = 0; j < nc; ++j) v[j] = kInf;
    for (int64_t i = 0; i < nr; ++i) {
      const double* row = cost + i * nc;
      for (int64_t j = 0; j < nc; ++j) {
        if (row[j] < v[j]) {
          v[j] = row[j];
          argmin[j] = i;
        }
      }
    }
    for (int64_t j = 0; j < nc; ++j) {
      if (v[j] == kInf) {  // a column of forbidden entries only: infeasible, found by the search
        v[j] = 0.0;
        continue;
      }
      const int64_t i = argmin[j];
      if (col4row[i] == -1) {
        col4row[i] = j;
        row4col[j] = i;
      }
    }
  }

  // Assigns every row; false when the forbidden entries leave no complete matching.
  bool solve() {
    if (nr == nc) reduce_columns();
    for (int64_t cur = 0; cur < nr; ++cur) {
      if (col4row[cur] != -1) continue;  // matched by the column reduction
      double min_val = 0.0;
      const int64_t sink = augmenting_path(cur, min_val);
      if (sink < 0) return false;
      u[cur] += min_val;
      for (int64_t i = 0; i < nr; ++i) {
        if (sr[i] && i != cur) u[i] += min_val - shortest[col4row[i]];
      }
      for (int64_t j = 0; j < nc; ++j) {
        if (sc[j]) v[j] -= min_val - shortest[j];
      }
      for (int64_t j = sink;;) {  // augment along the path back to cur
        const int64_t i = path[j];
        row4col[j] = i;
        std::swap(col4row[i], j);
        if (i == cur) break;
      }
    }
    return true;
  }
};

}  // namespace

Assignment linear_sum_assignment(const torch::Tensor& cost, bool maximize) {
  const Problem p = prepare(cost, maximize, /*allow_forbidden=*/true);
  if (p.rows == 0) return {};
  Solver solver(p.work.data_ptr<double>(), p.rows, p.cols);
  TORCH_CHECK_VALUE(solver.solve(), "cost: infeasible cost matrix (its forbidden ",
                    maximize ? "-inf" : "+inf", " entries leave no assignment of ", p.rows,
                    " pairs)");
  return finish(p, solver.col4row);
}

Assignment greedy_assignment(const torch::Tensor& cost, bool maximize) {
  const Problem p = prepare(cost, maximize, /*allow_forbidden=*/false);
  if (p.rows == 0) return {};
  const double* w = p.work.data_ptr<double>();
  const int64_t nr = p.rows;
  const int64_t nc = p.cols;
  const int64_t k = std::min(nc, kGreedyCandidates);
  // Orders columns of one row by cost, ties by column index (the original row index when
  // transposed, so ties resolve by the original (row, column) either way).
  const auto by_cost = [w, nc](int64_t r) {
    const double* row = w + r * nc;
    return [row](int64_t a, int64_t b) { return row[a] < row[b] || (row[a] == row[b] && a < b); };
  };
  // Each row's k best columns among `pool`, in order: a linear selection, then a sort of k.
  std::vector<int64_t> candidates(static_cast<size_t>(nr * k));
  std::vector<int64_t> count(nr, 0), next(nr, 0);
  const auto refill = [&](int64_t r, std::vector<int64_t>& pool) {
    const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(pool.size()));
    std::nth_element(pool.begin(), pool.begin() + (take - 1), pool.end(), by_cost(r));
    std::sort(pool.begin(), pool.begin() + take, by_cost(r));
    std::copy(pool.begin(), pool.begin() + take, candidates.begin() + r * k);
    count[r] = take;
    next[r] = 0;
  };
  at::parallel_for(0, nr, kGreedyGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> pool(nc);
    for (int64_t r = begin; r < end; ++r) {
      std::iota(pool.begin(), pool.end(), 0);
      refill(r, pool);
    }
  });
  // Heap entries: (cost, original row, original column, work row), smallest first. Each free
  // row holds one entry: its best column among those free when the entry was pushed, a lower
  // bound of its current best, so a popped entry whose column is still free is the global best
  // (and later candidates of a row never tie-break before earlier ones).
  struct Entry {
    double value;
    int64_t key_row, key_col, row;
    bool operator>(const Entry& o) const {
      if (value != o.value) return value > o.value;
      if (key_row != o.key_row) return key_row > o.key_row;
      return key_col > o.key_col;
    }
  };
  std::vector<char> col_taken(nc, 0);
  std::vector<int64_t> col_of_row(nr, -1);
  std::vector<int64_t> pool;
  const auto current = [&](int64_t r) { return candidates[r * k + next[r]]; };
  const auto entry = [&](int64_t r) {
    const int64_t c = current(r);
    return p.transposed ? Entry{w[r * nc + c], c, r, r} : Entry{w[r * nc + c], r, c, r};
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int64_t r = 0; r < nr; ++r) heap.push(entry(r));
  while (!heap.empty()) {
    const int64_t r = heap.top().row;
    heap.pop();
    if (!col_taken[current(r)]) {
      col_taken[current(r)] = 1;
      col_of_row[r] = current(r);
      continue;
    }
    while (next[r] < count[r] && col_taken[current(r)]) ++next[r];
    if (next[r] == count[r]) {  // all k candidates taken: select again among the free columns
      pool.clear();
      for (int64_t c = 0; c < nc; ++c) {
        if (!col_taken[c]) pool.push_back(c);
      }
      refill(r, pool);  // rows <= columns, so a free column remains for every free row
    }
    heap.push(entry(r));
  }
  return finish(p, col_of_row);
}

}  // namespace libtransfer::detect
