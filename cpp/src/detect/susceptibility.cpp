#include "libtransfer/detect/susceptibility.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>
#include <utility>

#include "libtransfer/detect/activation_test.h"
#include "libtransfer/detect/output_test.h"
#include "libtransfer/errors.h"
#include "libtransfer/stats/distributions.h"

namespace libtransfer::detect {
namespace {

constexpr double kLn10 = 2.302585092994045684;
// Random directions are drawn this many doubles at a time (32 MiB), whatever count x D is.
constexpr std::int64_t kRandomChunkElements = std::int64_t{1} << 22;

// The student's trainable tensors, paired with the teacher's by name (same order as the
// student's). InvalidInput naming the first name or shape that differs.
std::vector<std::pair<std::string, std::pair<torch::Tensor, torch::Tensor>>> pair_parameters(
    models::Model& student, models::Model& teacher, const std::string& teacher_argument) {
  const models::NamedTensors s = student.named_parameters();
  const models::NamedTensors t = teacher.named_parameters();
  if (s.empty()) {
    throw InvalidInput("susceptibility: the student (" + student.describe() +
                       ") has no parameters");
  }
  std::map<std::string, torch::Tensor> t_by_name(t.begin(), t.end());
  std::vector<std::pair<std::string, std::pair<torch::Tensor, torch::Tensor>>> out;
  for (const auto& [name, tensor] : s) {
    auto it = t_by_name.find(name);
    if (it == t_by_name.end()) {
      throw InvalidInput("susceptibility: parameter '" + name + "' of the student is missing in " +
                         teacher_argument + " (mismatched architectures)");
    }
    if (it->second.sizes() != tensor.sizes()) {
      std::ostringstream msg;
      msg << "susceptibility: parameter '" << name << "' is " << tensor.sizes()
          << " in the student but " << it->second.sizes() << " in " << teacher_argument;
      throw InvalidInput(msg.str());
    }
    out.push_back({name, {tensor, it->second}});
  }
  if (t.size() != s.size()) {
    std::ostringstream msg;
    msg << "susceptibility: the student has " << s.size() << " parameter tensors, "
        << teacher_argument << " has " << t.size() << " (mismatched architectures)";
    throw InvalidInput(msg.str());
  }
  return out;
}

// Makes the given tensors require grad for the lifetime of the guard, then restores the flags.
class RequiresGradGuard {
 public:
  explicit RequiresGradGuard(std::vector<torch::Tensor> tensors) : tensors_(std::move(tensors)) {
    for (auto& t : tensors_) {
      flags_.push_back(t.requires_grad());
      if (!t.requires_grad()) t.requires_grad_(true);
    }
  }
  ~RequiresGradGuard() {
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      if (!flags_[i]) tensors_[i].requires_grad_(false);
    }
  }

 private:
  std::vector<torch::Tensor> tensors_;
  std::vector<bool> flags_;
};

// Puts a model in evaluation mode for the lifetime of the guard (dropout off: the probe measures
// the deterministic gradient), then restores its mode.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(models::Model& model) : model_(model), was_(model.is_training()) {
    model_.set_training(false);
  }
  ~EvalModeGuard() { model_.set_training(was_); }

 private:
  models::Model& model_;
  bool was_;
};

std::vector<torch::Tensor> gradient(const torch::Tensor& loss,
                                    const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads =
      torch::autograd::grad({loss}, params, {}, /*retain_graph=*/false, /*create_graph=*/false,
                            /*allow_unused=*/true);
  for (std::size_t i = 0; i < grads.size(); ++i) {
    grads[i] = grads[i].defined()
                   ? grads[i].detach().to(torch::kDouble)
                   : torch::zeros(params[i].sizes(), params[i].options().dtype(torch::kDouble));
  }
  return grads;
}

// The student's imitation-loss gradient toward `teacher` on the probes, per student parameter.
std::vector<torch::Tensor> imitation_gradient(models::Model& student, models::Model& teacher,
                                              const std::vector<torch::Tensor>& params,
                                              const torch::Tensor& input, const torch::Tensor& mask,
                                              const distill::KDConfig& kd) {
  torch::Tensor teacher_logits;
  {
    torch::NoGradGuard no_grad;
    teacher_logits = teacher.forward(input, mask).detach();
  }
  torch::AutoGradMode enable(true);
  const torch::Tensor student_logits = student.forward(input, mask);
  const torch::Tensor kd_mask =
      student_logits.dim() == 3 && mask.defined() ? mask.to(student_logits.device()) : mask;
  const torch::Tensor loss =
      distill::kd_loss(student_logits, teacher_logits.to(student_logits.device()), kd_mask, kd);
  return gradient(loss, params);
}

