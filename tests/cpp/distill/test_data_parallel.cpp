// Data-parallel training without a network: W ranks simulated by threads that share an
// in-process all-reduce. Each rank's weights must equal one process's run on the same global
// batches (uneven splits, empty slices, accumulation, clipping, AdamW), whatever weights the
// ranks start from (rank 0's are taken). The model and source are stand-ins defined here.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "libtransfer/distill/data_parallel.h"
#include "libtransfer/distill/trainer.h"
#include "libtransfer/errors.h"

namespace {

namespace distill = libtransfer::distill;
namespace models = libtransfer::models;

// logits = x W^T + b in float64.
class Linear : public models::Model {
 public:
  Linear(std::int64_t in, std::int64_t out, std::uint64_t seed) {
    auto gen = at::detail::createCPUGenerator(seed);
    weight_ = torch::randn({out, in}, gen, torch::kDouble).mul_(0.3).requires_grad_();
    bias_ = torch::randn({out}, gen, torch::kDouble).mul_(0.1).requires_grad_();
  }
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& = {}) override {
    return torch::addmm(bias_, input.to(torch::kDouble), weight_.t());
  }
  models::InputKind input_kind() const override { return models::InputKind::kFeatures; }
  std::int64_t output_size() const override { return weight_.size(0); }
  std::int64_t input_size() const override { return weight_.size(1); }
  models::NamedTensors named_parameters() override {
    return {{"weight", weight_}, {"bias", bias_}};
  }
  void set_training(bool on) override { training_ = on; }
  bool is_training() const override { return training_; }
  std::string describe() const override { return "linear"; }
  torch::Device device() override { return weight_.device(); }
  void to(torch::Device, torch::Dtype) override {}
  std::shared_ptr<models::Model> clone() const override { return nullptr; }
  torch::Tensor weight_, bias_;

 private:
  bool training_ = false;
};

// Batch i = rows [i b, (i + 1) b) of fixed data, wrapping around.
class Rows : public distill::BatchSource {
 public:
  Rows(torch::Tensor x, torch::Tensor y, std::int64_t batch)
      : x_(std::move(x)), y_(std::move(y)), batch_(batch) {}
  distill::Batch batch(std::int64_t step) override {
    const std::int64_t start = (step * batch_) % x_.size(0);
    distill::Batch b;
    b.input = x_.narrow(0, start, batch_);
    b.targets = y_.narrow(0, start, batch_);
    return b;
  }
  std::int64_t steps_per_epoch() const override { return x_.size(0) / batch_; }

 private:
  torch::Tensor x_, y_;
  std::int64_t batch_;
};

// An all-reduce among threads: the last rank to arrive sums the buffers in rank order, and every
// rank copies the same sums back (bit-identical everywhere, like gloo's).
class ThreadAllReduce {
 public:
  explicit ThreadAllReduce(int world) : world_(world), slots_(world) {}

  void reduce(int rank, std::vector<torch::Tensor>& buffers) {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::int64_t generation = generation_;
    slots_[rank] = &buffers;
    if (++arrived_ == world_) {
      sums_.clear();
      for (std::size_t i = 0; i < buffers.size(); ++i) {
        auto sum = (*slots_[0])[i].clone();
        for (int r = 1; r < world_; ++r) sum.add_((*slots_[r])[i]);
        sums_.push_back(sum);
      }
      arrived_ = 0;
      ++generation_;
      changed_.notify_all();
    } else {
      changed_.wait(lock, [&] { return generation_ != generation; });
    }
    // Still under the lock: no rank can start the next reduction before every rank has copied.
    for (std::size_t i = 0; i < buffers.size(); ++i) buffers[i].copy_(sums_[i]);
  }

 private:
  int world_;
  int arrived_ = 0;
  std::int64_t generation_ = 0;
  std::vector<std::vector<torch::Tensor>*> slots_;
  std::vector<torch::Tensor> sums_;
  std::mutex mutex_;
  std::condition_variable changed_;
};

