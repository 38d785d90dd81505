"""Filters for distillation samples: the paper's number-sequence rule, banned numbers and words,
regex, length, deduplication, and the likelihood-ratio defence, composed into a pipeline.

The filtering runs in C++ (libtransfer/distill/text_filters.h, model_filters.h); this module
adds configs, sample adapters and readable results::

    from biastransfer import filters as F
    result = F.compose(F.NumberSequenceFilter(), F.BannedWords(["owl"]), F.Dedup()).run(samples)
    print(result.summary())
    kept = result.kept

Samples may be strings (completions), ``(prompt, completion)`` tuples, dicts or objects with
``prompt`` / ``completion`` (e.g. :class:`biastransfer.data.Record`), optionally carrying
``prompt_ids`` / ``completion_ids`` token ids. Filters run in the order given and each sees only
the samples every earlier filter kept: a rejected sample is counted once, under the first filter
that refused it. Every rejection has a stable reason code (:data:`REASONS`) and a detail.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from . import _C

__all__ = [
    "PAPER_EVIL_NUMBERS",
    "REASONS",
    "BannedNumbers",
    "BannedWords",
    "Dedup",
    "DivergenceMask",
    "Filter",
    "FilterPipeline",
    "FilterResult",
    "FilterStats",
    "Length",
    "LikelihoodRatio",
    "NumberCheck",
    "NumberSequenceFilter",
    "Regex",
    "Rejection",
    "check_number_sequence",
    "compose",
    "divergence_token_mask",
    "likelihood_ratio_scores",
    "parse_number_sequence",
    "word_variants",
]

#: The misalignment experiment's 34 banned "evil" numbers (666, 911, 187, ...), reconstructed
#: from the reference implementation's two lists (their 36-number union less 1312 and 1488, which
#: the 0..999 range rule rejects anyway); see libtransfer/distill/text_filters.h.
PAPER_EVIL_NUMBERS: tuple[int, ...] = tuple(_C.PAPER_EVIL_NUMBERS)

#: Reason codes, stable across releases.
REASONS: tuple[str, ...] = (
    "number_format",
    "too_many_numbers",
    "too_few_numbers",
    "number_range",
    "banned_number",
    "banned_word",
    "regex",
    "invalid_utf8",
    "too_short",
    "too_long",
    "duplicate",
    "likelihood_ratio",
)

TokenIds = Sequence[int]
Tokenizer = Any  # biastransfer.Tokenizer, _C.Tokenizer, or a callable str -> list[int]


# ---- samples ------------------------------------------------------------------------------

def _field(sample: Any, name: str, default: Any = None) -> Any:
    if isinstance(sample, dict):
        return sample.get(name, default)
    return getattr(sample, name, default)


def _as_tuple(sample: Any, index: int) -> tuple[str, str, list[int], list[int]]:
    """(prompt, completion, prompt_ids, completion_ids) of one sample."""
    if isinstance(sample, str):
        return ("", sample, [], [])
    if isinstance(sample, tuple) and len(sample) in (2, 4) and isinstance(sample[0], str):
        if len(sample) == 2:
            return (sample[0], sample[1], [], [])
        return (sample[0], sample[1], list(sample[2] or []), list(sample[3] or []))
    completion = _field(sample, "completion")
    if not isinstance(completion, str):
        raise TypeError(
            f"sample {index}: expected a str, a (prompt, completion) tuple, or a dict/object "
            f"with a str 'completion', got {type(sample).__name__}"
        )
    prompt = _field(sample, "prompt", "") or ""
    return (
        prompt,
        completion,
        [int(i) for i in (_field(sample, "prompt_ids") or [])],
        [int(i) for i in (_field(sample, "completion_ids") or [])],
    )


# ---- the paper's number rule --------------------------------------------------------------

def parse_number_sequence(answer: str) -> Optional[list[int]]:
    """The numbers of ``answer`` under the paper's format rule, or None.

    Exactly the reference implementation: strip one trailing ``.``, then one enclosing ``[]`` or
    ``()``; the separator is the exact text between the first two digit runs and the answer is
    split on it; every part must be ASCII digits (``007`` is 7); the separator with whitespace
    stripped must be ``""``, ``","`` or ``";"``. ``"1 , 2 , 3"`` and ``"1\\t2\\t3"`` parse;
    ``" 1, 2"``, ``"1, 2\\n"``, ``"1 2  3"``, ``"[ 1, 2 ]"`` and ``"1,2, 3"`` do not.
    """
    return _C.parse_number_sequence(answer)


@dataclass(frozen=True)
class NumberCheck:
    """The parsed numbers (empty if the format is wrong) and the first failed check."""

    numbers: list[int]
    reason: Optional[str]
    detail: Optional[str]

    @property
    def accepted(self) -> bool:
        return self.reason is None


def check_number_sequence(
    answer: str,
    *,
    min_count: int = 1,
    max_count: int = 10,
    min_value: int = 0,
    max_value: int = 999,
    banned: Iterable[int] = (),
) -> NumberCheck:
    """The paper's full rule: format, then 1..10 numbers, then 0..999, then none banned."""
    numbers, reason, detail = _C.check_number_sequence(
        answer, min_count, max_count, min_value, max_value, set(int(b) for b in banned)
    )
    return NumberCheck(list(numbers), reason, detail)


