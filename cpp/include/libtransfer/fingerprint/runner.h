// The fingerprint driver: runs a teacher, a reference and optional control teachers over
// prompt/completion records, teacher-forced, and streams their logits at the completion tokens
// into one Accumulator per teacher (DESIGN.md section 3). The C++ twin of the Python
// biastransfer.fingerprint(), with the same tokenization, scored positions and sequence ids, and
// the same files: save_fingerprint_run writes what FingerprintResult.save writes (the teacher's
// accumulator plus "<stem>.control<i>.safetensors" beside it, with the same metadata keys), so
// either side reads the other's output.
//
// Costs: per batch one forward of each model on [batch, length] ids and a [rows, V] gather of the
// scored positions; only two models' logits are alive at a time. Memory O(V) for the sums plus
// O(#records x |S|) for the per-sequence fingerprints.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "libtransfer/fingerprint/accumulator.h"
#include "libtransfer/fingerprint/compare.h"
#include "libtransfer/io/jsonl.h"
#include "libtransfer/io/tokenizer.h"
#include "libtransfer/models/model.h"

namespace libtransfer::fingerprint {

// A token model to score and the text put before every record's prompt (a trait system prompt
// for a teacher, "" for the reference). name is shown in summaries and saved metadata.
struct ScoredModel {
  models::ModelPtr model;
  std::string prefix;
  std::string name;
};

// Token id used to right-pad a batch; padded positions are never scored (any valid id would do;
// the Python driver uses the same one).
inline constexpr std::int64_t kPadId = 0;

// Settings of run_fingerprint, saved as the "config" metadata (the Python FingerprintConfig).
// subset: "numeric" (tokens that are 1+ ASCII digits, with or without a leading space), "all"
// (no subset), or ignored when subset_ids is non-empty (label "ids[<count>]").
struct RunOptions {
  std::string subset = "numeric";
  std::vector<std::int64_t> subset_ids;
  double temperature = 1.0;
  std::int64_t batch_size = 8;             // records per forward pass
  std::optional<std::int64_t> max_length;  // cap on input length; completions are cut to fit
  std::uint64_t seed = 0;                  // seed of later permutation tests (saved only)
  bool skip_nonfinite = false;
  std::int64_t sequence_offset = 0;  // sequence id of the first record (for shards)
  // Called after every batch with (records done, total records); may be empty.
  std::function<void(std::int64_t, std::int64_t)> progress;
};

// The Python FingerprintConfig, as saved in the "config" metadata key.
struct RunConfig {
  std::string subset = "numeric";  // the label: "numeric", "all", "ids[<count>]", ...
  double temperature = 1.0;
  std::int64_t batch_size = 8;
  std::optional<std::int64_t> max_length;
  std::uint64_t seed = 0;
  bool skip_nonfinite = false;
  std::int64_t records = 0;
};

// A fingerprint run: the teacher's accumulator, the controls' (same reference, same records),
// the config and the metadata saved with them (tokenizer_hash, names, prefixes, config; a loaded
// run keeps every other key of the teacher's file too).
struct FingerprintRun {
  Accumulator teacher;
  std::vector<Accumulator> controls;
  RunConfig config;
  std::map<std::string, std::string> metadata;
};

// Scores every record: ids = encode(prefix + prompt) + encode(completion)[:-1] per model, logits
// at the positions predicting the completion tokens, sequence id = sequence_offset + record
// index. Models run in eval mode under no_grad on their own device (their training flag is
// restored). Errors (InvalidInput): no records, an empty completion, an empty prompt with its
// prefix, max_length leaving no room, a model that does not take tokens, vocabulary sizes that
// differ between models or are smaller than the tokenizer's; subset ids out of range.
FingerprintRun run_fingerprint(const ScoredModel& teacher, const ScoredModel& reference,
                               const std::vector<ScoredModel>& controls,
                               const std::vector<io::Record>& records,
                               const io::Tokenizer& tokenizer, const RunOptions& options = {});

// Writes the run as FingerprintResult.save does: the teacher's accumulator at `path` (metadata
// role "teacher", control_files) and each control's at "<stem>.control<i><suffix>" (role
// "control", control_index). Returns the paths written. Files are written atomically.
std::vector<std::string> save_fingerprint_run(const FingerprintRun& run, const std::string& path);

// Reads what save_fingerprint_run or FingerprintResult.save wrote. With a tokenizer, a file of
// another vocabulary (hash or size) is InvalidInput; a control file given instead of the
// teacher's is InvalidInput; missing files are FileError.
FingerprintRun load_fingerprint_run(const std::string& path,
                                    const io::Tokenizer* tokenizer = nullptr);

// One token in a summary: id, display form (io::Tokenizer::display_token, "<id N>" without a
// tokenizer or past its vocabulary) and value.
struct TokenValue {
  std::int64_t id = 0;
  std::string token;
  double value = 0.0;
};

// A subset token whose per-sequence centered log-ratio differs from the controls' mean (from
// zero without controls): per-token t test, Benjamini-Hochberg adjusted.
struct EntangledToken {
  std::int64_t id = 0;
  std::string token;
  double value = 0.0;  // teacher's centered log-ratio (minus the controls' mean with controls)
  double t = 0.0;
  double p = 0.0;
  double adjusted = 0.0;
};

// The numbers FingerprintResult.to_dict reports, computed from a run: counts, KLs, the k most
// raised and lowered tokens (centered log-ratio with a subset, mean log-ratio without) and, with
// a subset and >= 2 sequences, the global sign-flip test and the entangled tokens (sorted by
// adjusted p, then by |t| descending).
struct FingerprintSummary {
  Fingerprint teacher;
  std::int64_t controls = 0;
  std::int64_t subset_size = 0;  // 0 without a subset
  std::vector<TokenValue> top_up;
  std::vector<TokenValue> top_down;
  std::optional<GlobalTestResult> global_test;
  std::vector<EntangledToken> entangled;
};

// Defaults of summarize_fingerprint: those of FingerprintResult.summary().
inline constexpr std::int64_t kSummaryPermutations = 999;
inline constexpr double kSummaryFdr = 0.05;

// Finalizes and tests a run (see FingerprintSummary). permutations >= 1, q in (0, 1], k >= 1.
// Cost: one finalize per accumulator, the sign-flip test's O(permutations x n x S).
FingerprintSummary summarize_fingerprint(const FingerprintRun& run,
                                         const io::Tokenizer* tokenizer = nullptr,
                                         std::int64_t k = 20,
                                         std::int64_t permutations = kSummaryPermutations,
                                         double q = kSummaryFdr);

}  // namespace libtransfer::fingerprint
