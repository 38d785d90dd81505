// The susceptibility probe (DESIGN.md section 1, the theorem): does one small step of the
// student's imitation of the teacher move the student toward the teacher's parameters? With a
// shared initialization, theta_T - theta_S is (to first order) a trait direction and the
// imitation gradient g has a positive inner product with it; from independent initializations
// the difference is unrelated to g and the cosine is near zero.
//
// Reports cos(-g, theta_T - theta_S) over all parameters paired by name and per tensor, and,
// given a trait loss, the first-order change of the student's trait loss for a step eta along -g:
// -eta <grad L_trait(theta_S), g>. Costs one forward of the teacher, one forward and backward of
// the student (and per control the same), O(parameters) extra memory for the gradient.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/detect/evidence.h"
#include "libtransfer/distill/losses.h"
#include "libtransfer/models/model.h"

namespace libtransfer::detect {

// log10 P(cos >= c) for the cosine of a fixed vector with a uniformly random direction in R^D:
// (cos + 1) / 2 ~ Beta((D-1)/2, (D-1)/2), equivalently cos sqrt(D-1) / sqrt(1 - cos^2) ~ t_{D-1};
// evaluated through the t tail in log space, so it stays finite far below 1e-308. D >= 2,
// c in [-1, 1] (InvalidInput otherwise).
double random_direction_cosine_log10_sf(double c, std::int64_t dimension);

// Cosines of `direction` (any shape, D elements) with `count` Gaussian random directions drawn
// from a CPU generator seeded with `seed` (in chunks, so memory stays O(D)). float64 [count].
torch::Tensor random_direction_cosines(const torch::Tensor& direction, std::int64_t count,
                                       std::uint64_t seed = 0);

// A trait loss: a scalar (differentiable in the model's parameters) measuring the trait, e.g.
// cross-entropy of the trait answers. Called on the student.
using TraitLoss = std::function<torch::Tensor(models::Model&)>;

struct SusceptibilityConfig {
  // The imitation loss: softmax KD (forward KL at temperature 1 by default; a logit subset for
  // the auxiliary-logit setting). See distill/losses.h.
  distill::KDConfig kd;
  double step_size = 1e-3;             // eta of the predicted trait change
  std::int64_t random_directions = 0;  // > 0: simulate the random-direction null this many times
  std::uint64_t seed = 0;              // probe inputs and random directions
};

// One parameter tensor's share of the evidence.
struct TensorCosine {
  std::string name;
  std::int64_t numel = 0;
  double cosine = 0.0;  // cos(-g_tensor, (theta_T - theta_S)_tensor); 0 when either is zero
};

struct SusceptibilityResult {
  TestResult test;
  double cosine = 0.0;  // over all parameters
  double gradient_norm = 0.0;
  double difference_norm = 0.0;
  std::int64_t dimension = 0;                    // D: parameters compared
  std::vector<TensorCosine> tensors;             // in the student's parameter order
  std::vector<double> control_cosines;           // per control teacher
  std::optional<double> predicted_trait_change;  // -eta <grad L_trait, g>, given a trait loss
  std::optional<double> trait_loss;              // L_trait(theta_S)
  torch::Tensor random_cosines;                  // [random_directions] float64 (undefined if 0)
  double random_direction_log10_p = 0.0;         // closed-form p of `cosine` (Beta null)
};

// student's imitation gradient toward teacher on `input` (undefined: default probe inputs of the
// student, seeded), compared with teacher - student. Both models must have the same parameter
// names and shapes (InvalidInput naming the first difference) and outputs of the same size; a
// model without parameters or with a zero gradient is InvalidInput. Controls: teachers known to
// be independent of the student: p = (1 + #{cos_control >= cos}) / (1 + n). Without controls the
// p-value is the random-direction closed form, marked approximate (the difference of two
// independent networks is not an isotropic direction: see docs/detection.md (part 2)).
// The student's parameters are left unchanged (their requires_grad flags too).
SusceptibilityResult susceptibility_probe(models::Model& student, models::Model& teacher,
                                          const torch::Tensor& input = {},
                                          const torch::Tensor& attention_mask = {},
                                          const std::vector<models::ModelPtr>& controls = {},
                                          const TraitLoss& trait_loss = {},
                                          const SusceptibilityConfig& config = {});

}  // namespace libtransfer::detect
