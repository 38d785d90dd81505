#include "libtransfer/distill/trainer.h"

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "libtransfer/distill/checkpoint.h"
#include "libtransfer/io/atomic_file.h"
#include "libtransfer/io/safetensors.h"

namespace libtransfer::distill {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Seconds between two default progress lines on stderr (every step would flood a terminal).
constexpr double kProgressLineInterval = 0.5;

std::string shape_string(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// SplitMix64 finalizer: decorrelates nearby (seed, index) pairs for the per-micro-batch seeds.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The positions a loss averages over: the batch's loss mask, else (token batches) the attention
// mask, else every position.
torch::Tensor positions_mask(const Batch& batch, bool tokens) {
  if (batch.loss_mask.defined()) return batch.loss_mask;
  if (tokens && batch.attention_mask.defined()) return batch.attention_mask;
  return {};
}

// Feature inputs in the model's floating dtype (a float32 noise source may feed a float64 model).
torch::Tensor model_input(models::Model& model, const torch::Tensor& input, torch::Dtype dtype) {
  if (model.input_kind() == models::InputKind::kFeatures && input.is_floating_point() &&
      input.scalar_type() != dtype) {
    return input.to(dtype);
  }
  return input;
}

torch::Dtype floating_dtype_of(models::Model& model) {
  for (const auto& [name, p] : model.named_parameters()) {
    if (p.is_floating_point()) return p.scalar_type();
  }
  return torch::kFloat32;
}

std::string join(const std::vector<std::string>& parts, const std::string& separator) {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) out += (i ? separator : "") + parts[i];
  return out;
}

// Appends JSON lines and flushes each, so a killed run loses at most the line being written.
class MetricsLog {
 public:
  MetricsLog(const std::string& path, bool truncate) {
    if (path.empty()) return;
    file_ = std::fopen(path.c_str(), truncate ? "wb" : "ab");
    if (!file_) throw FileError("cannot open metrics file '" + path + "' for writing");
    path_ = path;
  }
  ~MetricsLog() {
    if (file_) std::fclose(file_);
  }
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  void write(const nlohmann::json& line) {
    if (!file_) return;
    const std::string text = line.dump() + "\n";
    if (std::fwrite(text.data(), 1, text.size(), file_) != text.size() || std::fflush(file_) != 0) {
      throw FileError("cannot write metrics file '" + path_ + "'");
    }
  }

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
};

// Keeps the lines of steps <= `step` (the checkpoint a run resumes from), rewriting atomically.
void trim_metrics(const std::string& path, std::int64_t step) {
  if (path.empty() || !fs::exists(path)) return;
  std::ifstream in(path, std::ios::binary);
  std::string kept;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    // A line cut short by a kill does not parse: it belongs to a step after the checkpoint.
    const auto json = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (json.is_discarded() || !json.is_object() || !json.contains("step")) continue;
    if (!json["step"].is_number_integer() || json["step"].get<std::int64_t>() > step) continue;
    kept += line + "\n";
  }
  in.close();
  io::write_file_atomically(path, kept);
}

nlohmann::json progress_json(const Progress& p) {
  return {{"step", p.step},           {"epoch", p.epoch},
          {"loss", p.loss},           {"lr", p.lr},
          {"grad_norm", p.grad_norm}, {"examples_per_s", p.examples_per_s},
          {"elapsed_s", p.elapsed_s}};
}

