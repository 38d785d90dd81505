"""Writes the fuzzers' seed corpora under fuzz/corpus/<target>/ (committed; rerun after a format
change): small valid files of each format and near-valid variants that stop at each check.

Only the standard library: every file is assembled byte by byte here, independently of the
library's writers. Run with any Python 3.8+: ``python fuzz/make_corpus.py``.
"""
from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent / "corpus"
SEPARATOR = "\n\f\n"  # fuzz_support.h kPartSeparator: between the parts of one input

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8,
               "U64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_bytes(tensors: List[Tuple[str, str, List[int], bytes]],
                      metadata: Dict[str, str] | None = None, pad: bool = True) -> bytes:
    """A safetensors file: u64 header length, JSON header, data (tensors in the given order)."""
    header: Dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def raw_safetensors(header: str, data: bytes = b"") -> bytes:
    text = header.encode()
    return struct.pack("<Q", len(text)) + text + data


def corpus_safetensors() -> Dict[str, bytes]:
    f32 = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
    i64 = struct.pack("<q", 7)
    valid = safetensors_bytes([("weight", "F32", [2, 2], f32), ("step", "I64", [], i64)],
                              {"format": "pt"})
    return {
        "valid_two_tensors": valid,
        "valid_empty": safetensors_bytes([]),
        "valid_metadata_only": safetensors_bytes([], {"a": "b"}),
        "valid_zero_size": safetensors_bytes([("e", "BF16", [0, 3], b""), ("b", "BOOL", [1], b"\x01")]),
        "valid_all_dtypes": safetensors_bytes(
            [(f"t_{d}", d, [1], b"\x01" * s) for d, s in DTYPE_SIZES.items()]),
        "truncated": valid[:-3],
        "short_length": b"\x10\x00\x00",
        "length_past_end": struct.pack("<Q", 1000) + b"{}",
        "offsets_overlap": raw_safetensors(
            '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
            '"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', b"abc"),
        "offsets_gap": raw_safetensors(
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab"),
        "shape_overflow": raw_safetensors(
            '{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'),
        "nested_deep": raw_safetensors('{"a":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}}',
                                       b"x"),
        "duplicate_key": raw_safetensors(
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "bad_metadata": raw_safetensors('{"__metadata__":{"k":1}}'),
        "negative_dim": raw_safetensors('{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}'),
        "unknown_dtype": raw_safetensors('{"a":{"dtype":"Q8","shape":[1],"data_offsets":[0,1]}}',
                                         b"x"),
    }


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_bpe(words: List[str]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """A byte-level vocab (all 256 bytes) plus merges that build each word left to right."""
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges: List[Tuple[str, str]] = []
    for word in words:
        symbols = [table[b] for b in word.encode()]
        left = symbols[0]
        for right in symbols[1:]:
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
            left += right
    return vocab, merges


def corpus_tokenizer_files() -> Dict[str, bytes]:
    vocab, merges = tiny_bpe([" the", " owl", "123", " 7", "he"])
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    few = {"a": 0, "b": 1, "ab": 2, "Ġ": 3}
    out = {
        "valid_bytes_and_merges": vocab_text + SEPARATOR + merges_text + SEPARATOR
        + "the owl said 123, 7 times\r\n\u00e9\U0001F989",
        "valid_crlf_merges": vocab_text + SEPARATOR + merges_text.replace("\n", "\r\n")
        + SEPARATOR + " the the",
        "valid_tiny": json.dumps(few) + SEPARATOR + "a b\n" + SEPARATOR + "ab ba",
        "missing_byte": json.dumps(few) + SEPARATOR + "a b\n" + SEPARATOR + "abc",
        "merge_not_in_vocab": json.dumps(few) + SEPARATOR + "a c\n" + SEPARATOR,
        "gap_in_ids": json.dumps({"a": 0, "b": 2}) + SEPARATOR + SEPARATOR,
        "duplicate_ids": json.dumps({"a": 0, "b": 0}) + SEPARATOR + SEPARATOR,
        "bad_merge_line": json.dumps(few) + SEPARATOR + "a b c\n" + SEPARATOR,
        "not_byte_level": json.dumps({"\u4e2d": 0}) + SEPARATOR + SEPARATOR,
        "vocab_not_object": "[1, 2]" + SEPARATOR + SEPARATOR,
    }
    return {name: text.encode() for name, text in out.items()}


def tokenizer_json(vocab: Dict[str, int], merges: List[Tuple[str, str]], **extra) -> dict:
    root = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": [f"{a} {b}" for a, b in merges]},
    }
    root.update(extra)
    return root


def corpus_tokenizer_json() -> Dict[str, bytes]:
    vocab, merges = tiny_bpe([" the", " owl", "123", "he"])
    n = len(vocab)
    added = [{"id": n, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}]
    split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d{1,3}| ?\\p{L}+|\\s+|."},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    pairs = tokenizer_json(vocab, merges)
    pairs["model"]["merges"] = [[a, b] for a, b in merges]
    docs = {
        "valid_gpt2_style": (tokenizer_json(vocab, merges, added_tokens=added),
                             "the owl<|endoftext|> 1234"),
        "valid_split_regex": (tokenizer_json(vocab, merges, pre_tokenizer=split), "owl 12345 x"),
        "valid_prefix_space": (tokenizer_json(vocab, merges, pre_tokenizer={
            "type": "ByteLevel", "add_prefix_space": True, "use_regex": True}), "the"),
        "valid_pair_merges": (pairs, "he he"),
        "unsupported_model": (tokenizer_json(vocab, merges, model={"type": "WordPiece"}), ""),
        "unsupported_normalizer": (tokenizer_json(vocab, merges, normalizer={"type": "NFC"}), ""),
        "bad_added_token": (tokenizer_json(vocab, merges, added_tokens=[{"id": -1}]), ""),
        "missing_pre_tokenizer": (tokenizer_json(vocab, merges, pre_tokenizer=None), ""),
        "bad_regex": (tokenizer_json(vocab, merges, pre_tokenizer={
            "type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated",
                 "invert": False}, {"type": "ByteLevel", "use_regex": False}]}), ""),
    }
    out = {name: (json.dumps(doc, ensure_ascii=False) + SEPARATOR + text).encode()
           for name, (doc, text) in docs.items()}
    out["not_json"] = b'{"model": ' + SEPARATOR.encode()
    return out


