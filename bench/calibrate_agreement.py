"""Null calibration of the weight test's agreement statistic (docs/detection.md).

Independent pairs of small MLPs: (1) at random initialization (the null is exact there: the
forward and backward matchings depend on independent weights), and (2) trained briefly on the same
synthetic data with different seeds through the C++ trainer (the null is only approximate after
training). Prints, per setting, the fraction of pairs with combined agreement p < 0.01 and < 0.05,
the same for the per-layer p-values, and the mean number of agreements per layer (1 under the
null). Usage: python bench/calibrate_agreement.py [--random 100] [--trained 30] [--steps 300]
[--hidden 16]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from biastransfer.detection import weight_test
from biastransfer.training import Trainer, TrainerConfig

SIZES = (20, 16, 16, 5)  # --hidden changes the two hidden widths


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def data(n: int = 2048, seed: int = 12345):
    """A fixed synthetic task: 5 classes from a random teacher MLP on Gaussian inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SIZES[0], generator=g)
    w1 = torch.randn(SIZES[0], 32, generator=g)
    w2 = torch.randn(32, SIZES[-1], generator=g)
    return x, (torch.relu(x @ w1) @ w2).argmax(1)


def summarize(name: str, combined: list, per_layer: list, agreements: list) -> None:
    c, l = np.asarray(combined), np.asarray(per_layer)
    print(f"{name:<10} pairs {len(c):>4}  combined p<0.01 {np.mean(c < 0.01):.3f}  "
          f"p<0.05 {np.mean(c < 0.05):.3f}  | per-layer p<0.01 {np.mean(l < 0.01):.3f}  "
          f"p<0.05 {np.mean(l < 0.05):.3f}  | mean agreements {np.mean(agreements):.2f} (null 1)")


def run(pairs: int, trained: bool, steps: int, x, y):
    combined, per_layer, agreements = [], [], []
    cfg = dict(steps=steps, batch_size=64, lr=3e-3, progress=False)
    for k in range(pairs):
        a, b = mlp(20_000 + 2 * k), mlp(20_001 + 2 * k)
        if trained:
            Trainer(TrainerConfig(seed=2 * k, **cfg)).fit(a, (x, y), objective="ce")
            Trainer(TrainerConfig(seed=2 * k + 1, **cfg)).fit(b, (x, y), objective="ce")
        r = weight_test(a.state_dict(), b.state_dict(), statistic="agreement")
        combined.append(r.p_value)
        per_layer += [e.p_value for e in r.layers]
        agreements += [e.statistic for e in r.layers]
    return combined, per_layer, agreements


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=100)
    parser.add_argument("--trained", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=16)
    args = parser.parse_args()
    global SIZES
    SIZES = (SIZES[0], args.hidden, args.hidden, SIZES[-1])
    x, y = data()
    start = time.perf_counter()
    summarize("random", *run(args.random, False, 0, x, y))
    summarize(f"trained{args.steps}", *run(args.trained, True, args.steps, x, y))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
