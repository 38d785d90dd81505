// Internal: the computational kernels behind Accumulator::update (not installed). The caller has
// validated shapes, dtypes and options; a kernel returns partial sums that the caller commits, so a
// failed update changes nothing.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace libtransfer::fingerprint::detail {

// Consecutive scored rows of one sequence: their count and the sum of F_c over them ([S]).
struct SequenceRun {
  int64_t id = 0;
  int64_t count = 0;
  std::vector<double> sum;
};

// Partial sums of one update (or one thread's share of it). O(V + |S| + runs x |S|) memory.
struct PartialSums {
  PartialSums(int64_t vocab_size, int64_t subset_size, int64_t padded_vocab);
  // Adds other's sums and appends its runs (merging a run continued across the boundary).
  void add(const PartialSums& other);

  int64_t vocab_size;
  std::vector<double> sum_delta, sum_delta_sq, sum_grad;  // [padded_vocab >= V], tail unused
  std::vector<double> sum_centered;                       // [S]
  double kl_teacher_reference = 0.0, kl_reference_teacher = 0.0;
  double mass_shift = 0.0, mass_shift_sq = 0.0;
  int64_t positions = 0, skipped_nonfinite = 0;
  std::vector<SequenceRun> runs;
};

// One update's rows as the kernels see them: [rows, V] (row stride given, unit column stride).
struct RowsInput {
  torch::Tensor teacher, reference;  // [rows, V], same dtype and device, last stride 1
  torch::Tensor mask;                // [rows] bool on the CPU (undefined: all scored)
  torch::Tensor sequence_ids;        // [rows] int64 on the CPU: the sequence of each row
  bool per_sequence_sums = true;     // keep the sum of F_c per sequence run (else counts only)
  int64_t positions_per_batch = 0;   // T of a [B, T, V] input (for messages), 0 for 2-D input
  double temperature = 1.0;
  const std::vector<int64_t>* subset = nullptr;  // sorted, validated
  bool skip_nonfinite = false;
};

// True when this CPU runs the AVX2/FMA/F16C kernel.
bool cpu_has_avx2();

// The fused CPU kernel: float32/bfloat16/float16 through AVX2 when available, otherwise (and for
// float64) the scalar loop. force_scalar selects the scalar loop.
PartialSums accumulate_cpu(const RowsInput& input, bool force_scalar);

// Torch ops on the tensors' device (any device), in float64, in chunks of rows.
PartialSums accumulate_torch(const RowsInput& input);

// Rows per chunk of the torch path: about this many elements of float64 temporaries at once.
inline constexpr int64_t kTorchChunkElements = int64_t{1} << 24;

// The message for a non-finite logit (shared by both paths).
std::string nonfinite_message(const char* which, int64_t row, int64_t column,
                              int64_t positions_per_batch);

}  // namespace libtransfer::fingerprint::detail
