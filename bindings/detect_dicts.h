// The detector's results cross to Python as plain dicts (the Python dataclasses in
// biastransfer.detection / detect_api are built from them); one conversion for every binding.
#pragma once

#include <pybind11/pybind11.h>

#include "libtransfer/detect/evidence.h"
#include "libtransfer/detect/report.h"

namespace libtransfer::bindings {

inline pybind11::dict evidence_dict(const detect::LayerEvidence& e) {
  pybind11::dict d;
  d["name"] = e.name;
  d["kind"] = e.kind;
  d["units"] = e.units;
  d["statistic"] = e.statistic;
  d["statistic_name"] = e.statistic_name;
  d["log10_p"] = e.log10_p;
  d["matched_fraction"] = e.matched_fraction;
  d["note"] = e.note;
  return d;
}

// "calibrated": whether the report would combine this test's p-value (exact or control-based).
inline pybind11::dict result_dict(const detect::TestResult& r) {
  pybind11::dict d;
  d["test"] = r.test;
  d["ran"] = r.ran;
  d["skipped_reason"] = r.skipped_reason;
  d["statistic"] = r.statistic;
  d["statistic_name"] = r.statistic_name;
  d["log10_p"] = r.log10_p;
  d["method"] = r.method;
  d["calibrated"] = detect::is_calibrated(r);
  pybind11::list layers;
  for (const auto& e : r.layers) layers.append(evidence_dict(e));
  d["layers"] = layers;
  return d;
}

}  // namespace libtransfer::bindings
