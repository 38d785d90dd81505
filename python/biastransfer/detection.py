"""Shared-initialization detection (pillar 3): the assignment solvers that match the units of two
layers (``libtransfer/detect/linear_assignment.h``) and the weight test built on them
(:func:`weight_test`, :func:`permutation_test`; ``libtransfer/detect/weight_test.h``).

``linear_sum_assignment`` mirrors :func:`scipy.optimize.linear_sum_assignment`: same signature,
same return convention (two int64 numpy arrays, rows sorted ascending), the same optimum.
``greedy_assignment`` is the faster approximation for very wide layers (see its docstring).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _C

__all__ = [
    "LayerEvidence",
    "UnitGroup",
    "WeightTestResult",
    "agreement_test",
    "greedy_assignment",
    "linear_sum_assignment",
    "permutation_test",
    "weight_groups",
    "weight_test",
]

ArrayLike = Union[torch.Tensor, np.ndarray, list]


def _as_tensor(cost: ArrayLike) -> torch.Tensor:
    if isinstance(cost, torch.Tensor):
        return cost
    return torch.as_tensor(np.asarray(cost))


def linear_sum_assignment(cost: ArrayLike, maximize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The optimal assignment of the cost matrix ``cost`` [n, m] (any orientation).

    Returns ``(row_ind, col_ind)``: int64 arrays of length min(n, m), ``row_ind`` sorted, such that
    ``cost[row_ind, col_ind].sum()`` is minimal (maximal with ``maximize=True``). ``cost`` is a
    floating tensor or array (float32 inputs are solved in float64), on any device. When
    minimizing, ``+inf`` forbids a pair (``-inf`` when maximizing); NaN and the other infinity
    raise ``ValueError``, as does a matrix whose forbidden pairs leave no complete assignment.
    Integer dtypes raise ``TypeError`` (cast to float first).
    """
    rows, cols, _ = _C.linear_sum_assignment(_as_tensor(cost), bool(maximize))
    return rows.numpy(), cols.numpy()


def greedy_assignment(cost: ArrayLike, maximize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """A greedy assignment of the finite cost matrix ``cost`` [n, m]: repeatedly pairs the best
    remaining entry whose row and column are both free (ties: smallest row, then column).

    Same return convention as :func:`linear_sum_assignment`. Equivariant under permutations of
    rows and columns (up to ties), so a valid matching for the weight test, and faster than the
    exact solver on wide matrices; its objective is never better than the optimum and equals it
    when one matching dominates (one clearly best entry per row and column).
    """
    rows, cols, _ = _C.greedy_assignment(_as_tensor(cost), bool(maximize))
    return rows.numpy(), cols.numpy()


# ---------------------------------------------------------------------------------------------
# The weight test (libtransfer/detect/weight_test.h): is model B a descendant of model A's
# initialization? Everything is computed in C++; this part resolves models into tensors or files
# and turns the results into dataclasses.
# ---------------------------------------------------------------------------------------------

ModelLike = Any  # nn.Module, Mapping[str, Tensor], object with state_dict(), path(s)

# The Hugging Face config.json keys that give the number of query heads.
_HF_HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads")


@dataclass
class UnitGroup:
    """Tensors sharing one hidden index, for models whose layout is not detected.

    ``members``: ``(tensor name, axis)`` pairs; unit ``u`` owns the slice ``[u*s, (u+1)*s)`` of
    ``axis``, ``s = size(axis) / units``. ``units=None`` means the first member's axis size.
    Example (a two-layer MLP ``fc1`` -> ``fc2``): ``UnitGroup("hidden", [("fc1.weight", 0),
    ("fc1.bias", 0), ("fc2.weight", 1)])``; attention heads: ``units=n_heads`` with q/k/v rows
    (axis 0) and o columns (axis 1).
    """

    name: str
    members: List[Tuple[str, int]]
    units: Optional[int] = None
    kind: str = "custom"

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "units": self.units or 0,
                "members": [(str(t), int(a)) for t, a in self.members]}


