// Tests of the JSON lines records reader and writer against hand-written file contents.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/io/jsonl.h"

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using libtransfer::FileError;
using libtransfer::InvalidInput;
using libtransfer::io::JsonlReader;
using libtransfer::io::JsonlWriter;
using libtransfer::io::kJsonlMaxLineBytes;
using libtransfer::io::read_jsonl;
using libtransfer::io::Record;
using libtransfer::io::write_jsonl;
using libtransfer::testing::TempDir;
using libtransfer::testing::write_bytes;

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

bool same(const Record& a, const Record& b) {
  return a.prompt == b.prompt && a.completion == b.completion && a.extra_json == b.extra_json;
}

template <class F>
std::string invalid_input_message(F&& f) {
  try {
    f();
  } catch (const InvalidInput& e) {
    return e.what();
  }
  FAIL("expected libtransfer::InvalidInput");
  return {};
}

// U+1F989 OWL and U+00E9 as UTF-8 bytes.
const std::string kOwl = "\xF0\x9F\xA6\x89";
const std::string kEAcute = "\xC3\xA9";

}  // namespace

TEST_CASE("JSONL records round-trip, including unicode, newlines, quotes and extras", "[jsonl]") {
  TempDir dir("test_jsonl");
  const std::string path = dir.file("r.jsonl");
  const std::vector<Record> records = {
      {"Say only numbers: 123, 456", "789, 12, 345", ""},
      {"caf" + kEAcute + " " + kOwl, "owls " + kOwl + kOwl, R"({"animal":"owl","seed":7})"},
      {"line 1\nline 2\r\nline 3", "tab\there \"quoted\" back\\slash", ""},
      {"", "", R"({"nested":{"a":[1,2.5,null,true]},"z":"last","a":"first"})"},
      {std::string("nul\0byte and \x01 control", 23), "\xE2\x80\xA8 U+2028", ""},
  };
  write_jsonl(path, records);
  const std::vector<Record> back = read_jsonl(path);
  REQUIRE(back.size() == records.size());
  for (std::size_t i = 0; i < records.size(); ++i) {
    CAPTURE(i);
    CHECK(same(back[i], records[i]));
  }

  // The format itself: one compact object per line, keys prompt, completion, extras in order;
  // UTF-8 written as is; newlines inside strings escaped so each record stays on one line.
  const std::string text = read_text(path);
  CHECK(std::count(text.begin(), text.end(), '\n') == 5);
  CHECK_THAT(text, Contains("{\"prompt\":\"Say only numbers: 123, 456\","
                            "\"completion\":\"789, 12, 345\"}\n"));
  CHECK_THAT(text, Contains("\"completion\":\"owls " + kOwl + kOwl +
                            "\",\"animal\":\"owl\",\"seed\":7}\n"));
  CHECK_THAT(text, Contains(R"("prompt":"line 1\nline 2\r\nline 3")"));
  CHECK_THAT(text, Contains(R"("nested":{"a":[1,2.5,null,true]},"z":"last","a":"first"})"));
  CHECK_THAT(text, Contains(R"(nul\u0000byte and \u0001 control)"));
  CHECK(text.find("\\ud83e") == std::string::npos);  // no \u escapes of the emoji
}

TEST_CASE("JSONL reading accepts CRLF, blank lines and a last line without newline", "[jsonl]") {
  TempDir dir("test_jsonl");
  const std::string path = dir.file("r.jsonl");
  write_bytes(path,
              "\n"
              "{\"prompt\": \"a\", \"completion\": \"b\"}\r\n"
              "   \t\r\n"
              "\r\n"
              "  {\"id\": 1, \"completion\": \"d\",  \"prompt\": \"c\", \"w\": 0.5}  \n"
              "\n"
              "{\"prompt\":\"" +
                  kOwl + "\",\"completion\":\"\\u00e9\\ud83e\\udd89\"}");
  JsonlReader reader(path);
  Record r;
  REQUIRE(reader.next(r));
  CHECK(same(r, {"a", "b", ""}));
  CHECK(reader.line_number() == 2);
  REQUIRE(reader.next(r));
  CHECK(same(r, {"c", "d", R"({"id":1,"w":0.5})"}));
  CHECK(reader.line_number() == 5);
  REQUIRE(reader.next(r));
  CHECK(same(r, {kOwl, kEAcute + kOwl, ""}));  // \u escapes decode to UTF-8
  CHECK(reader.line_number() == 7);
  CHECK_FALSE(reader.next(r));
  CHECK_FALSE(reader.next(r));

  SECTION("an empty file holds no records") {
    write_bytes(path, "");
    CHECK(read_jsonl(path).empty());
  }
  SECTION("a file of blank lines holds no records") {
    write_bytes(path, "\n\r\n  \n");
    CHECK(read_jsonl(path).empty());
  }
}

