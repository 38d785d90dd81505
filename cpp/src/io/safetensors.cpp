#include "libtransfer/io/safetensors.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>
#include <unordered_set>
#include <utility>

#include <nlohmann/json.hpp>

#include "libtransfer/errors.h"
#include "libtransfer/io/atomic_file.h"

namespace libtransfer::io {
namespace {

// Tensor bytes are used as they lie in the file, which is little-endian by definition.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; a big-endian host would need byte swapping");

// The writer keeps insertion order ("__metadata__" first, then the layout order).
using Json = nlohmann::ordered_json;
// The reader parses into std::map objects: ordered_json's linear-time inserts made a header of n
// tensors cost O(n^2) (minutes for 300,000 names). The header order, needed only to break ties
// between same-offset tensors, is recorded by the parser callback instead.
using HeaderJson = nlohmann::json;

// A parsed header and the order of its top-level keys.
struct ParsedHeader {
  HeaderJson json;
  std::vector<std::string> order;
};

constexpr const char* kMetadataKey = "__metadata__";

// A valid header nests at most object -> entry object -> shape array: containers opened at depth 3
// or more are rejected before they are built (a corrupt header cannot exhaust memory or stack).
constexpr int kMaxHeaderNesting = 3;

// How many tensor names an "unknown tensor" message lists.
constexpr std::size_t kNamesInMessages = 5;

constexpr std::uint64_t kInt64Max =
    static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());

std::string quoted(const std::string& text) { return "'" + text + "'"; }

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

std::string range_text(std::uint64_t begin, std::uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// Offset of the first byte that breaks UTF-8 (overlong forms, surrogates and code points above
// U+10FFFF included), or npos if `text` is valid.
std::size_t first_invalid_utf8(std::string_view text) {
  static constexpr std::uint32_t kMinCodePoint[] = {0, 0, 0x80, 0x800, 0x10000};
  std::size_t i = 0;
  while (i < text.size()) {
    const auto lead = static_cast<unsigned char>(text[i]);
    std::size_t length = 0;
    std::uint32_t code = 0;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xE0) == 0xC0) {
      length = 2;
      code = lead & 0x1F;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3;
      code = lead & 0x0F;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4;
      code = lead & 0x07;
    } else {
      return i;
    }
    if (length > text.size() - i) return i;
    for (std::size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) return i;
      code = (code << 6) | (next & 0x3F);
    }
    if (code < kMinCodePoint[length] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) {
      return i;
    }
    i += length;
  }
  return std::string_view::npos;
}

