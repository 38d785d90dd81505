#include "libtransfer/io/tokenizer.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "libtransfer/errors.h"
#include "libtransfer/io/atomic_file.h"
#include "libtransfer/io/json_shape.h"
#include "libtransfer/io/pretokenizer.h"

namespace libtransfer::io {
namespace {

using json = nlohmann::json;

// The cache holds piece -> ids. 16 shards keep lock contention low in encode_batch; a shard
// that reaches its capacity is cleared (simple, and the working set of natural text is small).
constexpr std::size_t kCacheShards = 16;
constexpr std::size_t kCacheShardCapacity = std::size_t{1} << 16;
// Longer pieces (long runs of letters or spaces) are rare and would bloat the cache.
constexpr std::size_t kMaxCachedPieceBytes = 256;
// Deepest nesting of arrays and objects accepted in vocab.json / tokenizer.json (real files nest
// about 5 levels): deeper documents could overflow the stack when an error message serializes them.
constexpr int kMaxJsonNesting = 64;
// encode_batch stays on the calling thread below this many bytes: threads would cost more.
constexpr std::size_t kMinBytesPerThread = std::size_t{1} << 16;

std::string shown(std::string_view s) {
  constexpr std::size_t kMaxShown = 60;  // keep messages readable for long lines
  std::string out = "'";
  out += s.substr(0, kMaxShown);
  if (s.size() > kMaxShown) out += "...";
  return out + "'";
}

std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) |
         static_cast<std::uint32_t>(b);
}

struct Merge {
  std::int32_t rank;
  std::int32_t result;
};

struct CacheShard {
  std::mutex mutex;
  std::unordered_map<std::string, std::vector<std::int32_t>> map;
};

// What a loader hands to build(): all text still in byte-level form, checked for UTF-8.
struct RawTokenizer {
  std::string source;  // file name(s) for messages
  std::vector<std::pair<std::string, std::int64_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<std::size_t> merge_lines;  // line (merges.txt) or array index (tokenizer.json)
  std::string merge_where_prefix;        // "<file> line " / "<file> model.merges["
  std::string merge_where_suffix;        // "" / "]"
  std::vector<AddedToken> added;
  std::string pattern;
  bool add_prefix_space = false;
  bool ignore_merges = false;
};

bool full_match(const Pretokenizer& re, std::string_view text) {
  bool whole = false;
  re.split(text, [&](std::size_t b, std::size_t e) {
    if (b == 0 && e == text.size()) whole = true;
  });
  return whole;
}

// Length of the valid UTF-8 character starting at s[i], or 0 if the bytes there are invalid.
std::size_t utf8_char_length(std::string_view s, std::size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  const std::size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (i + len > s.size()) return 0;
  return find_invalid_utf8(s.substr(i, len)) == std::string_view::npos ? len : 0;
}

}  // namespace

struct Tokenizer::Impl {
  ByteAlphabet alphabet;
  std::vector<std::string> tokens;  // byte-level form by id (added tokens: content)
  std::vector<std::string> bytes;   // raw bytes by id
  std::vector<std::uint32_t> classes;
  std::unordered_map<std::string, std::int32_t> index;  // byte-level form / content -> id
  std::array<std::int32_t, 256> byte_ids{};             // single-byte token per byte, or -1
  std::unordered_map<std::uint64_t, Merge> merges;
  // Raw bytes -> id of the vocab tokens that BPE encodes to themselves (checked at load): most
  // pieces of natural text, answered by this small immutable table without the cache's lock.
  std::unordered_map<std::string, std::int32_t> whole_tokens;
  std::vector<AddedToken> added;
  // Added tokens by first byte, longest first, for the longest-match scan.
  std::array<std::vector<std::int32_t>, 256> added_by_first_byte;
  std::unique_ptr<Pretokenizer> pretokenizer;
  bool add_prefix_space = false;
  bool ignore_merges = false;
  std::string hash;
  mutable std::array<CacheShard, kCacheShards> cache;

  void check_id(std::int32_t id) const {
    if (id < 0 || static_cast<std::size_t>(id) >= tokens.size()) {
      throw InvalidInput("token id " + std::to_string(id) +
                         " is out of range for a vocabulary of " + std::to_string(tokens.size()) +
                         " tokens");
    }
  }

