// How transfer-audit shows a fingerprint run (fingerprint and inspect): the JSON of Python's
// FingerprintResult.to_dict and the text of its summary().
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "libtransfer/fingerprint/runner.h"

namespace transfer_audit {

// The to_dict() fields: names, config, tokenizer_hash, vocab_size, positions, sequences,
// skipped_nonfinite, KLs, top_up / top_down as [id, token, value], and with a subset
// subset_size, mass_shift(_stderr), global_test and entangled_tokens.
nlohmann::json fingerprint_json(const libtransfer::fingerprint::FingerprintRun& run,
                                const libtransfer::fingerprint::FingerprintSummary& summary);

// The readable summary (as FingerprintResult.summary()).
std::string fingerprint_text(const libtransfer::fingerprint::FingerprintRun& run,
                             const libtransfer::fingerprint::FingerprintSummary& summary, double q);

// A finding: the global test's p <= alpha, or at least one entangled token.
bool is_finding(const libtransfer::fingerprint::FingerprintSummary& summary, double alpha);

}  // namespace transfer_audit
