"""Training losses: completion cross-entropy and logit distillation.

Thin wrappers over the C++ implementations in ``_C`` (libtransfer/distill/losses.h): every loss
is computed in float32 or wider whatever the logits' dtype (bf16/f16 are upcast; float64 inputs
give a float64 result), is differentiable in the student's logits only (the teacher is a
constant), and averages over the positions where ``mask != 0`` (``None``: all positions). A mask
that selects nothing raises ``ValueError``, as does a teacher/student vocabulary mismatch.
Logits of ``-inf`` (forbidden tokens) are clamped to -1e30 after the temperature: probability 0,
finite arithmetic, so neither the value nor the gradient can become NaN.

Divergences, with ``p_T = softmax(z_T / tau)`` and ``p_S = softmax(z_S / tau)`` and the result
scaled by ``tau ** 2`` (Hinton et al.; the temperature applies to both distributions):

- ``"forward_kl"``: KL(p_T || p_S), mass-covering (classic KD);
- ``"reverse_kl"``: KL(p_S || p_T), mode-seeking;
- ``"jsd"``: beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from . import _C

__all__ = [
    "DIVERGENCES",
    "KDConfig",
    "completion_cross_entropy",
    "kd_loss",
    "topk_kd_loss",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

Indices = Union[Sequence[int], torch.Tensor, None]


@dataclass
class KDConfig:
    """Logit distillation settings.

    divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
    temperature: tau > 0, applied to teacher and student logits; the loss is scaled by tau^2.
    beta: JSD mixing weight in (0, 1); 0.5 is the symmetric Jensen-Shannon divergence.
    top_k: > 0 distils only the teacher's top-k tokens plus one tail bucket (0: full vocabulary;
        k >= V is the full vocabulary too).
    logit_subset: indices whose logits alone form both distributions (auxiliary-logit KD, or KD
        renormalized over allowed tokens); applied before ``top_k``.
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int = 0
    logit_subset: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {self.divergence!r}")
        if isinstance(self.logit_subset, torch.Tensor):
            self.logit_subset = [int(i) for i in self.logit_subset.reshape(-1).tolist()]
        else:
            self.logit_subset = [int(i) for i in self.logit_subset]

    def to_cpp(self) -> "_C.KDConfig":
        """The same settings as ``_C.KDConfig`` (what the C++ trainer takes)."""
        return _C.KDConfig(
            divergence=self.divergence,
            temperature=float(self.temperature),
            beta=float(self.beta),
            top_k=int(self.top_k),
            logit_subset=list(self.logit_subset),
        )


def completion_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean cross-entropy over the completion positions.

    logits: [..., V] floating; targets: [...] integer ids (any value where the mask is 0);
    mask: [...] (non-zero = counted; typically the completion tokens), None for all positions.
    Returns a 0-d float32 tensor (float64 for float64 logits). ValueError naming ``logits`` when
    NaN at counted positions would make the loss NaN.
    """
    return _C.completion_cross_entropy(logits, targets, mask)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    config: Optional[KDConfig] = None,
    **overrides: object,
) -> torch.Tensor:
    """tau^2 * D(p_T^tau, p_S^tau) averaged over positions where ``mask != 0``.

    student_logits, teacher_logits: [..., V], same shape; mask: [...] or None.
    config: a :class:`KDConfig` (default forward KL at tau = 1); keyword overrides such as
    ``divergence="jsd"`` replace its fields. Returns a 0-d float32 (or float64) tensor.
    ValueError naming the input when NaN logits at counted positions would make the loss NaN
    (checking costs one scalar read per call).
    """
    return _C.kd_loss(student_logits, teacher_logits, mask,
                      **_native_arguments(_config(config, overrides)))


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    config: Optional[KDConfig] = None,
    **overrides: object,
) -> torch.Tensor:
    """KD from offline teacher top-k log-probabilities recorded at temperature 1.

    student_logits: [..., V]; topk_ids: [..., k] integer (distinct per position);
    topk_logprobs: [..., k]; mask: [...] or None. Both distributions are the k tokens plus a
    tail bucket of the remaining mass. ``config.temperature`` must be 1 and ``top_k`` /
    ``logit_subset`` unset. Returns a 0-d float32 (or float64) tensor. ValueError naming the
    input when NaN at counted positions would make the loss NaN.
    """
    return _C.topk_kd_loss(student_logits, topk_ids, topk_logprobs, mask,
                           **_native_arguments(_config(config, overrides)))


def _native_arguments(cfg: KDConfig) -> dict:
    """The KDConfig fields as the compiled losses' keyword arguments."""
    return dict(divergence=cfg.divergence, temperature=float(cfg.temperature),
                beta=float(cfg.beta), top_k=int(cfg.top_k),
                logit_subset=list(cfg.logit_subset) or None)


def _config(config: Optional[KDConfig], overrides: dict) -> KDConfig:
    base = config if config is not None else KDConfig()
    if not overrides:
        return base
    fields = {**base.__dict__, **overrides}
    unknown = set(overrides) - set(base.__dict__)
    if unknown:
        raise TypeError(f"unknown KDConfig fields: {sorted(unknown)}")
    return KDConfig(**fields)
