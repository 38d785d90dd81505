// Learning-rate schedules: the factor that multiplies the base learning rate at each optimizer
// step. A pure function of the step, so a resumed run gets exactly the rates of an uninterrupted
// one. Costs nothing.
#pragma once

#include <cstdint>
#include <string>

namespace libtransfer::distill {

enum class ScheduleKind {
  kConstant,  // warmup (if any), then the base rate
  kLinear,    // warmup, then linear decay from the base rate to min_lr_ratio * base at the end
  kCosine,    // warmup, then half a cosine from the base rate to min_lr_ratio * base at the end
};

// Parses "constant" | "linear" | "cosine" (InvalidInput listing the choices otherwise).
ScheduleKind parse_schedule(const std::string& name);
std::string to_string(ScheduleKind kind);

struct ScheduleConfig {
  ScheduleKind kind = ScheduleKind::kConstant;
  // Steps 0 .. warmup_steps - 1 ramp linearly: step s uses (s + 1) / warmup_steps of the rate,
  // so the first step already moves and step warmup_steps - 1 uses the full rate.
  std::int64_t warmup_steps = 0;
  // The floor the decaying schedules reach at the last step (0: decay to zero).
  double min_lr_ratio = 0.0;
};

// InvalidInput for warmup_steps < 0 or min_lr_ratio outside [0, 1].
void validate(const ScheduleConfig& config);

// The factor in [0, 1] for 0-based `step` of `total_steps`. After warmup, decay runs over
// steps warmup_steps .. total_steps: step warmup_steps uses 1, and the factor reaches
// min_lr_ratio at step total_steps (one past the last step, so the last step still moves).
double lr_factor(const ScheduleConfig& config, std::int64_t step, std::int64_t total_steps);

}  // namespace libtransfer::distill
