// Text and JSON of a fingerprint run (see fingerprint_report.h).
#include "fingerprint_report.h"

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"

namespace transfer_audit {
namespace {

namespace fingerprint = libtransfer::fingerprint;

nlohmann::json metadata_json(const fingerprint::FingerprintRun& run, const std::string& key) {
  const auto found = run.metadata.find(key);
  if (found == run.metadata.end()) return nlohmann::json::object();
  const auto parsed = nlohmann::json::parse(found->second, nullptr, /*allow_exceptions=*/false);
  return parsed.is_object() ? parsed : nlohmann::json::object();
}

// {"teacher", "reference", "controls"} with Python's defaults for missing entries.
nlohmann::json names_of(const fingerprint::FingerprintRun& run) {
  auto names = metadata_json(run, "names");
  if (!names.contains("teacher")) names["teacher"] = "teacher";
  if (!names.contains("reference")) names["reference"] = "reference";
  if (!names.contains("controls")) {
    names["controls"] = nlohmann::json::array();
    for (std::size_t i = 0; i < run.controls.size(); ++i) {
      names["controls"].push_back("control " + std::to_string(i));
    }
  }
  return names;
}

nlohmann::json tokens_json(const std::vector<fingerprint::TokenValue>& tokens) {
  auto out = nlohmann::json::array();
  for (const auto& t : tokens) out.push_back({t.id, t.token, json_number(t.value)});
  return out;
}

std::string format(const char* pattern, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, pattern, value);
  return buffer;
}

}  // namespace

nlohmann::json fingerprint_json(const fingerprint::FingerprintRun& run,
                                const fingerprint::FingerprintSummary& summary) {
  const auto& fp = summary.teacher;
  const auto hash = run.metadata.find("tokenizer_hash");
  nlohmann::json config = {{"subset", run.config.subset},
                           {"temperature", run.config.temperature},
                           {"batch_size", run.config.batch_size},
                           {"max_length", nullptr},
                           {"seed", run.config.seed},
                           {"skip_nonfinite", run.config.skip_nonfinite},
                           {"records", run.config.records}};
  if (run.config.max_length.has_value()) config["max_length"] = *run.config.max_length;
  nlohmann::json out = {
      {"names", names_of(run)},
      {"config", config},
      {"tokenizer_hash",
       hash == run.metadata.end() ? nlohmann::json(nullptr) : nlohmann::json(hash->second)},
      {"vocab_size", fp.vocab_size},
      {"positions", fp.positions},
      {"sequences", fp.sequences},
      {"skipped_nonfinite", fp.skipped_nonfinite},
      {"kl_teacher_reference", json_number(fp.kl_teacher_reference)},
      {"kl_reference_teacher", json_number(fp.kl_reference_teacher)},
      {"controls", summary.controls},
      {"top_up", tokens_json(summary.top_up)},
      {"top_down", tokens_json(summary.top_down)},
  };
  if (summary.subset_size > 0) {
    out["subset_size"] = summary.subset_size;
    out["mass_shift"] = json_number(fp.mass_shift);
    out["mass_shift_stderr"] = json_number(fp.mass_shift_stderr);
  }
  if (summary.global_test.has_value()) {
    const auto& g = *summary.global_test;
    out["global_test"] = {{"statistic", json_number(g.statistic)},
                          {"p_value", json_number(g.p_value)},
                          {"permutations", g.permutations},
                          {"exact", g.exact},
                          {"n_sequences", g.n_sequences}};
    auto entangled = nlohmann::json::array();
    for (const auto& e : summary.entangled) {
      entangled.push_back({{"id", e.id},
                           {"token", e.token},
                           {"value", json_number(e.value)},
                           {"t", json_number(e.t)},
                           {"p", json_number(e.p)},
                           {"adjusted", json_number(e.adjusted)}});
    }
    out["entangled_tokens"] = entangled;
  }
  return out;
}

std::string fingerprint_text(const fingerprint::FingerprintRun& run,
                             const fingerprint::FingerprintSummary& summary, double q) {
  const auto& fp = summary.teacher;
  const auto names = names_of(run);
  const auto hash = run.metadata.find("tokenizer_hash");
  std::ostringstream out;
  out << "fingerprint of '" << names["teacher"].get<std::string>() << "' against '"
      << names["reference"].get<std::string>() << "'";
  if (summary.controls > 0) out << " with " << summary.controls << " controls";
  out << "\n  vocabulary " << fp.vocab_size << " (tokenizer "
      << (hash == run.metadata.end() ? std::string("unknown") : hash->second) << "), temperature "
      << format("%g", fp.temperature) << ", subset " << run.config.subset;
  if (summary.subset_size > 0) out << " (" << summary.subset_size << " tokens)";
  out << "\n  scored " << fp.positions << " positions in " << fp.sequences << " sequences";
  if (fp.skipped_nonfinite > 0) out << ", skipped " << fp.skipped_nonfinite << " non-finite";
  out << "\n  KL(T||R) = " << format("%.6f", fp.kl_teacher_reference)
      << ", KL(R||T) = " << format("%.6f", fp.kl_reference_teacher) << " nats per position";
  if (summary.subset_size > 0) {
    out << "\n  mass shift onto the subset: " << format("%+.6f", fp.mass_shift) << " ± "
        << format("%.6f", fp.mass_shift_stderr) << " nats";
  }
  const std::string what =
      summary.subset_size > 0 ? "centered log-ratio on the subset" : "mean log-ratio";
  for (const auto& [title, rows] :
       {std::make_pair("raised", &summary.top_up), std::make_pair("lowered", &summary.top_down)}) {
    out << "\n  most " << title << " (" << what << ", nats):";
    int rank = 0;
    for (const auto& t : *rows) {
      char line[64];
      std::snprintf(line, sizeof line, "\n    %3d. ", ++rank);
      out << line << "'" << t.token << "' id " << t.id << " " << format("%+.5f", t.value);
    }
  }
  if (summary.global_test.has_value()) {
    const auto& g = *summary.global_test;
    out << "\n  global sign-flip test against "
        << (summary.controls > 0 ? "the controls' mean" : "zero") << " (sum of squares, "
        << (g.exact ? "all " : "") << g.permutations
        << (g.exact ? " sign patterns, " : " random sign patterns, ") << g.n_sequences
        << " sequences): p = " << format("%.4g", g.p_value);
    out << "\n  entangled tokens (per-token t-test, Benjamini-Hochberg q = " << format("%g", q)
        << "): " << summary.entangled.size();
    for (const auto& e : summary.entangled) {
      out << "\n    '" << e.token << "' id " << e.id << " " << format("%+.5f", e.value)
          << "  t = " << format("%+.2f", e.t) << "  p_adj = " << format("%.3g", e.adjusted);
    }
  }
  return out.str();
}

bool is_finding(const fingerprint::FingerprintSummary& summary, double alpha) {
  if (!summary.global_test.has_value()) return false;
  return summary.global_test->p_value <= alpha || !summary.entangled.empty();
}

}  // namespace transfer_audit