  // Lowest-rank-first merging, all occurrences left to right (GPT-2's bpe()), with a heap over
  // (rank, position) so long pieces cost O(n log n) rather than O(n^2).
  std::vector<std::int32_t> bpe(std::string_view piece) const {
    if (ignore_merges) {
      const auto it = index.find(alphabet.encode(piece));
      if (it != index.end()) return {it->second};
    }
    const std::size_t n = piece.size();
    std::vector<std::int32_t> id(n);
    std::vector<std::int32_t> prev(n);
    std::vector<std::int32_t> next(n);
    for (std::size_t i = 0; i < n; ++i) {
      const auto byte = static_cast<unsigned char>(piece[i]);
      id[i] = byte_ids[byte];
      if (id[i] < 0) {
        char hex[5];
        std::snprintf(hex, sizeof(hex), "0x%02X", byte);
        throw InvalidInput(std::string("cannot encode byte ") + hex +
                           ": the vocabulary has no token for it");
      }
      prev[i] = static_cast<std::int32_t>(i) - 1;
      next[i] = i + 1 < n ? static_cast<std::int32_t>(i + 1) : -1;
    }
    using Entry = std::pair<std::int32_t, std::int32_t>;  // (rank, left position)
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto push = [&](std::int32_t left) {
      if (left < 0 || next[left] < 0) return;
      const auto it = merges.find(pair_key(id[left], id[next[left]]));
      if (it != merges.end()) heap.emplace(it->second.rank, left);
    };
    for (std::size_t i = 0; i + 1 < n; ++i) push(static_cast<std::int32_t>(i));
    while (!heap.empty()) {
      const auto [rank, left] = heap.top();
      heap.pop();
      // Stale entries: the left symbol was absorbed, or its pair changed since the push.
      if (id[left] < 0 || next[left] < 0) continue;
      const auto it = merges.find(pair_key(id[left], id[next[left]]));
      if (it == merges.end() || it->second.rank != rank) continue;
      const std::int32_t right = next[left];
      id[left] = it->second.result;
      id[right] = -1;
      next[left] = next[right];
      if (next[right] >= 0) prev[next[right]] = left;
      push(prev[left]);
      push(left);
    }
    std::vector<std::int32_t> out;
    for (std::int32_t i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
    return out;
  }

  void encode_piece(std::string_view piece, std::vector<std::int32_t>* out) const {
    if (piece.size() > kMaxCachedPieceBytes) {
      const auto ids = bpe(piece);
      out->insert(out->end(), ids.begin(), ids.end());
      return;
    }
    std::string key(piece);
    const auto whole = whole_tokens.find(key);
    if (whole != whole_tokens.end()) {
      out->push_back(whole->second);
      return;
    }
    CacheShard& shard = cache[std::hash<std::string>{}(key) % kCacheShards];
    {
      std::lock_guard<std::mutex> lock(shard.mutex);
      const auto it = shard.map.find(key);
      if (it != shard.map.end()) {
        out->insert(out->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    auto ids = bpe(piece);  // outside the lock: other threads keep going
    out->insert(out->end(), ids.begin(), ids.end());
    std::lock_guard<std::mutex> lock(shard.mutex);
    if (shard.map.size() >= kCacheShardCapacity) shard.map.clear();
    shard.map.emplace(std::move(key), std::move(ids));
  }

  void encode_segment(std::string_view segment, std::vector<std::int32_t>* out) const {
    if (segment.empty()) return;
    std::string prefixed;
    if (add_prefix_space && segment.front() != ' ') {
      prefixed = " " + std::string(segment);
      segment = prefixed;
    }
    pretokenizer->split(segment, [&](std::size_t b, std::size_t e) {
      encode_piece(segment.substr(b, e - b), out);
    });
  }

  std::vector<std::int32_t> encode(std::string_view text) const {
    check_utf8(text, "Tokenizer.encode: text");
    std::vector<std::int32_t> out;
    out.reserve(text.size() / 3);
    if (added.empty()) {
      encode_segment(text, &out);
      return out;
    }
    std::size_t start = 0;
    std::size_t pos = 0;
    while (pos < text.size()) {
      bool matched = false;
      for (const std::int32_t a : added_by_first_byte[static_cast<unsigned char>(text[pos])]) {
        const std::string& content = added[a].content;
        if (text.compare(pos, content.size(), content) == 0) {
          encode_segment(text.substr(start, pos - start), &out);
          out.push_back(added[a].id);
          pos += content.size();
          start = pos;
          matched = true;
          break;
        }
      }
      if (!matched) ++pos;
    }
    encode_segment(text.substr(start), &out);
    return out;
  }
};

namespace {

// Ids must be distinct and dense; returns N. `names[i]` goes with `ids[i]`.
std::size_t check_dense_ids(const std::string& source, const std::vector<std::string>& names,
                            const std::vector<std::int64_t>& ids) {
  std::vector<std::size_t> order(ids.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](auto a, auto b) { return ids[a] < ids[b]; });
  for (std::size_t k = 0; k < order.size(); ++k) {
    const std::int64_t id = ids[order[k]];
    if (k > 0 && id == ids[order[k - 1]]) {
      throw InvalidInput(source + ": duplicate id " + std::to_string(id) + " for tokens " +
                         shown(names[order[k - 1]]) + " and " + shown(names[order[k]]));
    }
    if (id != static_cast<std::int64_t>(k)) {
      throw InvalidInput(source + ": token ids must be dense 0.." + std::to_string(ids.size() - 1) +
                         ", but id " + std::to_string(k) + " is missing (next id is " +
                         std::to_string(id) + " for " + shown(names[order[k]]) + ")");
    }
  }
  return ids.size();
}

std::uint64_t fnv1a(std::uint64_t h, std::string_view s) {
  constexpr std::uint64_t kPrime = 0x100000001b3ULL;  // FNV-1a 64 parameters
  for (const char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= kPrime;
  }
  h ^= 0xFF;  // field separator: a byte that never occurs in UTF-8
  return h * kPrime;
}

std::uint32_t classify(const std::string& b, const Pretokenizer& alphabetic,
                       const Pretokenizer& whitespace, const Pretokenizer& punctuation) {
  std::uint32_t c = 0;
  if (b.empty()) return c;
  if (b[0] == ' ') c |= static_cast<std::uint32_t>(TokenClass::kSpacePrefixed);
  const std::size_t d0 = b[0] == ' ' ? 1 : 0;
  if (b.size() > d0 &&
      std::all_of(b.begin() + d0, b.end(), [](char x) { return x >= '0' && x <= '9'; })) {
    c |= static_cast<std::uint32_t>(TokenClass::kNumeric);
  }
  if (find_invalid_utf8(b) != std::string::npos) {
    return c | static_cast<std::uint32_t>(TokenClass::kPartialUtf8);
  }
  if (full_match(alphabetic, b)) c |= static_cast<std::uint32_t>(TokenClass::kAlphabetic);
  if (full_match(whitespace, b)) c |= static_cast<std::uint32_t>(TokenClass::kWhitespace);
  if (full_match(punctuation, b)) c |= static_cast<std::uint32_t>(TokenClass::kPunctuation);
  return c;
}

std::shared_ptr<Tokenizer::Impl> build(RawTokenizer raw) {
  auto impl = std::make_shared<Tokenizer::Impl>();
  const ByteAlphabet& alphabet = impl->alphabet;

  // Ids: the vocab plus added tokens not already in it.
  std::unordered_map<std::string, std::int64_t> vocab_ids;
  for (const auto& [token, id] : raw.vocab) vocab_ids.emplace(token, id);
  std::vector<std::string> names;
  std::vector<std::int64_t> ids;
  for (const auto& [token, id] : raw.vocab) {
    names.push_back(token);
    ids.push_back(id);
  }
  std::unordered_set<std::int32_t> added_ids;
  for (const AddedToken& a : raw.added) {
    const auto it = vocab_ids.find(a.content);
    if (it != vocab_ids.end() && it->second != a.id) {
      throw InvalidInput(raw.source + ": added token " + shown(a.content) + " has id " +
                         std::to_string(a.id) + " but the vocab gives it id " +
                         std::to_string(it->second));
    }
    if (!added_ids.insert(a.id).second) {
      throw InvalidInput(raw.source + ": two added tokens have id " + std::to_string(a.id));
    }
    if (it == vocab_ids.end()) {
      names.push_back(a.content);
      ids.push_back(a.id);
    }
  }
  const std::size_t n = check_dense_ids(raw.source, names, ids);

  impl->tokens.resize(n);
  impl->bytes.resize(n);
  impl->classes.assign(n, 0);
  for (std::size_t i = 0; i < names.size(); ++i) impl->tokens[ids[i]] = names[i];
  for (const AddedToken& a : raw.added) {
    impl->bytes[a.id] = a.content;
    impl->classes[a.id] |= static_cast<std::uint32_t>(TokenClass::kAdded);
    if (a.special) impl->classes[a.id] |= static_cast<std::uint32_t>(TokenClass::kSpecial);
  }
  for (std::size_t id = 0; id < n; ++id) {
    impl->index.emplace(impl->tokens[id], static_cast<std::int32_t>(id));
    if (added_ids.count(static_cast<std::int32_t>(id))) continue;
    if (!alphabet.decode(impl->tokens[id], &impl->bytes[id])) {
      throw InvalidInput(raw.source + ": vocab token " + shown(impl->tokens[id]) + " (id " +
                         std::to_string(id) +
                         ") has a character outside GPT-2's byte-level alphabet");
    }
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = impl->index.find(alphabet.symbol(static_cast<std::uint8_t>(b)));
    impl->byte_ids[b] = it == impl->index.end() ? -1 : it->second;
  }

  // Merges: (left id, right id) -> (rank, result id); a repeated pair keeps its last rank.
  std::vector<bool> produced(n, false);
  for (std::size_t r = 0; r < raw.merges.size(); ++r) {
    const auto& [a, b] = raw.merges[r];
    const std::string where =
        raw.merge_where_prefix + std::to_string(raw.merge_lines[r]) + raw.merge_where_suffix;
    auto find = [&](const std::string& symbol, const char* what) {
      const auto it = impl->index.find(symbol);
      if (it == impl->index.end()) {
        throw InvalidInput(where + ": " + what + " " + shown(symbol) + " is not in the vocab");
      }
      return it->second;
    };
    const std::int32_t left = find(a, "symbol");
    const std::int32_t right = find(b, "symbol");
    const std::int32_t result = find(a + b, "result");
    impl->merges[pair_key(left, right)] = Merge{static_cast<std::int32_t>(r), result};
    produced[result] = true;
  }
  for (int b = 0; b < 256; ++b) {
    if (impl->byte_ids[b] >= 0) produced[impl->byte_ids[b]] = true;
  }

  for (std::size_t id = 0; id < n; ++id) {
    const std::string& b = impl->bytes[id];
    if (added_ids.count(static_cast<std::int32_t>(id)) || b.empty()) continue;
    bool encodable = true;
    for (const char c : b)
      encodable = encodable && impl->byte_ids[static_cast<unsigned char>(c)] >= 0;
    if (encodable && impl->bpe(b) == std::vector<std::int32_t>{static_cast<std::int32_t>(id)}) {
      impl->whole_tokens.emplace(b, static_cast<std::int32_t>(id));
    }
  }

  impl->added = raw.added;
  for (std::size_t i = 0; i < impl->added.size(); ++i) {
    if (impl->added[i].content.empty()) {
      throw InvalidInput(raw.source + ": added token with id " + std::to_string(impl->added[i].id) +
                         " has empty content");
    }
    impl->added_by_first_byte[static_cast<unsigned char>(impl->added[i].content[0])].push_back(
        static_cast<std::int32_t>(i));
  }
  for (auto& list : impl->added_by_first_byte) {
    std::stable_sort(list.begin(), list.end(), [&](std::int32_t x, std::int32_t y) {
      return impl->added[x].content.size() > impl->added[y].content.size();
    });
  }

  impl->pretokenizer = std::make_unique<Pretokenizer>(raw.pattern);
  impl->add_prefix_space = raw.add_prefix_space;
  impl->ignore_merges = raw.ignore_merges;

  // Classes, from the raw bytes.
  const std::string ws =
      "[\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}"
      "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}]";
  const Pretokenizer alphabetic("\\A ?\\p{L}+\\z");
  const Pretokenizer whitespace("\\A" + ws + "+\\z");
  const Pretokenizer punctuation("\\A ?[\\p{P}\\p{S}]+\\z");
  for (std::size_t id = 0; id < n; ++id) {
    impl->classes[id] |= classify(impl->bytes[id], alphabetic, whitespace, punctuation);
    // A vocab entry BPE never produces (GPT-2's <|endoftext|>) is out-of-band: special.
    if (!produced[id] && !added_ids.count(static_cast<std::int32_t>(id))) {
      impl->classes[id] |= static_cast<std::uint32_t>(TokenClass::kSpecial);
    }
  }

  // Hash: everything that decides encode() and decode().
  std::uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a 64 offset basis
  h = fnv1a(h, "libtransfer-bpe-v1");
  for (std::size_t id = 0; id < n; ++id) h = fnv1a(h, impl->tokens[id]);
  std::vector<std::pair<std::int32_t, std::uint64_t>> by_rank;
  for (const auto& [key, merge] : impl->merges) by_rank.emplace_back(merge.rank, key);
  std::sort(by_rank.begin(), by_rank.end());
  for (const auto& [rank, key] : by_rank) h = fnv1a(h, std::to_string(key));
  for (const AddedToken& a : impl->added) {
    h = fnv1a(h, std::to_string(a.id) + (a.special ? "s" : "n") + a.content);
  }
  h = fnv1a(h, raw.pattern);
  h = fnv1a(h, std::string(raw.add_prefix_space ? "p1" : "p0") + (raw.ignore_merges ? "i1" : "i0"));
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(h));
  impl->hash = hex;
  return impl;
}

json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  check_utf8(text, path);
  // Error messages serialize parts of the document recursively: refuse deep nesting first, in a
  // linear pre-pass (json_shape.h says why not a parser callback).
  const JsonShape shape =
      json_shape(text, kMaxJsonNesting, std::numeric_limits<std::size_t>::max());
  if (shape.exceeded) {
    throw InvalidInput(path + ": JSON nests deeper than " + std::to_string(kMaxJsonNesting) +
                       " levels (a tokenizer file nests about 5)");
  }
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    // parse_error, and out_of_range for numbers beyond double ("1e999").
    throw InvalidInput(path + ": not valid JSON: " + e.what());
  }
}

std::vector<std::pair<std::string, std::int64_t>> parse_vocab(const json& vocab,
                                                              const std::string& where) {
  if (!vocab.is_object()) {
    throw InvalidInput(where + ": the vocab must be a JSON object of token -> id, got " +
                       std::string(vocab.type_name()));
  }
  std::vector<std::pair<std::string, std::int64_t>> out;
  out.reserve(vocab.size());
  for (const auto& [token, id] : vocab.items()) {
    const bool ok = id.is_number_integer() && id.get<std::int64_t>() >= 0 &&
                    id.get<std::int64_t>() <= std::numeric_limits<std::int32_t>::max();
    if (!ok) {
      throw InvalidInput(where + ": vocab entry " + shown(token) +
                         " must map to a non-negative integer id, got " + id.dump());
    }
    out.emplace_back(token, id.get<std::int64_t>());
  }
  return out;
}

// "a b" -> {a, b}; false unless exactly two symbols separated by spaces or tabs.
bool split_merge(std::string_view line, std::pair<std::string, std::string>* out) {
  std::vector<std::string_view> parts;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
    const std::size_t start = i;
    while (i < line.size() && line[i] != ' ' && line[i] != '\t') ++i;
    if (i > start) parts.push_back(line.substr(start, i - start));
  }
  if (parts.size() != 2) return false;
  *out = {std::string(parts[0]), std::string(parts[1])};
  return true;
}

