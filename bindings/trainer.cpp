// biastransfer._C: the trainer (libtransfer/distill/trainer.h), its configuration, progress and
// result, and the checkpoint listing. Batch sources are bound in bindings/datasets.cpp.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "bindings.h"
#include "libtransfer/distill/checkpoint.h"
#include "libtransfer/distill/data_parallel.h"
#include "libtransfer/distill/trainer.h"
#include "libtransfer/errors.h"
#include "model_caster.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using distill::BatchSource;
using distill::BatchSourcePtr;
using distill::Progress;
using distill::TrainerConfig;
using distill::TrainResult;

BatchSourcePtr to_source(const py::object& data) {
  try {
    return data.cast<BatchSourcePtr>();
  } catch (const py::cast_error&) {
    throw WrongType("data: expected a BatchSource (biastransfer.datasets), got " +
                    std::string(Py_TYPE(data.ptr())->tp_name));
  }
}

TrainerConfig make_config(int64_t steps, double epochs, int64_t accumulation, double lr,
                          double beta1, double beta2, double eps, double weight_decay,
                          bool decoupled_weight_decay, const std::string& schedule,
                          int64_t warmup_steps, double min_lr_ratio, double grad_clip,
                          uint64_t seed, const std::string& checkpoint_dir,
                          int64_t checkpoint_every, int64_t keep_checkpoints,
                          bool overwrite_checkpoints, const std::string& metrics_path,
                          int64_t log_every, int64_t eval_every, bool progress,
                          int64_t stop_after_step) {
  TrainerConfig c;
  c.steps = steps;
  c.epochs = epochs;
  c.accumulation = accumulation;
  c.optimizer.lr = lr;
  c.optimizer.beta1 = beta1;
  c.optimizer.beta2 = beta2;
  c.optimizer.eps = eps;
  c.optimizer.weight_decay = weight_decay;
  c.optimizer.decoupled_weight_decay = decoupled_weight_decay;
  c.schedule.kind = distill::parse_schedule(schedule);
  c.schedule.warmup_steps = warmup_steps;
  c.schedule.min_lr_ratio = min_lr_ratio;
  c.grad_clip = grad_clip;
  c.seed = seed;
  c.checkpoint_dir = checkpoint_dir;
  c.checkpoint_every = checkpoint_every;
  c.keep_checkpoints = keep_checkpoints;
  c.overwrite_checkpoints = overwrite_checkpoints;
  c.metrics_path = metrics_path;
  c.log_every = log_every;
  c.eval_every = eval_every;
  c.progress = progress;
  c.stop_after_step = stop_after_step;
  return c;
}

void bind_config(py::module_& m) {
  py::class_<TrainerConfig>(m, "TrainerConfig",
                            "The C++ trainer's settings (biastransfer.training.TrainerConfig "
                            "builds one; see its docstring).")
      .def(py::init(&make_config), py::arg("steps") = 0, py::arg("epochs") = 0.0,
           py::arg("accumulation") = 1, py::arg("lr") = 1e-3, py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0,
           py::arg("decoupled_weight_decay") = true, py::arg("schedule") = "constant",
           py::arg("warmup_steps") = 0, py::arg("min_lr_ratio") = 0.0, py::arg("grad_clip") = 0.0,
           py::arg("seed") = 0, py::arg("checkpoint_dir") = "", py::arg("checkpoint_every") = 0,
           py::arg("keep_checkpoints") = 3, py::arg("overwrite_checkpoints") = false,
           py::arg("metrics_path") = "", py::arg("log_every") = 1, py::arg("eval_every") = 0,
           py::arg("progress") = true, py::arg("stop_after_step") = 0)
      .def_readwrite("steps", &TrainerConfig::steps)
      .def_readwrite("epochs", &TrainerConfig::epochs)
      .def_readwrite("accumulation", &TrainerConfig::accumulation)
      .def_readwrite("grad_clip", &TrainerConfig::grad_clip)
      .def_readwrite("seed", &TrainerConfig::seed)
      .def_readwrite("checkpoint_dir", &TrainerConfig::checkpoint_dir)
      .def_readwrite("checkpoint_every", &TrainerConfig::checkpoint_every)
      .def_readwrite("keep_checkpoints", &TrainerConfig::keep_checkpoints)
      .def_readwrite("metrics_path", &TrainerConfig::metrics_path)
      .def_readwrite("stop_after_step", &TrainerConfig::stop_after_step)
      .def(
          "set_data_parallel",
          [](TrainerConfig& c, int64_t rank, int64_t world_size,
             std::optional<distill::AllReduce> all_reduce) {
            distill::DataParallel parallel;
            parallel.rank = rank;
            parallel.world_size = world_size;
            if (all_reduce) parallel.all_reduce = std::move(*all_reduce);
            distill::validate(parallel);
            c.parallel = std::move(parallel);
          },
          py::arg("rank"), py::arg("world_size"), py::arg("all_reduce"),
          "Data-parallel training (biastransfer.distributed sets it up): all_reduce(buffers)\n"
          "must sum each tensor of the list in place across the ranks (e.g.\n"
          "torch.distributed.all_reduce on each). None: a single process.")
      .def_property_readonly("rank", [](const TrainerConfig& c) { return c.parallel.rank; })
      .def_property_readonly("world_size",
                             [](const TrainerConfig& c) { return c.parallel.world_size; })
      .def_property_readonly("data_parallel",
                             [](const TrainerConfig& c) { return c.parallel.active(); })
      .def_property_readonly("lr", [](const TrainerConfig& c) { return c.optimizer.lr; })
      .def_property_readonly("schedule",
                             [](const TrainerConfig& c) { return to_string(c.schedule.kind); });
}

