// biastransfer._C: the shared-initialization detector (libtransfer/detect): assignment solvers.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "bindings.h"
#include "libtransfer/detect/linear_assignment.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

torch::Tensor to_index_tensor(const std::vector<std::int64_t>& v) {
  return torch::tensor(v, torch::kLong).reshape({static_cast<std::int64_t>(v.size())});
}

// Runs one solver without the GIL and returns (rows int64 [k], cols int64 [k], objective).
template <typename Solver>
py::tuple solve(Solver solver, const torch::Tensor& cost, bool maximize) {
  detect::Assignment a;
  {
    py::gil_scoped_release release;
    a = solver(cost, maximize);
  }
  return py::make_tuple(to_index_tensor(a.rows), to_index_tensor(a.cols), a.objective);
}

}  // namespace

void bind_detect(py::module_& m) {
  m.def(
      "linear_sum_assignment",
      [](const torch::Tensor& cost, bool maximize) {
        return solve(detect::linear_sum_assignment, cost, maximize);
      },
      py::arg("cost"), py::arg("maximize") = false,
      "Exact linear assignment of the 2-D floating cost [n, m] (shortest augmenting paths, as\n"
      "scipy): (rows int64 [k], cols int64 [k], objective float), k = min(n, m), rows sorted.\n"
      "+inf forbids a pair when minimizing (-inf when maximizing); no complete matching ->\n"
      "ValueError 'infeasible cost matrix'.");
  m.def(
      "greedy_assignment",
      [](const torch::Tensor& cost, bool maximize) {
        return solve(detect::greedy_assignment, cost, maximize);
      },
      py::arg("cost"), py::arg("maximize") = false,
      "Greedy assignment (best remaining entry first, ties by index) of the finite cost [n, m]:\n"
      "(rows int64 [k], cols int64 [k], objective float). Faster, not optimal in general.");
}

}  // namespace libtransfer::bindings