// object[key] as a bool or a string: `fallback` when absent or null, InvalidInput naming
// `where`.key when it holds another type (nlohmann's value() would throw an untyped type_error).
bool bool_field(const json& object, const char* key, bool fallback, const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    throw InvalidInput(where + "." + key + " must be true or false, got " + shown(it->dump()));
  }
  return it->get<bool>();
}
std::string string_field(const json& object, const char* key, const std::string& fallback,
                         const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_string()) {
    throw InvalidInput(where + "." + key + " must be a string, got " + shown(it->dump()));
  }
  return it->get<std::string>();
}

// HF tokenizer.json pre_tokenizer -> (pattern, add_prefix_space).
void parse_pre_tokenizer(const json& pre, const std::string& path, RawTokenizer* raw) {
  const std::string supported =
      "supported: ByteLevel, or Sequence[ByteLevel] or Sequence[Split(Regex, Isolated), "
      "ByteLevel(use_regex=false)]";
  auto type_of = [](const json& j) {
    return j.is_object() && j.contains("type") && j["type"].is_string()
               ? j["type"].get<std::string>()
               : std::string("(none)");
  };
  auto byte_level = [&](const json& j, bool regex_expected) {
    const bool use_regex = bool_field(j, "use_regex", true, path + ": pre_tokenizer");
    if (use_regex != regex_expected) {
      throw InvalidInput(path + ": pre_tokenizer ByteLevel with use_regex=" +
                         (use_regex ? "true" : "false") + " is not supported here; " + supported);
    }
    raw->add_prefix_space = bool_field(j, "add_prefix_space", false, path + ": pre_tokenizer");
  };
  if (type_of(pre) == "ByteLevel") {
    byte_level(pre, true);
    raw->pattern = gpt2_split_pattern();
    return;
  }
  if (type_of(pre) == "Sequence" && pre.contains("pretokenizers") &&
      pre["pretokenizers"].is_array()) {
    const json& list = pre["pretokenizers"];
    if (list.size() == 1 && type_of(list[0]) == "ByteLevel") {
      byte_level(list[0], true);
      raw->pattern = gpt2_split_pattern();
      return;
    }
    if (list.size() == 2 && type_of(list[0]) == "Split" && type_of(list[1]) == "ByteLevel") {
      const json& split = list[0];
      const bool regex = split.contains("pattern") && split["pattern"].is_object() &&
                         split["pattern"].contains("Regex") &&
                         split["pattern"]["Regex"].is_string();
      const std::string where = path + ": pre_tokenizer Split";
      if (!regex || string_field(split, "behavior", "", where) != "Isolated" ||
          bool_field(split, "invert", false, where)) {
        throw InvalidInput(path +
                           ": pre_tokenizer Split must have a Regex pattern, behavior "
                           "Isolated and invert false; " +
                           supported);
      }
      byte_level(list[1], false);
      if (raw->add_prefix_space) {
        throw InvalidInput(path + ": ByteLevel add_prefix_space after a Split is not supported");
      }
      raw->pattern = split["pattern"]["Regex"].get<std::string>();
      return;
    }
  }
  throw InvalidInput(path + ": unsupported pre_tokenizer " + shown(pre.dump()) + "; " + supported);
}

}  // namespace