void bind_results(py::module_& m) {
  py::class_<Progress>(m, "Progress", "One optimizer step's numbers (see trainer.h).")
      .def_readonly("step", &Progress::step, "Completed optimizer steps (1 after the first).")
      .def_readonly("total_steps", &Progress::total_steps)
      .def_readonly("epoch", &Progress::epoch)
      .def_readonly("loss", &Progress::loss, "This step's objective over its whole batch.")
      .def_readonly("lr", &Progress::lr)
      .def_readonly("grad_norm", &Progress::grad_norm, "Global gradient norm before clipping.")
      .def_readonly("examples_per_s", &Progress::examples_per_s)
      .def_readonly("elapsed_s", &Progress::elapsed_s)
      .def("__repr__", [](const Progress& p) {
        return "Progress(step=" + c10::str(p.step) + "/" + c10::str(p.total_steps) +
               ", loss=" + c10::str(p.loss) + ", lr=" + c10::str(p.lr) + ")";
      });
  py::class_<TrainResult>(m, "TrainResult", "What Trainer.fit/resume return.")
      .def_readonly("steps", &TrainResult::steps)
      .def_readonly("resumed_from", &TrainResult::resumed_from)
      .def_readonly("resumed_path", &TrainResult::resumed_path)
      .def_readonly("skipped_checkpoints", &TrainResult::skipped_checkpoints)
      .def_readonly("history", &TrainResult::history)
      .def_readonly("evaluations", &TrainResult::evaluations);
}

distill::Objective make_objective(const std::string& objective,
                                  const std::optional<distill::KDConfig>& kd, double ce_weight,
                                  const std::vector<int64_t>& ce_logit_subset) {
  distill::Objective out;
  out.kind = distill::parse_objective(objective);
  if (kd) out.kd = *kd;
  out.ce_weight = ce_weight;
  out.ce_logit_subset = ce_logit_subset;
  return out;
}