void print_progress_line(const Progress& p, bool last) {
  std::fprintf(stderr,
               "\r[trainer] step %lld/%lld  epoch %.2f  loss %.5g  lr %.3g  grad_norm %.3g  "
               "%.0f ex/s  %.1fs%s",
               static_cast<long long>(p.step), static_cast<long long>(p.total_steps), p.epoch,
               p.loss, p.lr, p.grad_norm, p.examples_per_s, p.elapsed_s, last ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace

ObjectiveKind parse_objective(const std::string& name) {
  if (name == "ce" || name == "sft") return ObjectiveKind::kCrossEntropy;
  if (name == "kd") return ObjectiveKind::kDistill;
  if (name == "mixed") return ObjectiveKind::kMixed;
  throw InvalidInput("objective: expected 'ce' (or 'sft'), 'kd' or 'mixed', got '" + name + "'");
}

std::string to_string(ObjectiveKind kind) {
  switch (kind) {
    case ObjectiveKind::kCrossEntropy:
      return "ce";
    case ObjectiveKind::kDistill:
      return "kd";
    case ObjectiveKind::kMixed:
      return "mixed";
  }
  return "?";
}

struct Trainer::StepOutcome {
  double loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  std::int64_t examples = 0;
};

Trainer::Trainer(models::ModelPtr student, BatchSourcePtr data, TrainerConfig config,
                 Objective objective, models::ModelPtr teacher)
    : student_(std::move(student)),
      teacher_(std::move(teacher)),
      data_(std::move(data)),
      config_(std::move(config)),
      objective_(std::move(objective)) {
  if (!student_) throw InvalidInput("trainer: student must be a model, got null");
  if (!data_) throw InvalidInput("trainer: data must be a batch source, got null");
  const auto& c = config_;
  auto check = [](bool ok, const std::string& field, const std::string& expected,
                  const std::string& got) {
    if (!ok)
      throw InvalidInput("trainer config." + field + ": expected " + expected + ", got " + got);
  };
  check(c.steps >= 0, "steps", ">= 0", std::to_string(c.steps));
  check(c.epochs >= 0.0 && std::isfinite(c.epochs), "epochs", "a finite value >= 0",
        std::to_string(c.epochs));
  check(c.steps > 0 || c.epochs > 0.0, "steps", "steps > 0 or epochs > 0", "neither");
  check(c.accumulation >= 1, "accumulation", ">= 1", std::to_string(c.accumulation));
  check(c.grad_clip >= 0.0 && std::isfinite(c.grad_clip), "grad_clip",
        "a finite value >= 0 (0: off)", std::to_string(c.grad_clip));
  check(c.checkpoint_every >= 0, "checkpoint_every", ">= 0", std::to_string(c.checkpoint_every));
  check(c.log_every >= 1, "log_every", ">= 1", std::to_string(c.log_every));
  check(c.eval_every >= 0, "eval_every", ">= 0", std::to_string(c.eval_every));
  check(c.stop_after_step >= 0, "stop_after_step", ">= 0", std::to_string(c.stop_after_step));
  validate(c.optimizer);
  validate(c.schedule);
  validate(c.parallel);

  const bool uses_kd = objective_.kind != ObjectiveKind::kCrossEntropy;
  const bool uses_ce = objective_.kind != ObjectiveKind::kDistill;
  check(objective_.ce_weight >= 0.0 && objective_.ce_weight <= 1.0, "objective.ce_weight",
        "a value in [0, 1]", std::to_string(objective_.ce_weight));
  const std::int64_t outputs = student_->output_size();
  auto check_subset = [outputs](const std::vector<std::int64_t>& subset, const std::string& field) {
    std::set<std::int64_t> seen;
    for (const auto index : subset) {
      if (index < 0 || index >= outputs) {
        throw InvalidInput("trainer " + field + ": index " + std::to_string(index) +
                           " is out of range for a student with " + std::to_string(outputs) +
                           " outputs");
      }
      if (!seen.insert(index).second) {
        throw InvalidInput("trainer " + field + ": index " + std::to_string(index) +
                           " appears twice");
      }
    }
  };
  if (uses_ce) check_subset(objective_.ce_logit_subset, "objective.ce_logit_subset");
  if (uses_kd) {
    const auto& kd = objective_.kd;
    check(kd.temperature > 0.0 && std::isfinite(kd.temperature), "kd.temperature",
          "a finite value > 0", std::to_string(kd.temperature));
    check_subset(kd.logit_subset, "kd.logit_subset");
  }
  if (teacher_) {
    if (teacher_->output_size() != outputs) {
      throw InvalidInput("trainer: teacher and student vocabularies differ: the teacher has " +
                         std::to_string(teacher_->output_size()) +
                         " outputs (vocabulary size), the student " + std::to_string(outputs) +
                         "; distillation needs the same vocabulary (" + teacher_->describe() +
                         " vs " + student_->describe() + ")");
    }
    if (teacher_->input_kind() != student_->input_kind()) {
      throw InvalidInput("trainer: teacher and student take different inputs (" +
                         teacher_->describe() + " vs " + student_->describe() + ")");
    }
    if (teacher_->device() != student_->device()) {
      throw InvalidInput("trainer: teacher is on " + teacher_->device().str() +
                         ", the student on " + student_->device().str() + "; move one of them");
    }
    teacher_->set_training(false);
  }

  const std::int64_t per_epoch = data_->steps_per_epoch();
  check(per_epoch > 0, "data.steps_per_epoch()", "> 0", std::to_string(per_epoch));
  total_steps_ = c.steps > 0 ? c.steps
                             : static_cast<std::int64_t>(std::ceil(
                                   c.epochs * static_cast<double>(per_epoch) / c.accumulation));
  if (total_steps_ < 1) total_steps_ = 1;
  feature_dtype_ = floating_dtype_of(*student_);

  // The first batch shows whether the data fits the student and the objective: fail now, not at
  // step 1,000. Sources are pure functions of the step, so peeking changes nothing.
  const Batch first = data_->batch(0);
  const bool tokens = student_->input_kind() == models::InputKind::kTokens;
  if (!first.input.defined() || first.input.dim() != 2) {
    throw InvalidInput("trainer: batch 0: expected input of shape [B, " +
                       std::string(tokens ? "T" : "F") + "], got " +
                       (first.input.defined() ? shape_string(first.input) : "none"));
  }
  if (tokens && first.input.is_floating_point()) {
    throw WrongType("trainer: the student takes token ids, but batch 0's input is " +
                    std::string(c10::toString(first.input.scalar_type())));
  }
  if (!tokens) {
    if (!first.input.is_floating_point()) {
      throw WrongType("trainer: the student takes floating features, but batch 0's input is " +
                      std::string(c10::toString(first.input.scalar_type())));
    }
    const std::int64_t features = student_->input_size();
    if (features > 0 && first.input.size(1) != features) {
      throw InvalidInput("trainer: batch 0 has " + std::to_string(first.input.size(1)) +
                         " features per example, the student takes " + std::to_string(features));
    }
  }
  if (uses_ce && !first.targets.defined()) {
    throw InvalidInput("trainer: objective " + to_string(objective_.kind) +
                       " needs targets, but batch 0 has none (noise sources carry no labels)");
  }
  if (uses_kd && !teacher_) {
    if (first.teacher_logits.defined()) {
      if (first.teacher_logits.size(-1) != outputs) {
        throw InvalidInput(
            "trainer: teacher and student vocabularies differ: batch 0's teacher "
            "logits have " +
            std::to_string(first.teacher_logits.size(-1)) +
            " entries (vocabulary size), the student " + std::to_string(outputs));
      }
    } else if (!first.teacher_topk_ids.defined() || !first.teacher_topk_logprobs.defined()) {
      throw InvalidInput("trainer: objective " + to_string(objective_.kind) +
                         " needs a teacher model or teacher signals in the batches "
                         "(teacher_logits, or teacher_topk_ids and teacher_topk_logprobs)");
    }
  }
  optimizer_ = std::make_unique<AdamW>(student_->named_parameters(), c.optimizer);
}

torch::Tensor Trainer::loss(const Batch& raw) {
  const Batch batch = raw.to(student_->device());
  const bool tokens = student_->input_kind() == models::InputKind::kTokens;
  const auto mask = positions_mask(batch, tokens);
  const auto logits =
      student_->forward(model_input(*student_, batch.input, feature_dtype_), batch.attention_mask);

  torch::Tensor ce;
  torch::Tensor kd;
  if (objective_.kind != ObjectiveKind::kDistill) {
    if (objective_.ce_logit_subset.empty()) {
      ce = completion_cross_entropy(logits, batch.targets, mask);
    } else {
      const auto subset =
          torch::tensor(objective_.ce_logit_subset, torch::kLong).to(logits.device());
      ce = completion_cross_entropy(logits.index_select(-1, subset), batch.targets, mask);
    }
  }
  if (objective_.kind != ObjectiveKind::kCrossEntropy) {
    if (teacher_) {
      torch::Tensor teacher_logits;
      {
        torch::NoGradGuard no_grad;
        teacher_logits =
            teacher_->forward(model_input(*teacher_, batch.input, floating_dtype_of(*teacher_)),
                              batch.attention_mask);
      }
      kd = kd_loss(logits, teacher_logits, mask, objective_.kd);
    } else if (batch.teacher_logits.defined()) {
      kd = kd_loss(logits, batch.teacher_logits, mask, objective_.kd);
    } else {
      kd = topk_kd_loss(logits, batch.teacher_topk_ids, batch.teacher_topk_logprobs, mask,
                        objective_.kd);
    }
  }
  if (objective_.kind == ObjectiveKind::kCrossEntropy) return ce;
  if (objective_.kind == ObjectiveKind::kDistill) return kd;
  return objective_.ce_weight * ce + (1.0 - objective_.ce_weight) * kd;
}

Trainer::StepOutcome Trainer::train_step() {
  const std::int64_t k = config_.accumulation;
  const bool tokens = student_->input_kind() == models::InputKind::kTokens;
  // Data parallel: a rank's share of a micro-batch may be empty, and only the global count of
  // loss positions must be positive (checked after the reduction, on every rank alike).
  const bool parallel = config_.parallel.active();
  std::vector<Batch> micro(static_cast<std::size_t>(k));
  std::vector<double> positions(static_cast<std::size_t>(k));
  double total_positions = 0.0;
  StepOutcome outcome;
  for (std::int64_t j = 0; j < k; ++j) {
    micro[j] = data_->batch(step_ * k + j);
    if (micro[j].size() == 0) {
      if (parallel) continue;
      throw InvalidInput("trainer: step " + std::to_string(step_) + ": the source's batch " +
                         std::to_string(step_ * k + j) + " is empty");
    }
    const auto mask = positions_mask(micro[j], tokens);
    positions[j] = mask.defined() ? mask.ne(0).sum().item<double>()
                                  : static_cast<double>(tokens ? micro[j].input.numel()
                                                               : micro[j].input.size(0));
    total_positions += positions[j];
    outcome.examples += micro[j].size();
  }
  if (total_positions <= 0.0 && !parallel) {
    throw InvalidInput("trainer: step " + std::to_string(step_) +
                       ": its loss masks select no position");
  }

  optimizer_->zero_grad();
  student_->set_training(true);
  double loss_sum = 0.0;  // parallel: sum over micro-batches of loss x positions
  std::int64_t bad_micro_batch = -1;
  double bad_loss = 0.0;
  for (std::int64_t j = 0; j < k; ++j) {
    if (positions[j] == 0.0) continue;  // nothing to learn from; its loss would be undefined
    const std::int64_t index = step_ * k + j;
    // Dropout and any other randomness in the forward: a pure function of (seed, micro-batch).
    torch::manual_seed(mix(config_.seed ^ mix(static_cast<std::uint64_t>(index))));
    const auto value = loss(micro[j]);
    const double v = value.item<double>();
    if (!std::isfinite(v)) {
      if (parallel) {  // the other ranks learn of it in the reduction; all stop together
        bad_micro_batch = j;
        bad_loss = v;
        break;
      }
      optimizer_->zero_grad();
      std::ostringstream message;
      message << "trainer: non-finite loss (" << v << ") at step " << step_
              << " (0-based), micro-batch " << j << " of " << k << " (source batch " << index
              << "); training stopped before the update";
      if (!config_.checkpoint_dir.empty()) {
        message << "; the newest checkpoint in '" << config_.checkpoint_dir << "' is untouched";
      }
      throw NonFiniteLoss(message.str(), step_, j);
    }
    if (parallel) {
      // Weighted by positions now, divided by the global count after the reduction.
      (value * positions[j]).backward();
      loss_sum += v * positions[j];
    } else {
      const double weight = positions[j] / total_positions;
      (value * weight).backward();
      outcome.loss += v * weight;
    }
  }
  if (parallel) reduce_step(outcome, total_positions, loss_sum, bad_micro_batch, bad_loss);

  // Global gradient norm, as torch.nn.utils.clip_grad_norm_ computes it.
  std::vector<torch::Tensor> grads;
  std::vector<torch::Tensor> norms;
  for (auto& [name, p] : optimizer_->parameters()) {
    if (!p.grad().defined()) continue;
    grads.push_back(p.grad());
    norms.push_back(p.grad().detach().norm(2));
  }
  if (!norms.empty()) {
    const auto total = torch::stack(norms).norm(2);
    outcome.grad_norm = total.item<double>();
    if (!std::isfinite(outcome.grad_norm)) {
      optimizer_->zero_grad();
      throw NonFiniteLoss(
          "trainer: non-finite gradient norm (" + std::to_string(outcome.grad_norm) + ") at step " +
              std::to_string(step_) + " (0-based); training stopped before the update",
          step_, -1);
    }
    if (config_.grad_clip > 0.0) {
      const double coefficient = config_.grad_clip / (outcome.grad_norm + 1e-6);
      if (coefficient < 1.0) {
        torch::NoGradGuard no_grad;
        for (auto& g : grads) g.mul_(coefficient);
      }
    }
  }
  outcome.lr = config_.optimizer.lr * lr_factor(config_.schedule, step_, total_steps_);
  optimizer_->step(outcome.lr);
  optimizer_->zero_grad();
  ++step_;
  return outcome;
}

void Trainer::reduce_step(StepOutcome& outcome, double local_positions, double local_loss_sum,
                          std::int64_t bad_micro_batch, double bad_loss) {
  const auto& parallel = config_.parallel;
  const std::int64_t world = parallel.world_size;
  const auto& params = optimizer_->parameters();
  const std::int64_t n_params = static_cast<std::int64_t>(params.size());
  // Counters, summed over the ranks in float64 (integers below 2^53 stay exact): [positions,
  // loss x positions, examples, per rank: failed micro-batch + 1 and its loss, per parameter:
  // whether its gradient is defined (a parameter no rank's forward used keeps no gradient).
  const std::int64_t kPositions = 0, kLoss = 1, kExamples = 2, kBad = 3;
  const std::int64_t kDefined = kBad + 2 * world;
  auto counters = torch::zeros({kDefined + n_params}, torch::kDouble);
  auto* c = counters.data_ptr<double>();
  c[kPositions] = local_positions;
  c[kLoss] = local_loss_sum;
  c[kExamples] = static_cast<double>(outcome.examples);
  if (bad_micro_batch >= 0) {
    c[kBad + 2 * parallel.rank] = static_cast<double>(bad_micro_batch + 1);
    c[kBad + 2 * parallel.rank + 1] = bad_loss;
  }
  // One flat buffer per gradient dtype (parameters in optimizer order; zeros for undefined
  // gradients); the float64 one carries the counters at its end.
  std::vector<torch::Dtype> dtypes;
  std::vector<std::vector<torch::Tensor>> pieces;
  std::vector<std::size_t> group_of(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i].second;
    const auto dtype = p.scalar_type();
    std::size_t g = 0;
    while (g < dtypes.size() && dtypes[g] != dtype) ++g;
    if (g == dtypes.size()) {
      dtypes.push_back(dtype);
      pieces.emplace_back();
    }
    group_of[i] = g;
    const auto& grad = p.grad();
    if (grad.defined()) {
      c[kDefined + static_cast<std::int64_t>(i)] = 1.0;
      pieces[g].push_back(grad.detach().reshape(-1));
    } else {
      pieces[g].push_back(torch::zeros({p.numel()}, p.options()));
    }
  }
  std::vector<torch::Tensor> buffers;
  std::int64_t counters_group = -1;
  for (std::size_t g = 0; g < dtypes.size(); ++g) {
    if (dtypes[g] == torch::kDouble && counters_group < 0) {
      counters_group = static_cast<std::int64_t>(g);
      pieces[g].push_back(counters.to(pieces[g].front().device()));
    }
    buffers.push_back(torch::cat(pieces[g]));
  }
  // NCCL reduces device tensors only: the counters travel on the student's device.
  if (counters_group < 0) buffers.push_back(counters.to(student_->device()));
  pieces.clear();

  parallel.all_reduce(buffers);

  const auto& carrier =
      buffers[counters_group < 0 ? buffers.size() - 1 : static_cast<std::size_t>(counters_group)];
  const auto reduced =
      carrier.narrow(0, carrier.numel() - counters.numel(), counters.numel()).to(torch::kCPU);
  const double* r = reduced.data_ptr<double>();
  std::ostringstream failures;
  std::int64_t first_bad_rank = -1;
  for (std::int64_t rank = 0; rank < world; ++rank) {
    const double micro_plus_one = r[kBad + 2 * rank];
    if (micro_plus_one == 0.0) continue;
    if (first_bad_rank < 0) first_bad_rank = rank;
    failures << (first_bad_rank == rank ? "" : "; ") << "rank " << rank << ": micro-batch "
             << static_cast<std::int64_t>(micro_plus_one) - 1 << " of " << config_.accumulation
             << ", loss " << r[kBad + 2 * rank + 1];
  }
  if (first_bad_rank >= 0) {
    optimizer_->zero_grad();
    std::ostringstream message;
    message << "trainer: non-finite loss at step " << step_ << " (0-based) (" << failures.str()
            << "); every rank stopped before the update";
    if (!config_.checkpoint_dir.empty()) {
      message << "; the newest checkpoint in '" << config_.checkpoint_dir << "' is untouched";
    }
    throw NonFiniteLoss(message.str(), step_,
                        static_cast<std::int64_t>(r[kBad + 2 * first_bad_rank]) - 1);
  }
  const double global_positions = r[kPositions];
  if (global_positions <= 0.0) {
    optimizer_->zero_grad();
    throw InvalidInput("trainer: step " + std::to_string(step_) +
                       ": its loss masks select no position on any of the " +
                       std::to_string(world) + " ranks");
  }
  outcome.loss = r[kLoss] / global_positions;
  outcome.examples = static_cast<std::int64_t>(r[kExamples]);

  // Back into .grad, divided by the global count: the gradient of the global batch's mean loss.
  torch::NoGradGuard no_grad;
  std::vector<std::int64_t> offset(dtypes.size(), 0);
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto p = params[i].second;
    const std::size_t g = group_of[i];
    const std::int64_t n = p.numel();
    const auto slice = buffers[g].narrow(0, offset[g], n).view(p.sizes());
    offset[g] += n;
    if (r[kDefined + static_cast<std::int64_t>(i)] == 0.0) continue;  // unused on every rank
    if (p.grad().defined()) {
      p.mutable_grad().copy_(slice).div_(global_positions);
    } else {
      p.mutable_grad() = slice.div(global_positions);
    }
  }
}

