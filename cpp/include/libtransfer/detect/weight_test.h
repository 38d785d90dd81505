// The weight test of shared initialization (DESIGN.md section 4): for every group of hidden units
// (grouping.h), row-normalize the units of both models, C = A_hat B_hat^T, match units by the
// linear assignment maximizing the trace -> pi, and ask how close pi is to the identity. Under the
// null (independent initializations drawn from a permutation-invariant distribution and
// permutation-equivariant training: SGD, Adam, AdamW) pi is a uniform random permutation, so:
// - fixed points K = #{i : pi(i) = i}: P(K >= k) <= 1/k!, p = min(1, 1/K!) (the default: exact
//   bound, conservative and discrete; p = 1 whenever K <= 1);
// - Spearman's rho between pi and the identity, one-sided (rho >= observed): exact enumeration of
//   all n! permutations for n <= kSpearmanExactMaxUnits, else the t approximation that
//   scipy.stats.spearmanr uses, floored at 1/n! (no permutation is rarer than the identity).
// Layers are combined with Fisher's method in log space.
//
// Agreement (statistic kAgreement, or robust = true next to an identity statistic): per group two
// matchings from halves of each unit whose weights are independent at initialization, and
// K = #{i : pi_1(i) = pi_2(i)}; p = P(K >= k) for a uniform permutation (exact tail). Invariant to
// permutations of B's hidden units, so it detects permuted copies. MLP chains: the forward
// matching of the in-rows (layer 1 in the fixed input basis, later layers after aligning B's
// previous layer by its forward matching) vs the backward matching of the out-columns (from the
// fixed output classes down). Transformers: gate rows vs up rows (GLU; in-rows vs out-columns for
// a plain MLP), q,k rows vs v rows and o columns (heads), in the residual basis (aligned first
// with align_embeddings). Exact at initialization only: training couples the halves and
// independently trained models converge to similar units, so the method string starts with
// kApproximateMethodPrefix and reports do not combine it. Cost: two matchings per group.
//
// Optional: residual alignment (transformers whose residual basis may be permuted): match the
// columns of the two embedding matrices first and permute every residual axis of B accordingly.
//
// The exact permutation test (PERMTEST) turns any statistic phi of two states into a p-value:
// p = (1 + #{phi(sigma A, B) >= phi(A, B)}) / (T + 1), sigma permuting the units of every group of
// A consistently, uniformly at random (seeded).
//
// Costs: per group two [units, features] matrices and a [units, units] similarity (compute dtype)
// plus the solver's float64 copy; one group at a time, so peak memory is a few groups' worth.
// Time is dominated by the similarity matmuls (units^2 * features flops per group) and the
// assignments (see linear_assignment.h). The permutation test materializes both models' group
// tensors (meant for models that fit in memory several times) and costs T statistic evaluations.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/detect/evidence.h"
#include "libtransfer/detect/grouping.h"
#include "libtransfer/detect/state_source.h"
#include "libtransfer/models/model.h"

