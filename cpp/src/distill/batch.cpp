#include "libtransfer/distill/batch.h"

namespace libtransfer::distill {
namespace {

torch::Tensor moved(const torch::Tensor& t, torch::Device device) {
  return t.defined() ? t.to(device) : t;
}

}  // namespace

Batch Batch::to(torch::Device device) const {
  Batch out;
  out.input = moved(input, device);
  out.attention_mask = moved(attention_mask, device);
  out.targets = moved(targets, device);
  out.loss_mask = moved(loss_mask, device);
  out.teacher_logits = moved(teacher_logits, device);
  out.teacher_topk_ids = moved(teacher_topk_ids, device);
  out.teacher_topk_logprobs = moved(teacher_topk_logprobs, device);
  return out;
}

}  // namespace libtransfer::distill
