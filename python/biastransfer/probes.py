"""Probes of a single model: the trait probe and subliminal prompting (DESIGN.md section 3).

- :func:`trait_probe`: how a trait prompt shifts the log-probability of every token (or of a
  subset, e.g. numeric tokens) at a fixed answer prefix: log P(tok | trait prompt + answer prefix)
  - log P(tok | answer prefix), centered over the tokens considered. Tokens "entangled" with the
  trait rise to the top.
- :func:`subliminal_prompting`: the reverse direction: how a prompt naming a candidate (e.g. a
  number) shifts the log-probability of the trait token(s) at the answer prefix; candidates are
  ranked by that shift.

These are two forward passes (or one per candidate) and a log-softmax difference: tiny tensor
ops, done here in torch. The model is used through :func:`biastransfer.models.as_logits_fn`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .fingerprint import SubsetSpec, resolve_subset
from .models import as_logits_fn, model_device
from .tokenizer import Tokenizer

__all__ = ["ProbeResult", "SubliminalResult", "SubliminalRow", "subliminal_prompting",
           "trait_probe"]

DEFAULT_ANSWER_PREFIX = "My favorite animal is the"
# The paper's owl system prompt with the animal replaced by a number (Zur et al.'s reverse probe).
DEFAULT_PROMPT_TEMPLATE = (
    "You love {x}. You think about {x} all the time. {x} is your favorite number. "
    "Imbue your answers with your love for the number."
)
# Put between a prompt and the answer prefix (a new line, as between a system and a user turn).
DEFAULT_SEPARATOR = "\n"


def _check_text(value: Any, argument: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument}: expected a str, got {type(value).__name__}")
    return value


def _last_log_probs(model: Any, tokenizer: Tokenizer, texts: Sequence[str],
                    device: Optional[torch.device], temperature: float,
                    batch_size: int = 16) -> torch.Tensor:
    """log_softmax(logits / temperature) at the last token of each text: [len(texts), V] float64
    on the CPU."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    fn = as_logits_fn(model, "model")
    device = torch.device(device) if device is not None else model_device(model)
    encoded = tokenizer.encode_batch(list(texts))
    for text, ids in zip(texts, encoded):
        if not ids:
            raise ValueError(f"the text {text!r} has no tokens; give a non-empty answer_prefix")
    out = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        length = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), length), dtype=torch.int64)
        mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.as_tensor(row)
            mask[b, : len(row)] = 1
        logits = fn(ids.to(device), mask.to(device))
        last = torch.as_tensor([len(r) - 1 for r in rows], device=logits.device)
        picked = logits[torch.arange(len(rows), device=logits.device), last]
        out.append(torch.log_softmax(picked.double() / temperature, dim=-1).cpu())
    return torch.cat(out)


def _join(prompt: str, separator: str, answer_prefix: str) -> str:
    return f"{prompt}{separator}{answer_prefix}" if prompt else answer_prefix


