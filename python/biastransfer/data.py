"""Data files: IDX arrays (MNIST, Fashion-MNIST) and JSON lines prompt/completion records.

The parsing and writing are libtransfer's (C++); this module adds paths, dataclasses and the
Fashion-MNIST loader. Errors: ``ValueError`` for malformed files (naming the file, and the line for
JSON lines), ``OSError`` for missing or unreadable files, ``TypeError`` for unsupported dtypes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Union

import torch

from . import _C

__all__ = [
    "FASHION_MNIST_CLASSES",
    "Record",
    "iter_jsonl",
    "load_fashion_mnist",
    "read_idx",
    "read_jsonl",
    "write_idx",
    "write_jsonl",
]

PathLike = Union[str, "os.PathLike[str]"]

# Label i of Fashion-MNIST is FASHION_MNIST_CLASSES[i] (zalandoresearch/fashion-mnist README).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Where Debian's dataset-fashion-mnist package installs the files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
_FASHION_MNIST_IMAGE_SIZE = 28
# The paper's recipe scales pixels from 0..255 to [-1, 1]: x / 127.5 - 1 (exact at 0 and 255).
_PIXEL_HALF_RANGE = 127.5

# torch dtypes an IDX file can hold.
_IDX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64)


def read_idx(path: PathLike) -> torch.Tensor:
    """Reads a plain or gzip-compressed IDX file.

    Returns a CPU tensor with the file's shape (e.g. [N, 28, 28] for MNIST images, [N] for labels)
    and dtype (uint8, int8, int16, int32, float32 or float64). Raises ValueError for a malformed
    file, OSError if it cannot be read.
    """
    return _C.read_idx(os.fsdecode(path))


def write_idx(path: PathLike, tensor: torch.Tensor, gzip: bool | None = None) -> None:
    """Writes `tensor` (1 to 8 dimensions) as an IDX file, atomically.

    gzip: compress; by default when the file name ends with ".gz". Raises TypeError for a dtype
    IDX cannot hold (allowed: uint8, int8, int16, int32, float32, float64), ValueError for a 0-d
    tensor or more than 8 dimensions.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"write_idx: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _IDX_DTYPES:
        allowed = ", ".join(str(d) for d in _IDX_DTYPES)
        raise TypeError(f"write_idx: IDX files hold {allowed} tensors, got {tensor.dtype}")
    name = os.fsdecode(path)
    if gzip is None:
        gzip = name.endswith(".gz")
    _C.write_idx(name, tensor, bool(gzip))


@dataclass
class Record:
    """One prompt/completion pair of a JSON lines data set; `extra` holds every other key."""

    prompt: str
    completion: str
    extra: dict[str, Any] = field(default_factory=dict)


def _record_of(item: tuple[str, str, str]) -> Record:
    prompt, completion, extra_json = item
    return Record(prompt, completion, json.loads(extra_json) if extra_json else {})


def read_jsonl(path: PathLike) -> list[Record]:
    """Reads every record of a JSON lines file (one object per line, with string "prompt" and
    "completion"; blank lines skipped). Raises ValueError naming the line for a bad one."""
    return [_record_of(item) for item in _C.read_jsonl(os.fsdecode(path))]


def iter_jsonl(path: PathLike) -> Iterator[Record]:
    """Yields the records of a JSON lines file one at a time (one line in memory at a time).
    The file is opened now (OSError if missing) and closed when the iterator is exhausted or
    dropped; a bad line raises ValueError, naming it, when iteration reaches it."""
    reader = _C.JsonlReader(os.fsdecode(path))
    return (_record_of(item) for item in reader)


def _utf8_text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where}: {key} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from surrogateescape decoding
        raise ValueError(f"{where}: {key} is not valid UTF-8 text ({e.reason} at {e.start})") from e
    return value


def _fields_of(item: Record | Mapping[str, Any], where: str) -> tuple[str, str, str]:
    if isinstance(item, Record):
        prompt, completion, extra = item.prompt, item.completion, item.extra
    elif isinstance(item, Mapping):
        for key in ("prompt", "completion"):
            if key not in item:
                raise ValueError(f"{where}: missing key {key!r}")
        prompt, completion = item["prompt"], item["completion"]
        extra = {k: v for k, v in item.items() if k not in ("prompt", "completion")}
    else:
        raise TypeError(f"{where}: expected a Record or a mapping, got {type(item).__name__}")
    if not isinstance(extra, Mapping):
        raise TypeError(f"{where}: extra must be a dict, got {type(extra).__name__}")
    try:
        extra_json = (
            json.dumps(dict(extra), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            if extra
            else ""
        )
    except TypeError as e:
        raise TypeError(f"{where}: extra is not JSON-serializable: {e}") from e
    except ValueError as e:  # NaN or infinity, which JSON cannot hold
        raise ValueError(f"{where}: extra is not valid JSON: {e}") from e
    prompt = _utf8_text(prompt, "prompt", where)
    completion = _utf8_text(completion, "completion", where)
    return prompt, completion, extra_json


def write_jsonl(path: PathLike, records: Iterable[Record | Mapping[str, Any]]) -> None:
    """Writes records as JSON lines, atomically: one compact object per line, keys prompt,
    completion, then the extras; non-ASCII text as UTF-8. Records are streamed, so `records` may
    be a generator. Mappings are taken as {"prompt": ..., "completion": ..., **extra}. On any
    error nothing is written (an existing file stays as it was)."""
    name = os.fsdecode(path)
    writer = _C.JsonlWriter(name)
    for index, item in enumerate(records):
        writer.write(*_fields_of(item, f"JSON lines file '{name}' record {index}"))
    writer.commit()


def _fashion_mnist_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {root}; install the Debian package "
        f"{_FASHION_MNIST_PACKAGE} (apt install {_FASHION_MNIST_PACKAGE}) or pass root= a folder "
        f"holding the four IDX files"
    )


def load_fashion_mnist(
    split: str = "train", root: PathLike = FASHION_MNIST_ROOT, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads a Fashion-MNIST split ("train": 60,000 images, "test": 10,000).

    Returns (images, labels): images [N, 28, 28] uint8 in 0..255, or float32 in [-1, 1] when
    normalize (x / 127.5 - 1, the paper's recipe); labels [N] int64 in 0..9, naming
    FASHION_MNIST_CLASSES. Raises ValueError for an unknown split or files of the wrong shape,
    OSError (naming the Debian package dataset-fashion-mnist) when the files are missing.
    """
    if split not in _FASHION_MNIST_SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    folder = Path(os.fsdecode(root))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} not found; install the Debian package "
            f"{_FASHION_MNIST_PACKAGE} (apt install {_FASHION_MNIST_PACKAGE}) or pass root="
        )
    prefix = _FASHION_MNIST_SPLITS[split]
    images_path = _fashion_mnist_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _fashion_mnist_file(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)

    side = _FASHION_MNIST_IMAGE_SIZE
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (side, side):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape [N, {side}, {side}], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != torch.uint8 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} uint8 labels, "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if labels.numel() > 0 and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: labels must be in 0..9, got {int(labels.max())}")
    if normalize:
        images = images.to(torch.float32).div_(_PIXEL_HALF_RANGE).sub_(1.0)
    return images, labels.to(torch.int64)
