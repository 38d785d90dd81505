// transfer-audit detect A B: were two models trained from the same initialization? Runs the
// tests of the detection pillar that the files allow (weights always; activations, outputs and
// the susceptibility probe when both files hold runnable models) and prints the report, as the
// Python biastransfer.detect() does. Exit 1 when the verdict is "shared".
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "libtransfer/detect/activation_test.h"
#include "libtransfer/detect/output_test.h"
#include "libtransfer/detect/report.h"
#include "libtransfer/detect/susceptibility.h"
#include "libtransfer/detect/weight_test.h"
#include "libtransfer/errors.h"

namespace transfer_audit {
namespace {

namespace detect = libtransfer::detect;
namespace models = libtransfer::models;
using libtransfer::InvalidInput;

// The tests in the order they run (the Python ALL_TESTS).
const std::vector<std::string> kAllTests = {"weights", "activations", "outputs", "susceptibility"};

struct DetectOptions {
  std::string a;
  std::string b;
  double alpha = detect::kDefaultAlpha;
  std::vector<std::string> tests = kAllTests;
  std::vector<std::string> controls;
  std::uint64_t seed = 0;
  std::int64_t probe_rows = detect::kDefaultProbeRows;
  std::int64_t probe_length = detect::kDefaultProbeLength;
  std::string statistic = "fixed_points";
  std::string solver = "auto";
};

detect::TestResult skipped(const std::string& test, const std::string& reason) {
  detect::TestResult result;
  result.test = test;
  result.skipped_reason = reason;
  return result;
}

bool wants(const DetectOptions& options, const std::string& test) {
  return std::find(options.tests.begin(), options.tests.end(), test) != options.tests.end();
}

std::string input_kind_name(models::Model& model) {
  return model.input_kind() == models::InputKind::kTokens ? "tokens" : "features";
}

int run_detect(const DetectOptions& options, const GlobalOptions& global) {
  if (!(options.alpha > 0.0 && options.alpha < 1.0)) {
    throw InvalidInput("--alpha: expected a value in (0, 1), got " + std::to_string(options.alpha));
  }
  Progress progress("detect", global);
  progress.note("loading models");
  const LoadedModel a = load_model_file(options.a, "a");
  const LoadedModel b = load_model_file(options.b, "b");
  std::vector<LoadedModel> controls;
  std::vector<models::ModelPtr> control_models;
  std::vector<const detect::StateSource*> control_weights;
  for (std::size_t i = 0; i < options.controls.size(); ++i) {
    const std::string argument = "controls[" + std::to_string(i) + "]";
    controls.push_back(load_model_file(options.controls[i], argument));
    if (!controls.back().model) {
      throw InvalidInput(argument + ": " + controls.back().why_no_model +
                         ": controls must be runnable models");
    }
  }
  for (const auto& control : controls) {
    control_models.push_back(control.model);
    control_weights.push_back(control.weights.get());
  }

  std::string forward_reason;
  if (!a.model || !b.model) {
    forward_reason = "needs forward passes, but " + (a.model ? b.why_no_model : a.why_no_model) +
                     "; give models (TorchScript, or files written by model.save)";
  }
  torch::Tensor probes;
  const bool forward_tests =
      forward_reason.empty() && std::any_of(options.tests.begin(), options.tests.end(),
                                            [](const std::string& t) { return t != "weights"; });
  if (forward_tests) {
    if (a.model->input_kind() != b.model->input_kind()) {
      throw InvalidInput("a takes " + input_kind_name(*a.model) + " and b takes " +
                         input_kind_name(*b.model) + ": the models are not comparable");
    }
    probes = detect::default_probe_inputs(*a.model, options.probe_rows, options.probe_length,
                                          options.seed);
  }

  std::vector<detect::TestResult> results;
  for (const auto& name : kAllTests) {
    if (!wants(options, name)) continue;
    progress.note(name + " test");
    if (name == "weights") {
      detect::WeightTestOptions weight_options;
      weight_options.statistic = detect::parse_weight_statistic(options.statistic);
      weight_options.solver = detect::parse_assignment_solver(options.solver);
      results.push_back(detect::weight_test(*a.weights, *b.weights, weight_options));
      if (!control_weights.empty()) {
        // Permuted copies escape the identity statistic; the agreement statistic sees them and
        // the controls calibrate it.
        detect::WeightTestOptions agreement;
        agreement.solver = weight_options.solver;
        results.push_back(
            detect::weight_agreement_test(*a.weights, *b.weights, control_weights, agreement));
      }
      continue;
    }
    if (!forward_reason.empty()) {
      results.push_back(skipped(name, forward_reason));
      continue;
    }
    if (name == "activations") {
      try {
        auto result = detect::activation_test(*a.model, *b.model, probes);
        if (!control_models.empty() && !detect::is_calibrated(result.test)) {
          result = detect::activation_test(*a.model, *b.model, probes, {}, control_models);
        }
        results.push_back(result.test);
      } catch (const InvalidInput& error) {
        const std::string message = error.what();
        if (message.find("hidden activations") == std::string::npos) throw;
        results.push_back(skipped(name, "needs hidden activations: " + message));
      }
    } else if (name == "outputs") {
      results.push_back(
          detect::output_test(*a.model, *b.model, probes, {}, control_models, options.seed).test);
    } else {
      detect::SusceptibilityConfig config;
      config.seed = options.seed;
      results.push_back(
          detect::susceptibility_probe(*a.model, *b.model, probes, {}, control_models, {}, config)
              .test);
    }
  }
  progress.finish();
  const auto report = detect::make_report(std::move(results), options.alpha);
  if (global.json) {
    std::cout << report.to_json(2) << std::endl;
  } else {
    std::cout << report.to_text() << std::endl;
  }
  return report.verdict == detect::Verdict::kShared ? kExitFinding : kExitClean;
}

}  // namespace

Command add_detect_command(CLI::App& app, const GlobalOptions& global) {
  auto options = std::make_shared<DetectOptions>();
  auto* sub = app.add_subcommand(
      "detect", "test whether two models share an initialization (exit 1: shared)");
  sub->footer(
      "Test whether two models were trained from the same initialization. A and B: safetensors "
      "files (or folders of shards) or TorchScript archives (.pt, .pth, .ts, .jit). Weights-only "
      "files get the weight test; runnable models (TorchScript, files written by model.save) "
      "also the activation, output and susceptibility tests. Exit 1 when the verdict is "
      "'shared' at --alpha, 0 otherwise (not shared or inconclusive).");
  sub->add_option("a", options->a, "model A (the student for the susceptibility probe)")
      ->required();
  sub->add_option("b", options->b, "model B (the teacher)")->required();
  sub->add_option("--alpha", options->alpha, "significance level of the verdict")
      ->capture_default_str();
  sub->add_option("--tests", options->tests, "tests to run (default: all)")
      ->check(CLI::IsMember(kAllTests))
      ->expected(1, -1);
  sub->add_option("--controls", options->controls,
                  "runnable models known to be independent of A (calibrate the p-values)")
      ->expected(1, -1);
  sub->add_option("--seed", options->seed, "seed of the probe inputs")->capture_default_str();
  sub->add_option("--probe-rows", options->probe_rows, "probe inputs of the forward tests")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--probe-length", options->probe_length, "tokens per probe row (LMs)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--statistic", options->statistic, "weight test statistic")
      ->check(CLI::IsMember({"fixed_points", "spearman", "agreement"}))
      ->capture_default_str();
  sub->add_option("--solver", options->solver, "linear assignment solver")
      ->check(CLI::IsMember({"auto", "exact", "greedy"}))
      ->capture_default_str();
  return {sub, [options, &global] { return run_detect(*options, global); }};
}

}  // namespace transfer_audit
