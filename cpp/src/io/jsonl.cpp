#include "libtransfer/io/jsonl.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "libtransfer/errors.h"
#include "libtransfer/io/json_shape.h"

namespace libtransfer::io {
namespace {

// ordered_json keeps the keys in file order, so extras survive a read/write round trip as written.
using Json = nlohmann::ordered_json;

// Bytes read from the file per fread.
constexpr std::size_t kReadBufferBytes = std::size_t{1} << 16;
// How much of a parser's "last read" excerpt goes into an error message.
constexpr std::size_t kMaxDetailBytes = 160;

constexpr const char* kPromptKey = "prompt";
constexpr const char* kCompletionKey = "completion";

// Error text must be valid UTF-8 (Python decodes it), but parser excerpts may hold the very bytes
// that were invalid: escape everything outside printable ASCII, and cut long excerpts.
std::string printable(const std::string& text) {
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (out.size() >= kMaxDetailBytes) {
      out += "...";
      break;
    }
    if (byte >= 0x20 && byte < 0x7F) {
      out.push_back(c);
    } else {
      static const char* digits = "0123456789ABCDEF";
      out += "\\x";
      out.push_back(digits[byte >> 4]);
      out.push_back(digits[byte & 0xF]);
    }
  }
  return out;
}

// nlohmann's messages start with "[json.exception.<kind>.<id>] "; parse errors go on with
// "parse error at line 1, column 7: ", where the line is always 1 (one JSON text per line).
// Keep only the description.
std::string parser_detail(const std::exception& e) {
  std::string what = e.what();
  if (!what.empty() && what.front() == '[') {
    const auto bracket = what.find("] ");
    if (bracket != std::string::npos) what.erase(0, bracket + 2);
  }
  if (what.rfind("parse error", 0) == 0) {
    const auto colon = what.find(": ");
    if (colon != std::string::npos) what.erase(0, colon + 2);
  }
  return printable(what);
}

bool is_blank(const std::string& line) {
  return std::all_of(line.begin(), line.end(),
                     [](char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

std::string string_field(Json& object, const char* key, const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end()) {
    throw InvalidInput(where + ": missing key \"" + key + "\"");
  }
  if (!it->is_string()) {
    throw InvalidInput(where + ": \"" + key + "\" must be a string, got " + it->type_name());
  }
  return it->get<std::string>();
}

// Parses one JSON text, refusing nesting past kJsonlMaxNesting as the parser meets it (values are
// serialized recursively later) and numbers beyond double (nlohmann's out_of_range 406).
// Errors: InvalidInput "<where>: <what> ..." with the parser's byte offset.
Json parse_json(const std::string& text, const std::string& where, const std::string& what) {
  // A linear pre-pass (json_shape.h says why not a parser callback): nesting, and objects large
  // enough to make ordered_json's linear-time inserts quadratic.
  const JsonShape shape = json_shape(text, kJsonlMaxNesting, kJsonlMaxMembers);
  if (shape.exceeded && shape.depth > static_cast<std::size_t>(kJsonlMaxNesting)) {
    throw InvalidInput(where + ": JSON nests deeper than " + std::to_string(kJsonlMaxNesting) +
                       " levels");
  }
  if (shape.exceeded) {
    throw InvalidInput(where + ": a JSON object has more than " + std::to_string(kJsonlMaxMembers) +
                       " keys");
  }
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    throw InvalidInput(where + ": " + what + " at byte " + std::to_string(e.byte) + ": " +
                       parser_detail(e));
  } catch (const Json::out_of_range& e) {
    throw InvalidInput(where + ": " + what + ": " + parser_detail(e));
  }
}

Record parse_record(const std::string& line, const std::string& where) {
  Json json = parse_json(line, where, "invalid JSON");
  if (!json.is_object()) {
    throw InvalidInput(where + ": expected a JSON object, got " + json.type_name());
  }
  Record record;
  record.prompt = string_field(json, kPromptKey, where);
  record.completion = string_field(json, kCompletionKey, where);
  json.erase(kPromptKey);
  json.erase(kCompletionKey);
  if (!json.empty()) record.extra_json = json.dump();
  return record;
}

// Names the first field of `record` that is not valid UTF-8, for an error message.
std::string invalid_utf8_detail(const Record& record) {
  for (const auto* field : {&record.prompt, &record.completion}) {
    try {
      (void)Json(*field).dump();
    } catch (const Json::type_error& e) {
      const char* name = field == &record.prompt ? kPromptKey : kCompletionKey;
      return std::string(name) + " is not valid UTF-8 (" + parser_detail(e) + ")";
    }
  }
  return "a string is not valid UTF-8";
}

std::string record_line(const Record& record, const std::string& where) {
  Json json = Json::object();
  json[kPromptKey] = record.prompt;
  json[kCompletionKey] = record.completion;
  if (!record.extra_json.empty()) {
    Json extra = parse_json(record.extra_json, where, "extra_json is not valid JSON");
    if (!extra.is_object()) {
      throw InvalidInput(where + ": extra_json must be a JSON object, got " + extra.type_name());
    }
    for (auto& [key, value] : extra.items()) {
      if (key == kPromptKey || key == kCompletionKey) {
        throw InvalidInput(where + ": extra_json repeats the key \"" + key + "\"");
      }
      json[key] = value;
    }
  }
  try {
    // Compact, with non-ASCII text as UTF-8; strict: invalid UTF-8 throws type_error 316.
    return json.dump();
  } catch (const Json::type_error&) {
    throw InvalidInput(where + ": " + invalid_utf8_detail(record));
  }
}

}  // namespace

JsonlReader::JsonlReader(std::string path, std::size_t max_line_bytes)
    : path_(std::move(path)), max_line_bytes_(max_line_bytes), buffer_(kReadBufferBytes) {
  file_ = std::fopen(path_.c_str(), "rb");
  if (file_ == nullptr) {
    throw FileError("cannot open '" + path_ + "': " + std::strerror(errno));
  }
}

JsonlReader::~JsonlReader() {
  if (file_ != nullptr) std::fclose(file_);
}

bool JsonlReader::read_line(std::string& line) {
  line.clear();
  bool got_any = false;
  for (;;) {
    if (buffer_pos_ == buffer_end_) {
      if (at_eof_) return got_any;
      buffer_pos_ = 0;
      buffer_end_ = std::fread(buffer_.data(), 1, buffer_.size(), file_);
      if (buffer_end_ == 0) {
        if (std::ferror(file_) != 0) {
          throw FileError("cannot read '" + path_ + "': " + std::strerror(errno));
        }
        at_eof_ = true;
        return got_any;
      }
    }
    got_any = true;
    const char* begin = buffer_.data() + buffer_pos_;
    const char* end = buffer_.data() + buffer_end_;
    const char* newline = static_cast<const char*>(std::memchr(begin, '\n', end - begin));
    const char* stop = newline != nullptr ? newline : end;
    line.append(begin, stop);
    buffer_pos_ = static_cast<std::size_t>(stop - buffer_.data()) + (newline != nullptr ? 1 : 0);
    if (line.size() > max_line_bytes_) {
      throw InvalidInput("JSON lines file '" + path_ + "' line " +
                         std::to_string(line_number_ + 1) + ": longer than " +
                         std::to_string(max_line_bytes_) + " bytes (no newline found)");
    }
    if (newline != nullptr) return true;
  }
}

bool JsonlReader::next(Record& record) {
  std::string line;
  while (read_line(line)) {
    ++line_number_;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (is_blank(line)) continue;
    record =
        parse_record(line, "JSON lines file '" + path_ + "' line " + std::to_string(line_number_));
    return true;
  }
  return false;
}

std::vector<Record> read_jsonl(const std::string& path) {
  JsonlReader reader(path);
  std::vector<Record> records;
  Record record;
  while (reader.next(record)) records.push_back(std::move(record));
  return records;
}

JsonlWriter::JsonlWriter(std::string path) : file_(std::move(path)) {}

void JsonlWriter::write(const Record& record) {
  const std::string line = record_line(
      record, "JSON lines file '" + file_.path() + "' record " + std::to_string(count_));
  file_.write(line);
  file_.write("\n");
  ++count_;
}

void JsonlWriter::commit() { file_.commit(); }

void write_jsonl(const std::string& path, const std::vector<Record>& records) {
  JsonlWriter writer(path);
  for (const Record& record : records) writer.write(record);
  writer.commit();
}

}  // namespace libtransfer::io