std::uint64_t read_le64(const std::uint8_t* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

std::string le64_bytes(std::uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return out;
}

// Product of the dimensions, or nullopt-like -1 if it would exceed int64 (zeros ignored for the
// overflow test, so that [0, 2^40, 2^40] is refused like [2^40, 2^40] would be).
std::int64_t checked_numel(const std::vector<std::int64_t>& shape) {
  std::uint64_t product = 1;
  bool has_zero = false;
  for (const std::int64_t dim : shape) {
    if (dim < 0) return -1;
    if (dim == 0) {
      has_zero = true;
      continue;
    }
    const auto d = static_cast<std::uint64_t>(dim);
    if (product > kInt64Max / d) return -1;
    product *= d;
  }
  return has_zero ? 0 : static_cast<std::int64_t>(product);
}

// numel * dtype_size, or nullopt on overflow of either.
std::optional<std::uint64_t> checked_nbytes(const std::vector<std::int64_t>& shape, Dtype dtype) {
  const std::int64_t numel = checked_numel(shape);
  if (numel < 0) return std::nullopt;
  const std::uint64_t size = dtype_size(dtype);
  const auto count = static_cast<std::uint64_t>(numel);
  if (count > std::numeric_limits<std::uint64_t>::max() / size) return std::nullopt;
  return count * size;
}

// Builds the messages of one file's validation: "invalid safetensors file 'f': tensor 't': ...".
class Problems {
 public:
  explicit Problems(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& problem) const {
    throw InvalidInput("invalid safetensors file " + quoted(path_) + ": " + problem);
  }
  [[noreturn]] void fail(const std::string& tensor, const std::string& problem) const {
    fail("tensor " + quoted(tensor) + ": " + problem);
  }

 private:
  std::string path_;
};

// A first, validating pass over the header that builds nothing: it refuses duplicate keys
// (nlohmann would silently keep the last one), nesting deeper than a safetensors header has,
// more than kSafetensorsMaxTensors names and shapes longer than kSafetensorsMaxRank, and records
// the order of the top-level keys. Linear in the header (nlohmann's callback parser is not: it
// rescans the parent object after every entry, O(n^2) in the tensor count).
class HeaderValidator : public nlohmann::json_sax<HeaderJson> {
 public:
  explicit HeaderValidator(const Problems& problems) : problems_(problems) {}

  bool null() override { return element(); }
  bool boolean(bool) override { return element(); }
  bool number_integer(number_integer_t) override { return element(); }
  bool number_unsigned(number_unsigned_t) override { return element(); }
  bool number_float(number_float_t, const string_t&) override { return element(); }
  bool string(string_t&) override { return element(); }
  bool binary(binary_t&) override { return element(); }
  bool start_object(std::size_t) override { return open(/*array=*/false); }
  bool start_array(std::size_t) override { return open(/*array=*/true); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }
  bool key(string_t& key) override {
    Container& object = containers_.back();
    const bool top = containers_.size() == 1;
    if (top && key != kMetadataKey && ++tensors_ > kSafetensorsMaxTensors) {
      problems_.fail("the header lists more than " + std::to_string(kSafetensorsMaxTensors) +
                     " tensors, the most one file may hold");
    }
    if (!object.keys.insert(key).second) {
      if (top) {
        if (key == kMetadataKey) problems_.fail("the header has two \"__metadata__\" entries");
        problems_.fail(key, "the header lists this name twice (duplicate key)");
      }
      const std::string& owner = containers_.front().last_key;
      if (owner == kMetadataKey) {
        problems_.fail("\"__metadata__\" has the key " + io::quoted(key) +
                       " twice (duplicate key)");
      }
      problems_.fail(owner, "its entry has the key " + io::quoted(key) + " twice (duplicate key)");
    }
    object.last_key = key;
    if (top) order_.push_back(key);
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    // Syntax errors, and out_of_range for numbers beyond double ("1e999").
    problems_.fail(std::string("the header is not valid JSON: ") + e.what());
  }

  std::vector<std::string> take_order() { return std::move(order_); }

 private:
  struct Container {
    bool array = false;
    std::size_t elements = 0;              // arrays: elements seen so far
    std::unordered_set<std::string> keys;  // objects: keys seen so far
    std::string last_key;
  };

  std::string tensor_name() const {
    return containers_.empty() ? "" : containers_.front().last_key;
  }

  bool element() {
    if (!containers_.empty() && containers_.back().array &&
        ++containers_.back().elements > kSafetensorsMaxRank) {
      problems_.fail(tensor_name(), "an array has more than " +
                                        std::to_string(kSafetensorsMaxRank) +
                                        " elements (the most dimensions a tensor may have)");
    }
    return true;
  }
  bool open(bool array) {
    if (containers_.size() >= static_cast<std::size_t>(kMaxHeaderNesting)) {
      problems_.fail(tensor_name(), "value nests deeper than a safetensors header allows");
    }
    element();
    containers_.emplace_back();
    containers_.back().array = array;
    return true;
  }
  bool close() {
    containers_.pop_back();
    return true;
  }

  const Problems& problems_;
  std::size_t tensors_ = 0;  // top-level keys other than "__metadata__"
  std::vector<Container> containers_;
  std::vector<std::string> order_;
};

// Validates the header (HeaderValidator) before parsing it into a tree, so that a forged header
// is refused before anything of its size is built.
ParsedHeader parse_header(const Problems& problems, std::string_view text) {
  ParsedHeader out;
  HeaderValidator validator(problems);
  try {
    HeaderJson::sax_parse(text.data(), text.data() + text.size(), &validator);
    out.json = HeaderJson::parse(text.data(), text.data() + text.size());
  } catch (const HeaderJson::exception& e) {
    problems.fail(std::string("the header is not valid JSON: ") + e.what());
  }
  out.order = validator.take_order();
  return out;
}

std::map<std::string, std::string> parse_metadata(const Problems& problems,
                                                  const HeaderJson& value) {
  if (!value.is_object()) {
    problems.fail(std::string("\"__metadata__\" must be an object of string to string, got a ") +
                  value.type_name());
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      problems.fail("\"__metadata__\" must map strings to strings, but key " + quoted(key) +
                    " holds a " + item.type_name());
    }
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

// A JSON number that is a non-negative integer no larger than `max`, else a message-ready failure.
std::uint64_t parse_count(const Problems& problems, const std::string& tensor, const char* field,
                          const HeaderJson& value, std::uint64_t max) {
  if (value.is_number_unsigned()) {
    const auto n = value.get<std::uint64_t>();
    if (n > max) {
      problems.fail(tensor, std::string(field) + " value " + std::to_string(n) + " is too large");
    }
    return n;
  }
  if (value.is_number_integer()) {
    problems.fail(tensor, std::string(field) + " has a negative value " + value.dump());
  }
  problems.fail(tensor, std::string(field) + " must hold non-negative integers, got " +
                            (value.is_number() ? "the non-integer " + value.dump()
                                               : std::string("a ") + value.type_name()));
}

TensorInfo parse_entry(const Problems& problems, const std::string& name, const HeaderJson& entry,
                       std::uint64_t data_size) {
  if (!entry.is_object()) {
    problems.fail(name, std::string("entry must be an object, got a ") + entry.type_name());
  }
  static const char* const kFields[] = {"dtype", "shape", "data_offsets"};
  for (const char* field : kFields) {
    if (!entry.contains(field)) problems.fail(name, std::string("entry lacks \"") + field + "\"");
  }
  for (const auto& [key, value] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      problems.fail(name, "entry has the unexpected key " + quoted(key) +
                              " (expected dtype, shape, data_offsets)");
    }
  }

  TensorInfo info;
  info.name = name;
  const HeaderJson& dtype = entry["dtype"];
  if (!dtype.is_string()) {
    problems.fail(name, std::string("dtype must be a string, got a ") + dtype.type_name());
  }
  const auto parsed = parse_dtype(dtype.get<std::string>());
  if (!parsed) {
    problems.fail(name, "unknown dtype " + quoted(dtype.get<std::string>()) + "; expected one of " +
                            known_dtype_names());
  }
  info.dtype = *parsed;

  const HeaderJson& shape = entry["shape"];
  if (!shape.is_array()) {
    problems.fail(name, std::string("shape must be an array, got a ") + shape.type_name());
  }
  for (const HeaderJson& dim : shape) {
    info.shape.push_back(
        static_cast<std::int64_t>(parse_count(problems, name, "shape", dim, kInt64Max)));
  }

  const HeaderJson& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    problems.fail(name, "data_offsets must be an array [begin, end], got " + offsets.dump());
  }
  const std::uint64_t u64_max = std::numeric_limits<std::uint64_t>::max();
  info.begin = parse_count(problems, name, "data_offsets", offsets[0], u64_max);
  info.end = parse_count(problems, name, "data_offsets", offsets[1], u64_max);
  if (info.begin > info.end) {
    problems.fail(name,
                  "data_offsets " + range_text(info.begin, info.end) + " begin after they end");
  }
  if (info.end > data_size) {
    problems.fail(name, "data_offsets " + range_text(info.begin, info.end) +
                            " run past the data section, which has " + std::to_string(data_size) +
                            " bytes");
  }
  const auto needed = checked_nbytes(info.shape, info.dtype);
  if (!needed) {
    problems.fail(name, "shape " + shape_text(info.shape) + " of " + dtype_name(info.dtype) +
                            " overflows a 64-bit byte count");
  }
  if (*needed != info.nbytes()) {
    problems.fail(name, "data_offsets " + range_text(info.begin, info.end) + " hold " +
                            std::to_string(info.nbytes()) + " bytes, but " +
                            dtype_name(info.dtype) + " " + shape_text(info.shape) + " needs " +
                            std::to_string(*needed));
  }
  return info;
}

