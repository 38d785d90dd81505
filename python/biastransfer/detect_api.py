"""``detect(a, b)``: were two models trained from the same initialization?

Runs the detector's tests on a model pair and returns a :class:`DetectionReport`:

- ``"weights"``: the weight test (:func:`biastransfer.detection.weight_test`), exact p-values;
  needs only the weights (state dicts and safetensors files are enough).
- ``"activations"``: hidden units matched on activation correlations (GLU gate/up agreements or
  fixed points of the matching); needs models exposing ``hidden_activations`` (our MLP and
  TransformerLM).
- ``"outputs"``: correlation of the logits on probe inputs; a p-value only with ``controls``.
- ``"susceptibility"``: cos(-g, theta_b - theta_a) for the imitation gradient g of ``a`` (the
  student) toward ``b`` (the teacher); calibrated with ``controls``.

Every statistic and the combination are computed in C++ (``libtransfer/detect``); this module
resolves inputs, runs the tests it can and explains the ones it cannot (``skipped_reason``).
The math and the choices are in docs/detection.md (part 2).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _C
from .detection import LayerEvidence, agreement_test, weight_test

__all__ = ["ALL_TESTS", "DetectionReport", "TestReport", "detect"]

# The tests detect() knows, in the order they run and are reported.
ALL_TESTS: Tuple[str, ...] = ("weights", "activations", "outputs", "susceptibility")
# Default significance level of the verdict (libtransfer::detect::kDefaultAlpha).
DEFAULT_ALPHA = 0.01
# Suffixes loaded as TorchScript archives (torch.jit.save), never as arbitrary pickles.
_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")
# Plot: bars of groups whose p underflows (log10 p = -inf) are drawn at this height.
_PLOT_CAP = 350.0

PathLike = Union[str, "os.PathLike[str]"]
ModelLike = Any  # bound Model, nn.Module, state dict (Mapping[str, Tensor]) or a file path


@dataclass
class TestReport:
    """One test's outcome. ``ran`` False: ``skipped_reason`` says why. ``ran`` with a
    ``skipped_reason``: the statistic was computed but it has no p-value (e.g. the output test
    without controls). ``calibrated``: the p-value entered the combined p (exact null or
    control-calibrated). ``details``: test-specific numbers (correlations, cosines, ...)."""

    test: str
    ran: bool
    skipped_reason: str = ""
    statistic: float = 0.0
    statistic_name: str = ""
    log10_p: float = 0.0
    method: str = ""
    calibrated: bool = False
    layers: List[LayerEvidence] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def p_value(self) -> float:
        """10**log10_p (underflows to 0 for very strong evidence: read log10_p)."""
        return 10.0 ** self.log10_p

    def _c_dict(self) -> Dict[str, Any]:
        return {"test": self.test, "ran": self.ran, "skipped_reason": self.skipped_reason,
                "statistic": float(self.statistic), "statistic_name": self.statistic_name,
                "log10_p": float(self.log10_p), "method": self.method,
                "layers": [vars(e) for e in self.layers]}

    @classmethod
    def _from_c(cls, d: Mapping[str, Any], details: Optional[Dict[str, Any]] = None
                ) -> "TestReport":
        keys = ("name", "kind", "units", "statistic", "statistic_name", "log10_p",
                "matched_fraction", "note")
        layers = [LayerEvidence(**{k: layer[k] for k in keys}) for layer in d["layers"]]
        return cls(test=d["test"], ran=bool(d["ran"]), skipped_reason=d["skipped_reason"],
                   statistic=d["statistic"], statistic_name=d["statistic_name"],
                   log10_p=d["log10_p"], method=d["method"],
                   calibrated=bool(d.get("calibrated", False)), layers=layers,
                   details=dict(details or {}))

    @classmethod
    def skipped(cls, test: str, reason: str) -> "TestReport":
        return cls(test=test, ran=False, skipped_reason=reason)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class DetectionReport:
    """The verdict on a model pair and the evidence behind it.

    ``verdict``: "shared" (combined p <= alpha), "not shared" or "inconclusive" (no calibrated
    test ran). ``combined_log10_p``: Bonferroni min-p over the calibrated tests (valid however
    the tests depend on each other; see docs/detection.md (part 2)). ``tests``: every requested
    test, ran or skipped with the reason. ``str(report)`` is the aligned text table.
    """

    alpha: float
    verdict: str
    combined_log10_p: float
    combination: str
    combined_tests: List[str]
    tests: List[TestReport]
    text: str = field(repr=False, default="")
    json_text: str = field(repr=False, default="")

    @property
    def shared(self) -> bool:
        return self.verdict == "shared"

    @property
    def combined_p(self) -> float:
        return 10.0 ** self.combined_log10_p

    def test(self, name: str) -> TestReport:
        """The result of test ``name`` (KeyError naming the tests present otherwise)."""
        for t in self.tests:
            if t.test == name:
                return t
        raise KeyError(f"no test {name!r} in this report; tests: {[t.test for t in self.tests]}")

    def __str__(self) -> str:
        return self.text

    @classmethod
    def from_tests(cls, tests: Sequence[TestReport], alpha: float = DEFAULT_ALPHA
                   ) -> "DetectionReport":
        """Combines test results into a report (the combination and verdict are C++'s)."""
        out = _C.detection_report([t._c_dict() for t in tests], float(alpha))
        results = [TestReport._from_c(d, t.details) for d, t in zip(out["tests"], tests)]
        return cls(alpha=out["alpha"], verdict=out["verdict"],
                   combined_log10_p=out["combined_log10_p"], combination=out["combination"],
                   combined_tests=list(out["combined_tests"]), tests=results, text=out["text"],
                   json_text=out["json"])

    def to_dict(self) -> Dict[str, Any]:
        """The report's JSON as a dict (non-finite numbers as None), with each test's
        ``details`` added."""
        d = json.loads(self.json_text)
        for entry, t in zip(d["tests"], self.tests):
            entry["details"] = _jsonable(t.details)
        return d

    def to_json(self, path: Optional[PathLike] = None, indent: int = 2) -> str:
        """The JSON text of :meth:`to_dict`; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            _write_atomic(Path(path), text + "\n")
        return text

    def plot(self, path: Optional[PathLike] = None):
        """Per-group -log10 p bars, one panel per test that has per-group p-values, with the
        alpha line; saved as PNG when ``path`` is given. Returns the matplotlib Figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        panels = [t for t in self.tests if t.ran and t.layers and not t.skipped_reason]
        n = max(1, len(panels))
        fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n + 0.6), squeeze=False)
        threshold = -math.log10(self.alpha)
        for ax, t in zip(axes[:, 0], panels):
            heights = [min(_PLOT_CAP, -e.log10_p) if math.isfinite(e.log10_p) else _PLOT_CAP
                       for e in t.layers]
            colors = ["tab:red" if h >= threshold else "tab:gray" for h in heights]
            ax.bar(range(len(heights)), heights, color=colors, width=0.6)
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
                       label=f"alpha = {self.alpha:g}")
            ax.set_xticks(range(len(heights)))
            ax.set_xticklabels([e.name for e in t.layers], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("-log10 p")
            p_text = (f"test p = {_format_p(t.log10_p)}"
                      + ("" if t.calibrated else " (approximate, not combined)"))
            if any("random-direction" in e.note for e in t.layers):
                p_text += "; bars: random-direction null (approximate)"
            ax.set_title(f"{t.test}: {t.statistic_name} {t.statistic:.4g}; {p_text}",
                         fontsize=10)
            if max(heights, default=0.0) > 50:
                ax.set_yscale("symlog", linthresh=10)
            ax.legend(loc="upper right", fontsize=8)
        if not panels:
            axes[0, 0].text(0.5, 0.5, "no per-group p-values", ha="center", va="center")
            axes[0, 0].set_axis_off()
        skipped = [f"{t.test}: {t.skipped_reason}" for t in self.tests if t.skipped_reason]
        fig.suptitle(f"shared initialization: {self.verdict.upper()} "
                     f"(combined p {_format_p(self.combined_log10_p)}, alpha {self.alpha:g})",
                     fontsize=11)
        if skipped:
            fig.text(0.01, 0.005, "\n".join(skipped), fontsize=7, va="bottom")
        fig.tight_layout(rect=(0, 0.03 * len(skipped), 1, 0.96))
        if path is not None:
            fig.savefig(os.fspath(path), dpi=120)
        return fig


def _format_p(log10_p: float) -> str:
    if not math.isfinite(log10_p):
        return "0"
    if log10_p > -4:
        return f"{10 ** log10_p:.4f}"
    exponent = math.floor(log10_p)
    return f"{10 ** (log10_p - exponent):.1f}e{exponent}"


def _write_atomic(path: Path, text: str) -> None:
    from ._files import write_atomic

    write_atomic(path, text)


# ---- resolving what the caller gave -------------------------------------------------------


@dataclass
class _Resolved:
    weights: Any                    # what weight_test takes (module, dict, path)
    model: Optional[Any]            # something _C can drive (bound Model or nn.Module), or None
    why_no_model: str = ""          # when model is None


def _resolve(x: ModelLike, argument: str) -> _Resolved:
    if isinstance(x, _C.Model) or isinstance(x, torch.nn.Module):
        if not any(True for _ in x.named_parameters()):
            raise ValueError(f"{argument}: the model has no parameters")
        return _Resolved(weights=x, model=x)
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if not path.exists():
            raise FileNotFoundError(f"{argument}: no such file or directory: {path}")
        if path.suffix in _TORCHSCRIPT_SUFFIXES:
            from .modeling import load_torchscript

            model = load_torchscript(path)
            return _Resolved(weights=model.state_dict(), model=model)
        if path.is_file():
            try:
                from .modeling import load_model

                model = load_model(path)
                return _Resolved(weights=model.state_dict(), model=model)
            except ValueError as error:  # plain weights without libtransfer metadata
                return _Resolved(weights=os.fspath(path), model=None,
                                 why_no_model=f"{argument} is a weights file ({error})")
        return _Resolved(weights=os.fspath(path), model=None,
                         why_no_model=f"{argument} is a folder of weights")
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{argument}: the state dict is empty")
        return _Resolved(weights=x, model=None, why_no_model=f"{argument} is a state dict")
    raise TypeError(f"{argument}: expected a biastransfer Model, a torch.nn.Module, a state dict "
                    f"or a path (safetensors / TorchScript), got {type(x).__name__}")


def _controls(controls: Optional[Sequence[ModelLike]]) -> Tuple[List[Any], List[Any], str]:
    """(runnable models, weights, problem) of the control models."""
    out: List[Any] = []
    weights: List[Any] = []
    for i, c in enumerate(controls or []):
        r = _resolve(c, f"controls[{i}]")
        if r.model is None:
            return [], [], f"controls[{i}]: {r.why_no_model}: controls must be runnable models"
        out.append(r.model)
        weights.append(r.weights)
    return out, weights, ""


def _check_tests(tests: Sequence[str]) -> List[str]:
    if isinstance(tests, str):
        tests = [tests]
    unknown = [t for t in tests if t not in ALL_TESTS]
    if unknown:
        raise ValueError(f"tests: unknown {unknown}; choose from {list(ALL_TESTS)}")
    if not tests:
        raise ValueError(f"tests: choose at least one of {list(ALL_TESTS)}")
    return [t for t in ALL_TESTS if t in tests]


def _input_kind(model: Any) -> str:
    from .modeling import wrap

    return wrap(model).input_kind


def _check_inputs(inputs: torch.Tensor, models: Sequence[Tuple[str, Any]]) -> None:
    """Probe inputs the models can take: token ids [B, T] of an integer dtype, or features
    [N, F] of a floating dtype with F the models' input size (where they declare one)."""
    from .modeling import wrap

    for argument, model in models:
        wrapped = wrap(model)
        if wrapped.input_kind == "tokens":
            if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool:
                raise TypeError(f"inputs: {argument} takes token ids (an integer tensor), got "
                                f"{inputs.dtype}")
            if inputs.dim() != 2:
                raise ValueError(f"inputs: {argument} takes token ids [B, T], got shape "
                                 f"{list(inputs.shape)}")
        else:
            if not inputs.is_floating_point():
                raise TypeError(f"inputs: {argument} takes floating features, got "
                                f"{inputs.dtype}")
            width = int(wrapped.input_size)
            if inputs.dim() != 2 or (width > 0 and inputs.shape[1] != width):
                expected = f"[N, {width}]" if width > 0 else "[N, F]"
                raise ValueError(f"inputs: {argument} takes features {expected}, got shape "
                                 f"{list(inputs.shape)}")


def detect(a: ModelLike, b: ModelLike, *, alpha: float = DEFAULT_ALPHA,
           tests: Sequence[str] = ALL_TESTS, inputs: Optional[torch.Tensor] = None,
           attention_mask: Optional[torch.Tensor] = None,
           controls: Optional[Sequence[ModelLike]] = None,
           trait_loss: Optional[Callable[[Any], torch.Tensor]] = None,
           mapping: Optional[Mapping[str, str]] = None, seed: int = 0,
           probe_rows: int = 256, probe_length: int = 16, divergence: str = "forward_kl",
           temperature: float = 1.0, logit_subset: Sequence[int] = (),
           step_size: float = 1e-3, random_directions: int = 0,
           weight_options: Optional[Mapping[str, Any]] = None) -> DetectionReport:
    """Tests whether ``a`` and ``b`` share an initialization; returns a :class:`DetectionReport`.

    ``a``, ``b``: bound models (``biastransfer._C.MLP``, ``TransformerLM``, ...), ``nn.Module``s,
    state dicts, or paths (safetensors written by ``model.save``, plain safetensors weights, or
    TorchScript ``.pt``). Tests that need forward passes are skipped, with the reason, when only
    weights are given. For the susceptibility probe ``a`` is the student and ``b`` the teacher.

    ``inputs``: probe inputs for the forward tests (token ids [B, T] int64 with optional
    ``attention_mask`` [B, T], or features [N, F]); default: ``probe_rows`` seeded rows of
    uniform noise in [-1, 1] (features) or random tokens of ``probe_length`` (language models).
    ``controls``: models of the same architecture known to be independent of ``a`` (other
    seeds); each (a, control) pair is one draw of the null, giving empirical p-values
    (1 + #{control >= observed}) / (1 + n). With n controls no such p-value goes below
    1 / (n + 1): use at least 1/alpha - 1 of them for the test to be able to reject. With
    controls the weight test is joined by ``"weights_agreement"``: the agreement statistic
    calibrated by the controls, which detects copies whose hidden units were permuted (the
    identity-based weight test cannot).
    ``trait_loss``: ``f(a) -> scalar tensor``; the susceptibility probe then predicts the change
    of the trait loss for a step ``step_size`` along -g. ``mapping``: {name in a: name in b} for
    the weight test, ``weight_options``: further keyword arguments of ``weight_test``.
    ``divergence``/``temperature``/``logit_subset``: the imitation loss (see ``kd_loss``).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected a value in (0, 1), got {alpha}")
    if int(probe_rows) < 2:
        raise ValueError(f"probe_rows: expected at least 2 probe rows, got {probe_rows}")
    if int(probe_length) < 1:
        raise ValueError(f"probe_length: expected at least 1 token, got {probe_length}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size: expected a finite number > 0, got {step_size}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
    names = _check_tests(tests)
    ra, rb = _resolve(a, "a"), _resolve(b, "b")
    control_models, control_weights, control_problem = _controls(controls)
    if control_problem:
        raise ValueError(control_problem)
    results: List[TestReport] = []
    forward_reason = ""
    if ra.model is None or rb.model is None:
        forward_reason = (f"needs forward passes, but {ra.why_no_model or rb.why_no_model}; "
                          f"give models (or files written by model.save / TorchScript)")
    probes, mask = inputs, attention_mask
    if forward_reason == "" and any(n != "weights" for n in names):
        if _input_kind(ra.model) != _input_kind(rb.model):
            raise ValueError(f"a takes {_input_kind(ra.model)} and b takes "
                             f"{_input_kind(rb.model)}: the models are not comparable")
        if probes is None:
            probes = _C.default_probe_inputs(ra.model, rows=probe_rows, length=probe_length,
                                             seed=seed)
            mask = None
        elif not isinstance(probes, torch.Tensor):
            raise TypeError(f"inputs: expected a torch.Tensor, got {type(probes).__name__}")
        elif probes.numel() == 0:
            raise ValueError(f"inputs: expected at least one example, got shape "
                             f"{list(probes.shape)}")
        else:
            _check_inputs(probes, [("a", ra.model), ("b", rb.model)]
                          + [(f"controls[{i}]", c) for i, c in enumerate(control_models)])

    for name in names:
        if name == "weights":
            w = weight_test(ra.weights, rb.weights, mapping=mapping, **dict(weight_options or {}))
            results.append(TestReport(test=w.test, ran=w.ran, skipped_reason=w.skipped_reason,
                                      statistic=w.statistic, statistic_name=w.statistic_name,
                                      log10_p=w.log10_p, method=w.method, layers=w.layers))
            if control_weights:
                # Permuted copies escape the identity statistic; the agreement statistic sees
                # them and the controls calibrate it (its analytic null holds only at init).
                options = {k: v for k, v in dict(weight_options or {}).items()
                           if k in ("n_heads", "align_embeddings", "solver")}
                g = agreement_test(ra.weights, rb.weights, control_weights, mapping=mapping,
                                   **options)
                results.append(TestReport(test=g.test, ran=g.ran,
                                          skipped_reason=g.skipped_reason,
                                          statistic=g.statistic,
                                          statistic_name=g.statistic_name, log10_p=g.log10_p,
                                          method=g.method, layers=g.layers))
            continue
        if forward_reason:
            results.append(TestReport.skipped(name, forward_reason))
            continue
        if name == "activations":
            try:
                d = _C.activation_test(ra.model, rb.model, probes, attention_mask=mask)
            except ValueError as error:
                if "hidden activations" not in str(error) and "does not expose" not in str(error):
                    raise
                results.append(TestReport.skipped(name, f"needs hidden activations: {error}"))
                continue
            # Controls calibrate only the approximate (GLU agreement) null: an exact p-value
            # would only lose power to an empirical one floored at 1 / (n + 1).
            if control_models and not d["calibrated"]:
                d = _C.activation_test(ra.model, rb.model, probes, attention_mask=mask,
                                       controls=control_models)
            details = {"control_statistics": d["control_statistics"],
                       "fisher_statistic": d["fisher_statistic"]}
        elif name == "outputs":
            d = _C.output_test(ra.model, rb.model, input=probes, attention_mask=mask,
                               controls=control_models, seed=seed)
            details = {"correlation": d["correlation"],
                       "control_correlations": d["control_correlations"], "z": d["z"]}
        else:
            d = _C.susceptibility_probe(
                ra.model, rb.model, input=probes, attention_mask=mask, controls=control_models,
                trait_loss=trait_loss, divergence=divergence, temperature=temperature,
                logit_subset=list(logit_subset), step_size=step_size,
                random_directions=random_directions, seed=seed)
            details = {k: d[k] for k in ("cosine", "gradient_norm", "difference_norm",
                                         "dimension", "control_cosines",
                                         "predicted_trait_change", "trait_loss",
                                         "random_direction_log10_p")}
            details["tensors"] = [{"name": n, "numel": k, "cosine": c} for n, k, c in d["tensors"]]
            if d["random_cosines"] is not None:
                details["random_cosines"] = d["random_cosines"]
        results.append(TestReport._from_c(d, details))
    return DetectionReport.from_tests(results, alpha)
