// The trainer: schedules and Adam(W) against closed forms, gradient accumulation and clipping
// against eager autograd, exact resume, corrupt checkpoints, non-finite losses, set-up errors.
// Models and sources are stand-ins defined here (a float64 linear classifier with optional
// dropout, a source of fixed slices), so the expectations are independent of the built-ins.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/distill/checkpoint.h"
#include "libtransfer/distill/optimizer.h"
#include "libtransfer/distill/schedule.h"
#include "libtransfer/distill/trainer.h"
#include "libtransfer/errors.h"

namespace {

using libtransfer::InvalidInput;
using libtransfer::testing::TempDir;
namespace distill = libtransfer::distill;
namespace models = libtransfer::models;

// logits = dropout(x) W^T + b, float64; dropout only in training mode.
class LinearModel : public models::Model {
 public:
  LinearModel(std::int64_t in, std::int64_t out, std::uint64_t seed, double dropout = 0.0)
      : dropout_(dropout) {
    auto gen = at::detail::createCPUGenerator(seed);
    weight_ = torch::randn({out, in}, gen, torch::kDouble).mul_(0.3).requires_grad_();
    bias_ = torch::randn({out}, gen, torch::kDouble).mul_(0.1).requires_grad_();
  }
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& = {}) override {
    auto x = input.to(torch::kDouble);
    if (training_ && dropout_ > 0.0) x = torch::dropout(x, dropout_, true);
    return torch::addmm(bias_, x, weight_.t());
  }
  models::InputKind input_kind() const override { return models::InputKind::kFeatures; }
  std::int64_t output_size() const override { return weight_.size(0); }
  std::int64_t input_size() const override { return weight_.size(1); }
  models::NamedTensors named_parameters() override {
    return {{"weight", weight_}, {"bias", bias_}};
  }
  void set_training(bool on) override { training_ = on; }
  bool is_training() const override { return training_; }
  std::string describe() const override {
    return "linear " + std::to_string(weight_.size(1)) + "-" + std::to_string(weight_.size(0));
  }
  torch::Device device() override { return weight_.device(); }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<models::Model> clone() const override {
    auto copy = std::make_shared<LinearModel>(*this);
    copy->weight_ = weight_.detach().clone().requires_grad_();
    copy->bias_ = bias_.detach().clone().requires_grad_();
    return copy;
  }
  torch::Tensor weight_, bias_;

 private:
  double dropout_;
  bool training_ = false;
};

// Batch i = rows [i b, (i + 1) b) of fixed data (wrapping around), optional teacher logits.
class SliceSource : public distill::BatchSource {
 public:
  SliceSource(torch::Tensor x, torch::Tensor y, std::int64_t batch, torch::Tensor teacher = {})
      : x_(std::move(x)), y_(std::move(y)), teacher_(std::move(teacher)), batch_(batch) {}
  distill::Batch batch(std::int64_t step) override {
    const std::int64_t start = (step * batch_) % x_.size(0);
    distill::Batch b;
    b.input = x_.narrow(0, start, batch_);
    if (y_.defined()) b.targets = y_.narrow(0, start, batch_);
    if (teacher_.defined()) b.teacher_logits = teacher_.narrow(0, start, batch_);
    if (poison_step >= 0 && step == poison_step) b.input = b.input.clone().fill_(NAN);
    return b;
  }
  std::int64_t steps_per_epoch() const override { return x_.size(0) / batch_; }
  std::int64_t poison_step = -1;

 private:
  torch::Tensor x_, y_, teacher_;
  std::int64_t batch_;
};

struct Data {
  torch::Tensor x, y;
};
Data make_data(std::int64_t n, std::int64_t features, std::int64_t classes, std::uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return {torch::randn({n, features}, gen, torch::kDouble),
          torch::randint(classes, {n}, gen, torch::kLong)};
}

