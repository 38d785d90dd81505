#include "libtransfer/detect/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "libtransfer/detect/activation_test.h"
#include "libtransfer/errors.h"

namespace libtransfer::detect {
namespace {

// p = 10^log10_p as text for any magnitude ("3.1e-507"), since doubles stop at 1e-308.
std::string format_p(double log10_p) {
  if (std::isnan(log10_p)) return "nan";
  if (log10_p == -std::numeric_limits<double>::infinity()) return "0";
  if (log10_p > -4.0) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.4f", std::pow(10.0, log10_p));
    return buf;
  }
  double exponent = std::floor(log10_p);
  double mantissa = std::pow(10.0, log10_p - exponent);
  if (mantissa >= 9.95) {  // would print as 10.0
    mantissa /= 10.0;
    exponent += 1.0;
  }
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%.1fe%+.0f", mantissa, exponent);
  return buf;
}

std::string format_number(double x) {
  x += 0.0;  // -0 prints as 0
  char buf[32];
  if (std::isfinite(x) && x == std::round(x) && std::fabs(x) < 1e12) {
    std::snprintf(buf, sizeof(buf), "%.0f", x);
  } else {
    std::snprintf(buf, sizeof(buf), "%.4g", x);
  }
  return buf;
}

std::string pad(const std::string& s, std::size_t width, bool right) {
  if (s.size() >= width) return s;
  return right ? std::string(width - s.size(), ' ') + s : s + std::string(width - s.size(), ' ');
}

// Finite numbers as numbers, others as null (JSON has no infinity; -inf log10 p means p = 0).
nlohmann::json json_number(double x) {
  return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr);
}

// p itself where a double holds it (>= 1e-300), else null: log10_p is the exact carrier.
nlohmann::json json_p(double log10_p) {
  return std::isfinite(log10_p) && log10_p >= -300.0 ? nlohmann::json(std::pow(10.0, log10_p))
                                                     : nlohmann::json(nullptr);
}

void append_layer_table(std::ostringstream& out, const std::vector<LayerEvidence>& layers) {
  std::vector<std::vector<std::string>> rows = {
      {"layer", "kind", "units", "statistic", "p", "matched", "note"}};
  for (const auto& e : layers) {
    rows.push_back(
        {e.name, e.kind, std::to_string(e.units),
         format_number(e.statistic) + (e.statistic_name.empty() ? "" : " " + e.statistic_name),
         format_p(e.log10_p), format_number(e.matched_fraction), e.note});
  }
  std::vector<std::size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (std::size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
  }
  const std::vector<bool> right = {false, false, true, true, true, true, false};
  for (const auto& r : rows) {
    std::string line = "   ";
    for (std::size_t c = 0; c < r.size(); ++c) {
      line += " " + (c + 1 == r.size() ? r[c] : pad(r[c], width[c], right[c]));
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out << line << "\n";
  }
}

}  // namespace

std::string to_string(Verdict verdict) {
  switch (verdict) {
    case Verdict::kShared:
      return "shared";
    case Verdict::kNotShared:
      return "not shared";
    case Verdict::kInconclusive:
      return "inconclusive";
  }
  return "inconclusive";
}

bool is_calibrated(const TestResult& test) {
  return test.ran && test.skipped_reason.empty() && !std::isnan(test.log10_p) &&
         test.method.rfind(kApproximateMethodPrefix, 0) != 0;
}

DetectionReport make_report(std::vector<TestResult> tests, double alpha) {
  if (!(alpha > 0.0 && alpha < 1.0)) {
    throw InvalidInput("report: alpha must be in (0, 1), got " + std::to_string(alpha));
  }
  DetectionReport report;
  report.alpha = alpha;
  report.tests = std::move(tests);
  double min_log10 = 0.0;
  for (const auto& t : report.tests) {
    if (!is_calibrated(t)) continue;
    report.combined_tests.push_back(t.test);
    min_log10 = std::min(min_log10, t.log10_p);
  }
  const std::size_t m = report.combined_tests.size();
  if (m == 0) {
    report.verdict = Verdict::kInconclusive;
    report.combined_log10_p = 0.0;
    report.combination = "none: no calibrated test ran";
    return report;
  }
  report.combined_log10_p = std::min(0.0, min_log10 + std::log10(static_cast<double>(m)));
  report.combination = m == 1 ? report.combined_tests[0] + " alone"
                              : "bonferroni min-p over " + std::to_string(m) + " calibrated tests";
  report.verdict =
      report.combined_log10_p <= std::log10(alpha) ? Verdict::kShared : Verdict::kNotShared;
  return report;
}

std::string DetectionReport::to_text() const {
  std::ostringstream out;
  out << "shared-initialization report: " << to_string(verdict) << " (alpha " << alpha
      << ", combined p " << format_p(combined_log10_p) << ", log10 p "
      << format_number(combined_log10_p) << ")\n";
  out << "combination: " << combination;
  if (!combined_tests.empty()) {
    out << " [";
    for (std::size_t i = 0; i < combined_tests.size(); ++i) {
      out << (i ? ", " : "") << combined_tests[i];
    }
    out << "]";
  }
  out << "\n";
  for (const auto& t : tests) {
    out << "\n[" << t.test << "] ";
    if (!t.ran) {
      out << "skipped: " << t.skipped_reason << "\n";
      continue;
    }
    out << t.statistic_name << " = " << format_number(t.statistic);
    if (t.skipped_reason.empty()) {
      out << ", p " << format_p(t.log10_p) << " (" << t.method << ")"
          << (is_calibrated(t) ? "" : " [not combined]") << "\n";
    } else {
      out << "; " << t.skipped_reason << "\n";
    }
    if (!t.layers.empty()) append_layer_table(out, t.layers);
  }
  return out.str();
}

std::string DetectionReport::to_json(int indent) const {
  nlohmann::json j;
  j["alpha"] = alpha;
  j["verdict"] = to_string(verdict);
  j["combined_log10_p"] = json_number(combined_log10_p);
  j["combined_p"] = json_p(combined_log10_p);
  j["combination"] = combination;
  j["combined_tests"] = combined_tests;
  j["tests"] = nlohmann::json::array();
  for (const auto& t : tests) {
    nlohmann::json jt;
    jt["test"] = t.test;
    jt["ran"] = t.ran;
    jt["skipped_reason"] = t.skipped_reason;
    jt["statistic"] = json_number(t.statistic);
    jt["statistic_name"] = t.statistic_name;
    jt["log10_p"] = json_number(t.log10_p);
    jt["p"] = json_p(t.log10_p);
    jt["method"] = t.method;
    jt["calibrated"] = is_calibrated(t);
    jt["layers"] = nlohmann::json::array();
    for (const auto& e : t.layers) {
      jt["layers"].push_back({{"name", e.name},
                              {"kind", e.kind},
                              {"units", e.units},
                              {"statistic", json_number(e.statistic)},
                              {"statistic_name", e.statistic_name},
                              {"log10_p", json_number(e.log10_p)},
                              {"p", json_p(e.log10_p)},
                              {"matched_fraction", json_number(e.matched_fraction)},
                              {"note", e.note}});
    }
    j["tests"].push_back(std::move(jt));
  }
  return j.dump(indent);
}

}  // namespace libtransfer::detect
