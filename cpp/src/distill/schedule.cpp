#include "libtransfer/distill/schedule.h"

#include <algorithm>
#include <cmath>

#include "libtransfer/errors.h"

namespace libtransfer::distill {
namespace {

constexpr double kPi = 3.14159265358979323846;

}  // namespace

ScheduleKind parse_schedule(const std::string& name) {
  if (name == "constant") return ScheduleKind::kConstant;
  if (name == "linear") return ScheduleKind::kLinear;
  if (name == "cosine") return ScheduleKind::kCosine;
  throw InvalidInput("schedule: expected 'constant', 'linear' or 'cosine', got '" + name + "'");
}

std::string to_string(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kConstant:
      return "constant";
    case ScheduleKind::kLinear:
      return "linear";
    case ScheduleKind::kCosine:
      return "cosine";
  }
  return "?";
}

void validate(const ScheduleConfig& config) {
  if (config.warmup_steps < 0) {
    throw InvalidInput("schedule.warmup_steps: expected >= 0, got " +
                       std::to_string(config.warmup_steps));
  }
  if (!(config.min_lr_ratio >= 0.0 && config.min_lr_ratio <= 1.0)) {
    throw InvalidInput("schedule.min_lr_ratio: expected a value in [0, 1], got " +
                       std::to_string(config.min_lr_ratio));
  }
}

double lr_factor(const ScheduleConfig& config, std::int64_t step, std::int64_t total_steps) {
  if (step < 0) throw InvalidInput("schedule: step must be >= 0, got " + std::to_string(step));
  const std::int64_t warmup = config.warmup_steps;
  if (step < warmup) return static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (config.kind == ScheduleKind::kConstant) return 1.0;
  const std::int64_t span = total_steps - warmup;
  if (span <= 0) return 1.0;  // no decay phase: warmup covers the whole run
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  const double floor = config.min_lr_ratio;
  if (config.kind == ScheduleKind::kLinear) return floor + (1.0 - floor) * (1.0 - progress);
  return floor + (1.0 - floor) * 0.5 * (1.0 + std::cos(kPi * progress));
}

}  // namespace libtransfer::distill
