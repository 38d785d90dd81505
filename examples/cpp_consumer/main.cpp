// A downstream program built against an installed libtransfer (see CMakeLists.txt): a
// shared-initialization detection on two safetensors files and a logit fingerprint of a
// TorchScript teacher against a reference on JSON-lines records.
//
//   consumer A.safetensors B.safetensors TEACHER.pt REFERENCE.pt DATA.jsonl VOCAB_DIR
//
// Prints two lines:
//   detect <verdict> log10_p=<combined log10 p> layers=<tested groups>
//   fingerprint positions=<n> sequences=<n> kl=<KL(T||R)> mass_shift=<m> global_p=<p>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>

#include "libtransfer/detect/report.h"
#include "libtransfer/detect/state_source.h"
#include "libtransfer/detect/weight_test.h"
#include "libtransfer/fingerprint/runner.h"
#include "libtransfer/io/jsonl.h"
#include "libtransfer/io/tokenizer.h"
#include "libtransfer/models/torchscript.h"

namespace lt = libtransfer;

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: consumer A.safetensors B.safetensors TEACHER.pt REFERENCE.pt DATA.jsonl "
                 "VOCAB_DIR\n";
    return 2;
  }
  try {
    // Detection: the weight test reads both files lazily, one unit group at a time.
    const auto a = lt::detect::state_from_safetensors({argv[1]});
    const auto b = lt::detect::state_from_safetensors({argv[2]});
    const auto weights = lt::detect::weight_test(*a, *b);
    const auto report = lt::detect::make_report({weights});
    std::printf("detect %s log10_p=%.6f layers=%zu\n",
                lt::detect::to_string(report.verdict).c_str(), report.combined_log10_p,
                weights.layers.size());

    // Fingerprint: teacher and reference score the same completions, teacher-forced.
    const std::string vocab_dir = argv[6];
    const auto tokenizer =
        lt::io::Tokenizer::from_files(vocab_dir + "/encoder.json", vocab_dir + "/vocab.bpe");
    lt::models::TorchScriptOptions options;
    options.input_kind = lt::models::InputKind::kTokens;
    const lt::fingerprint::ScoredModel teacher{lt::models::TorchScriptModel::load(argv[3], options),
                                               "", "teacher"};
    const lt::fingerprint::ScoredModel reference{
        lt::models::TorchScriptModel::load(argv[4], options), "", "reference"};
    const auto records = lt::io::read_jsonl(argv[5]);
    const auto run = lt::fingerprint::run_fingerprint(teacher, reference, {}, records, tokenizer);
    const auto summary = lt::fingerprint::summarize_fingerprint(run, &tokenizer);
    std::printf("fingerprint positions=%lld sequences=%lld kl=%.9g mass_shift=%.9g global_p=%.6g\n",
                static_cast<long long>(summary.teacher.positions),
                static_cast<long long>(summary.teacher.sequences),
                summary.teacher.kl_teacher_reference, summary.teacher.mass_shift,
                summary.global_test ? summary.global_test->p_value : 1.0);
  } catch (const std::exception& e) {
    std::cerr << "consumer: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