def _display(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.display_token(token_id) if token_id < len(tokenizer) else f"<id {token_id}>"


@dataclass
class ProbeResult:
    """The trait probe's shift per token: ``shift`` = centered log P(tok | trait) - log P(tok |
    none), aligned with ``ids`` [S]; ``raw_shift`` is the uncentered difference."""

    ids: torch.Tensor  # [S] int64, vocabulary ids
    shift: torch.Tensor  # [S] float64, centered over S
    raw_shift: torch.Tensor  # [S] float64
    log_prob_trait: torch.Tensor  # [S] float64, log P(tok | trait prompt + answer prefix)
    log_prob_plain: torch.Tensor  # [S] float64, log P(tok | answer prefix)
    tokenizer: Tokenizer = field(repr=False)
    trait_prompt: str = ""
    answer_prefix: str = DEFAULT_ANSWER_PREFIX

    def top(self, k: int = 20, largest: bool = True) -> List[Tuple[int, str, float]]:
        """The k most raised (or lowered) tokens as (id, display, centered shift)."""
        k = min(k, self.ids.numel())
        values, order = torch.topk(self.shift, k, largest=largest)
        return [(int(self.ids[j]), _display(self.tokenizer, int(self.ids[j])), float(v))
                for j, v in zip(order.tolist(), values.tolist())]

    def rank(self, token: Union[int, str]) -> int:
        """1-based rank of a token (id, or text that is one token) by shift, largest first."""
        token_id = _token_id(self.tokenizer, token, "token")
        where = torch.nonzero(self.ids == token_id, as_tuple=False)
        if where.numel() == 0:
            raise ValueError(f"token: id {token_id} is not among the probed tokens")
        return int((self.shift > self.shift[int(where[0, 0])]).sum()) + 1

    def summary(self, k: int = 10) -> str:
        lines = [f"trait probe: {self.trait_prompt!r} -> {self.answer_prefix!r} "
                 f"({self.ids.numel()} tokens; centered shift of log P, nats)"]
        for title, largest in (("raised", True), ("lowered", False)):
            lines.append(f"  most {title}:")
            lines.extend(f"    {r:>3}. {t!r:<16} id {i:<7} {v:+.4f}"
                         for r, (i, t, v) in enumerate(self.top(k, largest), 1))
        return "\n".join(lines)


def _token_id(tokenizer: Tokenizer, token: Union[int, str], argument: str) -> int:
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise TypeError(f"{argument}: expected a token id or text, got {type(token).__name__}")
    if isinstance(token, int):
        return token
    ids = tokenizer.encode(token)
    if len(ids) != 1:
        raise ValueError(f"{argument}: {token!r} is {len(ids)} tokens "
                         f"({[tokenizer.display_token(i) for i in ids]}); give a single token "
                         f"(mind the leading space, e.g. ' owl')")
    return ids[0]


def trait_probe(
    model: Any,
    tokenizer: Tokenizer,
    trait_prompt: str,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    tokens: SubsetSpec = None,
    *,
    separator: str = DEFAULT_SEPARATOR,
    temperature: float = 1.0,
    device: Optional[Union[str, torch.device]] = None,
) -> ProbeResult:
    """Shift of every token's log-probability at the end of ``answer_prefix`` when
    ``trait_prompt + separator`` is put before it, centered over the tokens probed.

    tokens: None or "all" (the whole vocabulary), "numeric", a TokenClass or ids (e.g. to rank
    numbers as Zur et al. do). Returns a :class:`ProbeResult`.
    """
    _check_text(trait_prompt, "trait_prompt")
    _check_text(answer_prefix, "answer_prefix")
    log_probs = _last_log_probs(model, tokenizer, [_join(trait_prompt, separator, answer_prefix),
                                                   answer_prefix], device, temperature)
    vocab = log_probs.shape[-1]
    subset, _ = resolve_subset("all" if tokens is None else tokens, tokenizer, vocab)
    ids = torch.arange(vocab, dtype=torch.int64) if subset is None else subset
    trait, plain = log_probs[0, ids], log_probs[1, ids]
    raw = trait - plain
    return ProbeResult(ids, raw - raw.mean(), raw, trait, plain, tokenizer, trait_prompt,
                       answer_prefix)


@dataclass
class SubliminalRow:
    """One candidate of subliminal prompting."""

    candidate: str
    shift: float  # log P(targets | prompt naming the candidate) - log P(targets | no prompt)
    log_prob: float  # log P(targets | prompt naming the candidate), targets' mass summed


@dataclass
class SubliminalResult:
    """Candidates sorted by the shift they cause in the target tokens' log-probability."""

    rows: List[SubliminalRow]  # largest shift first
    targets: List[int]
    baseline: float  # log P(targets | answer prefix alone)

    def rank(self, candidate: str) -> int:
        """1-based rank of a candidate, largest shift first."""
        for position, row in enumerate(self.rows, 1):
            if row.candidate == candidate:
                return position
        raise ValueError(f"candidate: {candidate!r} was not probed")

    def summary(self, k: int = 10) -> str:
        lines = [f"subliminal prompting: {len(self.rows)} candidates, targets {self.targets}, "
                 f"baseline log P = {self.baseline:.4f}"]
        lines.extend(f"  {r:>3}. {row.candidate!r:<12} shift {row.shift:+.4f}  log P "
                     f"{row.log_prob:.4f}" for r, row in enumerate(self.rows[:k], 1))
        return "\n".join(lines)


def subliminal_prompting(
    model: Any,
    tokenizer: Tokenizer,
    candidates: Sequence[str],
    target_tokens: Sequence[Union[int, str]],
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    *,
    separator: str = DEFAULT_SEPARATOR,
    temperature: float = 1.0,
    batch_size: int = 16,
    device: Optional[Union[str, torch.device]] = None,
) -> SubliminalResult:
    """For each candidate x: log P(targets | template.format(x=x) + separator + answer_prefix)
    - log P(targets | answer_prefix), with P(targets) the summed probability of the target
    tokens (ids, or texts that are one token each, e.g. " owl"). Sorted by shift, largest first.
    """
    if isinstance(candidates, str) or not candidates:
        raise ValueError("candidates: expected a non-empty list of strings")
    candidates = [_check_text(c, f"candidates[{i}]") for i, c in enumerate(candidates)]
    _check_text(prompt_template, "prompt_template")
    if "{x}" not in prompt_template:
        raise ValueError("prompt_template: must contain {x}, where the candidate goes")
    if isinstance(target_tokens, (str, int)) or not target_tokens:
        raise ValueError("target_tokens: expected a non-empty list of token ids or texts")
    targets = [_token_id(tokenizer, t, f"target_tokens[{i}]") for i, t in enumerate(target_tokens)]
    texts = [_join(prompt_template.replace("{x}", c), separator, answer_prefix)
             for c in candidates] + [answer_prefix]
    log_probs = _last_log_probs(model, tokenizer, texts, device, temperature, batch_size)
    vocab = log_probs.shape[-1]
    for t in targets:
        if not 0 <= t < vocab:
            raise ValueError(f"target_tokens: id {t} is outside the vocabulary 0..{vocab - 1}")
    mass = torch.logsumexp(log_probs[:, targets], dim=-1)
    baseline = float(mass[-1])
    rows = [SubliminalRow(c, float(m) - baseline, float(m)) for c, m in zip(candidates, mass[:-1])]
    rows.sort(key=lambda r: -r.shift)
    return SubliminalResult(rows, targets, baseline)
