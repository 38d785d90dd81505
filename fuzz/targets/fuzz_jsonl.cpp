// Fuzzes the JSON lines reader (read_jsonl, and JsonlReader with a small line limit). Accepted
// records must survive a round trip through write_jsonl unchanged.
#include <string>
#include <vector>

#include "fuzz_support.h"
#include "libtransfer/io/jsonl.h"

using libtransfer::fuzz::check;
using libtransfer::fuzz::parses_cleanly;
using libtransfer::fuzz::ScratchFile;
namespace io = libtransfer::io;

namespace {

// A line limit the fuzzer can reach in short inputs, to exercise the long-line refusal.
constexpr std::size_t kSmallLineLimit = 64;

bool same(const std::vector<io::Record>& a, const std::vector<io::Record>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].prompt != b[i].prompt || a[i].completion != b[i].completion ||
        a[i].extra_json != b[i].extra_json) {
      return false;
    }
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static ScratchFile input("jsonl_in"), output("jsonl_out");
  const std::string& path = input.write(data, size);

  parses_cleanly([&] {
    io::JsonlReader reader(path, kSmallLineLimit);
    io::Record record;
    while (reader.next(record)) {
      check(reader.line_number() >= 1, "a record without a line number");
    }
  });

  std::vector<io::Record> records;
  if (!parses_cleanly([&] { records = io::read_jsonl(path); })) return 0;
  io::write_jsonl(output.path(), records);
  check(same(io::read_jsonl(output.path()), records), "a JSON lines round trip changed records");
  return 0;
}