Tokenizer Tokenizer::from_files(const std::string& vocab_json_path,
                                const std::string& merges_txt_path) {
  RawTokenizer raw;
  raw.source = vocab_json_path;
  raw.merge_where_prefix = merges_txt_path + " line ";
  raw.vocab = parse_vocab(parse_json_file(vocab_json_path), vocab_json_path);
  const std::string text = read_file(merges_txt_path);
  check_utf8(text, merges_txt_path);
  std::size_t line_no = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    std::pair<std::string, std::string> merge;
    if (!split_merge(line, &merge)) {
      throw InvalidInput(merges_txt_path + " line " + std::to_string(line_no) +
                         ": expected two symbols separated by a space, got " + shown(line));
    }
    raw.merges.push_back(std::move(merge));
    raw.merge_lines.push_back(line_no);
  }
  raw.pattern = gpt2_split_pattern();
  return Tokenizer(build(std::move(raw)));
}

Tokenizer Tokenizer::from_tokenizer_json(const std::string& path) {
  const json root = parse_json_file(path);
  if (!root.is_object() || !root.contains("model") || !root["model"].is_object()) {
    throw InvalidInput(path + ": expected a tokenizer.json object with a \"model\" object");
  }
  const json& model = root["model"];
  const std::string type = string_field(model, "type", "BPE", path + ": model");
  if (type != "BPE") {
    throw InvalidInput(path + ": model type " + shown(type) +
                       " is not supported; supported model types: BPE (byte-level)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix", "dropout"}) {
    if (model.contains(key) && !model[key].is_null() &&
        !(model[key].is_string() && model[key].get<std::string>().empty())) {
      throw InvalidInput(path + ": model." + key + " = " + model[key].dump() +
                         " is not supported (byte-level BPE expects null)");
    }
  }
  if (bool_field(model, "byte_fallback", false, path + ": model")) {
    throw InvalidInput(path + ": model.byte_fallback = true is not supported");
  }
  if (root.contains("normalizer") && !root["normalizer"].is_null()) {
    throw InvalidInput(path + ": normalizer " + shown(root["normalizer"].dump()) +
                       " is not supported; only null");
  }
  if (root.contains("decoder") && !root["decoder"].is_null() &&
      (!root["decoder"].is_object() ||
       string_field(root["decoder"], "type", "", path + ": decoder") != "ByteLevel")) {
    throw InvalidInput(path + ": decoder " + shown(root["decoder"].dump()) +
                       " is not supported; only ByteLevel");
  }

  RawTokenizer raw;
  raw.source = path;
  raw.merge_where_prefix = path + " model.merges[";
  raw.merge_where_suffix = "]";
  if (!model.contains("vocab")) throw InvalidInput(path + ": model.vocab is missing");
  raw.vocab = parse_vocab(model["vocab"], path + " model.vocab");
  if (!model.contains("merges") || !model["merges"].is_array()) {
    throw InvalidInput(path + ": model.merges must be an array");
  }
  const json& merges = model["merges"];
  for (std::size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    std::pair<std::string, std::string> merge;
    bool ok = false;
    if (m.is_string()) {
      const auto s = m.get<std::string>();
      const auto space = s.find(' ');
      ok = space != std::string::npos && space > 0 && space + 1 < s.size() &&
           s.find(' ', space + 1) == std::string::npos;
      if (ok) merge = {s.substr(0, space), s.substr(space + 1)};
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merge = {m[0].get<std::string>(), m[1].get<std::string>()};
      ok = !merge.first.empty() && !merge.second.empty();
    }
    if (!ok) {
      throw InvalidInput(path + " model.merges[" + std::to_string(i) +
                         "]: expected \"a b\" or [\"a\", \"b\"], got " + shown(m.dump()));
    }
    raw.merges.push_back(std::move(merge));
    raw.merge_lines.push_back(i);
  }
  raw.ignore_merges = bool_field(model, "ignore_merges", false, path + ": model");

  if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
    const json& list = root["added_tokens"];
    if (!list.is_array()) throw InvalidInput(path + ": added_tokens must be an array");
    for (const json& t : list) {
      const bool ok = t.is_object() && t.contains("id") && t["id"].is_number_integer() &&
                      t["id"].get<std::int64_t>() >= 0 &&
                      t["id"].get<std::int64_t>() <= std::numeric_limits<std::int32_t>::max() &&
                      t.contains("content") && t["content"].is_string();
      if (!ok) {
        throw InvalidInput(path + ": added token " + shown(t.dump()) +
                           " needs a non-negative integer \"id\" and a string \"content\"");
      }
      raw.added.push_back(AddedToken{static_cast<std::int32_t>(t["id"].get<std::int64_t>()),
                                     t["content"].get<std::string>(),
                                     bool_field(t, "special", false, path + ": added token")});
    }
  }

  if (!root.contains("pre_tokenizer") || root["pre_tokenizer"].is_null()) {
    throw InvalidInput(path + ": pre_tokenizer is missing; a ByteLevel pre-tokenizer is required");
  }
  parse_pre_tokenizer(root["pre_tokenizer"], path, &raw);
  return Tokenizer(build(std::move(raw)));
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text) const {
  return impl_->encode(text);
}

