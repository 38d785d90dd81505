// Python bindings of io::Tokenizer as biastransfer._C.Tokenizer (pybind11 only, no torch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "libtransfer/io/tokenizer.h"

namespace py = pybind11;

namespace libtransfer::bindings {
namespace {

using io::Tokenizer;

py::dict number_summary_dict(const io::NumberSummary& s) {
  py::dict without_space;
  py::dict with_space;
  for (std::size_t d = 1; d < s.units_without_space.size(); ++d) {
    without_space[py::int_(d)] = s.units_without_space[d];
    with_space[py::int_(d)] = s.units_with_space[d];
  }
  py::dict out;
  out["units_without_space"] = without_space;
  out["units_with_space"] = with_space;
  out["single_token_0_999"] =
      py::dict(py::arg("without_space") = s.single_token_0_999_without_space,
               py::arg("with_space") = s.single_token_0_999_with_space);
  out["single_token_000_099"] =
      py::dict(py::arg("without_space") = s.single_token_000_099_without_space,
               py::arg("with_space") = s.single_token_000_099_with_space);
  return out;
}

}  // namespace

void bind_tokenizer(py::module_& m) {
  // Bits of Tokenizer.token_classes(id); python/biastransfer/tokenizer.py builds an IntFlag.
  py::dict bits;
  bits["NUMERIC"] = static_cast<std::uint32_t>(io::TokenClass::kNumeric);
  bits["ALPHABETIC"] = static_cast<std::uint32_t>(io::TokenClass::kAlphabetic);
  bits["SPACE_PREFIXED"] = static_cast<std::uint32_t>(io::TokenClass::kSpacePrefixed);
  bits["WHITESPACE"] = static_cast<std::uint32_t>(io::TokenClass::kWhitespace);
  bits["PUNCTUATION"] = static_cast<std::uint32_t>(io::TokenClass::kPunctuation);
  bits["SPECIAL"] = static_cast<std::uint32_t>(io::TokenClass::kSpecial);
  bits["ADDED"] = static_cast<std::uint32_t>(io::TokenClass::kAdded);
  bits["PARTIAL_UTF8"] = static_cast<std::uint32_t>(io::TokenClass::kPartialUtf8);
  m.attr("token_class_bits") = bits;

  py::class_<Tokenizer>(m, "Tokenizer",
                        "Byte-level BPE tokenizer (GPT-2 family). Thread-safe; see tokenizer.h.")
      .def_static("from_files", &Tokenizer::from_files, py::arg("vocab_json"),
                  py::arg("merges_txt"),
                  "Loads vocab.json (encoder.json) and merges.txt (vocab.bpe).")
      .def_static("from_tokenizer_json", &Tokenizer::from_tokenizer_json, py::arg("path"),
                  "Loads a Hugging Face tokenizer.json (byte-level BPE).")
      .def("encode", &Tokenizer::encode, py::arg("text"), "Ids of `text`: list[int].")
      .def(
          "encode_batch",
          [](const Tokenizer& t, const std::vector<std::string>& texts, int num_threads) {
            py::gil_scoped_release release;
            return t.encode_batch(texts, num_threads);
          },
          py::arg("texts"), py::arg("num_threads") = 0,
          "Ids of each text: list[list[int]]; releases the GIL, runs on several threads.")
      .def(
          "decode",
          [](const Tokenizer& t, const std::vector<std::int32_t>& ids) {
            const std::string b = t.decode(ids);
            PyObject* s =
                PyUnicode_DecodeUTF8(b.data(), static_cast<Py_ssize_t>(b.size()), "replace");
            if (s == nullptr) throw py::error_already_set();
            return py::reinterpret_steal<py::str>(s);
          },
          py::arg("ids"), "Text of the ids; bytes that are not valid UTF-8 become U+FFFD.")
      .def(
          "decode_bytes",
          [](const Tokenizer& t, const std::vector<std::int32_t>& ids) {
            return py::bytes(t.decode(ids));
          },
          py::arg("ids"), "Raw bytes of the ids (may cut a UTF-8 character).")
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size, "Number of ids.")
      .def("token_to_id", &Tokenizer::token_to_id, py::arg("token"),
           "Id of a byte-level token ('Ġthe') or added token, or None.")
      .def("id_to_token", &Tokenizer::id_to_token, py::arg("id"),
           "Byte-level form of a token ('Ġthe').")
      .def(
          "token_bytes",
          [](const Tokenizer& t, std::int32_t id) { return py::bytes(t.token_bytes(id)); },
          py::arg("id"), "Raw bytes of a token (b' the').")
      .def("display_token", &Tokenizer::display_token, py::arg("id"),
           "Readable form: '␣the', control and partial UTF-8 bytes as '\\xNN'.")
      .def("token_classes", &Tokenizer::token_classes, py::arg("id"),
           "TokenClass bits of a token (int).")
      .def(
          "ids_with_class",
          [](const Tokenizer& t, std::uint32_t required, std::uint32_t excluded) {
            return t.ids_with_class(static_cast<io::TokenClass>(required),
                                    static_cast<io::TokenClass>(excluded));
          },
          py::arg("required"), py::arg("excluded") = 0,
          "Ids having every bit of `required` and none of `excluded` (int masks of TokenClass).")
      .def("numeric_token_ids", &Tokenizer::numeric_token_ids,
           py::arg("leading_space") = py::none(),
           "Ids of pure-digit tokens: with a leading space (True), without (False), or both.")
      .def("encode_number", &Tokenizer::encode_number, py::arg("number"),
           py::arg("leading_space") = false, "Ids of a digit string, optionally after a space.")
      .def(
          "number_summary",
          [](const Tokenizer& t) { return number_summary_dict(t.number_summary()); },
          "Numeric units per digit length and how many of 0..999 / 000..099 are one token.")
      .def("hash", &Tokenizer::hash, "Stable content hash (FNV-1a 64, 16 hex digits).");
}

}  // namespace libtransfer::bindings
