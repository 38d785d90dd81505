// Data-parallel training across processes: what the Trainer needs to know about the other ranks,
// and the source decorator that gives each rank its rows of every global batch.
//
// The library does not talk to the network itself: the caller supplies an all-reduce (sum) over
// the ranks, e.g. torch.distributed.all_reduce bound from Python (biastransfer.distributed).
// With it, every optimizer step of the Trainer performs one all-reduce per gradient dtype (one in
// total for float64 models, two otherwise: the gradients plus a float64 vector of n_params + W + 3
// counters), so each rank communicates about 2 x (W - 1) / W x the gradient bytes per step with a
// ring all-reduce; see docs/scaling.md.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "libtransfer/distill/batch.h"

namespace libtransfer::distill {

// Sums every tensor of `buffers` element-wise across all ranks, in place (an all-reduce). Every
// rank calls it the same number of times with buffers of the same shapes and dtypes, and every
// rank must end with bit-identical sums (ring and tree all-reduces of gloo and NCCL do), since
// the ranks then take their optimizer steps independently.
using AllReduce = std::function<void(std::vector<torch::Tensor>& buffers)>;

// Where this process sits among the ranks of a data-parallel run. Plain data. Inactive (a single
// process) when all_reduce is empty.
struct DataParallel {
  std::int64_t rank = 0;        // 0 .. world_size - 1; rank 0 writes checkpoints and metrics
  std::int64_t world_size = 1;  // number of ranks
  AllReduce all_reduce;         // empty: not distributed

  bool active() const { return static_cast<bool>(all_reduce); }
  bool is_main() const { return rank == 0; }
};

// InvalidInput unless 0 <= rank < world_size (world_size >= 1), naming both values.
void validate(const DataParallel& parallel);

// Rows [rank * B / W, (rank + 1) * B / W) (integer division) of every batch of `inner`, for every
// tensor of the batch: the ranks' slices are disjoint and together are exactly the inner batch,
// which is what makes a data-parallel run equal to a single process on the same global batch. A
// rank's slice is empty when B < W. Each rank still builds the whole inner batch and then keeps
// its rows (views, no copy): cheap for generated and in-memory sources.
class RankSliceSource : public BatchSource {
 public:
  // InvalidInput for a null source or a rank outside 0 .. world_size - 1.
  RankSliceSource(BatchSourcePtr inner, std::int64_t rank, std::int64_t world_size);

  Batch batch(std::int64_t step) override;
  std::int64_t steps_per_epoch() const override { return inner_->steps_per_epoch(); }

  std::int64_t rank() const { return rank_; }
  std::int64_t world_size() const { return world_size_; }
  const BatchSourcePtr& inner() const { return inner_; }

 private:
  BatchSourcePtr inner_;
  std::int64_t rank_;
  std::int64_t world_size_;
};

}  // namespace libtransfer::distill