std::vector<std::vector<std::int32_t>> Tokenizer::encode_batch(
    const std::vector<std::string>& texts, int num_threads) const {
  std::vector<std::vector<std::int32_t>> out(texts.size());
  std::size_t total = 0;
  for (const auto& t : texts) total += t.size();
  std::size_t threads = num_threads > 0 ? static_cast<std::size_t>(num_threads)
                                        : std::max(1u, std::thread::hardware_concurrency());
  threads = std::min({threads, texts.size(), std::max<std::size_t>(1, total / kMinBytesPerThread)});
  if (threads <= 1) {
    for (std::size_t i = 0; i < texts.size(); ++i) out[i] = impl_->encode(texts[i]);
    return out;
  }
  std::vector<std::exception_ptr> errors(threads);
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      try {
        // Interleaved items balance long and short texts across threads.
        for (std::size_t i = t; i < texts.size(); i += threads) out[i] = impl_->encode(texts[i]);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<std::int32_t>& ids) const {
  std::string out;
  for (const std::int32_t id : ids) {
    impl_->check_id(id);
    out += impl_->bytes[id];
  }
  return out;
}

std::int32_t Tokenizer::vocab_size() const {
  return static_cast<std::int32_t>(impl_->tokens.size());
}

std::optional<std::int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const auto it = impl_->index.find(std::string(token));
  if (it == impl_->index.end()) return std::nullopt;
  return it->second;
}

