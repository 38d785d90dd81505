// Regression tests of the fuzzers' findings (fuzz/regressions/<target>/, docs/security.md): each
// input that once crashed a parser or tripped a sanitizer must now give a clean result, and every
// seed of the committed corpora named valid_* must still parse (so the fuzzers start from inputs
// that reach deep into the parsers). Plus the fingerprint file reader's own checks, on files
// assembled here byte by byte.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/distill/text_filters.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/fingerprint_file.h"
#include "libtransfer/io/idx.h"
#include "libtransfer/io/jsonl.h"
#include "libtransfer/io/safetensors.h"
#include "libtransfer/io/tokenizer.h"

namespace {

namespace fs = std::filesystem;
namespace io = libtransfer::io;
namespace distill = libtransfer::distill;
using Catch::Matchers::Contains;
using libtransfer::InvalidInput;
using libtransfer::testing::TempDir;
using libtransfer::testing::write_bytes;

const fs::path kFuzzDir = fs::path(LIBTRANSFER_SOURCE_DIR) / "fuzz";
// Between the parts of one multi-part fuzz input (fuzz/targets/fuzz_support.h).
const std::string kPartSeparator = "\n\f\n";

std::string read_raw(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<std::string> split_parts(const std::string& data, std::size_t parts) {
  std::vector<std::string> out;
  std::size_t from = 0;
  while (out.size() + 1 < parts) {
    const std::size_t at = data.find(kPartSeparator, from);
    if (at == std::string::npos) break;
    out.push_back(data.substr(from, at - from));
    from = at + kPartSeparator.size();
  }
  out.push_back(from <= data.size() ? data.substr(from) : "");
  while (out.size() < parts) out.emplace_back();
  return out;
}

// Feeds `data` to the parser a fuzz target exercises, through files in `dir`. Returns true when
// it parsed, false for a clean InvalidInput; any other exception propagates (a failed test).
bool parse_as(const std::string& target, const std::string& data, const TempDir& dir) {
  const std::string path = dir.file("input");
  try {
    if (target == "fuzz_safetensors") {
      write_bytes(path, data);
      io::SafetensorsFile::open(path);
    } else if (target == "fuzz_fingerprint_file") {
      write_bytes(path, data);
      io::read_fingerprint_file(path);
    } else if (target == "fuzz_idx") {
      write_bytes(path, data);
      io::read_idx(path);
    } else if (target == "fuzz_jsonl") {
      write_bytes(path, data);
      io::read_jsonl(path);
    } else if (target == "fuzz_number_sequence") {
      distill::check_number_sequence(data);
      return distill::parse_number_sequence(data).has_value();
    } else if (target == "fuzz_tokenizer_files") {
      const auto parts = split_parts(data, 3);
      write_bytes(dir.file("vocab.json"), parts[0]);
      write_bytes(dir.file("merges.txt"), parts[1]);
      const auto tok = io::Tokenizer::from_files(dir.file("vocab.json"), dir.file("merges.txt"));
      const auto ids = tok.encode(parts[2]);  // outside REQUIRE: InvalidInput must reach us
      REQUIRE(tok.decode(ids) == parts[2]);
    } else if (target == "fuzz_tokenizer_json") {
      const auto parts = split_parts(data, 2);
      write_bytes(path, parts[0]);
      io::Tokenizer::from_tokenizer_json(path).encode(parts[1]);
    } else {
      FAIL("no parser is known for fuzz target " << target);
    }
  } catch (const InvalidInput&) {
    return false;
  }
  return true;
}

// Runs `call`, requiring an InvalidInput whose message matches `matcher` (any other exception
// propagates and fails the test).
template <typename Call, typename Matcher>
void require_invalid(Call&& call, const Matcher& matcher) {
  try {
    call();
  } catch (const InvalidInput& e) {
    REQUIRE_THAT(std::string(e.what()), matcher);
    return;
  }
  FAIL("expected InvalidInput, nothing was thrown");
}

std::vector<fs::path> files_under(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file()) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

const std::vector<std::string> kTargets = {
    "fuzz_safetensors",     "fuzz_fingerprint_file", "fuzz_idx",           "fuzz_jsonl",
    "fuzz_number_sequence", "fuzz_tokenizer_files",  "fuzz_tokenizer_json"};

}  // namespace

TEST_CASE("every input the fuzzers ever crashed on now gives a clean result", "[fuzz]") {
  TempDir dir("fuzz_regressions");
  std::size_t replayed = 0;
  for (const auto& target : kTargets) {
    for (const auto& file : files_under(kFuzzDir / "regressions" / target)) {
      INFO(target << ": " << file.filename().string());
      parse_as(target, read_raw(file), dir);  // throws (fails) on anything but InvalidInput
      ++replayed;
    }
  }
  REQUIRE(replayed >= 1);
}

TEST_CASE("the committed seed corpora parse: valid_* seeds succeed, the others fail cleanly",
          "[fuzz]") {
  TempDir dir("fuzz_corpus");
  for (const auto& target : kTargets) {
    const auto files = files_under(kFuzzDir / "corpus" / target);
    INFO(target);
    REQUIRE(files.size() >= 5);
    for (const auto& file : files) {
      const std::string name = file.filename().string();
      INFO(name);
      const bool parsed = parse_as(target, read_raw(file), dir);
      if (name.rfind("valid_", 0) == 0) REQUIRE(parsed);
      if (target != "fuzz_number_sequence" && name.rfind("valid_", 0) != 0) REQUIRE_FALSE(parsed);
    }
  }
}

TEST_CASE("a digit run beyond int64 saturates instead of overflowing", "[fuzz][number_sequence]") {
  // fuzz/regressions/fuzz_number_sequence/int64_overflow_in_digit_run: 23 nines once overflowed
  // int64 (v * 10 + digit past 2^63, undefined behaviour) on the way to the saturation value.
  const std::string nines(23, '9');
  const auto parsed = distill::parse_number_sequence(nines + ", 1");
  REQUIRE(parsed.has_value());
  REQUIRE(*parsed == std::vector<std::int64_t>{distill::kNumberSaturation, 1});
  // 2^62 exactly and one below: the boundary of saturation.
  REQUIRE(*distill::parse_number_sequence("4611686018427387904") ==
          std::vector<std::int64_t>{std::int64_t{1} << 62});
  REQUIRE(*distill::parse_number_sequence("4611686018427387903") ==
          std::vector<std::int64_t>{(std::int64_t{1} << 62) - 1});
  REQUIRE(*distill::parse_number_sequence("92233720368547758079") ==
          std::vector<std::int64_t>{distill::kNumberSaturation});
  const auto check = distill::check_number_sequence(nines + ", 1");
  REQUIRE(check.rejection);
  REQUIRE(check.rejection->reason == distill::reason::kNumberRange);
}

// ---- fingerprint accumulator files, assembled here ------------------------------------------

namespace {

struct RawTensor {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::string bytes;
};

template <typename T>
RawTensor raw(const std::string& dtype, std::vector<std::int64_t> shape, std::vector<T> values) {
  std::string bytes(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return {dtype, std::move(shape), bytes};
}

// A safetensors file from a header typed with nlohmann::json (not the library's writer).
std::string safetensors(const std::map<std::string, RawTensor>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = metadata;
  std::string data;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", t.dtype},
                    {"shape", t.shape},
                    {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  const std::string text = header.dump();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((text.size() >> (8 * i)) & 0xFF);
  return out + text + data;
}

// A valid accumulator file: V = 4, subset {0, 2}, two sequences of 1 and 2 positions.
struct FingerprintParts {
  std::map<std::string, RawTensor> tensors;
  std::map<std::string, std::string> metadata;

  FingerprintParts() {
    tensors["subset"] = raw<std::int64_t>("I64", {2}, {0, 2});
    for (const char* name : {"sum_delta", "sum_delta_sq", "sum_grad"}) {
      tensors[name] = raw<double>("F64", {4}, {1.0, 2.0, 3.0, 4.0});
    }
    tensors["sum_centered"] = raw<double>("F64", {2}, {0.5, -0.5});
    for (const char* name : {"sum_kl_teacher_reference", "sum_kl_reference_teacher",
                             "sum_mass_shift", "sum_mass_shift_sq"}) {
      tensors[name] = raw<double>("F64", {}, {0.25});
    }
    tensors["positions"] = raw<std::int64_t>("I64", {}, {3});
    tensors["skipped_nonfinite"] = raw<std::int64_t>("I64", {}, {0});
    tensors["next_sequence_id"] = raw<std::int64_t>("I64", {}, {2});
    tensors["sequence_ids"] = raw<std::int64_t>("I64", {2}, {0, 1});
    tensors["sequence_counts"] = raw<std::int64_t>("I64", {2}, {1, 2});
    tensors["sequence_sum_centered"] = raw<double>("F64", {2, 2}, {1.0, 2.0, 3.0, 4.0});
    metadata = {{"format", "biastransfer.fingerprint_accumulator"},
                {"format_version", "1"},
                {"vocab_size", "4"},
                {"temperature", "0.5"},
                {"positions", "3"},
                {"options", R"({"skip_nonfinite":true,"per_sequence":true,"subset_size":2})"},
                {"tokenizer_hash", "abc"}};
  }
  std::string write(const TempDir& dir) const {
    const std::string path = dir.file("fp.safetensors");
    write_bytes(path, safetensors(tensors, metadata));
    return path;
  }
};

}  // namespace

TEST_CASE("a fingerprint accumulator file is read with every value in place",
          "[fuzz][fingerprint]") {
  TempDir dir;
  const auto state = io::read_fingerprint_file(FingerprintParts().write(dir), 4, "abc");
  REQUIRE(state.vocab_size == 4);
  REQUIRE(state.temperature == 0.5);
  REQUIRE(state.skip_nonfinite);
  REQUIRE(state.per_sequence);
  REQUIRE(state.subset == std::vector<std::int64_t>{0, 2});
  REQUIRE(state.sum_grad == std::vector<double>{1.0, 2.0, 3.0, 4.0});
  REQUIRE(state.sum_centered == std::vector<double>{0.5, -0.5});
  REQUIRE(state.sum_mass_shift_sq == 0.25);
  REQUIRE(state.positions == 3);
  REQUIRE(state.next_sequence_id == 2);
  REQUIRE(state.sequence_counts == std::vector<std::int64_t>{1, 2});
  REQUIRE(state.sequence_sum_centered == std::vector<double>{1.0, 2.0, 3.0, 4.0});
  REQUIRE(state.metadata.at("tokenizer_hash") == "abc");
}

TEST_CASE("fingerprint accumulator files with bad values are refused with a message",
          "[fuzz][fingerprint]") {
  TempDir dir;
  const auto refused = [&](const FingerprintParts& parts, const std::string& expected) {
    INFO(expected);
    require_invalid([&] { io::read_fingerprint_file(parts.write(dir)); },
                    Contains(expected) && Contains("fp.safetensors"));
  };
  constexpr auto kMax = std::numeric_limits<std::int64_t>::max();
  FingerprintParts parts;

  SECTION("a huge vocab_size costs nothing: the tensors must hold it") {
    parts.metadata["vocab_size"] = "1000000000000000";
    refused(parts, "tensor 'sum_delta' must have shape [1000000000000000], got [4]");
  }
  SECTION("sequence counts whose sum overflows int64") {
    // Summed naively this was signed overflow (undefined behaviour) before the comparison.
    parts.tensors["sequence_counts"] = raw<std::int64_t>("I64", {2}, {kMax, 2});
    refused(parts, "sequence counts add up to more than 2^63 - 1");
  }
  SECTION("counts that do not add up to positions") {
    parts.tensors["sequence_counts"] = raw<std::int64_t>("I64", {2}, {1, 1});
    refused(parts, "sequence counts add up to 2, but positions is 3");
  }
  SECTION("a repeated sequence id") {
    parts.tensors["sequence_ids"] = raw<std::int64_t>("I64", {2}, {5, 5});
    refused(parts, "sequence id 5 appears more than once");
  }
  SECTION("a non-positive count") {
    parts.tensors["sequence_counts"] = raw<std::int64_t>("I64", {2}, {0, 3});
    refused(parts, "sequence 0 has count 0");
  }
  SECTION("subset ids out of range, repeated or unsorted") {
    parts.tensors["subset"] = raw<std::int64_t>("I64", {2}, {0, 4});
    refused(parts, "subset: token id 4 is out of range for a vocabulary of V=4");
    parts.tensors["subset"] = raw<std::int64_t>("I64", {2}, {2, 2});
    refused(parts, "subset: token id 2 appears more than once");
    parts.tensors["subset"] = raw<std::int64_t>("I64", {2}, {2, 0});
    refused(parts, "tensor 'subset' must be sorted");
  }
  SECTION("metadata that is not a number or not the format") {
    parts.metadata["temperature"] = "nan";
    refused(parts, "temperature: expected a finite value > 0, got nan");
    parts.metadata["temperature"] = "1x";
    refused(parts, "metadata 'temperature' must be a number, got '1x'");
    parts.metadata["temperature"] = "1";
    parts.metadata["vocab_size"] = "0";
    refused(parts, "vocab_size: expected at least 1, got 0");
    parts.metadata["vocab_size"] = "4 apples";
    refused(parts, "metadata 'vocab_size' must be an integer, got '4 apples'");
    parts.metadata["vocab_size"] = "4";
    parts.metadata["options"] = R"({"skip_nonfinite":1,"per_sequence":true})";
    refused(parts, "metadata 'options' is not valid");
    parts.metadata["format_version"] = "2";
    refused(parts, "unsupported fingerprint accumulator format_version '2'");
    parts.metadata["format"] = "other";
    refused(parts, "metadata 'format' is 'other'");
  }
  SECTION("tensors of the wrong dtype, shape or missing") {
    parts.tensors["positions"] = raw<double>("F64", {}, {3.0});
    refused(parts, "tensor 'positions' must have dtype I64, got F64");
    parts.tensors["positions"] = raw<std::int64_t>("I64", {1}, {3});
    refused(parts, "tensor 'positions' must have shape [], got [1]");
    parts.tensors.erase("positions");
    refused(parts, "tensor 'positions' is missing");
  }
  SECTION("another vocabulary") {
    REQUIRE_THROWS_WITH(io::read_fingerprint_file(parts.write(dir), 5),
                        Contains("another vocabulary") && Contains("vocab_size=4, expected 5"));
    REQUIRE_THROWS_WITH(io::read_fingerprint_file(parts.write(dir), {}, std::string("xyz")),
                        Contains("tokenizer_hash=abc, expected xyz"));
  }
}

// ---- findings of the fuzzers, each with the input shape that triggered it --------------------

TEST_CASE("tokenizer.json fields of the wrong JSON type are refused as invalid input",
          "[fuzz][tokenizer]") {
  // nlohmann's value() threw an untyped json::type_error for these (fuzz/regressions/
  // fuzz_tokenizer_json/untyped_error_*); callers and the bindings expect InvalidInput.
  TempDir dir;
  const auto load = [&](const nlohmann::json& doc) {
    write_bytes(dir.file("tokenizer.json"), doc.dump());
    return io::Tokenizer::from_tokenizer_json(dir.file("tokenizer.json"));
  };
  const nlohmann::json valid = {
      {"model",
       {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}}}, {"merges", nlohmann::json::array()}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"added_tokens", {{{"id", 2}, {"content", "<s>"}, {"special", true}}}}};
  REQUIRE(load(valid).vocab_size() == 3);
  const std::vector<std::pair<nlohmann::json::json_pointer, std::string>> cases = {
      {nlohmann::json::json_pointer("/model/type"), "model.type must be a string"},
      {nlohmann::json::json_pointer("/model/byte_fallback"),
       "model.byte_fallback must be true or false"},
      {nlohmann::json::json_pointer("/model/ignore_merges"),
       "model.ignore_merges must be true or false"},
      {nlohmann::json::json_pointer("/pre_tokenizer/use_regex"),
       "pre_tokenizer.use_regex must be true or false"},
      {nlohmann::json::json_pointer("/pre_tokenizer/add_prefix_space"),
       "pre_tokenizer.add_prefix_space must be true or false"},
      {nlohmann::json::json_pointer("/added_tokens/0/special"),
       "added token.special must be true or false"},
      {nlohmann::json::json_pointer("/decoder/type"), "decoder.type must be a string"}};
  for (const auto& [pointer, message] : cases) {
    INFO(pointer.to_string());
    nlohmann::json doc = valid;
    doc[pointer] = pointer.back() == "type" ? nlohmann::json(7) : nlohmann::json("yes");
    require_invalid([&] { load(doc); }, Contains(message));
  }
  nlohmann::json listed = valid;
  listed["decoder"] = {1};  // not an object: value() threw type_error 306
  require_invalid([&] { load(listed); }, Contains("decoder '[1]' is not supported"));
}

TEST_CASE("JSON nested a million levels deep is refused instead of overflowing the stack",
          "[fuzz][jsonl][tokenizer]") {
  // Serializing such a value (the extras of a JSON lines record, a tokenizer.json fragment quoted
  // in an error message) recursed once per level: a 2 MB line overflowed an 8 MB stack.
  TempDir dir;
  const std::size_t depth = 1'000'000;
  const std::string deep = std::string(depth, '[') + std::string(depth, ']');
  write_bytes(dir.file("deep.jsonl"), R"({"prompt":"p","completion":"c","x":)" + deep + "}\n");
  require_invalid([&] { io::read_jsonl(dir.file("deep.jsonl")); },
                  Contains("line 1") && Contains("nests deeper than 256 levels"));
  // The limit itself: 256 levels in all (the record object is one) pass, 257 do not.
  const auto nested = [](std::size_t levels) {
    return R"({"prompt":"p","completion":"c","x":)" + std::string(levels, '[') +
           std::string(levels, ']') + "}\n";
  };
  write_bytes(dir.file("limit.jsonl"), nested(io::kJsonlMaxNesting - 1));
  REQUIRE(io::read_jsonl(dir.file("limit.jsonl")).at(0).extra_json.size() ==
          6 + 2 * (io::kJsonlMaxNesting - 1));
  write_bytes(dir.file("limit.jsonl"), nested(io::kJsonlMaxNesting));
  REQUIRE_THROWS_AS(io::read_jsonl(dir.file("limit.jsonl")), InvalidInput);

  write_bytes(dir.file("tokenizer.json"),
              R"({"model":{"type":"BPE","vocab":{},"merges":[]},"pre_tokenizer":)" + deep + "}");
  require_invalid([&] { io::Tokenizer::from_tokenizer_json(dir.file("tokenizer.json")); },
                  Contains("nests deeper than"));
  write_bytes(dir.file("vocab.json"), R"({"a":)" + deep + "}");
  write_bytes(dir.file("merges.txt"), "");
  require_invalid(
      [&] { io::Tokenizer::from_files(dir.file("vocab.json"), dir.file("merges.txt")); },
      Contains("nests deeper than"));
}

TEST_CASE("a safetensors tensor with an empty name is refused, as the writer refuses it",
          "[fuzz][safetensors]") {
  // fuzz/regressions/fuzz_safetensors/empty_tensor_name_round_trip: the reader accepted a file
  // that write_safetensors could not write back.
  TempDir dir;
  const std::string header = R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  std::string bytes(8, '\0');
  bytes[0] = static_cast<char>(header.size());
  write_bytes(dir.file("empty.safetensors"), bytes + header + "x");
  require_invalid([&] { io::SafetensorsFile::open(dir.file("empty.safetensors")); },
                  Contains("empty.safetensors") && Contains("a tensor has an empty name"));
}

TEST_CASE("JSON numbers beyond double are refused as invalid input by every JSON reader",
          "[fuzz][safetensors][jsonl][tokenizer]") {
  // nlohmann throws out_of_range 406 ("number overflow parsing '1e999'"), not a parse_error: the
  // readers caught only parse errors and let it escape untyped (fuzz/regressions/*/
  // number_beyond_double_*, first found in a fingerprint file's header).
  TempDir dir;
  const std::string header = R"({"a":{"dtype":"U8","shape":[1e999],"data_offsets":[0,1]}})";
  std::string bytes(8, '\0');
  bytes[0] = static_cast<char>(header.size());
  write_bytes(dir.file("big.safetensors"), bytes + header + "x");
  require_invalid([&] { io::SafetensorsFile::open(dir.file("big.safetensors")); },
                  Contains("not valid JSON") && Contains("1e999"));
  require_invalid([&] { io::read_fingerprint_file(dir.file("big.safetensors")); },
                  Contains("not valid JSON"));

  write_bytes(dir.file("big.jsonl"), "{\"prompt\":\"a\",\"completion\":\"b\",\"x\":-1e999}\n");
  require_invalid([&] { io::read_jsonl(dir.file("big.jsonl")); },
                  Contains("line 1: invalid JSON") && Contains("1e999"));
  require_invalid(
      [&] {
        io::write_jsonl(dir.file("out.jsonl"), {{"p", "c", R"({"x":1e999})"}});
      },
      Contains("extra_json is not valid JSON"));

  write_bytes(dir.file("vocab.json"), R"({"a":0,"b":1e999})");
  write_bytes(dir.file("merges.txt"), "");
  require_invalid(
      [&] { io::Tokenizer::from_files(dir.file("vocab.json"), dir.file("merges.txt")); },
      Contains("vocab.json: not valid JSON"));
}
