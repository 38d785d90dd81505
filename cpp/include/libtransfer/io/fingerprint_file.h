// Fingerprint accumulator files (written by fingerprint::Accumulator::save): a safetensors file of
// F64/I64 tensors plus "__metadata__" describing the accumulator. This is the torch-free reader and
// validator of that format, so that it can be fuzzed; Accumulator::load builds its state from it.
//
// Metadata keys: format ("biastransfer.fingerprint_accumulator"), format_version ("1"),
// vocab_size and positions (decimal integers), temperature (a decimal float), options (a JSON
// object with booleans "skip_nonfinite" and "per_sequence"), plus any user keys (tokenizer_hash,
// teacher, reference, ...). Tensors (V = vocab_size, S = subset size, Q = sequences):
// subset I64 [S] (ascending ids in [0, V)), sum_delta, sum_delta_sq, sum_grad F64 [V],
// sum_centered F64 [S], sum_kl_teacher_reference, sum_kl_reference_teacher, sum_mass_shift,
// sum_mass_shift_sq F64 [], positions, skipped_nonfinite, next_sequence_id I64 [],
// sequence_ids, sequence_counts I64 [Q], sequence_sum_centered F64 [Q or 0 (per_sequence false),
// S].
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/io/safetensors.h"

namespace libtransfer::io {

// The values of the metadata keys "format" and "format_version" this library writes and reads.
inline constexpr const char* kFingerprintFileFormat = "biastransfer.fingerprint_accumulator";
inline constexpr const char* kFingerprintFileFormatVersion = "1";

// Everything a fingerprint accumulator file holds, validated and copied out of the mapping
// (host-endian vectors, so nothing borrows the file). Costs the file's tensor bytes once more.
struct FingerprintFileState {
  std::map<std::string, std::string> metadata;  // every key of "__metadata__"
  std::int64_t vocab_size = 0;
  double temperature = 1.0;
  bool skip_nonfinite = false;
  bool per_sequence = true;
  std::vector<std::int64_t> subset;  // [S], ascending, unique, in [0, V)
  std::vector<double> sum_delta;     // [V]
  std::vector<double> sum_delta_sq;  // [V]
  std::vector<double> sum_grad;      // [V]
  std::vector<double> sum_centered;  // [S]
  double sum_kl_teacher_reference = 0.0;
  double sum_kl_reference_teacher = 0.0;
  double sum_mass_shift = 0.0;
  double sum_mass_shift_sq = 0.0;
  std::int64_t positions = 0;  // >= 0, equals the metadata's and the sum of sequence_counts
  std::int64_t skipped_nonfinite = 0;
  std::int64_t next_sequence_id = 0;
  std::vector<std::int64_t> sequence_ids;     // [Q], unique
  std::vector<std::int64_t> sequence_counts;  // [Q], each > 0
  std::vector<double> sequence_sum_centered;  // [Q x S] row-major when per_sequence, else empty
};

// Validates an opened safetensors file as a fingerprint accumulator file and copies its state out.
// Checks, each an InvalidInput naming the file: the format and version keys; vocab_size and
// positions integers, temperature a finite number > 0, options valid JSON with boolean
// skip_nonfinite and per_sequence; every tensor present with its dtype and shape (all shapes are
// checked before anything is copied, so a huge vocab_size in the metadata costs nothing: the
// tensors must hold the bytes); subset ids in range, unique and sorted; non-negative counts,
// positive and unique sequences whose counts add up (without overflow) to positions.
// expected_vocab_size / expected_tokenizer_hash: a mismatch (or no tokenizer_hash in the file) is
// an InvalidInput "fingerprint file from another vocabulary" naming both values.
FingerprintFileState read_fingerprint_file(
    const SafetensorsFile& file, std::optional<std::int64_t> expected_vocab_size = std::nullopt,
    const std::optional<std::string>& expected_tokenizer_hash = std::nullopt);

// The same from a path: SafetensorsFile::open's FileError and InvalidInput, then the checks above.
FingerprintFileState read_fingerprint_file(
    const std::string& path, std::optional<std::int64_t> expected_vocab_size = std::nullopt,
    const std::optional<std::string>& expected_tokenizer_hash = std::nullopt);

}  // namespace libtransfer::io
