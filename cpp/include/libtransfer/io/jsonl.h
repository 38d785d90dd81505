// JSON lines files of prompt/completion records, the format of distillation data sets: one JSON
// object per line with string keys "prompt" and "completion" and any other keys ("extras").
//
// Reading: blank lines (empty or only spaces, tabs and a CR) are skipped; CRLF line endings and a
// last line without a newline are accepted; strings must be valid UTF-8. Errors name the file and
// the 1-based line number. Writing: one compact object per line, keys prompt, completion, then the
// extras in their order; non-ASCII text is written as UTF-8, not as \u escapes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "libtransfer/io/atomic_file.h"

namespace libtransfer::io {

// Longest line accepted (bytes, without the newline): a corrupt file without newlines raises an
// error instead of filling memory. 64 MiB is far above any real prompt plus completion.
constexpr std::size_t kJsonlMaxLineBytes = std::size_t{64} << 20;

// Deepest nesting of arrays and objects accepted in a line (the record object is level 1): the
// extras are serialized recursively, so a line of a million '[' would overflow the stack.
constexpr int kJsonlMaxNesting = 256;

// Most keys of one JSON object in a line: records have a handful; ordered_json (which keeps the
// extras' order) inserts in linear time, so a forged line of millions of keys would parse in
// quadratic time.
constexpr std::size_t kJsonlMaxMembers = 4096;

// One prompt/completion pair. Every other key of the line's object is kept, serialized, in
// `extra_json`: a compact JSON object ("" when there are none), so JSON stays out of this header.
// Costs the strings it holds.
struct Record {
  std::string prompt;
  std::string completion;
  std::string extra_json;  // "" or a JSON object without "prompt"/"completion" keys, e.g. {"id":3}
};

// Reads a whole JSON lines file. Throws FileError if it cannot be read, InvalidInput naming the
// file and line for invalid JSON or UTF-8, a line that is not an object, a missing or non-string
// prompt/completion, a line longer than kJsonlMaxLineBytes or nesting deeper than kJsonlMaxNesting.
std::vector<Record> read_jsonl(const std::string& path);

// Streams records from a JSON lines file, one line at a time: memory is one line plus a 64 KiB
// buffer, whatever the file size. Usage: JsonlReader r(path); Record rec; while (r.next(rec)) ...
class JsonlReader {
 public:
  // FileError if the file cannot be opened. `max_line_bytes` bounds one line (tests lower it).
  explicit JsonlReader(std::string path, std::size_t max_line_bytes = kJsonlMaxLineBytes);
  ~JsonlReader();
  JsonlReader(const JsonlReader&) = delete;
  JsonlReader& operator=(const JsonlReader&) = delete;

  // Reads the next record into `record`; false at the end of the file. Errors as read_jsonl.
  bool next(Record& record);
  // 1-based number of the line the last record came from (0 before the first).
  std::size_t line_number() const { return line_number_; }
  const std::string& path() const { return path_; }

 private:
  bool read_line(std::string& line);  // false at end of file

  std::string path_;
  std::size_t max_line_bytes_;
  std::FILE* file_ = nullptr;
  std::vector<char> buffer_;
  std::size_t buffer_pos_ = 0;
  std::size_t buffer_end_ = 0;
  bool at_eof_ = false;
  std::size_t line_number_ = 0;
};

// Writes records as JSON lines, atomically: nothing appears at `path` until commit().
// Memory: one line at a time. Throws InvalidInput naming the record (0-based index) for invalid
// UTF-8 or an `extra_json` that is not a JSON object or repeats prompt/completion.
class JsonlWriter {
 public:
  explicit JsonlWriter(std::string path);
  void write(const Record& record);
  void commit();
  std::size_t count() const { return count_; }

 private:
  AtomicFile file_;
  std::size_t count_ = 0;
};

// Writes all `records` to `path` with a JsonlWriter.
void write_jsonl(const std::string& path, const std::vector<Record>& records);

}  // namespace libtransfer::io