namespace libtransfer::detect {

// Up to this many units the one-sided Spearman p-value is exact (all n! permutations enumerated:
// 9! = 362880 in a few milliseconds); above, the t approximation of scipy.stats.spearmanr.
inline constexpr std::int64_t kSpearmanExactMaxUnits = 9;

// Default number of random permutations of the permutation test: p resolves to 1e-3.
inline constexpr std::int64_t kDefaultWeightPermutations = 999;

// The per-layer statistic of the weight test. kFixedPoints and kSpearman compare the matching pi
// with the identity; kAgreement compares two matchings of the same units computed from
// independent halves of the weights (see weight_test below) and so survives hidden-unit
// permutations of B.
enum class WeightStatistic { kFixedPoints, kSpearman, kAgreement };
// "fixed_points", "spearman" or "agreement" (InvalidInput otherwise).
WeightStatistic parse_weight_statistic(const std::string& name);
std::string weight_statistic_name(WeightStatistic statistic);

// The matching solver: exact (linear_sum_assignment), greedy (greedy_assignment, faster on very
// wide layers, valid p-values, possibly less power) or auto (the default): exact up to
// auto_exact_max_units units per matching, greedy above. Both solvers are permutation-equivariant,
// so the p-values stay valid whichever runs; only power can drop, and a shared pair's similarity
// has a dominant diagonal that greedy recovers exactly. The per-group note says which one ran.
enum class AssignmentSolver { kExact, kGreedy, kAuto };
// "exact", "greedy" or "auto" (InvalidInput otherwise).
AssignmentSolver parse_assignment_solver(const std::string& name);
std::string assignment_solver_name(AssignmentSolver solver);

// Default size limit of the exact solver under solver = auto: an exact 4096 x 4096 assignment
// takes seconds, an 8192 x 8192 one about a minute on two cores (greedy: a few seconds).
inline constexpr std::int64_t kAutoExactMaxUnits = 4096;

// The solver that runs on an n-unit matching (kAuto resolved against auto_exact_max_units).
AssignmentSolver resolve_solver(AssignmentSolver solver, std::int64_t units,
                                std::int64_t auto_exact_max_units = kAutoExactMaxUnits);

// Options of weight_test. mapping renames tensors of A to their names in B (for renamed layers;
// unlisted names map to themselves). groups: explicit unit groups (names as in A); empty ->
// detect_layout. compute_dtype: kFloat or kDouble. device: where the similarities are computed
// (default: A's device).
struct WeightTestOptions {
  std::map<std::string, std::string> mapping;
  std::vector<UnitGroup> groups;
  WeightStatistic statistic = WeightStatistic::kFixedPoints;
  AssignmentSolver solver = AssignmentSolver::kAuto;
  std::int64_t auto_exact_max_units = kAutoExactMaxUnits;  // solver = kAuto: exact up to here
  bool align_embeddings = false;
  // Also run the agreement statistic next to an identity statistic (fixed_points / spearman):
  // both families of rows are reported and the combined p is Bonferroni over the two Fisher
  // p-values. Ignored when statistic is kAgreement.
  bool robust = false;
  std::int64_t n_heads = 0;
  torch::ScalarType compute_dtype = torch::kFloat;
  std::optional<torch::Device> device;
};

// Runs the weight test on two models. The result's layers: the residual basis first (transformers:
// the embedding-column matching; combined into the p-value unless it served as the alignment or
// the statistic is kAgreement), then every group in layer order (identity statistic), then with
// agreement every group again (statistic_name "agreement"); skipped groups included with
// log10_p = 0 and a note. Combined: Fisher over the identity rows, Fisher over the agreement rows
// (kAgreement), or with robust Bonferroni over both (statistic_name "bonferroni").
// Errors (InvalidInput unless said otherwise): a tensor a group needs missing in B (naming it and
// listing B's most similar names), shapes that differ (naming the tensor and both shapes),
// non-finite values (naming the tensor and the count), non-floating tensors in a group
// (WrongType), no 2-D weight, nothing testable left (every group skipped).
TestResult weight_test(const StateSource& a, const StateSource& b,
                       const WeightTestOptions& options = {});
TestResult weight_test(const models::NamedTensors& a, const models::NamedTensors& b,
                       const WeightTestOptions& options = {});

// The agreement statistic judged against control models, for copies whose hidden units may have
// been permuted. Each control (a model trained like B from an initialization independent of A's)
// gives one draw of the null: X_c = Fisher's X = -2 sum ln p over the agreement rows of (A, c),
// against X for (A, B); p = (1 + #{X_c >= X}) / (1 + n). Valid when the controls are exchangeable
// with B under the null (same architecture, data and recipe, independent initializations); the
// smallest p is 1 / (1 + n), so rejecting at alpha needs at least 1/alpha - 1 controls. Needed
// because after training independent models learn similar units, which inflates the agreement
// statistic beyond its initialization-time null (docs/detection.md). The result's test is
// "weights_agreement"; its layers are (A, B)'s agreement rows. options.statistic and robust are
// overridden. InvalidInput without controls.
TestResult weight_agreement_test(const StateSource& a, const StateSource& b,
                                 const std::vector<const StateSource*>& controls,
                                 WeightTestOptions options = {});

// log10 of min(1, 1/k!): the fixed-point p-value bound.
double fixed_points_log10_p(std::int64_t fixed_points);

// log10 P(K >= k) exactly, K the number of fixed points of a uniform random permutation of n
// (P(K = j) = D(n - j) / (j! (n - j)!), D the derangement numbers): the agreement statistic's
// null. 0 <= k <= n (InvalidInput otherwise); O(n).
double fixed_points_tail_log10_p(std::int64_t k, std::int64_t n);

// Spearman's rho between a permutation (perm[i] = pi(i), of 0..n-1) and the identity, and the
// one-sided p-value P(rho* >= rho) under a uniform random permutation. n >= 2.
struct SpearmanIdentity {
  double rho = 0.0;
  double log10_p = 0.0;
  bool exact = false;
};
SpearmanIdentity spearman_identity_test(const std::vector<std::int64_t>& perm);

// The built-in statistics of the permutation test. kIdentityCosine: mean over groups of the mean
// cosine of identically indexed units (cheap: no assignment). kMatchedSimilarity: mean over groups
// of the optimal assignment's mean cosine (one assignment per group and permutation; it changes
// under sigma because each group's units also carry the neighbouring groups' permuted axes).
enum class PermutationStatistic { kIdentityCosine, kMatchedSimilarity };
// "identity_cosine" or "matched_similarity" (InvalidInput otherwise).
PermutationStatistic parse_permutation_statistic(const std::string& name);
std::string permutation_statistic_name(PermutationStatistic statistic);

// A statistic of two states (A permuted, and B under A's names after mapping): larger = more alike.
using StateStatistic =
    std::function<double(const models::NamedTensors& a, const models::NamedTensors& b)>;

// Options of weight_permutation_test. custom, when set, replaces the built-in statistic and is
// given every floating tensor of A (group members permuted) and of B (renamed to A's names), in
// compute_dtype on device.
struct PermutationTestOptions {
  std::map<std::string, std::string> mapping;
  std::vector<UnitGroup> groups;
  std::int64_t n_heads = 0;
  PermutationStatistic statistic = PermutationStatistic::kIdentityCosine;
  StateStatistic custom;
  std::string custom_name = "custom";
  std::int64_t permutations = kDefaultWeightPermutations;
  std::uint64_t seed = 0;
  AssignmentSolver solver = AssignmentSolver::kAuto;
  std::int64_t auto_exact_max_units = kAutoExactMaxUnits;
  torch::ScalarType compute_dtype = torch::kFloat;
  std::optional<torch::Device> device;
};

// PERMTEST: p = (1 + #{phi(sigma A, B) >= phi(A, B) (ties within kTieRelativeTolerance count)})
// / (T + 1). The result: test "weights_permutation", statistic phi(A, B), log10_p, method; for
// the built-in statistics also one layer per tested group (its own statistic and permutation
// p-value from the same permutations). Same seed -> same result. Errors as weight_test, and
// permutations >= 1.
TestResult weight_permutation_test(const StateSource& a, const StateSource& b,
                                   const PermutationTestOptions& options = {});

}  // namespace libtransfer::detect