def idx_bytes(code: int, shape: List[int], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + payload


def corpus_idx() -> Dict[str, bytes]:
    u8 = idx_bytes(0x08, [2, 3], bytes(range(6)))
    return {
        "valid_u8": u8,
        "valid_u8_gzip": gzip.compress(u8, mtime=0),
        "valid_i8": idx_bytes(0x09, [3], b"\x80\x00\x7f"),
        "valid_i16": idx_bytes(0x0B, [3, 1], struct.pack(">3h", -1, 2, 300)),
        "valid_i32": idx_bytes(0x0C, [1], struct.pack(">i", -123456)),
        "valid_f32": idx_bytes(0x0D, [2], struct.pack(">2f", 1.5, -0.25)),
        "valid_f64": idx_bytes(0x0E, [1, 1, 1], struct.pack(">d", 3.0)),
        "valid_zero_dim": idx_bytes(0x08, [0, 5], b""),
        "truncated": u8[:-1],
        "trailing": u8 + b"\x00",
        "bad_magic": b"\x01" + u8[1:],
        "bad_type": idx_bytes(0x0A, [1], b"\x00"),
        "too_many_dims": bytes([0, 0, 8, 9]) + b"\x00\x00\x00\x01" * 9,
        "huge_header": idx_bytes(0x0E, [65536, 65536, 65536], b""),
        "gzip_truncated": gzip.compress(u8, mtime=0)[:-4],
    }


def corpus_jsonl() -> Dict[str, bytes]:
    lines = [
        '{"prompt": "List numbers: 1, 2, 3", "completion": "4, 5, 6"}',
        '{"prompt": "p", "completion": "(285, 574, 384).", "id": 3, "tags": ["a", {"b": null}]}',
        '',
        '   \t',
        '{"completion": "\\u00e9\\ud83e\\udd89", "prompt": "\u00fcnicode \U0001F989"}',
    ]
    return {
        "valid_records": ("\n".join(lines) + "\n").encode(),
        "valid_crlf_no_final_newline": "\r\n".join(lines).encode(),
        "valid_empty": b"",
        "not_object": b'[1, 2]\n',
        "missing_completion": b'{"prompt": "x"}\n',
        "non_string_prompt": b'{"prompt": 1, "completion": "x"}\n',
        "invalid_json": b'{"prompt": "x", "completion": }\n',
        "invalid_utf8": b'{"prompt": "\xff", "completion": "x"}\n',
        "lone_surrogate": b'{"prompt": "\\ud800", "completion": "x"}\n',
        # Longer than fuzz_jsonl's small line limit (64 bytes), far within the real one.
        "valid_long_line": b'{"prompt": "' + b"x" * 100 + b'", "completion": "y"}\n',
    }


def fingerprint_file(vocab: int = 5, subset: Tuple[int, ...] = (1, 3),
                     counts: Tuple[int, ...] = (2, 1), per_sequence: bool = True,
                     **meta_overrides: str) -> bytes:
    """A fingerprint accumulator file as Accumulator::save writes it (tensors sorted by element
    size then name; all are 8 bytes wide here, so by name)."""
    width, n_seq, positions = len(subset), len(counts), sum(counts)

    def f64(values: List[float]) -> bytes:
        return struct.pack(f"<{len(values)}d", *values)

    def i64(values: List[int]) -> bytes:
        return struct.pack(f"<{len(values)}q", *values)

    tensors = {
        "next_sequence_id": ("I64", [], i64([n_seq])),
        "positions": ("I64", [], i64([positions])),
        "sequence_counts": ("I64", [n_seq], i64(list(counts))),
        "sequence_ids": ("I64", [n_seq], i64(list(range(n_seq)))),
        "sequence_sum_centered": ("F64", [n_seq if per_sequence else 0, width],
                                  f64([0.25 * k for k in range(n_seq * width)]
                                      if per_sequence else [])),
        "skipped_nonfinite": ("I64", [], i64([0])),
        "subset": ("I64", [width], i64(list(subset))),
        "sum_centered": ("F64", [width], f64([0.5] * width)),
        "sum_delta": ("F64", [vocab], f64([0.1 * k for k in range(vocab)])),
        "sum_delta_sq": ("F64", [vocab], f64([0.01 * k for k in range(vocab)])),
        "sum_grad": ("F64", [vocab], f64([0.0] * vocab)),
        "sum_kl_reference_teacher": ("F64", [], f64([0.2])),
        "sum_kl_teacher_reference": ("F64", [], f64([0.3])),
        "sum_mass_shift": ("F64", [], f64([-0.5])),
        "sum_mass_shift_sq": ("F64", [], f64([0.25])),
    }
    options = {"temperature": 1.0, "skip_nonfinite": False, "per_sequence": per_sequence,
               "subset_size": width}
    metadata = {"format": "biastransfer.fingerprint_accumulator", "format_version": "1",
                "options": json.dumps(options, separators=(",", ":")),
                "positions": str(positions), "temperature": "1", "tokenizer_hash": "0123abcd",
                "vocab_size": str(vocab)}
    metadata.update(meta_overrides)
    return safetensors_bytes([(name, *tensors[name]) for name in sorted(tensors)],
                             dict(sorted(metadata.items())))


def corpus_fingerprint_file() -> Dict[str, bytes]:
    return {
        "valid_small": fingerprint_file(),
        "valid_no_per_sequence": fingerprint_file(per_sequence=False),
        "valid_empty_subset": fingerprint_file(subset=(), counts=()),
        "wrong_format": fingerprint_file(format="something else"),
        "wrong_version": fingerprint_file(format_version="2"),
        "vocab_mismatch": fingerprint_file(vocab_size="6"),
        "huge_vocab": fingerprint_file(vocab_size="1000000000000000"),
        "bad_temperature": fingerprint_file(temperature="-1"),
        "bad_options": fingerprint_file(options='{"per_sequence": 1}'),
        "positions_disagree": fingerprint_file(positions="4"),
        "unsorted_subset": fingerprint_file(subset=(3, 1)),
        "subset_out_of_range": fingerprint_file(subset=(1, 5)),
        "zero_count": fingerprint_file(counts=(0, 3)),
        "truncated": fingerprint_file()[:-8],
    }


def corpus_number_sequence() -> Dict[str, bytes]:
    # DESIGN.md section 1: accepted, then rejected, then edge cases of the reference's rules.
    texts = ["(285, 574, 384).", "1\n2\n3", "007, 12", "1 , 2 , 3", "1\t2\t3", "[1;2;3]", "5",
             "1,2, 3", "Here: 1, 2", "1, 2,", " 1, 2", "1, 2\n", "1 2  3", "[ 1, 2 ]",
             "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", "1000, 2", "666, 911, 187", "",
             "99999999999999999999999, 1", "\u0661, 2", "1\u00a02\u00a03", "1\u30002",
             "(1, 2]", "1..", "\uff11, 2", "1;;2"]
    return {f"seed_{i:02d}": t.encode() for i, t in enumerate(texts)}


CORPORA = {
    "fuzz_safetensors": corpus_safetensors,
    "fuzz_tokenizer_files": corpus_tokenizer_files,
    "fuzz_tokenizer_json": corpus_tokenizer_json,
    "fuzz_idx": corpus_idx,
    "fuzz_jsonl": corpus_jsonl,
    "fuzz_fingerprint_file": corpus_fingerprint_file,
    "fuzz_number_sequence": corpus_number_sequence,
}


def main() -> None:
    for target, make in CORPORA.items():
        folder = ROOT / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in make().items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(list(folder.iterdir()))} files")


if __name__ == "__main__":
    main()
