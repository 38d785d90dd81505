"""Calibration and power of the fingerprint tests, on synthetic logits fed straight into
``_C.FingerprintAccumulator`` (no model, so hundreds of repetitions take seconds).

- No shift (teacher = reference + independent noise, controls drawn the same way): the global
  sign-flip test's p-values are uniform (KS, through ``_C.ks_uniform`` and scipy, p > 0.01).
- Benjamini-Hochberg over the per-token tests keeps the false discovery rate at or below q.
- Planted shifts (a teacher whose logits on 10 of 500 tokens are raised by 0.2 nats): the planted
  tokens are recovered with precision and recall >= 0.95 at the sizes below (docs/fingerprints.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import pytest
import scipy.stats
import torch

from biastransfer import _C
from biastransfer.fingerprint import FingerprintResult

# Smallest KS p-value accepted for "uniform" (the threshold): a correct test fails it
# with probability 0.01, and the seeds are fixed, so a pass is reproducible.
KS_ALPHA = 0.01
REPETITIONS = 1000  # the issue asks for at least 200; 1000 take under a second in C++
PERMUTATIONS = 199  # p-values resolve to 1/200, far below the KS critical distance (~0.1)


@dataclass
class Sizes:
    """One synthetic experiment: n sequences of T positions over V tokens (S = all of them)."""

    sequences: int
    positions: int
    vocab: int
    noise: float  # standard deviation of the teacher's and controls' logit noise, nats
    controls: int


def draw(sizes: Sizes, rng: torch.Generator, planted: torch.Tensor | None = None):
    """Teacher and control accumulators against one reference: logits_R ~ N(0, 2^2), each
    teacher/control = logits_R + N(0, noise^2) independently per position (+ ``planted`` [V] on
    the teacher only)."""
    n, t, v = sizes.sequences, sizes.positions, sizes.vocab
    reference = torch.randn(n * t, v, generator=rng) * 2.0
    sequence_ids = torch.arange(n, dtype=torch.int64).repeat_interleave(t)
    subset = torch.arange(v, dtype=torch.int64)
    accumulators = []
    for role in range(1 + sizes.controls):
        logits = reference + torch.randn(n * t, v, generator=rng) * sizes.noise
        if role == 0 and planted is not None:
            logits += planted
        acc = _C.FingerprintAccumulator(v, subset=subset)
        acc.update(logits.float(), reference.float(), sequence_ids=sequence_ids)
        accumulators.append(acc)
    return FingerprintResult.from_accumulators(accumulators[0], accumulators[1:])


def assert_uniform(p_values: Sequence[float]) -> None:
    p = torch.as_tensor(p_values, dtype=torch.float64)
    ours = _C.ks_uniform(p)
    theirs = scipy.stats.kstest(p.numpy(), "uniform")
    assert ours["p_value"] > KS_ALPHA, (ours, np.quantile(p.numpy(), [0.1, 0.5, 0.9]))
    assert theirs.pvalue > KS_ALPHA, theirs
    assert ours["statistic"] == pytest.approx(theirs.statistic, rel=1e-9)


@pytest.mark.parametrize("statistic", ["sumsq", "maxt"])
@pytest.mark.parametrize("controls", [0, 2])
def test_global_test_p_values_are_uniform_without_a_shift(statistic, controls):
    sizes = Sizes(sequences=20, positions=5, vocab=40, noise=0.5, controls=controls)
    rng = torch.Generator().manual_seed(1000 + 10 * controls + (statistic == "maxt"))
    p_values = [
        draw(sizes, rng).global_test(permutations=PERMUTATIONS, statistic=statistic,
                                     seed=rep)["p_value"]
        for rep in range(REPETITIONS)
    ]
    assert min(p_values) >= 1 / (PERMUTATIONS + 1)
    assert_uniform(p_values)


def test_global_test_detects_a_planted_shift():
    sizes = Sizes(sequences=20, positions=5, vocab=40, noise=0.5, controls=2)
    planted = torch.zeros(sizes.vocab)
    planted[:4] = 0.5
    rng = torch.Generator().manual_seed(7)
    p = [draw(sizes, rng, planted).global_test(permutations=PERMUTATIONS, seed=r)["p_value"]
         for r in range(20)]
    assert max(p) <= 0.01, p  # power ~1 here, against a uniform p under the null


def fdr_and_power(found: List[int], truth: set) -> tuple[float, int, int]:
    false = sum(1 for i in found if i not in truth)
    return false / max(len(found), 1), len(found) - false, false


@pytest.mark.parametrize("q", [0.05, 0.2])
def test_benjamini_hochberg_keeps_the_false_discovery_rate(q):
    # Balanced planted shifts (+delta on 5 tokens, -delta on 5) keep the mean over S at zero, so
    # every other token's centered log-ratio has expectation exactly 0: a true null.
    sizes = Sizes(sequences=20, positions=5, vocab=100, noise=0.5, controls=2)
    planted = torch.zeros(sizes.vocab)
    planted[:5], planted[5:10] = 0.15, -0.15
    truth = set(range(10))
    rng = torch.Generator().manual_seed(int(q * 1000))
    fdp, discoveries = [], 0
    for _ in range(REPETITIONS):
        found = [e.id for e in draw(sizes, rng, planted).entangled_tokens(q=q)]
        fdp.append(fdr_and_power(found, truth)[0])
        discoveries += len(found)
    fdr = float(np.mean(fdp))
    margin = 3 * float(np.std(fdp, ddof=1)) / math.sqrt(REPETITIONS)
    assert discoveries > REPETITIONS  # the test has power here, so the FDR is not vacuous
    assert fdr <= q + margin, (fdr, q, margin)


# The sizes at which planted tokens are recovered (docs/fingerprints.md, "Planted shifts").
PLANTED = Sizes(sequences=100, positions=20, vocab=500, noise=1.0, controls=2)
PLANTED_TOKENS = 10
PLANTED_SHIFT = 0.2  # nats added to the teacher's logits of the planted tokens
PLANTED_Q = 0.01  # BH level: expected precision ~ 1 - q, so q must sit well below 0.05
PLANTED_REPETITIONS = 10


def test_planted_tokens_are_recovered():
    rng = torch.Generator().manual_seed(2024)
    true_found = false_found = 0
    for _ in range(PLANTED_REPETITIONS):
        chosen = torch.randperm(PLANTED.vocab, generator=rng)[:PLANTED_TOKENS]
        planted = torch.zeros(PLANTED.vocab)
        planted[chosen] = PLANTED_SHIFT
        result = draw(PLANTED, rng, planted)
        found = result.entangled_tokens(q=PLANTED_Q)
        _, hits, misses = fdr_and_power([e.id for e in found], set(chosen.tolist()))
        true_found += hits
        false_found += misses
        assert all(e.value > 0 for e in found if e.id in set(chosen.tolist()))
    precision = true_found / max(true_found + false_found, 1)
    recall = true_found / (PLANTED_TOKENS * PLANTED_REPETITIONS)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
