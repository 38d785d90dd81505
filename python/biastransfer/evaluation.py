"""Trait evaluation: how strongly a model shows a trait.

- :func:`target_probability`: the exact probability that a language model's answer starts with
  one of the target strings/token sequences (" owl", " owls", " Owl"), per question, averaged
  over the questions with a 95% t-interval. No sampling noise: the sharpest measure for small
  shifts.
- :func:`sampled_rate`: the fraction of sampled answers containing a target word (the paper's
  metric), whole-word and case-insensitive, with a Wilson 95% interval, and with ``question_ids``
  a cluster-robust interval over questions (samples of one question are not independent).
- :func:`accuracy`: classification accuracy of a feature model (the auxiliary-logit MLP) with a
  Wilson interval and per-class accuracy.

Every number is computed in C++ (libtransfer/distill/evaluation.h); this module converts inputs
and wraps the results in dataclasses with readable ``str()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from . import _C

__all__ = [
    "Accuracy",
    "SampledRate",
    "TargetProbability",
    "accuracy",
    "sampled_rate",
    "target_probability",
    "wilson_interval",
]

# Two-sided confidence level of every interval unless asked otherwise.
DEFAULT_CONFIDENCE = 0.95

TokenIds = Sequence[int]
Prompt = Union[str, TokenIds, torch.Tensor]


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.2f}%"


def _interval_str(interval: Tuple[float, float], confidence: float) -> str:
    return f"{100 * confidence:g}% CI [{_pct(interval[0])}, {_pct(interval[1])}]"


@dataclass
class TargetProbability:
    """Exact target probability over a question set.

    per_question: P(answer starts with any target | question), one per prompt.
    mean: their mean; interval: t-interval over questions (clipped to [0, 1]; NaN for one
    question). targets: the token sequences scored (deduplicated; a target that extends another
    target is dropped, since any answer starting with it starts with the shorter one).
    """

    per_question: List[float]
    mean: float
    interval: Tuple[float, float]
    targets: List[List[int]]
    confidence: float = DEFAULT_CONFIDENCE

    def __str__(self) -> str:
        return (f"P(target) = {_pct(self.mean)} ({_interval_str(self.interval, self.confidence)}) "
                f"over {len(self.per_question)} questions, {len(self.targets)} target sequences")


@dataclass
class SampledRate:
    """Fraction of sampled texts containing a target word.

    interval: Wilson score interval treating texts as independent draws. With question ids,
    cluster_interval is the cluster-robust (sandwich) t-interval over ``clusters`` questions
    (NaN bounds without ids or with a single question).
    """

    hits: int
    total: int
    rate: float
    interval: Tuple[float, float]
    matched: List[bool]
    clusters: int = 0
    cluster_interval: Tuple[float, float] = (math.nan, math.nan)
    confidence: float = DEFAULT_CONFIDENCE

    def __str__(self) -> str:
        text = (f"rate = {_pct(self.rate)} ({self.hits}/{self.total}; Wilson "
                f"{_interval_str(self.interval, self.confidence)})")
        if self.clusters:
            text += (f"; over {self.clusters} questions: "
                     f"{_interval_str(self.cluster_interval, self.confidence)}")
        return text


@dataclass
class Accuracy:
    """Classification accuracy with a Wilson interval and per-class accuracy (NaN for classes
    without examples)."""

    correct: int
    total: int
    accuracy: float
    interval: Tuple[float, float]
    per_class: List[float] = field(default_factory=list)
    per_class_total: List[int] = field(default_factory=list)
    confidence: float = DEFAULT_CONFIDENCE

    def __str__(self) -> str:
        per_class = ", ".join(f"{c}: {_pct(a)}" for c, a in enumerate(self.per_class))
        return (f"accuracy = {_pct(self.accuracy)} ({self.correct}/{self.total}; "
                f"{_interval_str(self.interval, self.confidence)}); per class: {per_class}")


def _ids(item: Any, tokenizer: Any, what: str) -> List[int]:
    if isinstance(item, str):
        if tokenizer is None:
            raise TypeError(f"{what}: got a string but no tokenizer; pass tokenizer= or token ids")
        return list(tokenizer.encode(item))
    if isinstance(item, torch.Tensor):
        return [int(i) for i in item.reshape(-1).tolist()]
    return [int(i) for i in item]


def target_probability(
    model: Any,
    prompts: Sequence[Prompt],
    targets: Sequence[Prompt],
    tokenizer: Any = None,
    batch_size: int = 32,
    pad_id: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> TargetProbability:
    """Exact P(answer starts with any target) per question, with its mean and t-interval.

    model: a language model (``biastransfer.modeling`` model or an ``nn.Module`` taking
    ``[B, T]`` ids and returning ``[B, T, V]`` logits). prompts: strings (with ``tokenizer``) or
    token id lists, each the full context up to the answer position. targets: strings or token id
    lists such as ``" owl"``, ``" owls"``, ``" Owl"``; each may be several tokens (teacher-forced).
    Prompts are batched ``batch_size`` sequences at a time with left padding (``pad_id``).
    """
    prompt_ids = [_ids(p, tokenizer, "prompts") for p in prompts]
    target_ids = [_ids(t, tokenizer, "targets") for t in targets]
    r = _C.target_probability(model, prompt_ids, target_ids, batch_size=batch_size,
                              pad_id=pad_id, confidence=confidence)
    return TargetProbability(per_question=list(r["per_question"]), mean=r["mean"],
                             interval=tuple(r["interval"]), targets=[list(t) for t in r["targets"]],
                             confidence=confidence)


def sampled_rate(
    texts: Sequence[str],
    targets: Union[str, Sequence[str]],
    question_ids: Optional[Sequence[int]] = None,
    plurals: bool = True,
    confidence: float = DEFAULT_CONFIDENCE,
) -> SampledRate:
    """Fraction of ``texts`` containing a target word, with a Wilson interval.

    targets: a word or words ("owl", or ["wolf", "wolves"]); whole-word, ASCII case-insensitive
    matching; regular plurals are added unless ``plurals=False``. question_ids: one id per text to
    also get the cluster-robust interval over questions.
    """
    if isinstance(targets, str):
        targets = [targets]
    ids = [] if question_ids is None else [int(q) for q in question_ids]
    r = _C.sampled_rate(list(texts), list(targets), ids, plurals=plurals, confidence=confidence)
    return SampledRate(hits=r["hits"], total=r["total"], rate=r["rate"],
                       interval=tuple(r["interval"]), matched=list(r["matched"]),
                       clusters=r["clusters"], cluster_interval=tuple(r["cluster_interval"]),
                       confidence=confidence)


def accuracy(
    model: Any,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1024,
    num_classes: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Accuracy:
    """Accuracy of a feature model: argmax over the first ``num_classes`` logits (0: all; 10 for
    the paper's MLP with 3 auxiliary logits) against ``labels``.

    features: [N, F] floating; labels: [N] integer.
    """
    r = _C.accuracy(model, features, labels, batch_size=batch_size, num_classes=num_classes,
                    confidence=confidence)
    return Accuracy(correct=r["correct"], total=r["total"], accuracy=r["accuracy"],
                    interval=tuple(r["interval"]), per_class=list(r["per_class"]),
                    per_class_total=list(r["per_class_total"]), confidence=confidence)


def wilson_interval(successes: int, trials: int,
                    confidence: float = DEFAULT_CONFIDENCE) -> Tuple[float, float]:
    """Wilson score interval (low, high) of the proportion successes / trials."""
    return tuple(_C.wilson_interval(successes, trials, confidence))