void Trainer::synchronize_start() {
  const auto& parallel = config_.parallel;
  const auto world = static_cast<double>(parallel.world_size);
  // Same world size and step everywhere: sums of 1, step and step^2 pin every rank's step.
  auto check = torch::tensor(
      {1.0, static_cast<double>(step_), static_cast<double>(step_) * static_cast<double>(step_)},
      torch::kDouble);
  std::vector<torch::Tensor> buffers{check.to(student_->device())};
  parallel.all_reduce(buffers);
  const auto* c = buffers[0].to(torch::kCPU).contiguous().data_ptr<double>();
  const double s = static_cast<double>(step_);
  if (c[0] != world || c[1] != world * s || c[2] != world * s * s) {
    std::ostringstream message;
    message << "trainer: data parallel ranks disagree: rank " << parallel.rank << " of "
            << parallel.world_size << " is at step " << step_ << ", but the ranks' counts sum to "
            << c[0] << " (expected " << world << ") and their steps to " << c[1] << " (expected "
            << world * s
            << "); start every rank from the same checkpoint (a checkpoint_dir all ranks see)";
    throw InvalidInput(message.str());
  }
  // Rank 0's weights everywhere (as torch's DistributedDataParallel does): the others add zeros.
  torch::NoGradGuard no_grad;
  const auto& params = optimizer_->parameters();
  std::vector<torch::Tensor> flat;
  for (const auto& [name, p] : params) {
    flat.push_back(parallel.is_main() ? p.detach().reshape(-1).clone()
                                      : torch::zeros({p.numel()}, p.options()));
  }
  // One buffer per parameter keeps dtypes apart; this runs once per run, not per step.
  parallel.all_reduce(flat);
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto p = params[i].second;
    p.copy_(flat[i].view(p.sizes()));
  }
}