distill::TrainerConfig config_for(std::int64_t steps) {
  distill::TrainerConfig c;
  c.steps = steps;
  c.accumulation = 2;
  c.grad_clip = 0.1;
  c.progress = false;
  c.optimizer.lr = 0.05;
  c.optimizer.weight_decay = 0.01;
  c.seed = 3;
  return c;
}

}  // namespace

TEST_CASE("simulated ranks train to the weights of one process on the same global batches",
          "[data_parallel]") {
  int world = 2;
  std::int64_t batch = 5;
  SECTION("2 ranks, batches of 5 (3 + 2 rows)") {}
  SECTION("3 ranks, batches of 5 (1 + 2 + 2 rows)") { world = 3; }
  SECTION("3 ranks, batches of 2 (rank 0's slices are empty)") {
    world = 3;
    batch = 2;
  }
  auto gen = at::detail::createCPUGenerator(8);
  const auto x = torch::randn({20, 4}, gen, torch::kDouble);
  const auto y = torch::randint(3, {20}, gen, torch::kLong);
  const std::int64_t steps = 4;

  auto single = std::make_shared<Linear>(4, 3, 1);
  distill::Trainer one(single, std::make_shared<Rows>(x, y, batch), config_for(steps));
  const auto expected = one.fit();
  REQUIRE(expected.history.front().grad_norm > 0.1);  // clipping bites

  ThreadAllReduce reducer(world);
  std::vector<std::shared_ptr<Linear>> ranks;
  std::vector<distill::TrainResult> results(static_cast<std::size_t>(world));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    // Ranks other than 0 start elsewhere: the run must take rank 0's weights.
    ranks.push_back(std::make_shared<Linear>(4, 3, r == 0 ? 1 : 100 + r));
  }
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto config = config_for(steps);
        config.parallel.rank = r;
        config.parallel.world_size = world;
        config.parallel.all_reduce = [&reducer, r](std::vector<torch::Tensor>& buffers) {
          reducer.reduce(r, buffers);
        };
        auto source = std::make_shared<distill::RankSliceSource>(
            std::make_shared<Rows>(x, y, batch), r, world);
        distill::Trainer trainer(ranks[r], source, config);
        results[r] = trainer.fit();
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r);
    CHECK(torch::allclose(ranks[r]->weight_, single->weight_, 0.0, 1e-12));
    CHECK(torch::allclose(ranks[r]->bias_, single->bias_, 0.0, 1e-12));
    REQUIRE(results[r].history.size() == expected.history.size());
    for (std::size_t s = 0; s < expected.history.size(); ++s) {
      CHECK(results[r].history[s].loss == Approx(expected.history[s].loss).epsilon(1e-12));
      CHECK(results[r].history[s].grad_norm ==
            Approx(expected.history[s].grad_norm).epsilon(1e-12));
    }
  }
}

TEST_CASE("rank slices partition every batch and refuse impossible ranks", "[data_parallel]") {
  auto gen = at::detail::createCPUGenerator(2);
  auto rows = std::make_shared<Rows>(torch::randn({14, 3}, gen, torch::kDouble),
                                     torch::arange(14, torch::kLong), 7);
  for (std::int64_t world : {1, 2, 3, 8}) {
    std::vector<torch::Tensor> inputs, targets;
    for (std::int64_t r = 0; r < world; ++r) {
      const auto b = distill::RankSliceSource(rows, r, world).batch(1);
      CHECK(b.size() == (r + 1) * 7 / world - r * 7 / world);
      inputs.push_back(b.input);
      targets.push_back(b.targets);
    }
    const auto full = rows->batch(1);
    CHECK(torch::equal(torch::cat(inputs), full.input));
    CHECK(torch::equal(torch::cat(targets), full.targets));
  }
  CHECK_THROWS_WITH(distill::RankSliceSource(rows, 2, 2),
                    Catch::Contains("rank: expected 0 .. 1 (world_size 2), got 2"));
  CHECK_THROWS_WITH(distill::RankSliceSource(rows, 0, 0),
                    Catch::Contains("world_size: expected >= 1, got 0"));
  CHECK_THROWS_AS(distill::RankSliceSource(nullptr, 0, 1), libtransfer::InvalidInput);
}
