// The training loop of the distillation pillar: drives any models::Model student (built-in,
// TorchScript, or a Python nn.Module through the bindings) over a BatchSource with hard-label
// cross-entropy, logit distillation (from a teacher Model run under no_grad on the same inputs, or
// from offline teacher logits / top-k log-probabilities in the batches), or a mix of both.
// Auxiliary-logit KD is KD with KDConfig::logit_subset on noise inputs.
//
// Determinism: batch(step) of a source depends only on its seed and the step, and before each
// micro-batch the trainer seeds torch's global generators from (config.seed, micro-batch index),
// so dropout in a student is reproducible too. Together with checkpoints holding the weights and
// the whole optimizer state, a run resumed from a checkpoint is bit-identical on the CPU to one
// that was never interrupted.
//
// Costs per optimizer step: accumulation x (student forward + backward, teacher forward when
// there is one), one Adam(W) update, and one device synchronization (loss and gradient norm are
// read back for the finiteness check and the metrics).
//
// Data parallel (config.parallel active, see data_parallel.h): each rank trains on its own rows of
// every global batch (RankSliceSource); after the backward passes of a step the gradients, the
// loss and the counts of loss positions are summed over the ranks with one all-reduce per
// gradient dtype, weighted so that the reduced gradient is exactly the global batch's (as the
// accumulation weighting does across micro-batches). The finiteness check, clipping and the update
// use the reduced values, so all ranks take the same step. At the start of a run the ranks check
// that they are at the same step and take rank 0's weights; only rank 0 writes checkpoints and
// metrics, and the ranks meet once more after the last checkpoint. Extra cost per step: one copy
// of the gradients into and out of a flat buffer, and the all-reduce.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "libtransfer/distill/batch.h"
#include "libtransfer/distill/data_parallel.h"
#include "libtransfer/distill/losses.h"
#include "libtransfer/distill/optimizer.h"
#include "libtransfer/distill/schedule.h"
#include "libtransfer/errors.h"
#include "libtransfer/models/model.h"

namespace libtransfer::distill {

enum class ObjectiveKind {
  kCrossEntropy,  // completion_cross_entropy against batch.targets (masked by batch.loss_mask)
  kDistill,       // kd_loss against the teacher (or topk_kd_loss on offline top-k signals)
  kMixed,         // ce_weight * CE + (1 - ce_weight) * KD
};

// Parses "ce" (alias "sft") | "kd" | "mixed" (InvalidInput listing the choices otherwise).
ObjectiveKind parse_objective(const std::string& name);
std::string to_string(ObjectiveKind kind);

// What the student is trained to minimize. Plain data.
struct Objective {
  ObjectiveKind kind = ObjectiveKind::kCrossEntropy;
  KDConfig kd;             // kDistill and kMixed
  double ce_weight = 0.5;  // kMixed: alpha in alpha * CE + (1 - alpha) * KD, in [0, 1]
  // Non-empty: the cross-entropy is the softmax over only these logits, and targets index into
  // this list (the auxiliary-logit MLP's teacher learns its 10 class logits this way while its
  // auxiliary logits get no label). Indices unique and in range.
  std::vector<std::int64_t> ce_logit_subset;
};

// How long, how fast, where to save. Plain data; checked by the Trainer's constructor.
struct TrainerConfig {
  std::int64_t steps = 0;  // optimizer steps; 0: derived from epochs
  // Passes over the source (its steps_per_epoch micro-batches each) when steps is 0:
  // steps = ceil(epochs * steps_per_epoch / accumulation).
  double epochs = 0.0;
  // Micro-batches per optimizer step; their losses are weighted by their share of loss positions
  // so that k micro-batches of b examples give the gradient of one batch of k * b.
  std::int64_t accumulation = 1;
  AdamWConfig optimizer;
  ScheduleConfig schedule;
  double grad_clip = 0.0;  // > 0: clip the global gradient norm to this value
  std::uint64_t seed = 0;

  std::string checkpoint_dir;         // "" : no checkpoints
  std::int64_t checkpoint_every = 0;  // steps between checkpoints (0: only at the end)
  std::int64_t keep_checkpoints = 3;  // newest files kept (<= 0: all)
  // A fresh run refuses a checkpoint_dir that already holds checkpoints (they would mix with
  // this run's) unless this is set, which deletes them first.
  bool overwrite_checkpoints = false;