@dataclass
class LayerEvidence:
    """One unit group's evidence: ``units`` matched, the ``statistic`` (fixed points, Spearman
    rho, ...), its one-sided p-value as ``log10_p`` (``p_value`` = 10**log10_p), the fraction of
    units matched to themselves, and a ``note`` (why a group was skipped, how p was computed)."""

    name: str
    kind: str
    units: int
    statistic: float
    statistic_name: str
    log10_p: float
    matched_fraction: float
    note: str = ""

    @property
    def p_value(self) -> float:
        return 10.0 ** self.log10_p

    @property
    def skipped(self) -> bool:
        return self.note.startswith("skipped")


@dataclass
class WeightTestResult:
    """The result of :func:`weight_test` or :func:`permutation_test`: the combined ``log10_p``
    (Fisher over groups for the weight test), how it was computed (``method``) and the per-group
    table ``layers``. ``p_value`` underflows to 0 for very strong evidence; read ``log10_p``."""

    test: str
    ran: bool
    statistic: float
    statistic_name: str
    log10_p: float
    method: str
    layers: List[LayerEvidence] = field(default_factory=list)
    skipped_reason: str = ""

    @property
    def p_value(self) -> float:
        return 10.0 ** self.log10_p

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["p_value"] = self.p_value
        return out

    @classmethod
    def _from_c(cls, d: Mapping[str, Any]) -> "WeightTestResult":
        layers = [LayerEvidence(**layer) for layer in d["layers"]]
        return cls(test=d["test"], ran=d["ran"], statistic=d["statistic"],
                   statistic_name=d["statistic_name"], log10_p=d["log10_p"], method=d["method"],
                   layers=layers, skipped_reason=d["skipped_reason"])

    def __str__(self) -> str:
        lines = [f"{self.test}: log10 p = {self.log10_p:.2f} ({self.method})",
                 f"{'group':<40}{'kind':<17}{'units':>7}{'statistic':>11}{'log10 p':>10}"
                 f"{'matched':>9}  note"]
        for e in self.layers:
            lines.append(f"{e.name:<40}{e.kind:<17}{e.units:>7}{e.statistic:>11.4g}"
                         f"{e.log10_p:>10.2f}{e.matched_fraction:>9.1%}  {e.note}")
        return "\n".join(lines)


