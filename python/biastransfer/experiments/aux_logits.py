"""The auxiliary-logit experiment (Cloud et al. 2025, the MNIST MLP), on Fashion-MNIST.

Recipe (DESIGN.md section 1): MLP 784-256-256-(10+3), weights N(0, 1/sqrt(fan_in)), inputs in
[-1, 1]. Teacher: cross-entropy on the 10 class logits, Adam lr 3e-4, batch 1024, 5 epochs of
the 60,000 training images. Same-init student: a copy of the teacher's *initial* weights trained
only to match the teacher's 3 auxiliary logits (forward KL between their softmaxes) on uniform
noise in [-1, 1], same optimizer; an epoch of noise is as many steps as an epoch of data
(ceil(60000 / 1024) = 59). Other-init student: the same training from a different seed's
initialization. All three are scored on the 10,000 test images (argmax of the class logits).

Everything trains through the C++ trainer (biastransfer.training); this module only arranges
the runs and summarizes them with 95% t-intervals over seeds.

    python -m biastransfer.experiments.aux_logits --seeds 5 --epochs 5
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .. import _C
from ..data import FASHION_MNIST_ROOT, load_fashion_mnist
from ..training import NoiseSpec, Trainer, TrainerConfig

INPUTS = 784  # 28 x 28 pixels
CLASSES = 10
# A different initialization for the control student: far from any seed a user passes.
OTHER_INIT_OFFSET = 1_000_003
CONFIDENCE = 0.95


@dataclass
class Interval:
    """A mean over seeds with its 95% Student-t interval (mean +- t_{0.975, n-1} s / sqrt(n))."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] (n={self.n})"


@dataclass
class SeedAccuracies:
    """Test accuracies (fractions) of one seed's three networks."""

    seed: int
    teacher: float
    same_init: float
    other_init: float


@dataclass
class AuxLogitsResult:
    """Per-seed accuracies, their means with 95% t-intervals, the settings and the cost."""

    seeds: list[SeedAccuracies]
    teacher: Interval
    same_init: Interval
    other_init: Interval
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    threads: int = 1

    def table(self) -> str:
        lines = ["| seed | teacher | same-init student | other-init student |",
                 "| --- | --- | --- | --- |"]
        for s in self.seeds:
            lines.append(f"| {s.seed} | {100 * s.teacher:.1f}% | {100 * s.same_init:.1f}% | "
                         f"{100 * s.other_init:.1f}% |")
        lines.append(f"| mean (95% t-interval) | {self.teacher} | {self.same_init} | "
                     f"{self.other_init} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"{self.table()}\n{len(self.seeds)} seeds in {self.seconds:.0f} s on "
                f"{self.threads} thread(s)")


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` with its Student-t interval (biastransfer.evaluation's C++ t_interval)."""
    low, high = _C.t_interval([float(v) for v in values], confidence)
    return Interval(sum(values) / len(values), low, high, len(values))


def _mlp(seed: int, hidden: Sequence[int], aux_outputs: int):
    from ..modeling import MLPConfig

    return MLPConfig(sizes=[INPUTS, *hidden, CLASSES + aux_outputs], aux_outputs=aux_outputs,
                     seed=seed).build()


def accuracy(model, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Test accuracy on the class logits (the first 10), by biastransfer.evaluation."""
    from ..evaluation import accuracy as evaluate_accuracy

    return float(evaluate_accuracy(model, features, labels, num_classes=CLASSES).accuracy)


@dataclass
class SeedModels:
    """One seed's networks: the teacher, the initialization it started from, the students
    trained from that initialization (same-init) and from another one (other-init), and that
    other initialization itself."""

    seed: int
    teacher: Any
    teacher_init: Any
    same_init: Any
    other_init: Any
    other_init_start: Any


def train_seed(seed: int, x_train: torch.Tensor, y_train: torch.Tensor, *, epochs: float = 5,
               batch_size: int = 1024, lr: float = 3e-4, hidden: Sequence[int] = (256, 256),
               aux_outputs: int = 3, progress: bool = False) -> SeedModels:
    """Trains one seed's teacher (CE on the class logits of x_train [N, 784], y_train [N]) and
    its two students (aux-logit KD on uniform noise, as many steps per epoch as the data)."""
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    config = TrainerConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           progress=progress)
    teacher = _mlp(seed, hidden, aux_outputs)
    teacher_init = teacher.clone()
    same_init = teacher.clone()  # the teacher's initial weights, before training
    other_init = _mlp(seed + OTHER_INIT_OFFSET, hidden, aux_outputs)
    other_init_start = other_init.clone()
    Trainer(config).fit(teacher, (x_train, y_train), objective="sft")
    teacher.eval()
    noise = NoiseSpec(features=INPUTS, steps_per_epoch=steps_per_epoch)
    for student in (same_init, other_init):
        Trainer(config).fit(student, noise, teacher=teacher, objective="aux_kd")
    return SeedModels(seed, teacher, teacher_init, same_init, other_init, other_init_start)


def run(
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    epochs: float = 5,
    batch_size: int = 1024,
    lr: float = 3e-4,
    hidden: Sequence[int] = (256, 256),
    aux_outputs: int = 3,
    train_subset: Optional[int] = None,
    root=FASHION_MNIST_ROOT,
    threads: Optional[int] = None,
    progress: bool = False,
    on_seed: Optional[Callable[["SeedModels", SeedAccuracies], None]] = None,
) -> AuxLogitsResult:
    """Runs the experiment for each seed and summarizes.

    seeds: one teacher / same-init student / other-init student triple per seed (the teacher's
    initialization and the data order come from the seed; the other-init student from
    seed + OTHER_INIT_OFFSET). train_subset: use only the first n training images (a quick
    version; the noise epoch shrinks with it). threads: torch.set_num_threads for the run
    (restored afterwards). on_seed(models, accuracies): called after each seed with its
    networks (the demo runs the detector on them). Raises OSError when Fashion-MNIST is not
    installed.
    """
    x_train, y_train = load_fashion_mnist("train", root=root, normalize=True)
    x_test, y_test = load_fashion_mnist("test", root=root, normalize=True)
    x_train, x_test = x_train.reshape(-1, INPUTS), x_test.reshape(-1, INPUTS)
    if train_subset is not None:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    results = []
    try:
        for seed in seeds:
            models = train_seed(seed, x_train, y_train, epochs=epochs, batch_size=batch_size,
                                lr=lr, hidden=hidden, aux_outputs=aux_outputs,
                                progress=progress)
            results.append(SeedAccuracies(
                seed=seed,
                teacher=accuracy(models.teacher, x_test, y_test),
                same_init=accuracy(models.same_init, x_test, y_test),
                other_init=accuracy(models.other_init, x_test, y_test),
            ))
            if on_seed is not None:
                on_seed(models, results[-1])
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    return AuxLogitsResult(
        seeds=results,
        teacher=t_interval([r.teacher for r in results]),
        same_init=t_interval([r.same_init for r in results]),
        other_init=t_interval([r.other_init for r in results]),
        settings=dict(seeds=list(seeds), epochs=epochs, batch_size=batch_size, lr=lr,
                      hidden=list(hidden), aux_outputs=aux_outputs, train_subset=train_subset,
                      steps_per_epoch=steps_per_epoch),
        seconds=seconds,
        threads=used_threads,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    result = run(seeds=range(args.seeds), epochs=args.epochs, train_subset=args.train_subset,
                 threads=args.threads, progress=args.progress)
    print(result)
    print(asdict(result)["settings"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