// The tensors must tile the data section: sorted by offset, no gap, no overlap, no trailing bytes.
void check_layout(const Problems& problems, const std::vector<TensorInfo>& sorted,
                  std::uint64_t data_size) {
  std::uint64_t expected = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : sorted) {
    const std::string where = "data_offsets " + range_text(t.begin, t.end);
    if (t.begin < expected) {
      problems.fail(t.name, where + " overlap tensor " + quoted(previous->name) + " at " +
                                range_text(previous->begin, previous->end));
    }
    if (t.begin > expected) {
      if (previous == nullptr) {
        problems.fail(t.name, where +
                                  " leave a gap: the data section must start with a tensor "
                                  "at offset 0, but the first tensor starts at " +
                                  std::to_string(t.begin));
      }
      problems.fail(t.name, where + " leave a gap of " + std::to_string(t.begin - expected) +
                                " bytes after tensor " + quoted(previous->name) + " at " +
                                range_text(previous->begin, previous->end));
    }
    expected = t.end;
    previous = &t;
  }
  if (expected != data_size) {
    const std::string trailing =
        std::to_string(data_size - expected) + " trailing bytes after the last tensor";
    if (previous == nullptr) {
      problems.fail("the header lists no tensors, but the data section has " + trailing);
    }
    problems.fail(previous->name, "the data section has " + trailing + " (it ends at " +
                                      std::to_string(expected) + " of " +
                                      std::to_string(data_size) + " bytes)");
  }
}

}  // namespace