void Trainer::save(double elapsed_s) {
  TrainerState state;
  state.step = step_;
  state.seed = config_.seed;
  state.accumulation = config_.accumulation;
  state.total_steps = total_steps_;
  state.elapsed_s = elapsed_s;
  save_checkpoint(checkpoint_path(config_.checkpoint_dir, step_), *student_, *optimizer_, state);
  prune_checkpoints(config_.checkpoint_dir, config_.keep_checkpoints);
}

void Trainer::load(const std::string& path) {
  {
    // Refuse a checkpoint of a different run before touching the model.
    const auto file = io::SafetensorsFile::open(path);
    const auto& metadata = file.metadata();
    const auto seed = metadata.find("trainer.seed");
    const auto accumulation = metadata.find("trainer.accumulation");
    if (seed != metadata.end() && seed->second != std::to_string(config_.seed)) {
      throw InvalidInput("checkpoint '" + path + "' belongs to a run with seed " + seed->second +
                         ", this run has seed " + std::to_string(config_.seed));
    }
    if (accumulation != metadata.end() &&
        accumulation->second != std::to_string(config_.accumulation)) {
      throw InvalidInput("checkpoint '" + path + "' belongs to a run with accumulation " +
                         accumulation->second + ", this run has " +
                         std::to_string(config_.accumulation));
    }
  }
  const TrainerState state = load_checkpoint(path, *student_, *optimizer_);
  step_ = state.step;
  elapsed_before_ = state.elapsed_s;
}

