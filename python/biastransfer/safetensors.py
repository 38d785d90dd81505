"""Read and write safetensors files (https://github.com/huggingface/safetensors).

Reading maps the file into memory (private, copy-on-write): tensors whose bytes are aligned to
their element size share the mapping instead of being copied, and writing to them never changes
the file. Writing is atomic: the old file survives any failure. Files are validated strictly on
open; a malformed file raises ``ValueError`` naming the file, the tensor and the problem.

Tensor order is the file's data layout order (by data offset). Our writer lays tensors out by
element size (largest first), then by name, so every tensor it writes can be mapped without a copy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from . import _C

PathLike = Union[str, "os.PathLike[str]"]
Device = Union[str, torch.device]

__all__ = ["TensorInfo", "SafetensorsFile", "load_safetensors", "save_safetensors"]


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: the safetensors dtype name (e.g. ``"BF16"``), the shape and the
    ``[begin, end)`` byte range relative to the start of the data section."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    data_offsets: Tuple[int, int]


def _path(path: PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected str or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def _device(device: Device) -> str:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected str or torch.device, got {type(device).__name__}")
    return str(device)


def load_safetensors(path: PathLike, device: Device = "cpu") -> Dict[str, torch.Tensor]:
    """Reads every tensor of a safetensors file, in data-offset order.

    On CPU, aligned tensors alias the file's private mapping (no copy; the mapping lives as long
    as any of them does); others are copied. Other devices get a copy.

    Raises ValueError (malformed file), OSError (cannot open), TypeError (a dtype torch lacks:
    U16, U32, U64, F8_E4M3, F8_E5M2).
    """
    return _C.safetensors_load(_path(path), _device(device))


def save_safetensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Writes ``{name: tensor}`` and optional string metadata to ``path``, atomically.

    Tensors of any shape (``[]`` and sizes of 0 included) and device are written contiguous, from
    CPU copies where needed. Supported dtypes: bool, uint8, int8, int16, int32, int64, float16,
    bfloat16, float32, float64; others raise TypeError. Names must be unique non-empty strings
    other than ``"__metadata__"`` (ValueError).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a mapping of str to torch.Tensor, got "
                        f"{type(tensors).__name__}")
    meta: Optional[Dict[str, str]] = None
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata: expected a mapping of str to str, got "
                            f"{type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata: expected str keys and values, got "
                                f"{key!r}: {type(value).__name__}")
        meta = dict(metadata)
    _C.safetensors_save(_path(path), dict(tensors), meta)


class SafetensorsFile:
    """An opened safetensors file: the validated header now, tensors on demand.

    Usage::

        with SafetensorsFile("model.safetensors") as f:
            w = f["layer.0.weight"]          # or f.get_tensor(name, device="cuda")
            f.info("layer.0.weight").shape   # without touching the data

    Tensors handed out stay valid after ``close()``: they keep the mapping alive themselves.
    """

    def __init__(self, path: PathLike) -> None:
        self._file: Optional[_C.SafetensorsFile] = _C.SafetensorsFile(_path(path))

    def _opened(self) -> _C.SafetensorsFile:
        if self._file is None:
            raise ValueError("the SafetensorsFile is closed")
        return self._file

    @property
    def path(self) -> str:
        return self._opened().path

    @property
    def metadata(self) -> Dict[str, str]:
        """The header's ``__metadata__`` (empty if absent)."""
        return self._opened().metadata

    def keys(self) -> List[str]:
        """Tensor names, in data-offset order."""
        return self._opened().keys()

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and data offsets of one tensor (ValueError if absent)."""
        dtype, shape, offsets = self._opened().info(name)
        return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), data_offsets=tuple(offsets))

    def get_tensor(self, name: str, device: Device = "cpu") -> torch.Tensor:
        """One tensor (ValueError if absent); zero-copy on CPU when aligned."""
        return self._opened().get_tensor(name, _device(device))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        return self.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._opened()

    def __len__(self) -> int:
        return len(self._opened())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Drops this handle on the mapping; tensors already handed out keep it alive."""
        self._file = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._file is None:
            return "SafetensorsFile(closed)"
        return f"SafetensorsFile({self._file.path!r}, {len(self._file)} tensors)"

    def _mapping_range(self) -> Tuple[int, int]:
        # (first, one past last) address of the mapping; for tests of zero-copy loading.
        return tuple(self._opened()._mapping_range())