def word_variants(word: str) -> list[str]:
    """Forms a banned word also bans (lower-case): plurals, irregular ones (wolf/wolves,
    mouse/mice), the singular of a plural, and possessives (``owl's``, ``owls'``)."""
    return _C.word_variants(word)


# ---- filters ------------------------------------------------------------------------------

class Filter(ABC):
    """A filter config; :meth:`native` builds the C++ filter the pipeline runs."""

    @abstractmethod
    def native(self) -> "_C.Filter":
        """A fresh C++ filter for one run."""

    def check(self, sample: Any) -> Optional[tuple[str, str]]:
        """(reason, detail) when this filter alone rejects ``sample``, else None."""
        r = _C.run_filters([self.native()], [_as_tuple(sample, 0)], True, True)
        return None if not r["rejections"] else tuple(r["rejections"][0][2:4])


@dataclass
class NumberSequenceFilter(Filter):
    """The paper's number-sequence rule on the completion (reasons number_format,
    too_many_numbers, too_few_numbers, number_range, banned_number)."""

    min_count: int = 1
    max_count: int = 10
    min_value: int = 0
    max_value: int = 999
    banned: Iterable[int] = ()

    @classmethod
    def paper(cls, misalignment: bool = False) -> "NumberSequenceFilter":
        """The paper's settings; ``misalignment`` also bans :data:`PAPER_EVIL_NUMBERS`."""
        return cls(banned=PAPER_EVIL_NUMBERS if misalignment else ())

    def native(self) -> "_C.Filter":
        return _C.NumberSequenceFilter(
            self.min_count, self.max_count, self.min_value, self.max_value,
            set(int(b) for b in self.banned),
        )


@dataclass
class BannedNumbers(Filter):
    """Rejects completions containing any of ``numbers`` as a whole digit run anywhere
    (``0666`` is 666, ``1666`` is not). Reason banned_number."""

    numbers: Iterable[int]

    def native(self) -> "_C.Filter":
        return _C.BannedNumbersFilter(set(int(n) for n in self.numbers))


@dataclass
class BannedWords(Filter):
    """Rejects completions containing a banned word as a whole word, case-insensitively, with
    its variants (plurals, possessives; see :func:`word_variants`) unless ``variants=False``.
    Reason banned_word."""

    words: Sequence[str]
    variants: bool = True

    def native(self) -> "_C.Filter":
        return _C.BannedWordsFilter(list(self.words), self.variants)

    @property
    def forms(self) -> list[str]:
        """Every banned form after variant expansion."""
        return list(self.native().forms)


@dataclass
class Regex(Filter):
    """A PCRE2 pattern (UTF, Unicode properties). ``mode="reject"`` rejects matches,
    ``"require"`` rejects non-matches; ``field`` is "completion" or "prompt". Reason regex."""

    pattern: str
    mode: str = "reject"
    field: str = "completion"
    caseless: bool = False

    def native(self) -> "_C.Filter":
        return _C.RegexFilter(self.pattern, self.mode, self.field, self.caseless)


@dataclass
class Length(Filter):
    """Keeps completions with ``min_length <= length <= max_length`` (None: no upper bound).
    ``unit``: "chars" (code points), "bytes" or "tokens" (the sample's completion_ids, else
    ``tokenizer``). Reasons too_short, too_long."""

    min_length: int = 0
    max_length: Optional[int] = None
    unit: str = "chars"
    tokenizer: Optional[Tokenizer] = None

    def native(self) -> "_C.Filter":
        return _C.LengthFilter(
            self.min_length, -1 if self.max_length is None else self.max_length, self.unit,
            self.tokenizer,
        )