std::int64_t TensorInfo::numel() const {
  const std::int64_t n = checked_numel(shape);
  if (n < 0) {
    throw InvalidInput("tensor " + quoted(name) + ": shape " + shape_text(shape) +
                       " is negative or overflows int64");
  }
  return n;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.mapping_ = MappedFile::open_private(path);
  const Problems problems(path);
  const std::uint8_t* bytes = file.mapping_->data();
  const std::uint64_t size = file.mapping_->size();

  if (size < kSafetensorsLengthBytes) {
    problems.fail("the file has " + std::to_string(size) +
                  " bytes, fewer than the 8-byte header length that starts a safetensors file");
  }
  const std::uint64_t header_length = read_le64(bytes);
  if (header_length > kSafetensorsMaxHeaderBytes) {
    problems.fail("header length " + std::to_string(header_length) + " exceeds the limit of " +
                  std::to_string(kSafetensorsMaxHeaderBytes) + " bytes");
  }
  if (header_length > size - kSafetensorsLengthBytes) {
    problems.fail("header length " + std::to_string(header_length) + " exceeds the " +
                  std::to_string(size - kSafetensorsLengthBytes) +
                  " bytes that follow it (truncated file?)");
  }
  const std::string_view header(reinterpret_cast<const char*>(bytes + kSafetensorsLengthBytes),
                                header_length);
  const std::size_t bad = first_invalid_utf8(header);
  if (bad != std::string_view::npos) {
    problems.fail("the header is not valid UTF-8 (byte " + std::to_string(bad) + " of " +
                  std::to_string(header_length) + ")");
  }

  const ParsedHeader parsed = parse_header(problems, header);
  const HeaderJson& json = parsed.json;
  if (!json.is_object()) {
    problems.fail(std::string("the header must be a JSON object, got a ") + json.type_name());
  }
  file.data_start_ = kSafetensorsLengthBytes + header_length;
  const std::uint64_t data_size = size - file.data_start_;
  for (const std::string& key : parsed.order) {
    const HeaderJson& value = json.at(key);
    if (key == kMetadataKey) {
      file.metadata_ = parse_metadata(problems, value);
    } else {
      // write_safetensors refuses empty names, so the reader does too: what it reads, it can
      // write back (a round trip the fuzzer checks).
      if (key.empty()) problems.fail("a tensor has an empty name");
      file.tensors_.push_back(parse_entry(problems, key, value, data_size));
    }
  }
  std::stable_sort(file.tensors_.begin(), file.tensors_.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
                   });
  check_layout(problems, file.tensors_, data_size);
  for (std::size_t i = 0; i < file.tensors_.size(); ++i)
    file.index_.emplace(file.tensors_[i].name, i);
  return file;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const auto found = index_.find(name);
  if (found != index_.end()) return tensors_[found->second];
  std::string available;
  for (std::size_t i = 0; i < tensors_.size() && i < kNamesInMessages; ++i) {
    available += (i > 0 ? ", " : "") + quoted(tensors_[i].name);
  }
  if (tensors_.size() > kNamesInMessages) available += ", ...";
  throw InvalidInput("safetensors file " + quoted(path()) + " has no tensor " + quoted(name) +
                     "; it has " + std::to_string(tensors_.size()) + " tensor(s)" +
                     (tensors_.empty() ? std::string() : ": " + available));
}

