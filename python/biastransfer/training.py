"""Training and distillation through the C++ trainer (libtransfer/distill/trainer.h).

The loop, the optimizer, checkpoints and metrics all run in C++; this module turns friendly
arguments into the native objects, adds a tqdm progress bar, and returns a readable result.

    from biastransfer.training import TrainerConfig, Trainer, NoiseSpec, distill
    result = Trainer(TrainerConfig(epochs=5, batch_size=1024, lr=3e-4)).fit(
        student, (features, labels), objective="sft")
    result = distill(teacher, student, NoiseSpec(features=784), config, objective="aux_kd")

Models: biastransfer's bound models (MLP, TransformerLM, TorchScript), or any torch.nn.Module:
the C++ loop calls its forward and updates its parameters in place (no Python training loop).
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch

from . import _C

PathLike = Union[str, "os.PathLike[str]"]

OBJECTIVES = ("sft", "ce", "kd", "aux_kd", "mixed")


@dataclass
class TrainerConfig:
    """How long, how fast, where to save.

    Length: ``steps`` optimizer steps, or (steps=0) ``epochs`` passes over the data: steps =
    ceil(epochs * batches_per_epoch / accumulation). ``batch_size`` is used when the data are
    tensors or a NoiseSpec (a BatchSource brings its own). Optimizer: AdamW (``weight_decay``
    decoupled; ``decoupled_weight_decay=False`` gives torch.optim.Adam's L2 penalty; with
    weight_decay 0 both are the paper's Adam). Schedule: "constant" | "linear" | "cosine" after
    ``warmup_steps`` of linear warmup. ``grad_clip`` > 0 clips the global gradient norm.
    ``accumulation`` micro-batches per step (k micro-batches of b = one batch of k*b).
    ``seed`` seeds everything random (data order and noise of sources built here, dropout).
    Checkpoints every ``checkpoint_every`` steps (and at the end) in ``checkpoint_dir``, newest
    ``keep_checkpoints`` kept; metrics as JSON lines in ``metrics_path`` every ``log_every``
    steps; ``progress``: a tqdm bar (or a line on stderr without tqdm).

    ``distributed=True``: data-parallel training over the torch.distributed process group
    (biastransfer.distributed.init_from_env() first; docs/scaling.md). ``batch_size`` and the
    data are the global batch: rank r of W trains on rows [r*B/W, (r+1)*B/W) of every
    micro-batch, gradients are all-reduced once per step, and the weights equal a single
    process's on the same global batches. Only rank 0 writes checkpoints and metrics and shows
    progress; checkpoint_dir must be visible to every rank for resume.
    """

    steps: int = 0
    epochs: float = 0.0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decoupled_weight_decay: bool = True
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    accumulation: int = 1
    seed: int = 0
    checkpoint_dir: Optional[PathLike] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    overwrite_checkpoints: bool = False
    metrics_path: Optional[PathLike] = None
    log_every: int = 1
    eval_every: int = 0
    progress: bool = True
    stop_after_step: int = 0  # > 0: stop after this step (interruption tests, time slices)
    distributed: bool = False  # data parallel over torch.distributed (see above)

    def to_native(self, *, native_progress_line: bool = False) -> "_C.TrainerConfig":
        """The C++ config. native_progress_line: let C++ print its stderr line."""
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected two values, got {self.betas!r}")
        return _C.TrainerConfig(
            steps=int(self.steps),
            epochs=float(self.epochs),
            accumulation=int(self.accumulation),
            lr=float(self.lr),
            beta1=float(self.betas[0]),
            beta2=float(self.betas[1]),
            eps=float(self.eps),
            weight_decay=float(self.weight_decay),
            decoupled_weight_decay=bool(self.decoupled_weight_decay),
            schedule=self.schedule,
            warmup_steps=int(self.warmup_steps),
            min_lr_ratio=float(self.min_lr_ratio),
            grad_clip=float(self.grad_clip),
            seed=int(self.seed),
            checkpoint_dir=os.fspath(self.checkpoint_dir) if self.checkpoint_dir else "",
            checkpoint_every=int(self.checkpoint_every),
            keep_checkpoints=int(self.keep_checkpoints),
            overwrite_checkpoints=bool(self.overwrite_checkpoints),
            metrics_path=os.fspath(self.metrics_path) if self.metrics_path else "",
            log_every=int(self.log_every),
            eval_every=int(self.eval_every),
            progress=native_progress_line,
            stop_after_step=int(self.stop_after_step),
        )


@dataclass
class NoiseSpec:
    """Uniform noise inputs [batch_size, features] in [low, high] (auxiliary-logit KD).

    batch_size / seed default to the TrainerConfig's. steps_per_epoch: the nominal epoch length
    (noise is endless), e.g. the number of batches of the real data set, so that ``epochs``
    means the same number of steps for both.
    """

    features: int
    low: float = -1.0
    high: float = 1.0
    steps_per_epoch: int = 1
    batch_size: Optional[int] = None
    seed: Optional[int] = None
    dtype: torch.dtype = torch.float32


@dataclass
class TrainingResult:
    """What fit/resume return: per-step history (dicts with step, epoch, loss, lr, grad_norm,
    examples_per_s, elapsed_s), evaluations [(step, {name: value})], and where a resumed run
    started (resumed_from = 0 for a fresh run; skipped_checkpoints: damaged ones passed over)."""

    steps: int
    history: list[dict[str, float]]
    evaluations: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    resumed_from: int = 0
    resumed_path: str = ""
    skipped_checkpoints: list[str] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan

    def __str__(self) -> str:
        start = f" (resumed from step {self.resumed_from})" if self.resumed_path else ""
        return f"trained to step {self.steps}{start}, final loss {self.final_loss:.5g}"


def as_source(data: Any, config: TrainerConfig) -> "_C.BatchSource":
    """A C++ BatchSource from ``data``: a BatchSource (as is), a (features [N, F], labels [N])
    pair (a seeded, shuffled TensorDataset of config.batch_size), or a NoiseSpec."""
    if isinstance(data, _C.BatchSource):
        return data
    if isinstance(data, NoiseSpec):
        return _C.NoiseSource(
            int(data.features),
            batch_size=int(data.batch_size or config.batch_size),
            low=float(data.low),
            high=float(data.high),
            seed=int(config.seed if data.seed is None else data.seed),
            steps_per_epoch=int(data.steps_per_epoch),
            dtype=data.dtype,
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        features, labels = data
        return _C.TensorDataset(features, labels, batch_size=int(config.batch_size),
                                seed=int(config.seed))
    raise TypeError(
        "data: expected a BatchSource, a (features, labels) pair of tensors or a NoiseSpec, "
        f"got {type(data).__name__}"
    )


def _native_kd(kd: Any) -> Optional["_C.KDConfig"]:
    if kd is None or isinstance(kd, _C.KDConfig):
        return kd
    if hasattr(kd, "to_cpp"):  # biastransfer.losses.KDConfig
        return kd.to_cpp()
    try:
        return _C.KDConfig(
            divergence=kd.divergence,
            temperature=float(kd.temperature),
            beta=float(kd.beta),
            top_k=int(kd.top_k),
            logit_subset=list(kd.logit_subset) if kd.logit_subset is not None else None,
        )
    except AttributeError as error:
        raise TypeError(
            f"kd: expected a biastransfer.losses.KDConfig, got {type(kd).__name__}"
        ) from error


def _declared_logits(student: Any) -> tuple[int, int]:
    """(auxiliary logits, all logits) of a model that declares them (the built-in MLP), else
    (0, 0)."""
    aux = getattr(student, "aux_outputs", None)
    size = getattr(student, "output_size", None)
    if callable(aux):
        aux = aux()
    if callable(size):
        size = size()
    if not aux or not size:
        return 0, 0
    return int(aux), int(size)


def _aux_indices(student: Any) -> list[int]:
    """The auxiliary logits of a model that declares them (the built-in MLP)."""
    aux, size = _declared_logits(student)
    if not aux:
        raise ValueError(
            "objective 'aux_kd': the student does not declare auxiliary logits; pass "
            "kd=KDConfig(logit_subset=[...]) with the auxiliary logit indices"
        )
    return list(range(size - aux, size))


def _class_indices(student: Any) -> list[int]:
    """The class logits (all but the auxiliary ones) of a model that declares them, else []."""
    aux, size = _declared_logits(student)
    return list(range(size - aux))


def _as_model(model: Any, data_source: "_C.BatchSource", argument: str) -> Any:
    """Plain nn.Modules get the input-kind hint from the data (features for floating inputs)."""
    if model is None or not isinstance(model, torch.nn.Module):
        return model
    try:
        from . import modeling
    except ImportError:  # the models bindings decide on their own
        return model
    wrap = getattr(modeling, "wrap", None)
    if wrap is None:
        return model
    batch_input = _first_input(data_source)
    kind = "tokens" if batch_input is not None and not batch_input.is_floating_point() else "features"
    return wrap(model, input_kind=kind)


def _first_input(source: Any) -> Optional[torch.Tensor]:
    batch = getattr(source, "batch", None)
    if batch is None:
        return None
    try:
        b = batch(0)
    except Exception:  # noqa: BLE001 - only a hint; the C++ constructor reports real problems
        return None
    return getattr(b, "input", None)


class _Bar:
    """tqdm progress bar fed by the C++ progress callback (None when tqdm is missing)."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.last = initial

    def __call__(self, p: Any) -> None:
        self.bar.update(p.step - self.last)
        self.last = p.step
        self.bar.set_postfix(loss=f"{p.loss:.4g}", lr=f"{p.lr:.2g}", epoch=f"{p.epoch:.2f}",
                             refresh=False)

    def close(self) -> None:
        self.bar.close()


def _history(result: Any) -> list[dict[str, float]]:
    keys = ("step", "epoch", "loss", "lr", "grad_norm", "examples_per_s", "elapsed_s")
    return [{k: getattr(p, k) for k in keys} for p in result.history]


class Trainer:
    """Trains models with the C++ loop; see TrainerConfig.

    fit(student, data, teacher=None, objective="sft", kd=None, ce_weight=0.5, evaluate=None):
      objective "sft"/"ce": cross-entropy on batch targets (a model with auxiliary logits, like
      the paper's MLP, is trained on its class logits only); "kd": logit distillation from
      ``teacher`` (or offline teacher signals in the batches) with ``kd`` (a
      biastransfer.losses.KDConfig; default forward KL at temperature 1); "aux_kd": KD on the
      student's auxiliary logits only (kd.logit_subset defaults to them); "mixed":
      ce_weight * CE + (1 - ce_weight) * KD. evaluate(step) -> {name: value} runs every
      config.eval_every steps. data: see as_source.
    resume(...): the same arguments; continues from the newest valid checkpoint of
      config.checkpoint_dir (or from ``path``), bit-identical on the CPU to an uninterrupted run.
    """

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config

    def _native(self, student: Any, data: Any, teacher: Any, objective: str, kd: Any,
                ce_weight: float, evaluate: Optional[Callable[[int], Mapping[str, float]]]):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
        source = as_source(data, self.config)
        tracker = None
        if self.config.distributed:
            from . import distributed

            current = distributed.info()  # ValueError unless init_from_env ran
            source = _C.RankSliceSource(source, current.rank, current.world_size)
            tracker = distributed._StepTracker()
        student_model = _as_model(student, source, "student")
        teacher_model = _as_model(teacher, source, "teacher")
        native_kd = _native_kd(kd)
        ce_subset: list[int] = []
        if objective in ("sft", "ce", "mixed"):
            ce_subset = _class_indices(student)
        if objective == "aux_kd":
            if native_kd is None:
                native_kd = _C.KDConfig()
            if not native_kd.logit_subset:
                native_kd.logit_subset = _aux_indices(student)
        native_objective = {"sft": "ce", "ce": "ce", "kd": "kd", "aux_kd": "kd",
                            "mixed": "mixed"}[objective]
        if native_objective != "ce" and native_kd is None:
            native_kd = _C.KDConfig()
        bar_wanted = self.config.progress
        try:
            import tqdm  # noqa: F401
        except ImportError:
            bar_wanted = False
        native_config = self.config.to_native(
            native_progress_line=self.config.progress and not bar_wanted)
        if tracker is not None:
            from . import distributed

            distributed.configure_trainer(native_config, tracker)
            bar_wanted = bar_wanted and distributed.is_main()
        trainer = _C.Trainer(student_model, source, native_config, objective=native_objective,
                             kd=native_kd, ce_weight=float(ce_weight), teacher=teacher_model,
                             ce_logit_subset=ce_subset)
        if evaluate is not None:
            trainer.set_evaluate_callback(lambda step: {k: float(v)
                                                        for k, v in evaluate(step).items()})
        self._tracker = tracker  # distributed: names the failing step in errors
        return trainer, bar_wanted

    def _run(self, trainer: Any, bar_wanted: bool, start: Callable[[], Any],
             initial: int) -> TrainingResult:
        bar = _Bar(trainer.total_steps, initial) if bar_wanted else None
        tracker = getattr(self, "_tracker", None)
        if tracker is not None:
            tracker.reset(trainer.step, trainer.total_steps)

            def track(p: Any) -> None:
                tracker.step = p.step
                if bar is not None:
                    bar(p)

            trainer.set_progress_callback(track)
        elif bar is not None:
            trainer.set_progress_callback(bar)
        try:
            native = start()
        finally:
            if bar is not None:
                bar.close()
        return TrainingResult(
            steps=native.steps,
            history=_history(native),
            evaluations=[(s, dict(v)) for s, v in native.evaluations],
            resumed_from=native.resumed_from,
            resumed_path=native.resumed_path,
            skipped_checkpoints=list(native.skipped_checkpoints),
        )

    def fit(self, student: Any, data: Any, teacher: Any = None, objective: str = "sft",
            kd: Any = None, ce_weight: float = 0.5,
            evaluate: Optional[Callable[[int], Mapping[str, float]]] = None) -> TrainingResult:
        """Trains ``student`` in place from step 0; returns a TrainingResult."""
        trainer, bar = self._native(student, data, teacher, objective, kd, ce_weight, evaluate)
        return self._run(trainer, bar, trainer.fit, 0)

    def resume(self, student: Any, data: Any, teacher: Any = None, objective: str = "sft",
               kd: Any = None, ce_weight: float = 0.5,
               evaluate: Optional[Callable[[int], Mapping[str, float]]] = None,
               path: Optional[PathLike] = None) -> TrainingResult:
        """Continues an interrupted fit (same arguments) from its checkpoints.

        path=None: the newest checkpoint of config.checkpoint_dir that loads cleanly (damaged
        ones are listed in skipped_checkpoints); a path: that file (an error if damaged).
        """
        trainer, bar = self._native(student, data, teacher, objective, kd, ce_weight, evaluate)
        if path is not None:
            return self._run(trainer, bar, lambda: trainer.resume_from(os.fspath(path)), 0)
        return self._run(trainer, bar, trainer.resume, 0)


def distill(teacher: Any, student: Any, data: Any, config: TrainerConfig,
            objective: str = "kd", kd: Any = None, ce_weight: float = 0.5) -> TrainingResult:
    """Distills ``teacher`` into ``student`` (trained in place) with the C++ trainer.

    objective: "kd" (all logits), "aux_kd" (the student's auxiliary logits only, e.g. on
    NoiseSpec inputs: the paper's auxiliary-logit experiment), "sft" (hard labels from the data;
    the teacher is unused) or "mixed". A teacher/student vocabulary mismatch is a ValueError
    before any step.
    """
    return Trainer(config).fit(student, data, teacher=None if objective in ("sft", "ce") else teacher,
                               objective=objective, kd=kd, ce_weight=ce_weight)


def clone_module(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a Python module (students start from a teacher's initialization)."""
    return copy.deepcopy(module)


__all__ = [
    "NoiseSpec",
    "OBJECTIVES",
    "Trainer",
    "TrainerConfig",
    "TrainingResult",
    "as_source",
    "clone_module",
    "distill",
]