TrainResult Trainer::fit() {
  // Data parallel: rank 0 alone manages the checkpoint directory.
  if (step_ == 0 && !config_.checkpoint_dir.empty() && is_main()) {
    const auto existing = list_checkpoints(config_.checkpoint_dir);
    if (!existing.empty()) {
      if (!config_.overwrite_checkpoints) {
        throw InvalidInput("trainer: checkpoint_dir '" + config_.checkpoint_dir +
                           "' already holds checkpoints (newest: step " +
                           std::to_string(existing.back().step) +
                           "); resume from it, choose another directory, or set "
                           "overwrite_checkpoints");
      }
      for (const auto& entry : existing) fs::remove(entry.path);
    }
  }
  return run(TrainResult{});
}

TrainResult Trainer::resume() {
  if (config_.checkpoint_dir.empty()) {
    throw InvalidInput("trainer: resume() needs config.checkpoint_dir");
  }
  const auto entries = list_checkpoints(config_.checkpoint_dir);
  if (entries.empty()) return fit();
  TrainResult result;
  for (auto it = entries.rbegin(); it != entries.rend(); ++it) {
    try {
      load(it->path);
      result.resumed_from = step_;
      result.resumed_path = it->path;
      break;
    } catch (const std::exception& e) {
      result.skipped_checkpoints.push_back(it->path + ": " + e.what());
      std::fprintf(stderr, "[trainer] skipping checkpoint %s\n", e.what());
    }
  }
  if (result.resumed_path.empty()) {
    throw InvalidInput("trainer: no valid checkpoint in '" + config_.checkpoint_dir +
                       "': " + join(result.skipped_checkpoints, "; "));
  }
  if (is_main()) trim_metrics(config_.metrics_path, step_);
  return run(std::move(result));
}