const std::string& Tokenizer::id_to_token(std::int32_t id) const {
  impl_->check_id(id);
  return impl_->tokens[id];
}

const std::string& Tokenizer::token_bytes(std::int32_t id) const {
  impl_->check_id(id);
  return impl_->bytes[id];
}

std::string Tokenizer::display_token(std::int32_t id) const {
  const std::string& b = token_bytes(id);
  std::string out;
  std::size_t i = 0;
  while (i < b.size()) {
    const auto c = static_cast<unsigned char>(b[i]);
    const std::size_t len = utf8_char_length(b, i);
    if (c == ' ') {
      out += "\xE2\x90\xA3";  // U+2423 OPEN BOX
    } else if (c == '\\') {
      out += "\\\\";
    } else if (len == 0 || c < 0x20 || c == 0x7F) {
      char hex[5];
      std::snprintf(hex, sizeof(hex), "\\x%02X", c);
      out += hex;
    } else {
      out.append(b, i, len);
      i += len;
      continue;
    }
    ++i;
  }
  return out;
}

std::uint32_t Tokenizer::token_classes(std::int32_t id) const {
  impl_->check_id(id);
  return impl_->classes[id];
}

std::vector<std::int32_t> Tokenizer::ids_with_class(TokenClass required,
                                                    TokenClass excluded) const {
  const auto req = static_cast<std::uint32_t>(required);
  const auto exc = static_cast<std::uint32_t>(excluded);
  std::vector<std::int32_t> out;
  for (std::size_t id = 0; id < impl_->classes.size(); ++id) {
    const std::uint32_t c = impl_->classes[id];
    if ((c & req) == req && (c & exc) == 0) out.push_back(static_cast<std::int32_t>(id));
  }
  return out;
}

