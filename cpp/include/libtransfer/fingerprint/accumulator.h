// Streaming accumulation of a logit fingerprint: teacher and reference logits go in batch by batch,
// float64 sums come out, merge across shards, and survive a safetensors round trip.
//
// Per scored position c (DESIGN.md section 3): l_T = log_softmax(teacher / tau), l_R likewise,
// delta = l_T - l_R, p = exp(l). Kept in float64: n, sum delta [V], sum delta^2 [V],
// sum (p_T - p_R) [V], sum KL(T||R), sum KL(R||T); with a token subset S: sum and sum of squares of
// the mass shift m_c = logsumexp_S l_T - logsumexp_S l_R, sum of F_c = delta_c[S] - mean delta_c[S]
// [S], and per sequence the count and sum of F_c [S].
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "libtransfer/fingerprint/fingerprint.h"

namespace libtransfer::fingerprint {

// How update() computes. kAuto: the fused CPU kernel (AVX2 when the CPU has it, else the scalar
// loop) for CPU tensors, torch ops on the tensors' device otherwise. The others force one path
// (for tests and comparisons): kScalar, a plain double-precision loop (CPU tensors only); kTorch,
// torch ops in float64 on the tensors' device, O(rows x V) temporaries in chunks of rows.
enum class Backend { kAuto, kScalar, kTorch };

// The accumulator's fixed settings. Plain data; the subset costs O(|S|).
struct AccumulatorOptions {
  double temperature = 1.0;     // tau > 0, finite; logits are divided by it before log_softmax
  std::vector<int64_t> subset;  // token ids in [0, V), no duplicates (any order; kept sorted)
  // false: a non-finite logit in a scored row raises ValueError naming the tensor and the row;
  // true: such rows are skipped and counted (skipped_nonfinite), never averaged in.
  bool skip_nonfinite = false;
  // Keep the sum of F_c per sequence (memory O(#sequences x |S|) float64). Counts per sequence are
  // kept either way (O(#sequences)).
  bool per_sequence = true;
  Backend backend = Backend::kAuto;
};

// The file format written by Accumulator::save (the safetensors "__metadata__" key "format").
inline constexpr const char* kAccumulatorFormat = "biastransfer.fingerprint_accumulator";
inline constexpr const char* kAccumulatorFormatVersion = "1";

// The streaming state. Memory: 3 x V float64 sums plus O(|S|) and O(#sequences x |S|); update()
// reads both logit tensors once (about 2 x rows x V elements) and allocates O(threads x V) scratch
// on the CPU path; nothing O(rows x V).
//
// Sequence ids: the per-sequence sums are keyed by a user-visible int64 id. Without sequence_ids,
// each batch row of a [B, T, V] update is a new sequence and each row of an [N, V] update is its
// own sequence, numbered consecutively from a running counter (which restarts at 0 in a new
// accumulator and moves past any explicit id given). Shards that are merged must use explicit,
// globally unique ids: default ids from different shards collide and would be added together.
class Accumulator {
 public:
  // ValueError for vocab_size < 1, a temperature that is not finite and > 0, subset ids out of
  // range or duplicated.
  explicit Accumulator(int64_t vocab_size, AccumulatorOptions options = {});

  // Adds the scored positions of one batch. teacher and reference: [B, T, V] or [N, V], same shape,
  // same dtype (float32, bfloat16, float16 or float64), same device; V == vocab_size. mask: bool or
  // 0/1 integers, [B, T] or [N] (absent: every position scored). sequence_ids: int64, [B] for 3-D
  // input or [N] for 2-D input. Errors (ValueError / TypeError) leave the state unchanged. On the
  // CPU the fused kernel runs rows in parallel (std::threads, up to at::get_num_threads()); on
  // other devices torch ops run there and only [V]-sized partial sums move to the CPU.
  void update(const torch::Tensor& teacher, const torch::Tensor& reference,
              const c10::optional<torch::Tensor>& mask = {},
              const c10::optional<torch::Tensor>& sequence_ids = {});

  // Adds another accumulator's sums: the result equals one pass over the union up to float64
  // rounding. Per-sequence sums are added by sequence id. ValueError naming both values when the
  // vocabulary size, temperature, subset or per_sequence setting differ.
  void merge(const Accumulator& other);

  // The means and standard errors. ValueError("... no scored positions ...") when n == 0.
  Fingerprint finalize() const;

  // Writes the state to a safetensors file (F64/I64 tensors, atomically). metadata (e.g.
  // "tokenizer_hash", "teacher", "reference") goes into "__metadata__" next to the reserved keys
  // format, format_version, vocab_size, temperature, positions, options (JSON); a user key equal to
  // a reserved one is a ValueError.
  void save(const std::string& path, const std::map<std::string, std::string>& metadata = {}) const;

  // Reads a file written by save(), validating the format key, every tensor's presence, dtype and
  // shape, and the values (ValueError). expected_vocab_size / expected_tokenizer_hash: a mismatch
  // is a ValueError naming both values ("fingerprint file from another vocabulary"). The file's
  // metadata (all keys) is stored into *metadata when given.
  static Accumulator load(const std::string& path,
                          std::map<std::string, std::string>* metadata = nullptr,
                          c10::optional<int64_t> expected_vocab_size = {},
                          c10::optional<std::string> expected_tokenizer_hash = {});

  int64_t vocab_size() const { return vocab_size_; }
  double temperature() const { return options_.temperature; }
  const std::vector<int64_t>& subset() const { return options_.subset; }
  const AccumulatorOptions& options() const { return options_; }
  int64_t positions() const { return positions_; }
  int64_t sequences() const { return static_cast<int64_t>(sequence_ids_.size()); }
  int64_t skipped_nonfinite() const { return skipped_nonfinite_; }
  int64_t next_sequence_id() const { return next_sequence_id_; }

  // The raw sums as tensors (copies; float64 / int64 on the CPU), under the names the file uses.
  std::map<std::string, torch::Tensor> state() const;

 private:
  void add_sequence(int64_t id, int64_t count, const double* sums);

  int64_t vocab_size_;
  AccumulatorOptions options_;
  int64_t positions_ = 0;
  int64_t skipped_nonfinite_ = 0;
  int64_t next_sequence_id_ = 0;
  std::vector<double> sum_delta_, sum_delta_sq_, sum_grad_;  // [V]
  double sum_kl_teacher_reference_ = 0.0;
  double sum_kl_reference_teacher_ = 0.0;
  double sum_mass_shift_ = 0.0;
  double sum_mass_shift_sq_ = 0.0;
  std::vector<double> sum_centered_;                   // [S]
  std::vector<int64_t> sequence_ids_;                  // insertion order
  std::vector<int64_t> sequence_counts_;               // [n_seq]
  std::vector<double> sequence_sums_;                  // [n_seq x S] when per_sequence
  std::unordered_map<int64_t, size_t> sequence_slot_;  // id -> index into the three above
};

}  // namespace libtransfer::fingerprint
