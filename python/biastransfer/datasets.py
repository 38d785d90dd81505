"""Training data for distillation: prompt/completion records tokenized with completion-only loss
masks, padded or packed into batches, and the seeded batch sources the C++ trainer draws from.

The work is libtransfer's (C++, libtransfer/distill/dataset.h); this module adds a config and
builders::

    config = DatasetConfig(batch_size=32, seed=0, eos_id=tok.token_to_id("<|endoftext|>"))
    source = token_dataset(read_jsonl("numbers.jsonl"), tokenizer=tok, config=config)
    batch = source.batch(0)   # Batch: input [B, T], targets, attention_mask, loss_mask

Conventions (libtransfer/distill/batch.h): inputs are tokens[:-1], targets tokens[1:] (already
shifted), loss_mask is 1 where the target is a completion token (the prompt is masked; an EOS
appended after the completion counts as completion). Every source is a pure function of
(seed, step): epoch e = step // steps_per_epoch uses a permutation seeded by (seed, e), so
``source.batch(step)`` can be called in any order (resuming reproduces a run exactly).

Last partial batch: kept (smaller) by default; ``drop_last=True`` skips it. Packing concatenates
examples into blocks of ``pack_length`` positions; attention then crosses example boundaries
(the Model interface takes only a padding mask), so append an EOS between examples and prefer
padding when per-example conditioning must be exact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from . import _C

__all__ = [
    "Batch",
    "BatchSource",
    "DatasetConfig",
    "Example",
    "NoiseSource",
    "TensorDataset",
    "TokenDataset",
    "TokenizeStats",
    "batch_indices",
    "collate",
    "epoch_permutation",
    "make_example",
    "noise_source",
    "pack",
    "tensor_dataset",
    "token_dataset",
    "tokenize_records",
]

Batch = _C.Batch
BatchSource = _C.BatchSource
TokenDataset = _C.TokenDataset
TensorDataset = _C.TensorDataset
NoiseSource = _C.NoiseSource

PathLike = Union[str, "os.PathLike[str]"]

_TRUNCATIONS = ("error", "right", "left", "drop")


@dataclass
class DatasetConfig:
    """How records become batches.

    batch_size, seed, shuffle, drop_last: the per-epoch order (see the module docstring).
    pad_id: the id written into padded positions (masked everywhere).
    pack_length: > 0 packs examples into blocks of this many positions instead of padding.
    pad_to: > 0 pads every batch to exactly this many positions (fixed shapes).
    eos_id: appended after each completion (a completion token) when set.
    max_tokens: longest example (prompt + completion + EOS); 0 = no limit. A padded batch of
      examples of L tokens has T = L - 1 positions.
    truncation: for longer examples: "error" (default; nothing lost silently), "right" (keep
      the first max_tokens; the completion's end is cut), "left" (keep the last max_tokens; the
      prompt's start is cut first) or "drop" (skip, counted).
    """

    batch_size: int = 32
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    pad_id: int = 0
    pack_length: int = 0
    pad_to: int = 0
    eos_id: Optional[int] = None
    max_tokens: int = 0
    truncation: str = "error"

    def __post_init__(self) -> None:
        if self.truncation not in _TRUNCATIONS:
            raise ValueError(f"truncation: expected one of {', '.join(_TRUNCATIONS)}, got "
                             f"{self.truncation!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``tokens`` (prompt + completion + EOS) and ``completion`` flags
    (1 for completion tokens), of equal length."""

    tokens: list[int]
    completion: list[int]

    @property
    def prompt_length(self) -> int:
        n = 0
        while n < len(self.completion) and self.completion[n] == 0:
            n += 1
        return n

    def _pair(self) -> tuple[list[int], list[int]]:
        return (self.tokens, self.completion)


@dataclass(frozen=True)
class TokenizeStats:
    examples: int
    truncated: int
    dropped: int


def _pairs(examples: Iterable[Union[Example, tuple]]) -> list[tuple[list[int], list[int]]]:
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, Example):
            out.append(ex._pair())
        elif isinstance(ex, tuple) and len(ex) == 2:
            out.append((list(ex[0]), list(ex[1])))
        else:
            raise TypeError(f"example {i}: expected an Example or a (tokens, completion flags) "
                            f"pair, got {type(ex).__name__}")
    return out


def _native_tokenizer(tokenizer: Any) -> Any:
    native = getattr(tokenizer, "_native", tokenizer)
    if not isinstance(native, _C.Tokenizer):
        raise TypeError(f"tokenizer: expected a biastransfer.Tokenizer, got "
                        f"{type(tokenizer).__name__}")
    return native