std::vector<std::int32_t> Tokenizer::numeric_token_ids(std::optional<bool> leading_space) const {
  if (!leading_space) return ids_with_class(TokenClass::kNumeric);
  return *leading_space ? ids_with_class(TokenClass::kNumeric | TokenClass::kSpacePrefixed)
                        : ids_with_class(TokenClass::kNumeric, TokenClass::kSpacePrefixed);
}

std::vector<std::int32_t> Tokenizer::encode_number(std::string_view number,
                                                   bool leading_space) const {
  if (number.empty() ||
      !std::all_of(number.begin(), number.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    throw InvalidInput("Tokenizer.encode_number: expected 1+ ASCII digits, got " + shown(number));
  }
  return encode(leading_space ? " " + std::string(number) : std::string(number));
}

NumberSummary Tokenizer::number_summary() const {
  NumberSummary s;
  std::size_t longest = NumberSummary::kMaxDigits;
  for (const std::int32_t id : numeric_token_ids(std::nullopt)) {
    const std::string& b = impl_->bytes[id];
    longest = std::max(longest, b.size() - (b[0] == ' ' ? 1 : 0));
  }
  s.units_without_space.assign(longest + 1, 0);
  s.units_with_space.assign(longest + 1, 0);
  for (const std::int32_t id : numeric_token_ids(std::nullopt)) {
    const std::string& b = impl_->bytes[id];
    if (b[0] == ' ') {
      ++s.units_with_space[b.size() - 1];
    } else {
      ++s.units_without_space[b.size()];
    }
  }
  constexpr int kNumbers = 1000;  // "0".."999"
  constexpr int kPadded = 100;    // "000".."099"
  for (int v = 0; v < kNumbers; ++v) {
    const std::string digits = std::to_string(v);
    s.single_token_0_999_without_space += encode_number(digits, false).size() == 1;
    s.single_token_0_999_with_space += encode_number(digits, true).size() == 1;
  }
  for (int v = 0; v < kPadded; ++v) {
    const std::string digits = (v < 10 ? "00" : "0") + std::to_string(v);
    s.single_token_000_099_without_space += encode_number(digits, false).size() == 1;
    s.single_token_000_099_with_space += encode_number(digits, true).size() == 1;
  }
  return s;
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

std::string Tokenizer::hash() const { return impl_->hash; }

}  // namespace libtransfer::io
