#include "libtransfer/distill/optimizer.h"

#include <torch/torch.h>

#include <cmath>
#include <sstream>
#include <unordered_map>

#include "libtransfer/errors.h"

namespace libtransfer::distill {
namespace {

std::string shape_string(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

}  // namespace

void validate(const AdamWConfig& config) {
  auto fail = [](const std::string& field, const std::string& expected, double got) {
    std::ostringstream out;
    out << "optimizer." << field << ": expected " << expected << ", got " << got;
    throw InvalidInput(out.str());
  };
  if (!(config.lr >= 0.0) || !std::isfinite(config.lr))
    fail("lr", "a finite value >= 0", config.lr);
  if (!(config.beta1 >= 0.0 && config.beta1 < 1.0))
    fail("beta1", "a value in [0, 1)", config.beta1);
  if (!(config.beta2 >= 0.0 && config.beta2 < 1.0))
    fail("beta2", "a value in [0, 1)", config.beta2);
  if (!(config.eps > 0.0)) fail("eps", "a value > 0", config.eps);
  if (!(config.weight_decay >= 0.0) || !std::isfinite(config.weight_decay)) {
    fail("weight_decay", "a finite value >= 0", config.weight_decay);
  }
}

AdamW::AdamW(models::NamedTensors parameters, AdamWConfig config)
    : parameters_(std::move(parameters)), config_(config) {
  validate(config_);
  torch::NoGradGuard no_grad;
  exp_avg_.reserve(parameters_.size());
  exp_avg_sq_.reserve(parameters_.size());
  for (const auto& [name, p] : parameters_) {
    if (!p.defined()) throw InvalidInput("optimizer: parameter '" + name + "' is undefined");
    if (!p.is_floating_point()) {
      throw WrongType("optimizer: parameter '" + name + "' must be floating point, got " +
                      std::string(c10::toString(p.scalar_type())));
    }
    exp_avg_.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    exp_avg_sq_.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
  }
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++step_count_;
  const double beta1 = config_.beta1;
  const double beta2 = config_.beta2;
  const double wd = config_.weight_decay;
  // torch.optim computes these in Python floats from a float step count; std::pow is the same
  // libm call, so the scalars match bit for bit.
  const double t = static_cast<double>(step_count_);
  const double bias_correction1 = 1.0 - std::pow(beta1, t);
  const double bias_correction2 = 1.0 - std::pow(beta2, t);
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    auto& p = parameters_[i].second;
    torch::Tensor grad = p.grad();
    if (!grad.defined()) continue;
    if (config_.decoupled_weight_decay) {
      if (wd != 0.0) p.mul_(1.0 - lr * wd);
    } else if (wd != 0.0) {
      grad = grad.add(p, wd);
    }
    exp_avg_[i].mul_(beta1).add_(grad, 1.0 - beta1);
    exp_avg_sq_[i].mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
    const auto denom = (exp_avg_sq_[i].sqrt() / bias_correction2_sqrt).add_(config_.eps);
    p.addcdiv_(exp_avg_[i], denom, -step_size);
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : parameters_) {
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  }
}

models::NamedTensors AdamW::state() const {
  models::NamedTensors out;
  out.reserve(2 * parameters_.size());
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    out.emplace_back(parameters_[i].first + ".exp_avg", exp_avg_[i]);
    out.emplace_back(parameters_[i].first + ".exp_avg_sq", exp_avg_sq_[i]);
  }
  return out;
}

void AdamW::load_state(const models::NamedTensors& state, std::int64_t step_count) {
  if (step_count < 0) {
    throw InvalidInput("optimizer state: step count must be >= 0, got " +
                       std::to_string(step_count));
  }
  std::unordered_map<std::string, const torch::Tensor*> by_name;
  for (const auto& [name, t] : state) by_name[name] = &t;
  // Check everything first so that a refused state leaves the optimizer unchanged.
  std::vector<const torch::Tensor*> found;
  found.reserve(2 * parameters_.size());
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      const std::string name = parameters_[i].first + suffix;
      const auto it = by_name.find(name);
      if (it == by_name.end()) {
        throw InvalidInput("optimizer state: missing tensor '" + name + "'");
      }
      if (!it->second->sizes().equals(parameters_[i].second.sizes())) {
        throw InvalidInput("optimizer state: tensor '" + name + "' has shape " +
                           shape_string(*it->second) + ", the parameter has shape " +
                           shape_string(parameters_[i].second));
      }
      found.push_back(it->second);
    }
  }
  if (by_name.size() != found.size()) {
    throw InvalidInput("optimizer state: expected " + std::to_string(found.size()) +
                       " tensors for " + std::to_string(parameters_.size()) + " parameters, got " +
                       std::to_string(by_name.size()));
  }
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    exp_avg_[i].copy_(*found[2 * i]);
    exp_avg_sq_[i].copy_(*found[2 * i + 1]);
  }
  step_count_ = step_count;
}

}  // namespace libtransfer::distill