  std::string metrics_path;     // "" : no metrics file; else JSON lines, see Trainer
  std::int64_t log_every = 1;   // steps between metrics lines (the last step is always written)
  std::int64_t eval_every = 0;  // steps between evaluate callbacks (0: never; also at the end)
  bool progress = true;         // a progress line on stderr when no progress callback is set
  // > 0: stop after completing this step (after its checkpoint), as if the process had been
  // killed there. For interruption tests and time-sliced jobs.
  std::int64_t stop_after_step = 0;
  // Data-parallel training across processes (inactive by default). The data source given to the
  // Trainer must then be this rank's share of the global batches (RankSliceSource); a rank's
  // micro-batch may be empty. Checkpoints (rank 0 writes, every rank reads on resume) need a
  // checkpoint_dir that all ranks see.
  DataParallel parallel;
};

// Reported after every optimizer step (and written to the metrics file every log_every steps).
struct Progress {
  std::int64_t step = 0;  // completed optimizer steps (1 after the first)
  std::int64_t total_steps = 0;
  double epoch = 0.0;           // passes over the source so far (micro-batches / steps_per_epoch)
  double loss = 0.0;            // this step's objective (the mean over its whole batch)
  double lr = 0.0;              // learning rate used by this step
  double grad_norm = 0.0;       // global gradient norm before clipping
  double examples_per_s = 0.0;  // examples (rows) per second since this fit() started
  double elapsed_s = 0.0;       // training time of the run, continued across resumes
};

using ProgressCallback = std::function<void(const Progress&)>;
// Called every eval_every steps with the completed step; returns named metrics (written to the
// metrics file and kept in the result).
using EvaluateCallback = std::function<std::map<std::string, double>(std::int64_t step)>;

// What fit() returns.
struct TrainResult {
  std::int64_t steps = 0;         // completed optimizer steps (total_steps unless stopped early)
  std::int64_t resumed_from = 0;  // step of the checkpoint the run resumed from (0: fresh)
  std::string resumed_path;       // that checkpoint's file ("" when fresh)
  // Checkpoints newer than the one resumed from that were refused, each "path: reason".
  std::vector<std::string> skipped_checkpoints;
  std::vector<Progress> history;  // every step of this call
  std::vector<std::pair<std::int64_t, std::map<std::string, double>>> evaluations;
};

// Thrown when a micro-batch's loss or the step's gradient norm is NaN or infinite. The step's
// update is not applied and no checkpoint is written, so the last checkpoint stays the newest.
class NonFiniteLoss : public InvalidInput {
 public:
  NonFiniteLoss(const std::string& message, std::int64_t step, std::int64_t micro_batch)
      : InvalidInput(message), step(step), micro_batch(micro_batch) {}
  std::int64_t step;         // 0-based index of the optimizer step that failed
  std::int64_t micro_batch;  // 0-based index within the step (-1: the gradient norm)
};

// The training loop. Construction checks everything that can be checked before training
// (config values, teacher/student vocabulary and input kind, the first batch's shapes against
// the student), so a run never fails on a setup mistake midway.
//
// Metrics file (config.metrics_path): one JSON object per line, {"step", "epoch", "loss", "lr",
// "grad_norm", "examples_per_s", "elapsed_s"}, and {"step", "eval": {...}} for evaluations.
// Lines are appended and flushed as they are written. A fresh run truncates the file; a resumed
// run first drops the lines of steps after its checkpoint (rewriting the file atomically), then
// appends, so after any number of interruptions the file reads as one uninterrupted run.
class Trainer {
 public:
  // teacher: required for KD objectives unless the batches carry teacher_logits or top-k
  // signals; it is put in eval mode and run under no_grad. InvalidInput for a teacher whose
  // output_size (vocabulary) or input kind differs from the student's.
  Trainer(models::ModelPtr student, BatchSourcePtr data, TrainerConfig config,
          Objective objective = {}, models::ModelPtr teacher = nullptr);

  void set_progress_callback(ProgressCallback callback) { progress_ = std::move(callback); }
  void set_evaluate_callback(EvaluateCallback callback) { evaluate_ = std::move(callback); }

  // Trains from the current step (0 for a new Trainer) to total_steps().
  TrainResult fit();
  // Loads the newest checkpoint of config.checkpoint_dir that loads cleanly (refused ones are
  // listed in the result and reported on stderr) and trains to the end; a directory without
  // checkpoints starts fresh. InvalidInput if checkpoints exist but none is valid.
  TrainResult resume();
  // Loads this checkpoint file (any error propagates) and trains to the end.
  TrainResult resume_from(const std::string& path);

  // The objective of one batch for the current weights, with autograd (no step taken).
  torch::Tensor loss(const Batch& batch);

  std::int64_t total_steps() const { return total_steps_; }
  std::int64_t step() const { return step_; }
  const TrainerConfig& config() const { return config_; }
  AdamW& optimizer() { return *optimizer_; }
  const models::ModelPtr& student() const { return student_; }

 private:
  struct StepOutcome;
  StepOutcome train_step();
  // Data parallel: sums the step's gradients and counters over the ranks and divides by the
  // global count of loss positions (see the file comment).
  void reduce_step(StepOutcome& outcome, double local_positions, double local_loss_sum,
                   std::int64_t bad_micro_batch, double bad_loss);
  // Data parallel: checks that all ranks are at the same step, then copies rank 0's weights.
  void synchronize_start();
  bool is_main() const { return config_.parallel.is_main(); }
  void save(double elapsed_s);
  TrainResult run(TrainResult result);
  void load(const std::string& path);

  models::ModelPtr student_;
  models::ModelPtr teacher_;
  BatchSourcePtr data_;
  TrainerConfig config_;
  Objective objective_;
  std::unique_ptr<AdamW> optimizer_;
  std::int64_t total_steps_ = 0;
  std::int64_t step_ = 0;
  double elapsed_before_ = 0.0;  // training time of earlier runs (from the checkpoint)
  torch::Dtype feature_dtype_ = torch::kFloat32;
  ProgressCallback progress_;
  EvaluateCallback evaluate_;
};

}  // namespace libtransfer::distill