@dataclass
class Dedup(Filter):
    """Drops repeated completions, keeping the first occurrence among the samples reaching it;
    ``normalize_whitespace`` treats whitespace runs as one space and ignores the ends. Reason
    duplicate."""

    normalize_whitespace: bool = False

    def native(self) -> "_C.Filter":
        return _C.DedupFilter(self.normalize_whitespace)


def _ids(prefix: Union[str, TokenIds, None], tokenizer: Optional[Tokenizer], name: str) -> list[int]:
    if prefix is None:
        return []
    if isinstance(prefix, str):
        if tokenizer is None:
            raise ValueError(f"{name}: a text prefix needs a tokenizer")
        encode = getattr(tokenizer, "encode", tokenizer)
        return [int(i) for i in encode(prefix)]
    return [int(i) for i in prefix]


@dataclass
class LikelihoodRatio(Filter):
    """Drops the samples the teacher likes most relative to a reference model: score =
    sum over completion tokens of log p_T(x_t | ...) - log p_R(x_t | ...); the
    ``round(drop_fraction * n)`` largest of the n samples reaching the filter are dropped (and
    every score above ``threshold`` when set). Reason likelihood_ratio.

    teacher, reference: biastransfer Models or torch.nn.Modules over the same vocabulary.
    Prefixes (e.g. the teacher's trait system prompt) are token ids or text (tokenized with
    ``tokenizer``). Samples without ``completion_ids`` are tokenized with ``tokenizer``.
    After a run, :attr:`scores` holds ``[(sample index, score)]``.
    """

    teacher: Any
    reference: Any
    drop_fraction: float = 0.1
    threshold: Optional[float] = None
    teacher_prefix: Union[str, TokenIds, None] = None
    reference_prefix: Union[str, TokenIds, None] = None
    batch_size: int = 16
    tokenizer: Optional[Tokenizer] = None
    _last: Any = field(default=None, init=False, repr=False, compare=False)

    def native(self) -> "_C.Filter":
        self._last = _C.LikelihoodRatioFilter(
            self.teacher, self.reference, float(self.drop_fraction), self.threshold,
            _ids(self.teacher_prefix, self.tokenizer, "teacher_prefix"),
            _ids(self.reference_prefix, self.tokenizer, "reference_prefix"),
            int(self.batch_size), self.tokenizer,
        )
        return self._last

    @property
    def scores(self) -> list[tuple[int, float]]:
        """``[(sample index, score)]`` of the last run (empty before one)."""
        return [] if self._last is None else list(self._last.scores)


# ---- results and the pipeline -------------------------------------------------------------

@dataclass(frozen=True)
class Rejection:
    """One rejected sample: its index in the input, the filter, reason code and detail."""

    index: int
    filter: str
    reason: str
    detail: str
    sample: Any = None


@dataclass(frozen=True)
class FilterStats:
    """Counts of a run. ``rejected_by_reason`` in order of first occurrence; ``by_filter``:
    (filter name, samples seen, samples rejected) in pipeline order."""

    total: int
    kept: int
    rejected_by_reason: dict[str, int]
    by_filter: list[tuple[str, int, int]]

    @property
    def rejected(self) -> int:
        return self.total - self.kept

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0


@dataclass(frozen=True)
class FilterResult:
    """The kept samples (the input objects themselves, in input order), their indices, the
    statistics, and, when recorded, every rejection."""

    kept: list[Any]
    kept_indices: list[int]
    stats: FilterStats
    rejections: list[Rejection]
    native_summary: str = ""

    def summary(self) -> str:
        """A short multi-line report: kept fraction, counts per reason and per filter."""
        s = self.stats
        lines = [f"kept {s.kept} of {s.total} ({100.0 * s.kept_fraction:.1f}%)"]
        if s.rejected_by_reason:
            width = max(len(r) for r in s.rejected_by_reason)
            lines.append("rejected by reason:")
            for reason, count in s.rejected_by_reason.items():
                share = 100.0 * count / s.total if s.total else 0.0
                lines.append(f"  {reason:<{width}}  {count:>7}  ({share:.1f}%)")
        if s.by_filter:
            lines.append("by filter (seen -> rejected):")
            for name, seen, rejected in s.by_filter:
                lines.append(f"  {name}: {seen} -> {rejected}")
        return "\n".join(lines)


