#include "libtransfer/distill/data_parallel.h"

#include <string>
#include <utility>

#include "libtransfer/errors.h"

namespace libtransfer::distill {

void validate(const DataParallel& parallel) {
  if (parallel.world_size < 1) {
    throw InvalidInput("data parallel world_size: expected >= 1, got " +
                       std::to_string(parallel.world_size));
  }
  if (parallel.rank < 0 || parallel.rank >= parallel.world_size) {
    throw InvalidInput("data parallel rank: expected 0 .. " +
                       std::to_string(parallel.world_size - 1) + " (world_size " +
                       std::to_string(parallel.world_size) + "), got " +
                       std::to_string(parallel.rank));
  }
}

RankSliceSource::RankSliceSource(BatchSourcePtr inner, std::int64_t rank, std::int64_t world_size)
    : inner_(std::move(inner)), rank_(rank), world_size_(world_size) {
  if (!inner_) throw InvalidInput("RankSliceSource: source must be a batch source, got null");
  DataParallel check;
  check.rank = rank;
  check.world_size = world_size;
  validate(check);
}

Batch RankSliceSource::batch(std::int64_t step) {
  Batch full = inner_->batch(step);
  const std::int64_t rows = full.size();
  const std::int64_t begin = rank_ * rows / world_size_;
  const std::int64_t end = (rank_ + 1) * rows / world_size_;
  auto slice = [&](const torch::Tensor& t, const char* name) -> torch::Tensor {
    if (!t.defined()) return t;
    if (t.dim() == 0 || t.size(0) != rows) {
      throw InvalidInput("RankSliceSource: batch " + std::to_string(step) + ": tensor " + name +
                         " must have the batch's " + std::to_string(rows) +
                         " rows in its first dimension, got shape " + c10::str(t.sizes()));
    }
    return t.slice(0, begin, end);
  };
  Batch out;
  out.input = slice(full.input, "input");
  out.attention_mask = slice(full.attention_mask, "attention_mask");
  out.targets = slice(full.targets, "targets");
  out.loss_mask = slice(full.loss_mask, "loss_mask");
  out.teacher_logits = slice(full.teacher_logits, "teacher_logits");
  out.teacher_topk_ids = slice(full.teacher_topk_ids, "teacher_topk_ids");
  out.teacher_topk_logprobs = slice(full.teacher_topk_logprobs, "teacher_topk_logprobs");
  return out;
}

}  // namespace libtransfer::distill
