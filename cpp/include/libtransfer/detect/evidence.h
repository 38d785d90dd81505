// The common currency of the shared-initialization tests: per-layer evidence and one test's
// result, which the report combines. Plain data, torch-free.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace libtransfer::detect {

// One layer's (or unit group's) evidence. p-values are carried as log10 so that the tiny values
// of shared pairs (1e-300 and below) survive; p = 10^log10_p.
struct LayerEvidence {
  std::string name;               // the group, e.g. "layers.3.mlp" or "layers.0.attn.heads"
  std::string kind;               // "mlp_hidden", "glu_hidden", "attention_heads", "embedding", ...
  std::int64_t units = 0;         // number of matched units
  double statistic = 0.0;         // the test statistic (e.g. fixed points, Spearman rho)
  std::string statistic_name;     // "fixed_points", "spearman", "agreement", ...
  double log10_p = 0.0;           // one-sided p-value, log10
  double matched_fraction = 0.0;  // fraction of units matched to themselves (pi(i) = i)
  std::string note;               // why something is special (e.g. "skipped: 1 unit")
};

// One test (weights, activations, outputs, susceptibility) over a model pair.
struct TestResult {
  std::string test;  // "weights", "activations", "outputs", "susceptibility"
  bool ran = false;
  std::string skipped_reason;  // when !ran: why (e.g. "no probe inputs given")
  double statistic = 0.0;
  std::string statistic_name;
  double log10_p = 0.0;  // combined over layers where that applies
  std::vector<LayerEvidence> layers;
  std::string method;  // how the p-value was obtained ("fisher over 12 layers", ...)
};

}  // namespace libtransfer::detect