const std::uint8_t* SafetensorsFile::data(const TensorInfo& info) const {
  return mutable_data(info);
}

std::uint8_t* SafetensorsFile::mutable_data(const TensorInfo& info) const {
  if (info.end > mapping_->size() - data_start_ || info.begin > info.end) {
    throw InvalidInput("tensor " + quoted(info.name) + ": data_offsets " +
                       range_text(info.begin, info.end) + " lie outside " + quoted(path()));
  }
  // A file without data may be mapped to nullptr; an empty tensor still gets a non-null address.
  if (mapping_->data() == nullptr) return nullptr;
  return mapping_->data() + data_start_ + info.begin;
}

void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const auto fail = [&](const std::string& problem) {
    throw InvalidInput("write_safetensors(" + quoted(path) + "): " + problem);
  };
  std::set<std::string> names;
  for (const TensorView& t : tensors) {
    if (t.name.empty()) fail("a tensor has an empty name");
    if (t.name == kMetadataKey) fail("\"__metadata__\" is reserved and cannot name a tensor");
    if (first_invalid_utf8(t.name) != std::string_view::npos) {
      fail("tensor name " + quoted(t.name) + " is not valid UTF-8");
    }
    if (!names.insert(t.name).second) fail("tensor " + quoted(t.name) + " appears twice");
    const std::string prefix = "tensor " + quoted(t.name) + ": ";
    if (std::any_of(t.shape.begin(), t.shape.end(), [](std::int64_t d) { return d < 0; })) {
      fail(prefix + "shape " + shape_text(t.shape) + " has a negative dimension");
    }
    const auto needed = checked_nbytes(t.shape, t.dtype);
    if (!needed) fail(prefix + "shape " + shape_text(t.shape) + " overflows a 64-bit byte count");
    if (*needed != t.nbytes) {
      fail(prefix + "nbytes is " + std::to_string(t.nbytes) + ", but " + dtype_name(t.dtype) + " " +
           shape_text(t.shape) + " needs " + std::to_string(*needed));
    }
    if (t.nbytes > 0 && t.data == nullptr) fail(prefix + "data is null");
  }
  for (const auto& [key, value] : metadata) {
    if (first_invalid_utf8(key) != std::string_view::npos ||
        first_invalid_utf8(value) != std::string_view::npos) {
      fail("metadata key " + quoted(key) + " or its value is not valid UTF-8");
    }
  }

  // Largest elements first keeps every tensor aligned to its element size (all sizes are powers
  // of two and each tensor's byte count is a multiple of its element size).
  std::vector<const TensorView*> order;
  for (const TensorView& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) {
    const std::size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });

  Json header = Json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::uint64_t offset = 0;
  for (const TensorView* t : order) {
    Json entry = Json::object();
    entry["dtype"] = dtype_name(t->dtype);
    entry["shape"] = t->shape;
    entry["data_offsets"] = {offset, offset + t->nbytes};
    header[t->name] = std::move(entry);
    offset += t->nbytes;
  }
  std::string text = header.dump();
  text.append((kSafetensorsDataAlignment - text.size() % kSafetensorsDataAlignment) %
                  kSafetensorsDataAlignment,
              ' ');

  AtomicFile file(path);
  file.write(le64_bytes(text.size()));
  file.write(text);
  for (const TensorView* t : order) file.write(t->data, t->nbytes);
  file.commit();
}

}  // namespace libtransfer::io
