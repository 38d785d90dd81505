// The torch-ops path of the fingerprint accumulator: any device, float64, chunks of rows. Only
// [V]-sized sums, per-run subset sums and a few scalars move to the CPU.
#include <algorithm>
#include <vector>

#include "accumulator_kernel.h"

namespace libtransfer::fingerprint::detail {

namespace {

void add_into(std::vector<double>& target, const torch::Tensor& values) {
  const auto cpu = values.to(torch::kCPU, torch::kDouble).contiguous();
  const double* data = cpu.data_ptr<double>();
  for (int64_t i = 0; i < cpu.numel(); ++i) target[static_cast<size_t>(i)] += data[i];
}

int64_t first_nonfinite(const torch::Tensor& row) {
  const auto bad = torch::nonzero(~torch::isfinite(row)).to(torch::kCPU);
  return bad.numel() > 0 ? bad[0][0].item<int64_t>() : -1;
}

}  // namespace

PartialSums accumulate_torch(const RowsInput& input) {
  const int64_t rows = input.teacher.size(0);
  const int64_t vocab = input.teacher.size(1);
  const auto& subset = *input.subset;
  const int64_t subset_size = static_cast<int64_t>(subset.size());
  const auto device = input.teacher.device();
  const double inv_tau = 1.0 / input.temperature;
  const bool keep_sums = input.per_sequence_sums && subset_size > 0;
  const auto subset_index = torch::tensor(subset, torch::kLong).to(device);
  const int64_t* sequence_ids = input.sequence_ids.data_ptr<int64_t>();
  const int64_t chunk = std::max<int64_t>(1, kTorchChunkElements / vocab);

  PartialSums out(vocab, subset_size, vocab);
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t end = std::min(rows, start + chunk);
    auto selected = torch::arange(start, end, torch::kLong);
    if (input.mask.defined()) selected = selected.masked_select(input.mask.slice(0, start, end));
    if (selected.numel() == 0) continue;
    auto on_device = selected.to(device);
    auto t = input.teacher.index_select(0, on_device).to(torch::kDouble);
    auto r = input.reference.index_select(0, on_device).to(torch::kDouble);
    const auto finite =
        torch::logical_and(torch::isfinite(t).all(1), torch::isfinite(r).all(1)).to(torch::kCPU);
    if (!finite.all().item<bool>()) {
      if (!input.skip_nonfinite) {
        const int64_t k = torch::nonzero(~finite)[0][0].item<int64_t>();
        const int64_t row = selected[k].item<int64_t>();
        int64_t column = first_nonfinite(t[k]);
        const char* which = column >= 0 ? "teacher" : "reference";
        if (column < 0) column = first_nonfinite(r[k]);
        TORCH_CHECK_VALUE(false, nonfinite_message(which, row, column, input.positions_per_batch));
      }
      out.skipped_nonfinite += (~finite).sum().item<int64_t>();
      selected = selected.masked_select(finite);
      if (selected.numel() == 0) continue;
      on_device = finite.to(device);
      t = t.index({on_device});
      r = r.index({on_device});
    }
    const auto lt = torch::log_softmax(t * inv_tau, 1);
    const auto lr = torch::log_softmax(r * inv_tau, 1);
    const auto d = lt - lr;
    const auto pt = lt.exp(), pr = lr.exp();
    add_into(out.sum_delta, d.sum(0));
    add_into(out.sum_delta_sq, (d * d).sum(0));
    add_into(out.sum_grad, (pt - pr).sum(0));
    out.kl_teacher_reference += (pt * d).sum().item<double>();
    out.kl_reference_teacher -= (pr * d).sum().item<double>();
    out.positions += selected.numel();

    // Runs of consecutive rows with the same sequence id, in row order.
    const int64_t* picked = selected.data_ptr<int64_t>();
    std::vector<int64_t> run_of_row(static_cast<size_t>(selected.numel()));
    std::vector<SequenceRun> runs;
    for (int64_t i = 0; i < selected.numel(); ++i) {
      const int64_t id = sequence_ids[picked[i]];
      if (runs.empty() || runs.back().id != id) runs.push_back({id, 0, {}});
      ++runs.back().count;
      run_of_row[static_cast<size_t>(i)] = static_cast<int64_t>(runs.size()) - 1;
    }
    if (subset_size > 0) {
      const auto ds = d.index_select(1, subset_index);
      const auto f = ds - ds.mean(1, true);
      const auto m = torch::logsumexp(lt.index_select(1, subset_index), 1) -
                     torch::logsumexp(lr.index_select(1, subset_index), 1);
      add_into(out.sum_centered, f.sum(0));
      out.mass_shift += m.sum().item<double>();
      out.mass_shift_sq += (m * m).sum().item<double>();
      if (keep_sums) {
        const auto index = torch::tensor(run_of_row, torch::kLong).to(device);
        const auto sums =
            torch::zeros({static_cast<int64_t>(runs.size()), subset_size}, f.options())
                .index_add_(0, index, f)
                .to(torch::kCPU)
                .contiguous();
        const double* data = sums.data_ptr<double>();
        for (size_t i = 0; i < runs.size(); ++i) {
          runs[i].sum.assign(data + i * subset_size, data + (i + 1) * subset_size);
        }
      }
    }
    PartialSums piece(vocab, subset_size, vocab);
    piece.runs = std::move(runs);
    out.add(piece);
  }
  return out;
}

}  // namespace libtransfer::fingerprint::detail