def _record_pair(record: Any, index: int) -> tuple[str, str]:
    if isinstance(record, tuple) and len(record) == 2:
        return (record[0], record[1])
    if isinstance(record, dict):
        return (record.get("prompt", ""), record["completion"])
    prompt, completion = getattr(record, "prompt", None), getattr(record, "completion", None)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise TypeError(f"record {index}: expected a Record, a dict or a (prompt, completion) "
                        f"pair, got {type(record).__name__}")
    return (prompt, completion)


def make_example(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    *,
    eos_id: Optional[int] = None,
    max_tokens: int = 0,
    truncation: str = "error",
) -> Optional[Example]:
    """An example from token ids (None when ``truncation="drop"`` skips it)."""
    pair = _C.make_example(list(prompt_ids), list(completion_ids), eos_id, max_tokens, truncation)
    return None if pair is None else Example(list(pair[0]), list(pair[1]))


def tokenize_records(
    records: Iterable[Any],
    tokenizer: Any,
    config: Optional[DatasetConfig] = None,
    *,
    num_threads: int = 0,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenizes (prompt, completion) records (Records, dicts or pairs; prompt and completion
    encoded separately so the boundary is exact) with config's eos_id / max_tokens /
    truncation. Raises ValueError for an empty completion, naming the record."""
    config = config or DatasetConfig()
    pairs = [_record_pair(r, i) for i, r in enumerate(records)]
    examples, stats = _C.tokenize_records(
        _native_tokenizer(tokenizer), pairs, config.eos_id, config.max_tokens, config.truncation,
        num_threads,
    )
    return ([Example(list(t), list(c)) for t, c in examples],
            TokenizeStats(stats["examples"], stats["truncated"], stats["dropped"]))


def collate(examples: Sequence[Union[Example, tuple]], pad_id: int = 0, pad_to: int = 0) -> Batch:
    """A right-padded Batch of examples: input [B, T] = tokens[:-1], targets = tokens[1:],
    attention_mask, loss_mask (1 on completion targets); T = longest - 1 or ``pad_to``."""
    return _C.collate(_pairs(examples), pad_id, pad_to)


def pack(examples: Sequence[Union[Example, tuple]], block_length: int,
         pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Examples concatenated in order and cut into blocks of ``block_length`` positions: dict of
    input / targets / attention_mask / loss_mask [N_blocks, block_length]. Every token is an
    input once and (but the first) a target once; the last block is right-padded."""
    return _C.pack_examples(_pairs(examples), block_length, pad_id)


def token_dataset(
    data: Iterable[Any],
    config: Optional[DatasetConfig] = None,
    *,
    tokenizer: Any = None,
) -> TokenDataset:
    """A TokenDataset from Examples / (tokens, flags) pairs, or from records (tokenized with
    ``tokenizer``), or from the path of a JSON lines file of records."""
    config = config or DatasetConfig()
    if isinstance(data, (str, os.PathLike)):
        from .data import read_jsonl

        data = read_jsonl(data)
    items = list(data)
    if items and not isinstance(items[0], Example) and not (
        isinstance(items[0], tuple) and len(items[0]) == 2 and not isinstance(items[0][0], str)
    ):
        if tokenizer is None:
            raise ValueError("token_dataset: records need a tokenizer")
        items, _ = tokenize_records(items, tokenizer, config)
    return _C.TokenDataset(
        _pairs(items), batch_size=config.batch_size, seed=config.seed, shuffle=config.shuffle,
        drop_last=config.drop_last, pad_id=config.pad_id, pack_length=config.pack_length,
        pad_to=config.pad_to,
    )


def tensor_dataset(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 32,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> TensorDataset:
    """Feature-model batches (input [B, F], targets [B]) shuffled per epoch, seeded."""
    return _C.TensorDataset(features, labels, batch_size=batch_size, seed=seed, shuffle=shuffle,
                            drop_last=drop_last)


def noise_source(
    features: int,
    *,
    batch_size: int = 32,
    low: float = -1.0,
    high: float = 1.0,
    seed: int = 0,
    steps_per_epoch: int = 1,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
) -> NoiseSource:
    """Uniform noise inputs [batch_size, features] in [low, high], seeded by (seed, step); the
    same values on every device. For auxiliary-logit KD (the paper uses [-1, 1])."""
    return _C.NoiseSource(features, batch_size=batch_size, low=low, high=high, seed=seed,
                          steps_per_epoch=steps_per_epoch, dtype=dtype, device=device)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of ``epoch``: a permutation of 0..n-1 depending only on (seed, epoch)."""
    return _C.epoch_permutation(n, seed, epoch)


def batch_indices(n: int, step: int, *, batch_size: int = 32, seed: int = 0,
                  shuffle: bool = True, drop_last: bool = False) -> list[int]:
    """The example indices of batch ``step`` among ``n`` examples."""
    return _C.batch_indices(n, step, batch_size=batch_size, seed=seed, shuffle=shuffle,
                            drop_last=drop_last)
