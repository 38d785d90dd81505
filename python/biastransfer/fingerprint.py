"""Tokenizer-level logit fingerprints: how a teacher's next-token distribution departs from a
reference's, per vocabulary token, on teacher-forced prompt/completion records.

:func:`fingerprint` scores the completion tokens of every record under the teacher, the reference
and any control teachers, streams the logits batch by batch into ``_C.FingerprintAccumulator``
(float64 sums in C++, memory O(V) whatever the data size) and returns a
:class:`FingerprintResult`: the finalized fingerprints, readable summaries and plots, and the tests
of ``_C`` (sign-flip global test, per-token tests with Benjamini-Hochberg, comparisons). The math
is in docs/fingerprints.md; every statistic is computed in C++, this module only feeds and reads.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _C
from .data import Record, _fields_of, read_jsonl
from .models import LogitsFn, ModelSpec, Scored, as_logits_fn, as_scored, model_device, model_name
from .tokenizer import TokenClass, Tokenizer

__all__ = [
    "EntangledToken",
    "Fingerprint",
    "FingerprintConfig",
    "FingerprintResult",
    "fingerprint",
    "resolve_subset",
]

PathLike = Union[str, "os.PathLike[str]"]
SubsetSpec = Union[str, TokenClass, Sequence[int], torch.Tensor, None]
Data = Union[PathLike, Iterable[Union[Record, Mapping[str, Any]]]]

# Permutations of the global test that summary() runs: p-values resolve to 1/1000, and even
# 10^4 sequences x 10^3 subset tokens take a fraction of a second per 100 permutations in C++.
SUMMARY_PERMUTATIONS = 999
# Benjamini-Hochberg false discovery rate of summary()'s entangled tokens (DESIGN.md section 3).
DEFAULT_FDR = 0.05
# Token id used to right-pad a batch; padded positions are masked out (any valid id would do).
PAD_ID = 0
# Metadata keys this module writes next to the accumulator's own (see FingerprintResult.save).
_META_TOKENIZER_HASH = "tokenizer_hash"
_META_ROLE = "role"  # "teacher" or "control"
_META_CONTROL_FILES = "control_files"  # JSON list of file names, beside the teacher's file
_META_NAMES = "names"  # JSON: {"teacher": ..., "reference": ..., "controls": [...]}
_META_CONFIG = "config"  # JSON of FingerprintConfig
_META_PREFIXES = "prefixes"  # JSON: {"teacher": ..., "reference": ..., "controls": [...]}
_FIELDS = ("mean_log_ratio", "grad", "centered")
# Keys the accumulator's own save() writes (reserved there) and the per-file keys above: dropped
# from a loaded result's metadata so that saving it again writes them afresh.
_NOT_CARRIED = frozenset({"format", "format_version", "vocab_size", "temperature", "positions",
                          "options", _META_ROLE, _META_CONTROL_FILES, "control_index"})


# ---- configuration and subsets --------------------------------------------------------------


@dataclass
class FingerprintConfig:
    """How a fingerprint was taken; saved with it (JSON) and shown by summary()."""

    subset: str = "numeric"  # "numeric", "all", "class:<flags>" or "ids[<count>]"
    temperature: float = 1.0
    batch_size: int = 8
    max_length: Optional[int] = None
    seed: int = 0
    skip_nonfinite: bool = False
    records: int = 0


def resolve_subset(
    subset: SubsetSpec, tokenizer: Optional[Tokenizer], vocab_size: int
) -> Tuple[Optional[torch.Tensor], str]:
    """The subset S as sorted unique int64 ids [S] (None: the whole vocabulary) and a label.

    ``subset``: "numeric" (tokens that are 1+ ASCII digits, with or without a leading space),
    "all", a :class:`TokenClass` flag (ids having every bit), or explicit ids (a sequence or a
    1-D integer tensor). Raises ValueError for an unknown name, an empty subset or ids outside
    0..vocab_size-1, TypeError for any other kind of value.
    """
    if isinstance(subset, str):
        if subset == "all":
            return None, "all"
        if subset == "numeric":
            if tokenizer is None:
                raise ValueError("subset: 'numeric' needs a tokenizer")
            ids, label = tokenizer.numeric_token_ids(), "numeric"
        else:
            raise ValueError(
                f"subset: expected 'numeric', 'all', a TokenClass or ids, got {subset!r}")
    elif subset is None:
        return None, "all"
    elif isinstance(subset, TokenClass):
        if tokenizer is None:
            raise ValueError("subset: a TokenClass needs a tokenizer")
        ids, label = tokenizer.ids_with_class(int(subset)), f"class:{subset!s}"
    elif isinstance(subset, torch.Tensor):
        if subset.dim() != 1 or subset.dtype.is_floating_point or subset.dtype == torch.bool:
            raise TypeError(f"subset: expected a 1-D integer tensor, got {subset.dtype} "
                            f"{list(subset.shape)}")
        ids, label = subset.tolist(), f"ids[{subset.numel()}]"
    elif isinstance(subset, Sequence) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in subset
    ):
        ids, label = list(subset), f"ids[{len(subset)}]"
    else:
        raise TypeError(f"subset: expected 'numeric', 'all', a TokenClass or a sequence of int "
                        f"ids, got {type(subset).__name__}")
    if not ids:
        raise ValueError(f"subset: {label} selects no token")
    tensor = torch.unique(torch.as_tensor(ids, dtype=torch.int64))  # sorted
    if int(tensor[0]) < 0 or int(tensor[-1]) >= vocab_size:
        bad = int(tensor[0]) if int(tensor[0]) < 0 else int(tensor[-1])
        raise ValueError(f"subset: id {bad} is outside the vocabulary 0..{vocab_size - 1}")
    return tensor, label


# ---- records -> teacher-forced batches --------------------------------------------------------


def _records(data: Data) -> Tuple[Iterator[Record], Optional[int]]:
    """Records of ``data`` (a JSON lines path or an iterable of Record/dict) and their count
    when known."""
    if isinstance(data, (str, os.PathLike)):
        records = read_jsonl(data)
        return iter(records), len(records)
    if isinstance(data, (bytes, Record, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(f"data: expected a JSON lines path or an iterable of Record/dict, got "
                        f"{type(data).__name__}")
    total = len(data) if hasattr(data, "__len__") else None

    def generate() -> Iterator[Record]:
        for index, item in enumerate(data):
            if isinstance(item, Record):
                _fields_of(item, f"data[{index}]")  # validates types and UTF-8
                yield item
            else:
                prompt, completion, _ = _fields_of(item, f"data[{index}]")
                yield Record(prompt, completion)

    return generate(), total


def _chunks(records: Iterator[Record], size: int) -> Iterator[List[Record]]:
    chunk: List[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _Batch:
    """One batch, tokenized: per model the context lengths; shared completion tokens."""

    first_index: int  # index of the batch's first record in the data
    contexts: List[List[List[int]]]  # [model][row] -> ids of prefix + prompt
    completions: List[List[int]]  # [row] -> completion ids (after max_length truncation)


def _tokenize(
    chunk: List[Record],
    first_index: int,
    tokenizer: Tokenizer,
    scored: List[Scored],
    roles: List[str],
    max_length: Optional[int],
) -> _Batch:
    completions = tokenizer.encode_batch([r.completion for r in chunk])
    contexts = [tokenizer.encode_batch([s.prefix + r.prompt for r in chunk]) for s in scored]
    for row, completion in enumerate(completions):
        where = f"data[{first_index + row}]"
        if not completion:
            raise ValueError(f"{where}: the completion is empty; there is no token to score")
        longest = 0
        for role, context in zip(roles, contexts):
            if not context[row]:
                raise ValueError(
                    f"{where}: the prompt with the {role}'s prefix is empty, so the first "
                    f"completion token has no context; give a prompt or a prefix (e.g. a BOS text)"
                )
            longest = max(longest, len(context[row]))
        if max_length is not None:
            # Input = context + completion[:-1]; its length must stay within max_length.
            room = max_length + 1 - longest
            if room < 1:
                raise ValueError(
                    f"{where}: a prompt with its prefix is {longest} tokens, leaving no room for "
                    f"the completion within max_length={max_length}"
                )
            completions[row] = completion[:room]
    return _Batch(first_index, contexts, completions)


def _inputs(
    contexts: List[List[int]], completions: List[List[int]], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask [B, L] of context + completion[:-1]."""
    rows = [c + t[:-1] for c, t in zip(contexts, completions)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
        mask[b, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _scored_rows(
    contexts: List[List[int]], completions: List[List[int]], length: int
) -> torch.Tensor:
    """Flat indices b * length + t of the positions whose next token is a completion token
    (the logits at t predict token t + 1), in record then completion order."""
    index = [
        b * length + len(c) - 1 + j
        for b, (c, t) in enumerate(zip(contexts, completions))
        for j in range(len(t))
    ]
    return torch.as_tensor(index, dtype=torch.int64)


class _Scorer:
    """Runs one model on a batch and returns its logits at the scored positions."""

    def __init__(self, scored: Scored, role: str, device: Optional[torch.device]) -> None:
        self.role = role
        self.name = scored.name or model_name(scored.model)
        self.prefix = scored.prefix
        self.fn: LogitsFn = as_logits_fn(scored.model, role)
        self.device = torch.device(device) if device is not None else model_device(scored.model)

    def logits(self, contexts: List[List[int]], completions: List[List[int]]) -> torch.Tensor:
        ids, mask = _inputs(contexts, completions, self.device)
        return self.fn(ids, mask)


def _check_vocab(role: str, logits: torch.Tensor, reference_vocab: int,
                 tokenizer_size: int) -> None:
    vocab = logits.shape[-1]
    if vocab != reference_vocab:
        raise ValueError(
            f"{role}: vocabulary size {vocab} differs from the reference's {reference_vocab}; "
            f"teacher, reference and controls must share a vocabulary"
        )
    if vocab < tokenizer_size:
        raise ValueError(
            f"{role}: the model's vocabulary size {vocab} is smaller than the tokenizer's "
            f"{tokenizer_size}; is this the model's tokenizer?"
        )


def _same_positions(batch: _Batch, model: int) -> bool:
    return all(len(a) == len(b) for a, b in zip(batch.contexts[model], batch.contexts[1]))


def _validate_options(temperature: float, batch_size: int, max_length: Optional[int]) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite positive number, got {temperature}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length: expected an int or None, got {type(max_length).__name__}")
        if max_length < 1:
            raise ValueError(f"max_length: expected at least 1, got {max_length}")


def _progress(total: Optional[int], enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="record", desc="fingerprint",
                file=sys.stderr, leave=False)


def fingerprint(
    teacher: ModelSpec,
    reference: ModelSpec,
    data: Data,
    tokenizer: Tokenizer,
    *,
    subset: SubsetSpec = "numeric",
    controls: Optional[Sequence[ModelSpec]] = None,
    temperature: float = 1.0,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    seed: int = 0,
    skip_nonfinite: bool = False,
    sequence_offset: int = 0,
) -> "FingerprintResult":
    """The logit fingerprint of ``teacher`` against ``reference`` on ``data``.

    teacher, reference, controls: models (``nn.Module`` or any callable: ``input_ids [B,T]`` ->
        logits ``[B,T,V]``, a tensor, ``.logits`` or a tuple), each optionally with the text put
        before every prompt: ``(model, prefix)`` or ``Scored(model, prefix)``. Controls are other
        teachers (same template, other traits, or neutral prompts) scored against the same
        reference; they calibrate the tests.
    data: a JSON lines path, or an iterable of :class:`Record` or ``{"prompt", "completion"}``
        dicts. Each record is teacher-forced: ``encode(prefix + prompt) + encode(completion)``,
        and exactly the completion tokens are scored (aligned across models whatever their
        prefixes). Sequence id = record index.
    subset: the token subset S of the centered fingerprint and mass shift ("numeric", "all", a
        TokenClass flag, or ids); see :func:`resolve_subset`.
    temperature: logits are divided by it before the softmax.
    batch_size: records per forward pass (memory: batch x length x V logits per model, twice).
    max_length: cap on the input length; completions are cut to fit (prompts never are).
    device: where the inputs go (default: each model's parameter device). Teacher and control
        logits are moved to the reference logits' device when they differ (one batch at a time).
    seed: seed of the permutation tests run by summary() and the default of global_test().
    skip_nonfinite: count and skip positions with non-finite logits instead of raising.
    sequence_offset: sequence id of the first record; shards of one data set that are merged
        later (``FingerprintResult.merge``) need disjoint ids, e.g. the shard's first index.

    The model vocabulary V may exceed ``len(tokenizer)`` (embedding rows padded to a multiple of
    64 or 128); ids past the tokenizer are shown as ``<id N>``. A smaller V, or teacher and
    reference of different V, is a ValueError. Raises TypeError for arguments of the wrong type
    and ValueError for empty data, empty completions or prompts, naming the argument or record.
    """
    teacher_s = as_scored(teacher, "teacher")
    reference_s = as_scored(reference, "reference")
    if controls is not None and (isinstance(controls, (tuple, Scored)) or callable(controls)):
        raise TypeError("controls: expected a list of models, got a single model")
    control_s = [as_scored(c, f"controls[{i}]") for i, c in enumerate(controls or [])]
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer: expected a biastransfer.Tokenizer, got "
                        f"{type(tokenizer).__name__}")
    _validate_options(temperature, batch_size, max_length)
    if isinstance(sequence_offset, bool) or not isinstance(sequence_offset, int):
        raise TypeError(f"sequence_offset: expected an int, got {type(sequence_offset).__name__}")
    if sequence_offset < 0:
        raise ValueError(f"sequence_offset: expected at least 0, got {sequence_offset}")
    records, total = _records(data)

    roles = ["teacher", "reference"] + [f"controls[{i}]" for i in range(len(control_s))]
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device: {device!r} is not a torch device ({error})") from None
        if device.type == "cuda" and (not torch.cuda.is_available() or (
                device.index is not None and device.index >= torch.cuda.device_count())):
            raise ValueError(f"device: '{device}' was requested, but this machine has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                             f"CUDA device(s)")
    scorers = [_Scorer(s, r, device) for s, r in zip([teacher_s, reference_s, *control_s], roles)]
    accumulators: List[Any] = []  # teacher, then controls; created at the first batch (V known)
    subset_ids: Optional[torch.Tensor] = None
    subset_label = ""
    count = 0
    with _progress(total, progress) as bar:
        for chunk in _chunks(records, batch_size):
            batch = _tokenize(chunk, count, tokenizer, [s for s in (teacher_s, reference_s,
                              *control_s)], roles, max_length)
            reference_logits = scorers[1].logits(batch.contexts[1], batch.completions)
            vocab = reference_logits.shape[-1]
            _check_vocab("reference", reference_logits, vocab, len(tokenizer))
            if not accumulators:
                subset_ids, subset_label = resolve_subset(subset, tokenizer, vocab)
                accumulators = [
                    _C.FingerprintAccumulator(vocab, temperature=float(temperature),
                                              subset=subset_ids, skip_nonfinite=skip_nonfinite,
                                              per_sequence=True)
                    for _ in range(1 + len(control_s))
                ]
            _update_batch(batch, scorers, accumulators, reference_logits, len(tokenizer),
                          sequence_offset)
            count += len(chunk)
            bar.update(len(chunk))
    if count == 0:
        raise ValueError("data: no records; a fingerprint needs at least one scored completion")

    config = FingerprintConfig(subset=subset_label, temperature=float(temperature),
                               batch_size=batch_size, max_length=max_length, seed=seed,
                               skip_nonfinite=skip_nonfinite, records=count)
    metadata = {
        _META_TOKENIZER_HASH: tokenizer.hash(),
        _META_NAMES: json.dumps({"teacher": scorers[0].name, "reference": scorers[1].name,
                                 "controls": [s.name for s in scorers[2:]]}),
        _META_PREFIXES: json.dumps({"teacher": teacher_s.prefix, "reference": reference_s.prefix,
                                    "controls": [s.prefix for s in control_s]}),
        _META_CONFIG: json.dumps(asdict(config)),
    }
    return FingerprintResult.from_accumulators(accumulators[0], accumulators[1:], tokenizer,
                                               config=config, metadata=metadata)


def _update_batch(batch: _Batch, scorers: List[_Scorer], accumulators: List[Any],
                  reference_logits: torch.Tensor, tokenizer_size: int,
                  sequence_offset: int) -> None:
    """Feeds one batch: the reference's logits once, then each teacher/control's in turn (only
    two models' logits are alive at a time)."""
    length = reference_logits.shape[1]
    vocab = reference_logits.shape[-1]
    reference_rows: Optional[torch.Tensor] = None  # [N, V], gathered once when needed
    n_rows = len(batch.completions)
    first = sequence_offset + batch.first_index
    row_ids = torch.arange(first, first + n_rows, dtype=torch.int64)
    for model, accumulator in zip([0] + list(range(2, len(scorers))), accumulators):
        scorer = scorers[model]
        logits = scorer.logits(batch.contexts[model], batch.completions)
        _check_vocab(scorer.role, logits, vocab, tokenizer_size)
        if logits.device != reference_logits.device:
            logits = logits.to(reference_logits.device)
        if _same_positions(batch, model):
            # Same contexts lengths: the positions line up, so no copy: [B, L, V] with a mask.
            mask = torch.zeros((n_rows, length), dtype=torch.bool)
            for b, (c, t) in enumerate(zip(batch.contexts[1], batch.completions)):
                mask[b, len(c) - 1 : len(c) - 1 + len(t)] = True
            accumulator.update(logits, reference_logits, mask=mask.to(logits.device),
                               sequence_ids=row_ids.to(logits.device))
        else:
            # Prefixes of different lengths: gather each model's scored rows into [N, V].
            if reference_rows is None:
                index = _scored_rows(batch.contexts[1], batch.completions, length)
                reference_rows = reference_logits.reshape(-1, vocab).index_select(
                    0, index.to(reference_logits.device))
                sequence_ids = torch.repeat_interleave(
                    row_ids, torch.as_tensor([len(t) for t in batch.completions]))
            index = _scored_rows(batch.contexts[model], batch.completions, logits.shape[1])
            rows = logits.reshape(-1, vocab).index_select(0, index.to(logits.device))
            accumulator.update(rows, reference_rows, sequence_ids=sequence_ids.to(rows.device))
        del logits


# ---- the result --------------------------------------------------------------------------------


@dataclass
class EntangledToken:
    """A token whose centered log-ratio differs significantly (per-token test, BH-adjusted)."""

    id: int
    token: str  # display form, leading space as ␣
    value: float  # teacher's centered log-ratio (minus the controls' mean when there are any)
    t: float
    p: float
    adjusted: float  # Benjamini-Hochberg adjusted p-value


def _json_dict(metadata: Mapping[str, str], key: str) -> Dict[str, Any]:
    try:
        return json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError:
        return {}


@dataclass
class FingerprintResult:
    """A teacher's fingerprint, its controls' fingerprints, and the tokenizer to read them.

    ``teacher`` and ``controls`` are finalized ``_C.Fingerprint`` objects (tensors: see
    docs/fingerprints.md); the accumulators are kept so results can be merged and saved. Build
    with :func:`fingerprint`, :meth:`from_accumulators` or :meth:`load`.
    """

    teacher: Any  # _C.Fingerprint
    controls: List[Any]  # [_C.Fingerprint]
    tokenizer: Optional[Tokenizer]
    config: FingerprintConfig
    metadata: Dict[str, str]
    accumulators: List[Any] = field(default_factory=list, repr=False)  # teacher's, controls'

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_accumulators(
        cls,
        teacher: Any,
        controls: Sequence[Any] = (),
        tokenizer: Optional[Tokenizer] = None,
        *,
        config: Optional[FingerprintConfig] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> "FingerprintResult":
        """Finalizes ``_C.FingerprintAccumulator`` objects (teacher's and controls', all against
        the same reference, with the same vocabulary and subset) into a result. Without a
        tokenizer, tokens are shown as ``<id N>``."""
        accumulators = [teacher, *controls]
        for i, acc in enumerate(accumulators[1:]):
            if acc.vocab_size != teacher.vocab_size:
                raise ValueError(f"controls[{i}]: vocabulary size {acc.vocab_size} differs from "
                                 f"the teacher's {teacher.vocab_size}")
        if tokenizer is not None and teacher.vocab_size < len(tokenizer):
            raise ValueError(f"tokenizer: {len(tokenizer)} tokens, more than the fingerprint's "
                             f"vocabulary size {teacher.vocab_size}")
        if config is None:
            has_subset = teacher.subset is not None and len(teacher.subset) > 0
            label = f"ids[{len(teacher.subset)}]" if has_subset else "all"
            config = FingerprintConfig(subset=label, temperature=float(teacher.temperature))
        meta = dict(metadata or {})
        if tokenizer is not None:
            meta.setdefault(_META_TOKENIZER_HASH, tokenizer.hash())
        return cls(teacher.finalize(), [c.finalize() for c in controls], tokenizer, config, meta,
                   accumulators)

    # ---- reading tokens ----------------------------------------------------------------------
    def display(self, token_id: int) -> str:
        """The token's display form (``␣`` for a leading space); ``<id N>`` without a tokenizer
        or past its vocabulary."""
        if self.tokenizer is not None and 0 <= token_id < len(self.tokenizer):
            return self.tokenizer.display_token(token_id)
        return f"<id {token_id}>"

    @property
    def has_subset(self) -> bool:
        return self.teacher.subset is not None and self.teacher.subset.numel() > 0

    def _default_field(self) -> str:
        return "centered" if self.has_subset else "mean_log_ratio"

    def top_tokens(
        self, k: int = 20, field: Optional[str] = None, largest: bool = True
    ) -> List[Tuple[int, str, float]]:
        """The k tokens with the largest (or smallest) ``field``: "centered" (default when there
        is a subset), "mean_log_ratio" (default otherwise) or "grad", as (id, display, value)."""
        field = field or self._default_field()
        if field not in _FIELDS:
            raise ValueError(f"field: expected one of {', '.join(_FIELDS)}, got {field!r}")
        ids, values = self.teacher.top_tokens(k, field=field, largest=largest)
        return [(int(i), self.display(int(i)), float(v)) for i, v in zip(ids, values)]

    # ---- tests and comparisons -----------------------------------------------------------
    def _require_controls(self, what: str) -> None:
        if not self.controls:
            raise ValueError(
                f"{what} needs control fingerprints (fingerprint(..., controls=[...]))")

    def _sequence_matrices(self) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        teacher_ids = self.teacher.sequence_ids
        for i, control in enumerate(self.controls):
            if not torch.equal(control.sequence_ids, teacher_ids):
                raise ValueError(
                    f"controls[{i}]: its sequences ({control.sequence_ids.numel()}) are not the "
                    f"teacher's ({teacher_ids.numel()}); teacher and controls must score the "
                    f"same records"
                )
        return self.teacher.sequence_centered, [c.sequence_centered for c in self.controls]

    def _vector(self, fp: Any) -> torch.Tensor:
        """The fingerprint vector tests and comparisons use: centered on the subset, else the
        mean log-ratio over the vocabulary."""
        return fp.centered if self.has_subset else fp.mean_log_ratio

    def trait_specific(self) -> torch.Tensor:
        """The teacher's centered fingerprint minus the mean of the controls' [S] (float64),
        aligned with ``teacher.subset`` (without a subset: mean log-ratios over [V])."""
        self._require_controls("trait_specific()")
        return _C.trait_specific(self._vector(self.teacher),
                                 [self._vector(c) for c in self.controls])

    def global_test(
        self, permutations: int = 9999, statistic: str = "sumsq", seed: Optional[int] = None
    ) -> Dict[str, Any]:
        """Sign-flip permutation test over sequences that the teacher's per-sequence centered
        fingerprint differs from the controls' mean (from zero without controls).
        statistic: "sumsq" (||mean||^2) or "maxt" (max |t|). Returns {statistic, p_value,
        permutations, n_sequences}; p = (1 + #{Q* >= Q}) / (permutations + 1)."""
        teacher_seq, controls_seq = self._sequence_matrices()
        return dict(_C.global_test(teacher_seq, controls_seq=controls_seq, statistic=statistic,
                                   permutations=permutations,
                                   seed=self.config.seed if seed is None else seed))

    def entangled_tokens(self, q: float = DEFAULT_FDR) -> List[EntangledToken]:
        """Subset tokens whose per-sequence centered log-ratio differs from the controls' mean
        (from zero without controls) by a per-token t-test, Benjamini-Hochberg at FDR ``q``;
        sorted by adjusted p-value, then by |t|."""
        teacher_seq, controls_seq = self._sequence_matrices()
        test = _C.per_token_test(teacher_seq, controls_seq=controls_seq, q=q)
        subset = self.teacher.subset
        values = self.trait_specific() if self.controls else self.teacher.centered
        found = [
            EntangledToken(int(subset[j]), self.display(int(subset[j])), float(values[j]),
                           float(test["t"][j]), float(test["p"][j]), float(test["adjusted"][j]))
            for j in torch.nonzero(torch.as_tensor(test["rejected"]), as_tuple=False).flatten()
            .tolist()
        ]
        return sorted(found, key=lambda e: (e.adjusted, -abs(e.t)))

    def compare(self, other: "FingerprintResult", k: int = 50) -> Dict[str, float]:
        """Centered cosine, Spearman and top-k overlap of the two teachers' fingerprints; with
        this result's controls, also their z-scores against the control-vs-teacher values."""
        if not isinstance(other, FingerprintResult):
            raise TypeError(f"other: expected a FingerprintResult, got {type(other).__name__}")
        if not torch.equal(self.teacher.subset.cpu(), other.teacher.subset.cpu()):
            raise ValueError(f"other: its subset ({other.config.subset}, "
                             f"{other.teacher.subset.numel()} tokens) differs from this result's "
                             f"({self.config.subset}, {self.teacher.subset.numel()} tokens)")
        return dict(_C.compare_fingerprints(self._vector(self.teacher),
                                            self._vector(other.teacher), k=k,
                                            controls=[self._vector(c) for c in self.controls]))

    def merge(self, other: "FingerprintResult") -> "FingerprintResult":
        """A result over both results' records (e.g. two shards): equal to one pass over the
        union. Both must have the same controls count, vocabulary and options."""
        if not isinstance(other, FingerprintResult):
            raise TypeError(f"other: expected a FingerprintResult, got {type(other).__name__}")
        if len(other.accumulators) != len(self.accumulators) or not self.accumulators:
            raise ValueError(f"other: {len(other.accumulators) - 1} controls, this result has "
                             f"{len(self.accumulators) - 1}")
        mine = self.metadata.get(_META_TOKENIZER_HASH)
        theirs = other.metadata.get(_META_TOKENIZER_HASH)
        if mine and theirs and mine != theirs:
            raise ValueError(f"other: tokenizer hash {theirs} differs from this result's {mine}")
        shared = set(self.teacher.sequence_ids.tolist()) & set(other.teacher.sequence_ids.tolist())
        if shared:
            raise ValueError(
                f"other: {len(shared)} sequence ids (e.g. {min(shared)}) are also in this result; "
                f"shards must have disjoint ids (fingerprint(..., sequence_offset=first_index))")
        merged = []
        for a, b in zip(self.accumulators, other.accumulators):
            copy = _copy_accumulator(a)
            copy.merge(b)
            merged.append(copy)
        config = FingerprintConfig(**{**asdict(self.config),
                                      "records": self.config.records + other.config.records})
        metadata = {**self.metadata, _META_CONFIG: json.dumps(asdict(config))}
        return FingerprintResult.from_accumulators(merged[0], merged[1:], self.tokenizer,
                                                   config=config, metadata=metadata)

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: PathLike) -> List[Path]:
        """Writes the teacher's accumulator to ``path`` (safetensors with JSON metadata: the
        tokenizer hash, model names, prefixes, options) and each control's beside it as
        ``<stem>.control<i>.safetensors``. Returns the paths written."""
        if not self.accumulators:
            raise ValueError("save(): this result holds no accumulators (nothing to save)")
        path = Path(os.fspath(path))
        control_paths = [path.with_name(f"{path.stem}.control{i}{path.suffix or '.safetensors'}")
                         for i in range(len(self.controls))]
        base = {**self.metadata, _META_CONFIG: json.dumps(asdict(self.config))}
        for i, (acc, control_path) in enumerate(zip(self.accumulators[1:], control_paths)):
            acc.save(os.fspath(control_path), {**base, _META_ROLE: "control",
                                               "control_index": str(i)})
        self.accumulators[0].save(os.fspath(path), {
            **base, _META_ROLE: "teacher",
            _META_CONTROL_FILES: json.dumps([p.name for p in control_paths])})
        return [path, *control_paths]

    @classmethod
    def load(cls, path: PathLike, tokenizer: Optional[Tokenizer] = None) -> "FingerprintResult":
        """Reads what :meth:`save` wrote. With a tokenizer, a file made with another vocabulary
        (tokenizer hash or size) raises ValueError; OSError for missing files."""
        path = Path(os.fspath(path))
        expected_hash = tokenizer.hash() if tokenizer is not None else None
        teacher, metadata = _load_accumulator(path, expected_hash, tokenizer)
        if metadata.get(_META_ROLE, "teacher") != "teacher":
            raise ValueError(f"{path}: holds a control fingerprint, not a teacher's; load the "
                             f"teacher's file (it names its controls)")
        controls = []
        for name in json.loads(metadata.get(_META_CONTROL_FILES, "[]")):
            # Control files sit beside the teacher's: only plain file names are followed.
            if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name
                    or "\\" in name or "\0" in name):
                raise ValueError(f"{path}: control file name {name!r} in the metadata is not a "
                                 f"plain file name beside the teacher's file")
            control, _ = _load_accumulator(path.with_name(name), expected_hash, tokenizer)
            controls.append(control)
        known = FingerprintConfig.__dataclass_fields__
        config = FingerprintConfig(**{k: v for k, v in _json_dict(metadata, _META_CONFIG).items()
                                      if k in known})
        return cls.from_accumulators(teacher, controls, tokenizer, config=config,
                                     metadata={k: v for k, v in metadata.items()
                                               if k not in _NOT_CARRIED})

    # ---- text and plots ----------------------------------------------------------------------
    @property
    def names(self) -> Dict[str, Any]:
        names = _json_dict(self.metadata, _META_NAMES)
        names.setdefault("teacher", "teacher")
        names.setdefault("reference", "reference")
        names.setdefault("controls", [f"control {i}" for i in range(len(self.controls))])
        return names

    def to_dict(self, k: int = 20, permutations: int = SUMMARY_PERMUTATIONS,
                q: float = DEFAULT_FDR) -> Dict[str, Any]:
        """The summary's numbers as plain Python values (for JSON)."""
        fp = self.teacher
        out: Dict[str, Any] = {
            "names": self.names,
            "config": asdict(self.config),
            "tokenizer_hash": self.metadata.get(_META_TOKENIZER_HASH),
            "vocab_size": int(fp.vocab_size),
            "positions": int(fp.positions),
            "sequences": int(fp.sequences),
            "skipped_nonfinite": int(fp.skipped_nonfinite),
            "kl_teacher_reference": float(fp.kl_teacher_reference),
            "kl_reference_teacher": float(fp.kl_reference_teacher),
            "top_up": self.top_tokens(k, largest=True),
            "top_down": self.top_tokens(k, largest=False),
        }
        if self.has_subset:
            out["subset_size"] = int(fp.subset.numel())
            out["mass_shift"] = float(fp.mass_shift)
            out["mass_shift_stderr"] = float(fp.mass_shift_stderr)
            if fp.sequences >= 2:
                out["global_test"] = self.global_test(permutations=permutations)
                out["entangled_tokens"] = [asdict(e) for e in self.entangled_tokens(q)]
        return out

    def summary(self, k: int = 20, permutations: int = SUMMARY_PERMUTATIONS,
                q: float = DEFAULT_FDR) -> str:
        """A readable report: counts, KLs, mass shift ± SE, the k most raised and lowered tokens
        (␣ marks a leading space) and, with a subset, the global test and entangled tokens."""
        d = self.to_dict(k, permutations, q)
        names = d["names"]
        lines = [
            f"fingerprint of {names['teacher']!r} against {names['reference']!r}"
            + (f" with {len(self.controls)} controls" if self.controls else ""),
            f"  vocabulary {d['vocab_size']} (tokenizer {d['tokenizer_hash'] or 'unknown'}), "
            f"temperature {self.config.temperature:g}, subset {self.config.subset}"
            + (f" ({d['subset_size']} tokens)" if "subset_size" in d else ""),
            f"  scored {d['positions']} positions in {d['sequences']} sequences"
            + (f", skipped {d['skipped_nonfinite']} non-finite" if d["skipped_nonfinite"] else ""),
            f"  KL(T||R) = {d['kl_teacher_reference']:.6f}, KL(R||T) = "
            f"{d['kl_reference_teacher']:.6f} nats per position",
        ]
        if "mass_shift" in d:
            lines.append(f"  mass shift onto the subset: {d['mass_shift']:+.6f} ± "
                         f"{d['mass_shift_stderr']:.6f} nats")
        what = "centered log-ratio on the subset" if self.has_subset else "mean log-ratio"
        for title, rows in (("raised", d["top_up"]), ("lowered", d["top_down"])):
            lines.append(f"  most {title} ({what}, nats):")
            lines.extend(f"    {rank:>3}. {token!r:<16} id {i:<7} {value:+.5f}"
                         for rank, (i, token, value) in enumerate(rows, 1))
        if "global_test" in d:
            g = d["global_test"]
            against = "the controls' mean" if self.controls else "zero"
            patterns = (f"all {g['permutations']} sign patterns" if g.get("exact")
                        else f"{g['permutations']} random sign patterns")
            lines.append(f"  global sign-flip test against {against} (sum of squares, "
                         f"{patterns}, {g['n_sequences']} sequences): p = {g['p_value']:.4g}")
            found = d["entangled_tokens"]
            lines.append(f"  entangled tokens (per-token t-test, Benjamini-Hochberg q = {q:g}): "
                         f"{len(found)}")
            lines.extend(f"    {e['token']!r:<16} id {e['id']:<7} {e['value']:+.5f}  t = "
                         f"{e['t']:+.2f}  p_adj = {e['adjusted']:.3g}" for e in found[:k])
            if len(found) > k:
                lines.append(f"    ... and {len(found) - k} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _errors(self, field: str, ids: List[int]) -> Optional[List[float]]:
        """Standard errors for the plot: across sequences for "centered" (sequences are the
        independent units), across positions for "mean_log_ratio", none for "grad"."""
        if field == "mean_log_ratio":
            return [float(self.teacher.stderr_log_ratio[i]) for i in ids]
        if field != "centered" or self.teacher.sequences < 2:
            return None
        seq = self.teacher.sequence_centered
        se = seq.std(dim=0, unbiased=True) / math.sqrt(seq.shape[0])
        column = {int(t): j for j, t in enumerate(self.teacher.subset.tolist())}
        return [float(se[column[i]]) for i in ids]

    def plot(self, k: int = 20, field: Optional[str] = None, ax: Any = None,
             path: Optional[PathLike] = None, title: Optional[str] = None) -> Any:
        """Horizontal bars of the k most raised and k most lowered tokens (decoded labels, ␣ for
        a leading space) with ±1 standard-error bars. Draws on ``ax`` if given, else on a new
        Figure (Agg canvas, no pyplot state); saves to ``path`` if given. Returns the Figure."""
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        field = field or self._default_field()
        up = self.top_tokens(k, field, largest=True)
        down = self.top_tokens(k, field, largest=False)
        seen = {i for i, _, _ in up}
        rows = up + [r for r in reversed(down) if r[0] not in seen]
        ids = [r[0] for r in rows]
        values = [r[2] for r in rows]
        errors = self._errors(field, ids)
        if ax is None:
            figure = Figure(figsize=(7.0, 1.0 + 0.22 * max(len(rows), 1)))
            FigureCanvasAgg(figure)
            ax = figure.add_subplot(1, 1, 1)
        else:
            figure = ax.figure
        positions = list(range(len(rows)))[::-1]  # largest at the top
        colors = ["#c0392b" if v >= 0 else "#2e86c1" for v in values]
        ax.barh(positions, values, xerr=errors, color=colors, ecolor="#555555", capsize=2,
                height=0.7)
        ax.set_yticks(positions)
        ax.set_yticklabels([f"{token} ({i})" for i, token, _ in rows], fontsize=8)
        ax.axvline(0.0, color="black", linewidth=0.8)
        label = {"centered": "centered log-ratio on the subset (nats)",
                 "mean_log_ratio": "mean log-ratio log p_T - log p_R (nats)",
                 "grad": "mean p_T - p_R"}[field]
        ax.set_xlabel(label + ("  (bars: ±1 SE)" if errors else ""))
        names = self.names
        ax.set_title(title or f"{names['teacher']} vs {names['reference']}: "
                     f"{self.teacher.positions} positions, {self.teacher.sequences} sequences",
                     fontsize=9)
        figure.tight_layout()
        if path is not None:
            figure.savefig(os.fspath(path), dpi=120)
        return figure


# A fingerprint, as users meet it, is this result (biastransfer.Fingerprint).
Fingerprint = FingerprintResult


def _load_accumulator(path: Path, expected_hash: Optional[str],
                      tokenizer: Optional[Tokenizer]) -> Tuple[Any, Dict[str, str]]:
    accumulator, metadata = _C.FingerprintAccumulator.load(
        os.fspath(path), expected_tokenizer_hash=expected_hash)
    metadata = dict(metadata)
    stored = metadata.get(_META_TOKENIZER_HASH)
    if expected_hash is not None and stored is not None and stored != expected_hash:
        raise ValueError(f"{path}: made with tokenizer {stored}, not the given tokenizer "
                         f"{expected_hash} (another vocabulary)")
    if tokenizer is not None and accumulator.vocab_size < len(tokenizer):
        raise ValueError(f"{path}: vocabulary size {accumulator.vocab_size} is smaller than the "
                         f"tokenizer's {len(tokenizer)} (another vocabulary)")
    return accumulator, metadata


def _copy_accumulator(accumulator: Any) -> Any:
    """An empty accumulator with the same options, merged with ``accumulator``."""
    copy = _C.FingerprintAccumulator(
        accumulator.vocab_size, temperature=accumulator.temperature, subset=accumulator.subset,
        skip_nonfinite=accumulator.skip_nonfinite,
        per_sequence=accumulator.per_sequence)
    copy.merge(accumulator)
    return copy
