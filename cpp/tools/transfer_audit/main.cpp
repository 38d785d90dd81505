// transfer-audit: the command-line face of libtransfer for people without Python.
//
//   transfer-audit detect A B            shared initialization of two models
//   transfer-audit fingerprint ...       logit fingerprint of a teacher on JSON-lines data
//   transfer-audit filter DATA.jsonl     the paper's number filter and the other text filters
//   transfer-audit inspect FILE          what a safetensors or fingerprint file holds
//
// Readable text by default, JSON with --json. Exit codes: 0 clean, 1 finding (detect: shared
// initialization; fingerprint: significant departure; filter: nothing kept), 2 usage or input
// error, with one line on stderr.
#include <c10/util/Exception.h>

#include <CLI/CLI.hpp>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "common.h"
#include "libtransfer/errors.h"
#include "libtransfer/version.h"

namespace {

// The first line of a message (c10 errors append a C++ stack trace after it).
std::string first_line(const std::string& message) {
  const auto end = message.find('\n');
  return end == std::string::npos ? message : message.substr(0, end);
}

int fail(const std::string& message) {
  std::cerr << "transfer-audit: error: " << first_line(message) << std::endl;
  return transfer_audit::kExitError;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace transfer_audit;
  CLI::App app(
      "transfer-audit: audit models and data for subliminal trait transfer (libtransfer " +
          libtransfer::version() +
          ").\nExit codes: 0 clean, 1 finding (detect: shared initialization; fingerprint: "
          "significant departure; filter: nothing kept), 2 usage or input error.",
      "transfer-audit");
  app.require_subcommand(1);
  GlobalOptions global;
  app.add_flag("--json", global.json, "print JSON instead of readable text")->configurable(false);
  app.add_flag("--progress", global.progress, "always show the progress line on stderr");
  app.add_flag("--no-progress", global.no_progress, "never show the progress line");
  app.set_version_flag("--version", "transfer-audit " + libtransfer::version() + " (torch " +
                                        libtransfer::built_with_torch() + ")");
  app.fallthrough();  // global flags are accepted after the subcommand too
  std::vector<Command> commands = {
      add_detect_command(app, global), add_fingerprint_command(app, global),
      add_filter_command(app, global), add_inspect_command(app, global)};
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help and --version derive from it
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return fail(e.what());
  }
  try {
    for (const auto& command : commands) {
      if (command.app->parsed()) return command.run();
    }
    return fail("no subcommand given");
  } catch (const libtransfer::InvalidInput& e) {
    return fail(e.what());
  } catch (const libtransfer::FileError& e) {
    return fail(e.what());
  } catch (const libtransfer::WrongType& e) {
    return fail(e.what());
  } catch (const c10::Error& e) {
    return fail(e.msg());
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}