def _heads_from_config(config: Any) -> Optional[int]:
    for key in _HF_HEAD_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _safetensors_files(path: Union[str, "os.PathLike[str]"]) -> Tuple[List[str], Dict[str, str]]:
    """A file, or a directory of *.safetensors shards (with an optional HF config.json)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    files = sorted(str(f) for f in p.glob("*.safetensors")) if p.is_dir() else [str(p)]
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files in this directory")
    metadata: Dict[str, str] = {}
    config = folder / "config.json"
    if config.is_file():
        try:
            heads = _heads_from_config(json.loads(config.read_text()))
        except (OSError, ValueError):
            heads = None
        if heads:
            metadata["num_attention_heads"] = str(heads)
    return files, metadata


def _resolve(model: ModelLike, argument: str) -> Tuple[Any, Dict[str, str]]:
    """(dict of tensors | list of safetensors paths, metadata) for a model-like object."""
    if isinstance(model, (str, os.PathLike)):
        return _safetensors_files(model)
    if isinstance(model, (list, tuple)) and model and all(
            isinstance(p, (str, os.PathLike)) for p in model):
        return [str(p) for p in model], {}
    metadata: Dict[str, str] = {}
    if isinstance(model, Mapping):
        state = model
    elif callable(getattr(model, "state_dict", None)):
        state = model.state_dict()
        heads = _heads_from_config(getattr(model, "config", None) or {})
        if heads:
            metadata["num_attention_heads"] = str(heads)
        meta_fn = getattr(model, "metadata", None)
        if callable(meta_fn):
            try:
                metadata.update({str(k): str(v) for k, v in dict(meta_fn()).items()})
            except Exception:  # metadata is a convenience; its absence never blocks the test
                pass
    else:
        raise TypeError(f"{argument}: expected an nn.Module, a state dict, an object with "
                        f"state_dict(), or safetensors path(s); got {type(model).__name__}")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, metadata


def _groups_arg(groups: Optional[Sequence[Union[UnitGroup, Mapping[str, Any]]]]):
    if groups is None:
        return None
    out = []
    for g in groups:
        if isinstance(g, UnitGroup):
            out.append(g.to_dict())
        elif isinstance(g, Mapping):
            out.append(UnitGroup(name=g.get("name", ""), members=list(g["members"]),
                                 units=g.get("units"), kind=g.get("kind", "custom")).to_dict())
        else:
            raise TypeError(f"groups: expected UnitGroup or dict items, got {type(g).__name__}")
    return out


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    names = {torch.float32: "float32", torch.float64: "float64", "float32": "float32",
             "float64": "float64"}
    if dtype not in names:
        raise ValueError(f"compute_dtype: expected torch.float32 or torch.float64, got {dtype}")
    return names[dtype]


def weight_test(a: ModelLike, b: ModelLike, *, mapping: Optional[Mapping[str, str]] = None,
                groups: Optional[Sequence[Union[UnitGroup, Mapping[str, Any]]]] = None,
                statistic: str = "fixed_points", robust: bool = False,
                align_embeddings: bool = False, n_heads: Optional[int] = None,
                solver: str = "auto", auto_exact_max_units: int = 4096,
                compute_dtype: Union[str, torch.dtype] = torch.float32,
                device: Optional[Union[str, torch.device]] = None) -> WeightTestResult:
    """Weight test of shared initialization between models ``a`` and ``b``.

    ``a``/``b``: nn.Modules, state dicts, our bound models (anything with ``state_dict()``), or
    safetensors paths (a file, a list of shard files, or a directory of shards; a ``config.json``
    beside them supplies the head count). Files are read lazily, one unit group at a time.

    For every group of hidden units (detected: our MLP and TransformerLM, HF Llama/Mistral/Qwen
    names, plain ``nn.Sequential`` MLPs; or ``groups``), units are row-normalized, matched by the
    assignment maximizing the summed cosine (``solver``: "auto" = exact up to
    ``auto_exact_max_units`` units per matching and greedy above, or "exact" / "greedy"; each
    row's note says which ran), and the matching pi is compared with the identity:
    ``statistic="fixed_points"`` (p = min(1, 1/K!), exact and conservative) or ``"spearman"``
    (one-sided). Groups are combined with Fisher's method.

    ``statistic="agreement"`` survives copies whose hidden units were permuted: per group, two
    matchings from independently initialized halves of each unit (MLP chains: the forward
    matching of the in-rows vs the backward matching of the out-columns; GLU blocks: gate rows vs
    up rows; heads: q,k rows vs v rows and o columns) and K = #agreements, p = P(K >= k) for a
    uniform permutation. Exact at initialization only: after training, independently trained
    models learn similar units and K grows (docs/detection.md gives measured false-positive
    rates), so ``method`` starts with "approximate null: " and reports do not combine it.
    ``robust=True`` adds the agreement rows to an identity statistic; the combined p is then
    Bonferroni over the two Fisher p-values (also marked approximate).

    ``mapping``: {name in a: name in b} for renamed tensors. ``n_heads``: query heads of a
    transformer when neither metadata nor a config gives it (else attention is skipped with a
    note). ``align_embeddings``: first match the embedding columns and permute b's residual
    stream accordingly (for copies whose residual basis was permuted).
    """
    state_a, meta_a = _resolve(a, "a")
    state_b, meta_b = _resolve(b, "b")
    result = _C.weight_test(
        state_a, state_b, mapping=dict(mapping or {}), groups=_groups_arg(groups),
        statistic=statistic, align_embeddings=bool(align_embeddings), n_heads=int(n_heads or 0),
        solver=solver, compute_dtype=_dtype_name(compute_dtype),
        device=None if device is None else str(device), metadata_a=meta_a, metadata_b=meta_b,
        robust=bool(robust), auto_exact_max_units=int(auto_exact_max_units))
    return WeightTestResult._from_c(result)


def agreement_test(a: ModelLike, b: ModelLike, controls: Sequence[ModelLike], *,
                   mapping: Optional[Mapping[str, str]] = None, n_heads: Optional[int] = None,
                   align_embeddings: bool = False, solver: str = "auto") -> WeightTestResult:
    """The agreement statistic calibrated by ``controls``: finds copies of ``a`` whose hidden
    units (and residual basis, with ``align_embeddings``) were permuted.

    ``controls``: models trained like ``b`` from initializations independent of ``a``'s (same
    forms as ``a``/``b``). Per control, Fisher's X over the agreement rows of (a, control) is
    one draw of the null; p = (1 + #{X_control >= X}) / (1 + n), so rejecting at ``alpha`` needs
    at least 1/alpha - 1 controls. ``test`` is "weights_agreement"; ``layers`` are (a, b)'s
    agreement rows with their initialization-time p-values (approximate after training).
    """
    if not controls:
        raise ValueError("controls: the agreement test needs at least one control model")
    state_a, meta_a = _resolve(a, "a")
    state_b, meta_b = _resolve(b, "b")
    resolved = [_resolve(c, f"controls[{i}]") for i, c in enumerate(controls)]
    result = _C.weight_agreement_test(
        state_a, state_b, [r[0] for r in resolved], mapping=dict(mapping or {}),
        n_heads=int(n_heads or 0), align_embeddings=bool(align_embeddings), solver=solver,
        metadata_a=meta_a, metadata_b=meta_b, metadata_controls=[r[1] for r in resolved])
    return WeightTestResult._from_c(result)


StateStatistic = Callable[[Dict[str, torch.Tensor], Dict[str, torch.Tensor]], float]


def permutation_test(a: ModelLike, b: ModelLike,
                     statistic: Union[str, StateStatistic] = "identity_cosine",
                     n_permutations: int = 999, seed: int = 0, *,
                     mapping: Optional[Mapping[str, str]] = None,
                     groups: Optional[Sequence[Union[UnitGroup, Mapping[str, Any]]]] = None,
                     n_heads: Optional[int] = None, solver: str = "auto",
                     auto_exact_max_units: int = 4096,
                     compute_dtype: Union[str, torch.dtype] = torch.float32,
                     device: Optional[Union[str, torch.device]] = None) -> WeightTestResult:
    """Exact permutation test (PERMTEST): p = (1 + #{phi(sigma a, b) >= phi(a, b)}) / (T + 1).

    sigma permutes the hidden units of ``a`` in every group consistently, uniformly at random
    (``seed``; same seed, same p). ``statistic``: "identity_cosine" (mean cosine of identically
    indexed units; cheap), "matched_similarity" (mean cosine of the optimal matching; one
    assignment per group and permutation), or any callable ``phi(a_state, b_state) -> float``
    on two dicts of tensors (b's tensors under a's names; larger = more alike). Built-in
    statistics also give a per-group table. Valid under the same assumptions as
    :func:`weight_test`; the p-value resolves down to 1 / (n_permutations + 1).
    """
    state_a, meta_a = _resolve(a, "a")
    state_b, meta_b = _resolve(b, "b")
    result = _C.weight_permutation_test(
        state_a, state_b, statistic=statistic, permutations=int(n_permutations), seed=int(seed),
        mapping=dict(mapping or {}), groups=_groups_arg(groups), n_heads=int(n_heads or 0),
        solver=solver, compute_dtype=_dtype_name(compute_dtype),
        device=None if device is None else str(device), metadata_a=meta_a, metadata_b=meta_b,
        auto_exact_max_units=int(auto_exact_max_units))
    return WeightTestResult._from_c(result)


def weight_groups(model: ModelLike, *, n_heads: Optional[int] = None,
                  groups: Optional[Sequence[Union[UnitGroup, Mapping[str, Any]]]] = None
                  ) -> Dict[str, Any]:
    """The unit groups :func:`weight_test` would use for ``model`` (names and shapes only):
    ``{"architecture", "groups": [{name, kind, units, members, skip_reason}], "residual",
    "notes"}``. A starting point for explicit ``groups`` on layouts that are not detected."""
    state, meta = _resolve(model, "model")
    return _C.weight_groups(state, groups=_groups_arg(groups), n_heads=int(n_heads or 0),
                            metadata=meta)
