// One bind_xxx function per topic file (k2's layout); module.cpp calls each in turn.
#pragma once

#include <pybind11/pybind11.h>

namespace libtransfer::bindings {

void bind_safetensors(pybind11::module_& m);  // bindings/safetensors.cpp
void bind_tokenizer(pybind11::module_& m);    // bindings/tokenizer.cpp
void bind_data(pybind11::module_& m);         // bindings/data.cpp (IDX, JSON lines)
void bind_stats(pybind11::module_& m);        // bindings/stats.cpp (tests, corrections, tails)
void bind_fingerprint(pybind11::module_& m);  // bindings/fingerprint.cpp (accumulator, Fingerprint)
void bind_fingerprint_inputs(pybind11::module_& m);  // bindings/fingerprint_inputs.cpp (top-k,
                                                     // samples, comparisons)
void bind_detect(pybind11::module_& m);              // bindings/detect.cpp (linear assignment)
void bind_detect_weights(pybind11::module_& m);      // bindings/detect_weights.cpp (weight test)
void bind_detect_probes(pybind11::module_& m);  // bindings/detect_probes.cpp (activation, output,
                                                // susceptibility tests, report)
void bind_models(pybind11::module_& m);    // bindings/models.cpp (Model, MLP, TransformerLM, ...)
void bind_sampler(pybind11::module_& m);   // bindings/sampler.cpp
void bind_filters(pybind11::module_& m);   // bindings/filters.cpp
void bind_datasets(pybind11::module_& m);  // bindings/datasets.cpp
void bind_losses(pybind11::module_& m);    // bindings/losses.cpp (losses, evaluation)
void bind_trainer(pybind11::module_& m);   // bindings/trainer.cpp

}  // namespace libtransfer::bindings