TrainResult Trainer::resume_from(const std::string& path) {
  load(path);
  TrainResult result;
  result.resumed_from = step_;
  result.resumed_path = path;
  if (is_main()) trim_metrics(config_.metrics_path, step_);
  return run(std::move(result));
}

TrainResult Trainer::run(TrainResult result) {
  const bool parallel = config_.parallel.active();
  if (parallel) synchronize_start();
  // Data parallel: rank 0 writes the checkpoints and the metrics; the others only train.
  const bool writes = is_main();
  if (!config_.checkpoint_dir.empty() && writes) fs::create_directories(config_.checkpoint_dir);
  MetricsLog metrics(writes ? config_.metrics_path : std::string(),
                     /*truncate=*/result.resumed_path.empty() && step_ == 0);
  const auto start = Clock::now();
  auto last_line = start;
  std::int64_t examples = 0;
  const double per_epoch = static_cast<double>(data_->steps_per_epoch());
  while (step_ < total_steps_) {
    const StepOutcome outcome = train_step();
    examples += outcome.examples;
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - start).count();
    Progress p;
    p.step = step_;
    p.total_steps = total_steps_;
    p.epoch = static_cast<double>(step_ * config_.accumulation) / per_epoch;
    p.loss = outcome.loss;
    p.lr = outcome.lr;
    p.grad_norm = outcome.grad_norm;
    p.examples_per_s = seconds > 0.0 ? static_cast<double>(examples) / seconds : 0.0;
    p.elapsed_s = elapsed_before_ + seconds;
    result.history.push_back(p);
    const bool last =
        step_ == total_steps_ || (config_.stop_after_step > 0 && step_ >= config_.stop_after_step);

    if (progress_) {
      progress_(p);
    } else if (config_.progress && writes &&
               (last ||
                std::chrono::duration<double>(now - last_line).count() >= kProgressLineInterval)) {
      print_progress_line(p, last);
      last_line = now;
    }
    if (step_ % config_.log_every == 0 || step_ == total_steps_) metrics.write(progress_json(p));
    if (evaluate_ && config_.eval_every > 0 &&
        (step_ % config_.eval_every == 0 || step_ == total_steps_)) {
      student_->set_training(false);
      auto values = evaluate_(step_);
      student_->set_training(true);
      metrics.write({{"step", step_}, {"eval", values}});
      result.evaluations.emplace_back(step_, std::move(values));
    }
    if (!config_.checkpoint_dir.empty() && writes &&
        ((config_.checkpoint_every > 0 && step_ % config_.checkpoint_every == 0) ||
         step_ == total_steps_)) {
      save(p.elapsed_s);
    }
    if (last) break;
  }
  if (parallel) {
    // A barrier: no rank returns before rank 0 has written the last checkpoint and metrics.
    std::vector<torch::Tensor> done{
        torch::ones({1}, torch::TensorOptions().dtype(torch::kDouble).device(student_->device()))};
    config_.parallel.all_reduce(done);
  }
  student_->set_training(false);
  result.steps = step_;
  return result;
}

}  // namespace libtransfer::distill