distill::TrainerConfig quiet_config(std::int64_t steps) {
  distill::TrainerConfig c;
  c.steps = steps;
  c.progress = false;
  c.optimizer.lr = 0.05;
  return c;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

TEST_CASE("learning-rate schedules follow their closed forms", "[trainer]") {
  distill::ScheduleConfig c;
  c.warmup_steps = 4;
  SECTION("warmup ramps (s + 1) / w, then constant") {
    for (int s = 0; s < 4; ++s) CHECK(distill::lr_factor(c, s, 20) == Approx((s + 1) / 4.0));
    CHECK(distill::lr_factor(c, 10, 20) == 1.0);
  }
  SECTION("linear decays to min_lr_ratio at total_steps") {
    c.kind = distill::ScheduleKind::kLinear;
    c.min_lr_ratio = 0.1;
    for (int s = 4; s < 20; ++s) {
      const double progress = (s - 4) / 16.0;
      CHECK(distill::lr_factor(c, s, 20) == Approx(0.1 + 0.9 * (1 - progress)).epsilon(1e-12));
    }
  }
  SECTION("cosine decays as half a cosine") {
    c.kind = distill::ScheduleKind::kCosine;
    for (int s = 4; s < 20; ++s) {
      const double progress = (s - 4) / 16.0;
      CHECK(distill::lr_factor(c, s, 20) ==
            Approx(0.5 * (1 + std::cos(M_PI * progress))).margin(1e-12));
    }
  }
  SECTION("bad values are refused") {
    CHECK_THROWS_AS(distill::parse_schedule("step"), InvalidInput);
    c.min_lr_ratio = 2;
    CHECK_THROWS_AS(distill::validate(c), InvalidInput);
  }
}

TEST_CASE("Adam and AdamW match a scalar reference implementation", "[trainer]") {
  const bool decoupled = GENERATE(true, false);
  distill::AdamWConfig config;
  config.lr = 0.01;
  config.weight_decay = 0.1;
  config.decoupled_weight_decay = decoupled;
  auto p = torch::tensor({0.5, -1.0, 2.0}, torch::kDouble).requires_grad_();
  distill::AdamW adam({{"p", p}}, config);
  std::vector<double> ref = {0.5, -1.0, 2.0}, m(3, 0.0), v(3, 0.0);
  const std::vector<std::vector<double>> grads = {{1, -2, 0.5}, {0.1, 0.3, -4}, {2, 2, 2}};
  for (int t = 1; t <= 3; ++t) {
    const double lr = config.lr * t;  // a different rate per step, as a schedule gives
    p.mutable_grad() = torch::tensor(grads[t - 1], torch::kDouble);
    adam.step(lr);
    for (int i = 0; i < 3; ++i) {
      double g = grads[t - 1][i];
      if (decoupled) {
        ref[i] *= 1 - lr * config.weight_decay;
      } else {
        g += config.weight_decay * ref[i];
      }
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.999 * v[i] + 0.001 * g * g;
      const double mhat = m[i] / (1 - std::pow(0.9, t));
      const double vhat = v[i] / (1 - std::pow(0.999, t));
      ref[i] -= lr * mhat / (std::sqrt(vhat) + config.eps);
    }
  }
  for (int i = 0; i < 3; ++i) CHECK(p[i].item<double>() == Approx(ref[i]).epsilon(1e-12));
  CHECK(adam.step_count() == 3);
}

TEST_CASE("the first step's loss is the cross-entropy of the batch", "[trainer]") {
  const auto data = make_data(16, 5, 3, 1);
  auto model = std::make_shared<LinearModel>(5, 3, 2);
  const auto w = model->weight_.detach().clone();
  const auto b = model->bias_.detach().clone();
  distill::Trainer trainer(model, std::make_shared<SliceSource>(data.x, data.y, 8),
                           quiet_config(1));
  const auto result = trainer.fit();
  // Independent: log-softmax by hand.
  const auto logits = data.x.narrow(0, 0, 8).matmul(w.t()) + b;
  const auto logz = logits.exp().sum(1).log();
  const auto picked = logits.gather(1, data.y.narrow(0, 0, 8).unsqueeze(1)).squeeze(1);
  const double expected = (logz - picked).mean().item<double>();
  REQUIRE(result.history.size() == 1);
  CHECK(result.history[0].loss == Approx(expected).epsilon(1e-12));
  CHECK(result.history[0].lr == Approx(0.05));
}

TEST_CASE("accumulating k micro-batches of b equals one batch of k b", "[trainer]") {
  const auto data = make_data(48, 6, 4, 3);
  const bool kd = GENERATE(false, true);
  auto run = [&](std::int64_t batch, std::int64_t accumulation) {
    auto model = std::make_shared<LinearModel>(6, 4, 7);
    auto config = quiet_config(3);
    config.accumulation = accumulation;
    distill::Objective objective;
    models::ModelPtr teacher;
    if (kd) {
      objective.kind = distill::ObjectiveKind::kMixed;
      objective.ce_weight = 0.3;
      objective.kd.temperature = 2.0;
      teacher = std::make_shared<LinearModel>(6, 4, 99);
    }
    distill::Trainer trainer(model, std::make_shared<SliceSource>(data.x, data.y, batch), config,
                             objective, teacher);
    const auto result = trainer.fit();
    return std::make_pair(model, result.history.back().loss);
  };
  const auto [whole, whole_loss] = run(8, 1);
  const auto [parts, parts_loss] = run(2, 4);
  CHECK((whole->weight_ - parts->weight_).abs().max().item<double>() < 1e-6);
  CHECK((whole->bias_ - parts->bias_).abs().max().item<double>() < 1e-6);
  CHECK(whole_loss == Approx(parts_loss).epsilon(1e-10));
}

TEST_CASE("gradient clipping scales the global norm to the limit", "[trainer]") {
  const auto data = make_data(8, 4, 3, 5);
  auto model = std::make_shared<LinearModel>(4, 3, 6);
  const auto w0 = model->weight_.detach().clone();
  const auto b0 = model->bias_.detach().clone();
  auto config = quiet_config(1);
  config.grad_clip = 0.05;
  // beta1 = beta2 = 0: the update is -lr g / (|g| + eps) element-wise, so with a large eps it
  // depends on the gradient's scale and shows whether clipping happened.
  config.optimizer.beta1 = 0.0;
  config.optimizer.beta2 = 0.0;
  config.optimizer.eps = 10.0;
  distill::Trainer trainer(model, std::make_shared<SliceSource>(data.x, data.y, 8), config);
  const auto result = trainer.fit();

  auto w = w0.clone().requires_grad_();
  auto b = b0.clone().requires_grad_();
  auto loss = torch::nn::functional::cross_entropy(torch::addmm(b, data.x, w.t()), data.y);
  loss.backward();
  const double norm =
      std::sqrt(w.grad().pow(2).sum().item<double>() + b.grad().pow(2).sum().item<double>());
  CHECK(result.history[0].grad_norm == Approx(norm).epsilon(1e-10));
  REQUIRE(norm > 0.05);
  const double scale = 0.05 / (norm + 1e-6);
  auto expected = [&](const torch::Tensor& p, const torch::Tensor& g) {
    const auto gc = g * scale;
    return p - 0.05 * gc / (gc.abs() + 10.0);
  };
  CHECK(torch::allclose(model->weight_, expected(w0, w.grad()), 0, 1e-12));
  CHECK(torch::allclose(model->bias_, expected(b0, b.grad()), 0, 1e-12));
}

TEST_CASE("a run resumed from a checkpoint is bit-identical to an uninterrupted one", "[trainer]") {
  TempDir dir;
  const auto data = make_data(40, 5, 3, 11);
  auto config = quiet_config(10);
  config.schedule.kind = distill::ScheduleKind::kCosine;
  config.schedule.warmup_steps = 2;
  config.optimizer.weight_decay = 0.01;
  config.grad_clip = 1.0;
  config.seed = 1234;
  config.checkpoint_every = 2;
  config.keep_checkpoints = 2;
  auto source = [&] { return std::make_shared<SliceSource>(data.x, data.y, 4); };

  config.checkpoint_dir = dir.file("full");
  config.metrics_path = dir.file("full.jsonl");
  auto full = std::make_shared<LinearModel>(5, 3, 1, /*dropout=*/0.3);
  distill::Trainer(full, source(), config).fit();

  config.checkpoint_dir = dir.file("cut");
  config.metrics_path = dir.file("cut.jsonl");
  config.stop_after_step = 5;  // stops after step 5; the newest checkpoint is step 4
  auto first = std::make_shared<LinearModel>(5, 3, 1, 0.3);
  CHECK(distill::Trainer(first, source(), config).fit().steps == 5);
  CHECK(distill::list_checkpoints(config.checkpoint_dir).back().step == 4);
  CHECK(distill::list_checkpoints(config.checkpoint_dir).size() == 2);  // keep_checkpoints

  config.stop_after_step = 0;
  auto resumed = std::make_shared<LinearModel>(5, 3, 77, 0.3);  // different weights: all restored
  distill::Trainer trainer(resumed, source(), config);
  const auto result = trainer.resume();
  CHECK(result.resumed_from == 4);
  CHECK(result.steps == 10);
  CHECK(torch::equal(full->weight_, resumed->weight_));
  CHECK(torch::equal(full->bias_, resumed->bias_));

  // The metrics file reads as one run: steps 1..10 once each (step 5's first line dropped).
  std::ifstream in(config.metrics_path);
  std::vector<std::int64_t> steps;
  std::string line;
  while (std::getline(in, line)) {
    const auto at = line.find("\"step\":");
    REQUIRE(at != std::string::npos);
    steps.push_back(std::stoll(line.substr(at + 7)));
  }
  CHECK(steps == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
}

TEST_CASE("corrupt checkpoints are refused and the newest valid one is used", "[trainer]") {
  TempDir dir;
  const auto data = make_data(24, 4, 3, 21);
  auto config = quiet_config(6);
  config.checkpoint_dir = dir.file("ckpt");
  config.checkpoint_every = 2;
  config.keep_checkpoints = 0;
  config.stop_after_step = 4;
  auto source = std::make_shared<SliceSource>(data.x, data.y, 4);
  auto model = std::make_shared<LinearModel>(4, 3, 1);
  distill::Trainer(model, source, config).fit();
  const std::string step2 = distill::checkpoint_path(config.checkpoint_dir, 2);
  const std::string step4 = distill::checkpoint_path(config.checkpoint_dir, 4);
  const std::string good = read_text(step4);

  auto fresh = [] { return std::make_shared<LinearModel>(4, 3, 5); };
  auto expect_refused_then_fallback = [&](const std::string& reason_part) {
    auto target = fresh();
    distill::AdamW optimizer(target->named_parameters(), {});
    const auto before = target->weight_.detach().clone();
    try {
      distill::load_checkpoint(step4, *target, optimizer);
      FAIL("a corrupt checkpoint was loaded");
    } catch (const std::exception& e) {
      CHECK_THAT(e.what(), Catch::Contains(reason_part));
    }
    CHECK(torch::equal(before, target->weight_));  // refused before touching the model
    auto resumed = fresh();
    auto c = config;
    c.stop_after_step = 0;
    const auto result = distill::Trainer(resumed, source, c).resume();
    CHECK(result.resumed_from == 2);
    REQUIRE(result.skipped_checkpoints.size() == 1);
    CHECK_THAT(result.skipped_checkpoints[0], Catch::Contains(step4));
    CHECK(std::filesystem::exists(step2));
  };

  SECTION("truncated") {
    libtransfer::testing::write_bytes(step4, good.substr(0, good.size() - 17));
    expect_refused_then_fallback("step-00000004");
  }
  SECTION("garbage") {
    libtransfer::testing::write_bytes(step4, std::string(good.size(), 'x'));
    expect_refused_then_fallback("step-00000004");
  }
  SECTION("a flipped data byte fails the checksum") {
    std::string bad = good;
    bad[bad.size() - 3] ^= 0x40;
    libtransfer::testing::write_bytes(step4, bad);
    expect_refused_then_fallback("checksum");
  }
  SECTION("a checkpoint of another model's shapes") {
    auto other = std::make_shared<LinearModel>(4, 5, 1);  // 5 outputs instead of 3
    distill::AdamW optimizer(other->named_parameters(), {});
    distill::save_checkpoint(step4, *other, optimizer, {4, 0, 1, 6, 0.0});
    expect_refused_then_fallback("shape");
  }
  SECTION("resume_from a corrupt file fails with its name") {
    libtransfer::testing::write_bytes(step4, good.substr(0, 100));
    auto c = config;
    c.stop_after_step = 0;
    CHECK_THROWS_WITH(distill::Trainer(fresh(), source, c).resume_from(step4),
                      Catch::Contains("step-00000004"));
  }
}

TEST_CASE("a non-finite loss stops training naming the step and micro-batch", "[trainer]") {
  TempDir dir;
  const auto data = make_data(64, 4, 3, 31);
  auto source = std::make_shared<SliceSource>(data.x, data.y, 2);
  source->poison_step = 7;  // source batch 7 = step 3, micro-batch 1 with accumulation 2
  auto config = quiet_config(10);
  config.accumulation = 2;
  config.checkpoint_dir = dir.file("ckpt");
  config.checkpoint_every = 2;
  auto model = std::make_shared<LinearModel>(4, 3, 1);
  distill::Trainer trainer(model, source, config);
  try {
    trainer.fit();
    FAIL("no error for a NaN loss");
  } catch (const distill::NonFiniteLoss& e) {
    CHECK(e.step == 3);
    CHECK(e.micro_batch == 1);
    CHECK_THAT(e.what(), Catch::Contains("step 3") && Catch::Contains("micro-batch 1"));
  }
  const auto saved = distill::list_checkpoints(config.checkpoint_dir);
  REQUIRE(saved.size() == 1);
  CHECK(saved.back().step == 2);
  // The last checkpoint holds the weights after step 2; the model was not updated at step 3.
  auto check = std::make_shared<LinearModel>(4, 3, 9);
  distill::AdamW optimizer(check->named_parameters(), {});
  distill::load_checkpoint(saved.back().path, *check, optimizer);
  CHECK(trainer.step() == 3);
  CHECK(torch::isfinite(model->weight_).all().item<bool>());
}

TEST_CASE("set-up mistakes are refused by the constructor", "[trainer]") {
  const auto data = make_data(16, 4, 3, 41);
  auto student = std::make_shared<LinearModel>(4, 3, 1);
  distill::Objective kd;
  kd.kind = distill::ObjectiveKind::kDistill;
  SECTION("teacher vocabulary differs") {
    auto teacher = std::make_shared<LinearModel>(4, 5, 2);
    CHECK_THROWS_WITH(
        distill::Trainer(student, std::make_shared<SliceSource>(data.x, data.y, 4), quiet_config(1),
                         kd, teacher),
        Catch::Contains("vocabularies differ") && Catch::Contains("5") && Catch::Contains("3"));
  }
  SECTION("offline teacher logits of another vocabulary") {
    auto source =
        std::make_shared<SliceSource>(data.x, data.y, 4, torch::zeros({16, 7}, torch::kDouble));
    CHECK_THROWS_WITH(distill::Trainer(student, source, quiet_config(1), kd),
                      Catch::Contains("vocabularies differ") && Catch::Contains("7"));
  }
  SECTION("KD without any teacher signal") {
    CHECK_THROWS_AS(distill::Trainer(student, std::make_shared<SliceSource>(data.x, data.y, 4),
                                     quiet_config(1), kd),
                    InvalidInput);
  }
  SECTION("feature count differs") {
    auto wide = std::make_shared<LinearModel>(6, 3, 1);
    CHECK_THROWS_WITH(
        distill::Trainer(wide, std::make_shared<SliceSource>(data.x, data.y, 4), quiet_config(1)),
        Catch::Contains("4 features") && Catch::Contains("6"));
  }
  SECTION("logit subset out of range") {
    kd.kd.logit_subset = {1, 3};
    auto teacher = std::make_shared<LinearModel>(4, 3, 2);
    CHECK_THROWS_WITH(distill::Trainer(student, std::make_shared<SliceSource>(data.x, data.y, 4),
                                       quiet_config(1), kd, teacher),
                      Catch::Contains("index 3"));
  }
  SECTION("a fresh run into a directory holding checkpoints") {
    TempDir dir;
    auto config = quiet_config(2);
    config.checkpoint_dir = dir.file("c");
    auto source = std::make_shared<SliceSource>(data.x, data.y, 4);
    distill::Trainer(student, source, config).fit();
    CHECK_THROWS_WITH(distill::Trainer(student, source, config).fit(),
                      Catch::Contains("already holds checkpoints"));
    config.overwrite_checkpoints = true;
    CHECK(distill::Trainer(student, source, config).fit().steps == 2);
  }
}