struct Cosines {
  double total = 0.0;
  double g_norm = 0.0;
  double d_norm = 0.0;
  std::vector<double> per_tensor;
  torch::Tensor flat_g;  // -g flattened (float64)
};

double safe_cos(double dot, double na, double nb) {
  return na > 0.0 && nb > 0.0 ? std::clamp(dot / (na * nb), -1.0, 1.0) : 0.0;
}

Cosines cosines(
    const std::vector<torch::Tensor>& grads,
    const std::vector<std::pair<std::string, std::pair<torch::Tensor, torch::Tensor>>>& pairs) {
  Cosines out;
  double dot = 0.0, gg = 0.0, dd = 0.0;
  std::vector<torch::Tensor> flat;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const torch::Tensor neg_g = -grads[i];
    const torch::Tensor d = (pairs[i].second.second.detach().to(neg_g.device(), torch::kDouble) -
                             pairs[i].second.first.detach().to(torch::kDouble));
    const double di = neg_g.mul(d).sum().item<double>();
    const double gi = neg_g.pow(2).sum().item<double>();
    const double ddi = d.pow(2).sum().item<double>();
    out.per_tensor.push_back(safe_cos(di, std::sqrt(gi), std::sqrt(ddi)));
    dot += di;
    gg += gi;
    dd += ddi;
    flat.push_back(neg_g.reshape({-1}));
  }
  out.g_norm = std::sqrt(gg);
  out.d_norm = std::sqrt(dd);
  out.total = safe_cos(dot, out.g_norm, out.d_norm);
  out.flat_g = torch::cat(flat);
  return out;
}

}  // namespace

double random_direction_cosine_log10_sf(double c, std::int64_t dimension) {
  if (dimension < 2) {
    throw InvalidInput("random_direction_cosine_log10_sf: dimension must be >= 2, got " +
                       std::to_string(dimension));
  }
  if (!(c >= -1.0 && c <= 1.0)) {
    throw InvalidInput("random_direction_cosine_log10_sf: cosine must be in [-1, 1], got " +
                       std::to_string(c));
  }
  if (c >= 1.0) return -std::numeric_limits<double>::infinity();
  if (c <= -1.0) return 0.0;
  const double df = static_cast<double>(dimension - 1);
  // cos = u_1 for a uniform unit vector u; u_1 / sqrt(1 - u_1^2) sqrt(D - 1) ~ t_{D-1}.
  const double t = c * std::sqrt(df) / std::sqrt((1.0 - c) * (1.0 + c));
  return std::min(0.0, stats::t_logsf(t, df) / kLn10);
}

torch::Tensor random_direction_cosines(const torch::Tensor& direction, std::int64_t count,
                                       std::uint64_t seed) {
  TORCH_CHECK_VALUE(direction.defined() && direction.numel() >= 1,
                    "random_direction_cosines: direction must hold at least one element");
  TORCH_CHECK_VALUE(count >= 0, "random_direction_cosines: count must be >= 0, got ", count);
  const torch::Tensor v = direction.detach().to(torch::kCPU, torch::kDouble).reshape({-1});
  const double v_norm = v.norm().item<double>();
  TORCH_CHECK_VALUE(v_norm > 0.0, "random_direction_cosines: direction is zero");
  const std::int64_t d = v.numel();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  torch::Tensor out = torch::empty({count}, torch::kDouble);
  const std::int64_t rows = std::max<std::int64_t>(1, kRandomChunkElements / d);
  for (std::int64_t start = 0; start < count; start += rows) {
    const std::int64_t r = std::min(rows, count - start);
    const torch::Tensor z = at::normal(0.0, 1.0, {r, d}, gen, torch::kDouble);
    out.narrow(0, start, r).copy_(z.matmul(v) / (z.norm(2, 1) * v_norm));
  }
  return out;
}

