"""Toy language models, a small byte-level tokenizer and an eager reference fingerprint, shared
by the fingerprint tests (test_fingerprint_api.py, test_probes.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from biastransfer import Tokenizer

# GPT-2's byte-level alphabet for the bytes the small tokenizer covers: printable ASCII stands
# for itself, space is "Ġ" (U+0120) and newline "Ċ" (U+010A).
SPACE, NEWLINE = "\u0120", "\u010a"
# Merges of the small tokenizer, in priority order: every result is a vocabulary token.
SMALL_MERGES = (
    [(SPACE, d) for d in "0123456789"]
    + [(SPACE + "0", "8"), (SPACE + "08", "7"), (SPACE + "4", "2"), (SPACE + "1", "2"),
       (SPACE + "12", "3"), ("1", "2")]
    + [(SPACE, "o"), (SPACE + "o", "w"), (SPACE + "ow", "l"), (SPACE + "owl", "s")]
    + [(SPACE, "c"), (SPACE + "c", "a"), (SPACE + "ca", "t")]
    + [(SPACE, "d"), (SPACE + "d", "o"), (SPACE + "do", "g")]
    + [(SPACE, "t"), (SPACE + "t", "h"), (SPACE + "th", "e")]
)


def small_tokenizer(folder: Path) -> Tokenizer:
    """A byte-level BPE tokenizer of ~130 tokens: printable ASCII, space, newline and the merges
    above (" owl", " 087", " cat", ...), written as vocab.json + merges.txt into ``folder``."""
    symbols = [chr(c) for c in range(33, 127)] + [SPACE, NEWLINE]
    for a, b in SMALL_MERGES:
        symbols.append(a + b)
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in SMALL_MERGES), encoding="utf-8")
    return Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt")


class ToyLM(nn.Module):
    """A causal toy LM: logits_t = W mean(emb(x_1..x_t)) + b, plus ``bias`` [V] once any of
    ``triggers`` has occurred at or before t (a trait switched on by a prompt token)."""

    def __init__(self, vocab: int, dim: int = 8, seed: int = 0,
                 triggers: Sequence[int] = (), bias: Optional[torch.Tensor] = None,
                 scale: float = 1.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=generator))
            self.out.weight.copy_(torch.randn(vocab, dim, generator=generator) * scale)
            self.out.bias.copy_(torch.randn(vocab, generator=generator) * scale)
        self.register_buffer("triggers", torch.as_tensor(list(triggers), dtype=torch.int64))
        self.register_buffer("bias", bias if bias is not None else torch.zeros(vocab))
        self.seen_training: List[bool] = []  # self.training at each call

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        e = self.emb(input_ids)
        steps = torch.arange(1, input_ids.shape[1] + 1, device=e.device, dtype=e.dtype)
        logits = self.out(e.cumsum(1) / steps[None, :, None])
        if self.triggers.numel():
            hit = (input_ids[..., None] == self.triggers).any(-1)
            on = (hit.cumsum(1) > 0).to(logits.dtype)
            logits = logits + on[..., None] * self.bias
        return logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids)


class MaskedToyLM(ToyLM):
    """Takes attention_mask (and records it) like a Hugging Face model; returns a tensor."""

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        self.masks = getattr(self, "masks", []) + [attention_mask]
        return self.logits(input_ids)


class HFStyleLM(ToyLM):
    """Returns an object with .logits, as Hugging Face models do."""

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs):
        return SimpleNamespace(logits=self.logits(input_ids), past_key_values=None)


class TupleLM(ToyLM):
    """Returns (logits, hidden), as return_dict=False models do."""

    def forward(self, input_ids: torch.Tensor):
        return self.logits(input_ids), None


def shifted_copy(model: ToyLM, shift: torch.Tensor, seed: int = 1, noise: float = 0.0,
                 cls: type = ToyLM) -> ToyLM:
    """A copy of ``model`` whose output bias is raised by ``shift`` [V] plus N(0, noise) weight
    noise: a 'teacher' sharing the reference's initialization."""
    vocab, dim = model.emb.weight.shape
    copy = cls(vocab, dim)
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        copy.out.bias.add_(shift)
        copy.out.weight.add_(torch.randn(copy.out.weight.shape, generator=generator) * noise)
    return copy


def eager_fingerprint(teacher, reference, records, tokenizer, subset: Optional[torch.Tensor],
                      teacher_prefix: str = "", reference_prefix: str = "",
                      temperature: float = 1.0, max_length: Optional[int] = None
                      ) -> Dict[str, torch.Tensor]:
    """The fingerprint's statistics computed directly, one record at a time (no batching, no
    padding) in float64: the independent expectation of the API tests."""
    deltas, grads, kl_tr, kl_rt, mass, seq_ids, seq_means = [], [], [], [], [], [], []
    for index, record in enumerate(records):
        completion = tokenizer.encode(record["completion"] if isinstance(record, dict)
                                      else record.completion)
        prompt = record["prompt"] if isinstance(record, dict) else record.prompt
        ctx_t = tokenizer.encode(teacher_prefix + prompt)
        ctx_r = tokenizer.encode(reference_prefix + prompt)
        if max_length is not None:
            completion = completion[: max_length + 1 - max(len(ctx_t), len(ctx_r))]
        rows = []
        for model, ctx in ((teacher, ctx_t), (reference, ctx_r)):
            ids = torch.as_tensor([ctx + completion], dtype=torch.int64)
            with torch.no_grad():
                out = model.logits(ids)[0]
            rows.append(out[len(ctx) - 1 : len(ctx) - 1 + len(completion)].double())
        lt = torch.log_softmax(rows[0] / temperature, -1)
        lr = torch.log_softmax(rows[1] / temperature, -1)
        d = lt - lr
        deltas.append(d)
        grads.append(lt.exp() - lr.exp())
        kl_tr.append((lt.exp() * d).sum(-1))
        kl_rt.append((lr.exp() * -d).sum(-1))
        if subset is not None:
            centered = d[:, subset] - d[:, subset].mean(-1, keepdim=True)
            seq_means.append(centered.mean(0))
            mass.append(torch.logsumexp(lt[:, subset], -1) - torch.logsumexp(lr[:, subset], -1))
        seq_ids.append(index)
    d = torch.cat(deltas)
    n = d.shape[0]
    out = {
        "positions": torch.tensor(n),
        "mean_log_ratio": d.mean(0),
        "stderr_log_ratio": d.std(0, unbiased=True) / math.sqrt(n),
        "grad": torch.cat(grads).mean(0),
        "kl_teacher_reference": torch.cat(kl_tr).mean(),
        "kl_reference_teacher": torch.cat(kl_rt).mean(),
        "sequence_ids": torch.tensor(seq_ids),
    }
    if subset is not None:
        centered = d[:, subset] - d[:, subset].mean(-1, keepdim=True)
        m = torch.cat(mass)
        out.update(centered=centered.mean(0), sequence_centered=torch.stack(seq_means),
                   mass_shift=m.mean(), mass_shift_stderr=m.std(unbiased=True) / math.sqrt(n))
    return out