void bind_trainer_class(py::module_& m) {
  py::class_<distill::Trainer>(m, "Trainer",
                               "The C++ training loop over a student model and a BatchSource (see "
                               "biastransfer.training.Trainer for the friendly surface).")
      .def(py::init([](const py::object& student, const py::object& data,
                       const TrainerConfig& config, const std::string& objective,
                       const std::optional<distill::KDConfig>& kd, double ce_weight,
                       const py::object& teacher, const std::vector<int64_t>& ce_logit_subset) {
             auto student_model = to_model(student, "student");
             auto teacher_model = teacher.is_none() ? nullptr : to_model(teacher, "teacher");
             auto source = to_source(data);
             auto goal = make_objective(objective, kd, ce_weight, ce_logit_subset);
             // The constructor runs the first batch through checks (and Python forwards need
             // the GIL, which PyModuleModel takes itself).
             py::gil_scoped_release release;
             return std::make_unique<distill::Trainer>(student_model, source, config, goal,
                                                       teacher_model);
           }),
           py::arg("student"), py::arg("data"), py::arg("config"), py::arg("objective") = "ce",
           py::arg("kd") = py::none(), py::arg("ce_weight") = 0.5, py::arg("teacher") = py::none(),
           py::arg("ce_logit_subset") = std::vector<int64_t>{},
           "objective: 'ce' (alias 'sft'), 'kd' or 'mixed' (ce_weight * CE + (1 - ce_weight) "
           "* KD). teacher: a model (required for KD unless the batches carry teacher signals). "
           "ce_logit_subset: CE over only these logits (targets index into the list).")
      .def(
          "set_progress_callback",
          [](distill::Trainer& t, std::optional<distill::ProgressCallback> callback) {
            t.set_progress_callback(callback ? *callback : distill::ProgressCallback());
          },
          py::arg("callback"), "callback(progress) after every step; None: the stderr line.")
      .def(
          "set_evaluate_callback",
          [](distill::Trainer& t, std::optional<distill::EvaluateCallback> callback) {
            t.set_evaluate_callback(callback ? *callback : distill::EvaluateCallback());
          },
          py::arg("callback"),
          "callback(step) -> dict[str, float], every config.eval_every steps (model in eval "
          "mode).")
      .def(
          "fit",
          [](distill::Trainer& t) {
            py::gil_scoped_release release;
            return t.fit();
          },
          "Trains from the current step to the end.")
      .def(
          "resume",
          [](distill::Trainer& t) {
            py::gil_scoped_release release;
            return t.resume();
          },
          "Continues from the newest valid checkpoint of config.checkpoint_dir (fresh if none).")
      .def(
          "resume_from",
          [](distill::Trainer& t, const std::string& path) {
            py::gil_scoped_release release;
            return t.resume_from(path);
          },
          py::arg("path"), "Continues from this checkpoint file (refused if damaged).")
      .def(
          "loss",
          [](distill::Trainer& t, const BatchSourcePtr& source, int64_t step) {
            return t.loss(source->batch(step));
          },
          py::arg("source"), py::arg("step"),
          "The objective of source.batch(step) for the current weights, with autograd.")
      .def_property_readonly("step", &distill::Trainer::step)
      .def_property_readonly("total_steps", &distill::Trainer::total_steps);
}

// Registers BatchSource unless the datasets bindings already did (module.cpp binds them first).
void ensure_batch_source(py::module_& m) {
  if (py::detail::get_type_info(typeid(BatchSource))) return;
  py::class_<BatchSource, BatchSourcePtr>(m, "BatchSource",
                                          "Produces the training batch of a step.")
      .def("steps_per_epoch", &BatchSource::steps_per_epoch);
}

void bind_sources(py::module_& m) {
  ensure_batch_source(m);
  py::class_<distill::RankSliceSource, BatchSource, std::shared_ptr<distill::RankSliceSource>>(
      m, "RankSliceSource",
      "Rows [rank * B / W, (rank + 1) * B / W) of every batch of a source: one rank's share of\n"
      "the global batches in data-parallel training (see libtransfer/distill/data_parallel.h).")
      .def(py::init([](const py::object& source, int64_t rank, int64_t world_size) {
             return std::make_shared<distill::RankSliceSource>(to_source(source), rank, world_size);
           }),
           py::arg("source"), py::arg("rank"), py::arg("world_size"))
      .def_property_readonly("rank", &distill::RankSliceSource::rank)
      .def_property_readonly("world_size", &distill::RankSliceSource::world_size)
      .def_property_readonly("inner", &distill::RankSliceSource::inner);
  m.def(
      "list_checkpoints",
      [](const std::string& dir) {
        std::vector<std::pair<int64_t, std::string>> out;
        for (const auto& e : distill::list_checkpoints(dir)) out.emplace_back(e.step, e.path);
        return out;
      },
      py::arg("dir"), "[(step, path)] of the checkpoints in dir, oldest first.");
}

}  // namespace

void bind_trainer(py::module_& m) {
  bind_config(m);
  bind_results(m);
  bind_trainer_class(m);
  bind_sources(m);
}

}  // namespace libtransfer::bindings