SusceptibilityResult susceptibility_probe(models::Model& student, models::Model& teacher,
                                          const torch::Tensor& input,
                                          const torch::Tensor& attention_mask,
                                          const std::vector<models::ModelPtr>& controls,
                                          const TraitLoss& trait_loss,
                                          const SusceptibilityConfig& config) {
  if (student.input_kind() != teacher.input_kind() ||
      student.output_size() != teacher.output_size()) {
    std::ostringstream msg;
    msg << "susceptibility: student (" << student.describe() << ", " << student.output_size()
        << " outputs) and teacher (" << teacher.describe() << ", " << teacher.output_size()
        << " outputs) are not comparable";
    throw InvalidInput(msg.str());
  }
  if (config.random_directions < 0) {
    throw InvalidInput("susceptibility: random_directions must be >= 0, got " +
                       std::to_string(config.random_directions));
  }
  const auto pairs = pair_parameters(student, teacher, "the teacher");
  torch::Tensor probes = input;
  torch::Tensor mask = attention_mask;
  if (!probes.defined()) {
    probes = default_probe_inputs(student, kDefaultProbeRows, kDefaultProbeLength, config.seed);
    mask = torch::Tensor();
  } else if (probes.numel() == 0) {
    throw InvalidInput("susceptibility: input holds no examples");
  }
  std::vector<torch::Tensor> params;
  for (const auto& p : pairs) params.push_back(p.second.first);
  EvalModeGuard student_eval(student);
  EvalModeGuard teacher_eval(teacher);
  RequiresGradGuard requires_grad(params);

  SusceptibilityResult result;
  TestResult& test = result.test;
  test.test = "susceptibility";
  test.statistic_name = "cosine";
  const auto grads = imitation_gradient(student, teacher, params, probes, mask, config.kd);
  const Cosines cos = cosines(grads, pairs);
  if (!(cos.d_norm > 0.0)) {
    throw InvalidInput(
        "susceptibility: the teacher's parameters equal the student's (theta_T - theta_S = 0): "
        "there is no direction to compare the imitation gradient with");
  }
  if (!(cos.g_norm > 0.0)) {
    throw InvalidInput(
        "susceptibility: the imitation gradient is zero (the student already matches the "
        "teacher on these inputs, or its outputs do not depend on its parameters)");
  }
  result.cosine = cos.total;
  result.gradient_norm = cos.g_norm;
  result.difference_norm = cos.d_norm;
  result.dimension = cos.flat_g.numel();
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const std::int64_t numel = pairs[i].second.first.numel();
    result.tensors.push_back({pairs[i].first, numel, cos.per_tensor[i]});
    LayerEvidence e;
    e.name = pairs[i].first;
    e.kind = "parameter";
    e.units = numel;
    e.statistic = cos.per_tensor[i];
    e.statistic_name = "cosine";
    if (numel >= 2) {
      e.log10_p = random_direction_cosine_log10_sf(cos.per_tensor[i], numel);
      e.note = "p: random-direction null";
    } else {
      e.note = "1 element: no p";
    }
    test.layers.push_back(std::move(e));
  }
  result.random_direction_log10_p =
      result.dimension >= 2 ? random_direction_cosine_log10_sf(result.cosine, result.dimension)
                            : 0.0;
  if (config.random_directions > 0) {
    result.random_cosines =
        random_direction_cosines(cos.flat_g, config.random_directions, config.seed);
  }
  if (trait_loss) {
    torch::AutoGradMode enable(true);
    const torch::Tensor l = trait_loss(student);
    if (!l.defined() || l.numel() != 1) {
      throw InvalidInput("susceptibility: trait_loss must return a scalar tensor");
    }
    const auto trait_grads = gradient(l.reshape({}), params);
    double dot = 0.0;  // <grad L_trait, g> = -<grad L_trait, -g>
    for (std::size_t i = 0; i < grads.size(); ++i) {
      dot += trait_grads[i].mul(grads[i]).sum().item<double>();
    }
    result.trait_loss = l.item<double>();
    result.predicted_trait_change = -config.step_size * dot;
  }
  for (std::size_t j = 0; j < controls.size(); ++j) {
    const std::string name = "controls[" + std::to_string(j) + "]";
    if (!controls[j]) throw InvalidInput("susceptibility: " + name + " is null");
    models::Model& control = *controls[j];
    if (control.output_size() != student.output_size()) {
      throw InvalidInput("susceptibility: " + name + " has " +
                         std::to_string(control.output_size()) + " outputs, the student " +
                         std::to_string(student.output_size()));
    }
    const auto control_pairs = pair_parameters(student, control, name);
    EvalModeGuard control_eval(control);
    result.control_cosines.push_back(
        cosines(imitation_gradient(student, control, params, probes, mask, config.kd),
                control_pairs)
            .total);
  }
  test.statistic = result.cosine;
  test.ran = true;
  std::ostringstream method;
  if (!controls.empty()) {
    const double n = static_cast<double>(controls.size());
    std::int64_t at_least = 0;
    for (double c : result.control_cosines) at_least += c >= result.cosine;
    test.log10_p = std::log10((1.0 + at_least) / (1.0 + n));
    method << "empirical over " << controls.size() << " control teachers (+1)";
  } else {
    test.log10_p = result.random_direction_log10_p;
    method << kApproximateMethodPrefix << "random direction in D = " << result.dimension
           << " (Beta((D-1)/2, (D-1)/2)); give control teachers to calibrate";
  }
  test.method = method.str();
  return result;
}

}  // namespace libtransfer::detect