TEST_CASE("JSONL reading streams lines longer than its read buffer", "[jsonl]") {
  TempDir dir("test_jsonl");
  const std::string path = dir.file("long.jsonl");
  const std::string big(300000, 'x');  // several 64 KiB buffers
  write_bytes(path, "{\"prompt\":\"" + big +
                        "\",\"completion\":\"y\"}\n{\"prompt\":\"p\",\"completion\":\"" + big +
                        "\"}");
  const auto records = read_jsonl(path);
  REQUIRE(records.size() == 2);
  CHECK(records[0].prompt == big);
  CHECK(records[1].completion == big);
}

TEST_CASE("JSONL lines that are not valid records raise InvalidInput with the line", "[jsonl]") {
  TempDir dir("test_jsonl");
  const std::string path = dir.file("bad.jsonl");
  const std::string good = "{\"prompt\":\"a\",\"completion\":\"b\"}\n";
  struct Case {
    const char* name;
    std::string line;
    const char* problem;
  };
  const std::vector<Case> cases = {
      {"invalid JSON", "{\"prompt\": \"a\", \"completion\": }", "invalid JSON"},
      {"unterminated string", "{\"prompt\": \"a", "invalid JSON"},
      {"two values on a line", good.substr(0, good.size() - 1) + " {}", "invalid JSON"},
      {"an array", "[\"a\", \"b\"]", "expected a JSON object, got array"},
      {"a string", "\"prompt\"", "expected a JSON object, got string"},
      {"missing prompt", "{\"completion\": \"b\"}", "missing key \"prompt\""},
      {"missing completion", "{\"prompt\": \"a\"}", "missing key \"completion\""},
      {"a number prompt", "{\"prompt\": 1, \"completion\": \"b\"}",
       "\"prompt\" must be a string, got number"},
      {"a null completion", "{\"prompt\": \"a\", \"completion\": null}",
       "\"completion\" must be a string, got null"},
      {"invalid UTF-8", "{\"prompt\": \"a\xFF\", \"completion\": \"b\"}", "UTF-8"},
      {"a truncated UTF-8 sequence", "{\"prompt\": \"\xF0\x9F\xA6\", \"completion\": \"b\"}",
       "UTF-8"},
      {"a lone surrogate escape", "{\"prompt\": \"\\ud83e\", \"completion\": \"b\"}", "surrogate"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    // The bad line is line 4: after a record, a blank line and another record.
    write_bytes(path, good + "\n" + good + c.line + "\n" + good);
    const std::string message = invalid_input_message([&] { read_jsonl(path); });
    CHECK_THAT(message, Contains(path) && Contains("line 4:") && Contains(c.problem));
    // Messages are printable ASCII even when the line holds invalid bytes (Python decodes them).
    CHECK(std::all_of(message.begin(), message.end(),
                      [](char ch) { return ch >= 0x20 && ch < 0x7F; }));
  }
}

TEST_CASE("JSONL lines over the length bound raise InvalidInput instead of filling memory",
          "[jsonl]") {
  TempDir dir("test_jsonl");
  const std::string path = dir.file("long.jsonl");
  SECTION("a small bound") {
    write_bytes(path, "{\"prompt\":\"a\",\"completion\":\"b\"}\n" + std::string(1000, ' ') + "\n");
    JsonlReader reader(path, 100);
    Record r;
    CHECK(reader.next(r));
    CHECK_THAT(invalid_input_message([&] { reader.next(r); }),
               Contains("line 2: longer than 100 bytes"));
  }
  SECTION("the default bound, on a file without newlines") {
    write_bytes(path, std::string(kJsonlMaxLineBytes + 1, 'a'));
    CHECK_THAT(invalid_input_message([&] { read_jsonl(path); }),
               Contains(path) && Contains("line 1: longer than 67108864 bytes"));
  }
  SECTION("a line of exactly the bound is accepted") {
    const std::string frame = "{\"prompt\":\"\",\"completion\":\"b\"}";
    write_bytes(path, "{\"prompt\":\"" + std::string(100 - frame.size(), 'x') +
                          "\",\"completion\":\"b\"}\r\n");
    JsonlReader reader(path, 101);  // 100 bytes plus the CR
    Record r;
    CHECK(reader.next(r));
    CHECK(r.prompt.size() == 100 - frame.size());
  }
}

TEST_CASE("JSONL reading a missing file raises FileError", "[jsonl]") {
  TempDir dir("test_jsonl");
  CHECK_THROWS_AS(read_jsonl(dir.file("missing.jsonl")), FileError);
  CHECK_THROWS_AS(read_jsonl(dir.path.string()), FileError);  // a folder
}

TEST_CASE("JSONL writing rejects invalid records, names them and leaves no file", "[jsonl]") {
  TempDir dir("test_jsonl");
  const std::string path = dir.file("out.jsonl");
  std::vector<Record> records = {{"a", "b", ""}, {"c", "d", ""}};
  std::string problem;
  SECTION("invalid UTF-8 in the prompt") {
    records[1].prompt = "ok \xFF";
    problem = "prompt is not valid UTF-8";
  }
  SECTION("invalid UTF-8 in the completion") {
    records[1].completion = "\xC3";
    problem = "completion is not valid UTF-8";
  }
  SECTION("extras that are not JSON") {
    records[1].extra_json = "{id: 1}";
    problem = "extra_json is not valid JSON";
  }
  SECTION("extras that are not an object") {
    records[1].extra_json = "[1]";
    problem = "extra_json must be a JSON object, got array";
  }
  SECTION("extras that repeat the prompt") {
    records[1].extra_json = R"({"prompt":"x"})";
    problem = "repeats the key \"prompt\"";
  }
  const std::string message = invalid_input_message([&] { write_jsonl(path, records); });
  CHECK_THAT(message, Contains(path) && Contains("record 1:") && Contains(problem));
  CHECK(
      std::all_of(message.begin(), message.end(), [](char ch) { return ch >= 0x20 && ch < 0x7F; }));
  CHECK_FALSE(fs::exists(path));
  CHECK(fs::is_empty(dir.path));
}

TEST_CASE("JSONL writing with a JsonlWriter appears only at commit", "[jsonl]") {
  TempDir dir("test_jsonl");
  const std::string path = dir.file("out.jsonl");
  write_bytes(path, "old\n");
  {
    JsonlWriter writer(path);
    writer.write({"p", "c", ""});
    CHECK(writer.count() == 1);
    CHECK(read_text(path) == "old\n");
    writer.commit();
  }
  CHECK(read_text(path) == "{\"prompt\":\"p\",\"completion\":\"c\"}\n");
  {
    JsonlWriter abandoned(path);
    abandoned.write({"q", "d", ""});
  }  // no commit: the old file stays
  CHECK(read_text(path) == "{\"prompt\":\"p\",\"completion\":\"c\"}\n");
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
}

TEST_CASE("JSONL writing an empty list gives an empty file", "[jsonl]") {
  TempDir dir("test_jsonl");
  write_jsonl(dir.file("e.jsonl"), {});
  CHECK(read_text(dir.file("e.jsonl")).empty());
  CHECK(read_jsonl(dir.file("e.jsonl")).empty());
}