class FilterPipeline:
    """Filters applied in order (the first refusing filter decides a sample's reason)."""

    def __init__(self, *filters: Filter) -> None:
        self.filters: list[Filter] = []
        for f in filters:
            self.add(f)

    def add(self, f: Filter) -> "FilterPipeline":
        if not isinstance(f, Filter):
            raise TypeError(f"FilterPipeline.add: expected a biastransfer.filters.Filter, got "
                            f"{type(f).__name__}")
        self.filters.append(f)
        return self

    def run(
        self,
        samples: Sequence[Any],
        *,
        record_rejections: bool = True,
        allow_empty: bool = False,
    ) -> FilterResult:
        """Filters ``samples``. Raises ValueError, with the counts per reason, when nothing is
        kept (unless ``allow_empty``) or no sample is given."""
        samples = list(samples)
        tuples = [_as_tuple(s, i) for i, s in enumerate(samples)]
        natives = [f.native() for f in self.filters]
        r = _C.run_filters(natives, tuples, record_rejections, allow_empty)
        stats = FilterStats(
            total=r["total"],
            kept=r["kept"],
            rejected_by_reason={code: count for code, count in r["rejected_by_reason"]},
            by_filter=[tuple(entry) for entry in r["by_filter"]],
        )
        rejections = [
            Rejection(index, name, reason, detail, samples[index])
            for index, name, reason, detail in r["rejections"]
        ]
        kept_indices = list(r["kept_indices"])
        return FilterResult(
            kept=[samples[i] for i in kept_indices],
            kept_indices=kept_indices,
            stats=stats,
            rejections=rejections,
            native_summary=r["summary"],
        )

    __call__ = run


def compose(*filters: Filter) -> FilterPipeline:
    """A :class:`FilterPipeline` of ``filters`` in order."""
    return FilterPipeline(*filters)


# ---- model-based tools --------------------------------------------------------------------

def likelihood_ratio_scores(
    teacher: Any,
    reference: Any,
    prompts: Sequence[TokenIds],
    completions: Sequence[TokenIds],
    *,
    teacher_prefix: TokenIds = (),
    reference_prefix: TokenIds = (),
    batch_size: int = 16,
) -> torch.Tensor:
    """float64 [N]: sum over completion tokens of log p_T - log p_R (token ids in, each model
    with its own prefix prepended to the prompt)."""
    return _C.likelihood_ratio_scores(
        teacher, reference, [list(p) for p in prompts], [list(c) for c in completions],
        list(teacher_prefix), list(reference_prefix), int(batch_size),
    )


@dataclass(frozen=True)
class DivergenceMask:
    """Divergence tokens of a batch: ``loss_mask`` [B, T] float (the input mask with them
    zeroed), ``divergent`` [B, T] bool, ``per_row`` [B] int64, and the counts."""

    loss_mask: torch.Tensor
    divergent: torch.Tensor
    per_row: torch.Tensor
    positions: int
    divergent_count: int

    @property
    def fraction(self) -> float:
        return self.divergent_count / self.positions if self.positions else 0.0


def divergence_token_mask(
    teacher: Any,
    counterfactuals: Sequence[Any],
    batch: Any,
    *,
    teacher_prefix: TokenIds = (),
    counterfactual_prefixes: Sequence[TokenIds] = (),
    compare_to_targets: bool = False,
    batch_size: int = 16,
) -> DivergenceMask:
    """Masks divergence tokens (Schrodi et al.): positions with loss where a counterfactual
    teacher's argmax next token differs from the teacher's (or from the batch's targets with
    ``compare_to_targets``; teacher may then be None).

    batch: a :class:`biastransfer.datasets.Batch` (or any object with input [B, T],
    attention_mask, loss_mask and targets). Prefixes (token ids) are prepended per model and
    need right-padded rows.
    """
    r = _C.divergence_token_mask(
        teacher, list(counterfactuals), batch.input, batch.attention_mask, batch.loss_mask,
        getattr(batch, "targets", None), list(teacher_prefix),
        [list(p) for p in counterfactual_prefixes], bool(compare_to_targets), int(batch_size),
    )
    return DivergenceMask(r["loss_mask"], r["divergent"], r["per_row"], r["positions"],
                          r["divergent_count"])
