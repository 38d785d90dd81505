"""Tests of the fingerprint tests and comparisons in biastransfer._C (trait-specific fingerprint,
global sign-flip test, per-token tests with Benjamini-Hochberg, comparison of two fingerprints),
against numpy/scipy formulas written here and calibration on synthetic per-sequence data."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest
import scipy.stats
import torch

from biastransfer import _C


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_trait_specific_subtracts_the_mean_of_the_controls() -> None:
    g = rng(0)
    teacher = torch.randn(8, 5, generator=g)
    controls = [torch.randn(8, 5, generator=g) for _ in range(3)]
    expected = teacher.double() - torch.stack(controls).double().mean(0)
    torch.testing.assert_close(_C.trait_specific(teacher, controls), expected)
    torch.testing.assert_close(_C.trait_specific(teacher[0], [c[0] for c in controls]), expected[0])
    torch.testing.assert_close(_C.trait_specific(teacher, []), teacher.double())
    with pytest.raises(ValueError, match=r"controls\[1\].*\[8, 5\].*\[8, 4\]"):
        _C.trait_specific(teacher, [controls[0], torch.zeros(8, 4)])


def test_global_test_is_the_sign_flip_test_of_the_differences() -> None:
    g = rng(1)
    teacher = torch.randn(40, 6, generator=g, dtype=torch.float64) + 0.1
    controls = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    diffs = teacher - (controls[0] + controls[1]) / 2
    for statistic in ("sumsq", "maxt"):
        r = _C.global_test(teacher, controls, statistic=statistic, permutations=499, seed=4)
        direct = _C.sign_flip_test(diffs, statistic=statistic, permutations=499, seed=4)
        assert r["p_value"] == direct["p_value"]
        assert r["statistic"] == pytest.approx(direct["statistic"], rel=1e-13)
        assert r["n_sequences"] == 40 and r["permutations"] == 499
    max_t = np.abs(scipy.stats.ttest_1samp(diffs.numpy(), 0).statistic).max()
    assert r["statistic"] == pytest.approx(float(max_t))
    with pytest.raises(ValueError, match=r"teacher_seq must be a matrix"):
        _C.global_test(teacher[0])
    with pytest.raises(ValueError, match=r"controls_seq|controls\[0\]"):
        _C.global_test(teacher, [teacher[:3]])


def test_global_test_p_values_are_uniform_with_exchangeable_controls() -> None:
    """Teacher and controls: the same per-sequence signal plus independent noise (no trait)."""
    g = rng(2)
    p_values: List[float] = []
    for rep in range(220):
        shared = torch.randn(16, 5, generator=g, dtype=torch.float64)  # what every model shares
        teacher = shared + 0.3 * torch.randn(16, 5, generator=g, dtype=torch.float64)
        control = shared + 0.3 * torch.randn(16, 5, generator=g, dtype=torch.float64)
        p_values.append(_C.global_test(teacher, [control], permutations=199, seed=rep)["p_value"])
    assert scipy.stats.kstest(p_values, "uniform").pvalue > 0.01


def test_per_token_test_matches_scipy_and_controls_the_fdr() -> None:
    g = rng(3)
    teacher = torch.randn(30, 12, generator=g, dtype=torch.float64)
    control = torch.randn(30, 12, generator=g, dtype=torch.float64)
    r = _C.per_token_test(teacher, [control], q=0.1)
    ref = scipy.stats.ttest_1samp((teacher - control).numpy(), 0.0)
    np.testing.assert_allclose(r["t"].numpy(), ref.statistic, rtol=1e-12)
    np.testing.assert_allclose(r["p"].numpy(), ref.pvalue, rtol=1e-10)
    rejected, adjusted = _C.benjamini_hochberg(r["p"], 0.1)
    assert torch.equal(r["rejected"], rejected) and torch.equal(r["adjusted"], adjusted)

    # FDR: 40 tokens, 6 truly shifted; the false discovery proportion averaged over repetitions.
    q, n, S, planted = 0.1, 25, 40, 6
    fdp, recall = [], []
    for _ in range(150):
        diffs = torch.randn(n, S, generator=g, dtype=torch.float64)
        diffs[:, :planted] += 0.9
        rej = _C.per_token_test(diffs, [], q=q)["rejected"].numpy()
        false = rej[planted:].sum()
        fdp.append(false / max(rej.sum(), 1))
        recall.append(rej[:planted].mean())
    # BH guarantees FDR <= q (m0/m) = 0.085 here; margin: 3 standard errors of the mean.
    margin = 3 * np.std(fdp) / np.sqrt(len(fdp))
    assert np.mean(fdp) <= q * (S - planted) / S + margin
    assert np.mean(recall) > 0.8


def centered_cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a - a.mean(), b - b.mean()
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_compare_fingerprints_against_numpy_and_scipy() -> None:
    gen = np.random.default_rng(4)
    a = gen.normal(size=60)
    b = 0.6 * a + gen.normal(size=60)
    controls = [gen.normal(size=60) for _ in range(5)]
    r = _C.compare_fingerprints(torch.from_numpy(a), torch.from_numpy(b), k=10,
                                controls=[torch.from_numpy(c) for c in controls])
    assert r["cosine"] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-12)
    assert r["cosine"] == pytest.approx(centered_cosine(a, b), rel=1e-12)
    assert r["spearman"] == pytest.approx(scipy.stats.spearmanr(a, b)[0], rel=1e-12)
    top_a, top_b = set(np.argsort(-a)[:10]), set(np.argsort(-b)[:10])
    assert r["topk_overlap"] == pytest.approx(len(top_a & top_b) / 10)
    cos_c = np.array([centered_cosine(c, b) for c in controls])
    sp_c = np.array([scipy.stats.spearmanr(c, b)[0] for c in controls])
    z_cos = (r["cosine"] - cos_c.mean()) / cos_c.std(ddof=1)
    z_sp = (r["spearman"] - sp_c.mean()) / sp_c.std(ddof=1)
    assert r["z_cosine"] == pytest.approx(z_cos, rel=1e-10)
    assert r["z_spearman"] == pytest.approx(z_sp, rel=1e-10)
    np.testing.assert_allclose(r["control_cosines"].numpy(), cos_c, rtol=1e-12)


def test_compare_fingerprints_edge_cases() -> None:
    a = torch.arange(10.0)
    r = _C.compare_fingerprints(a, 2 * a + 1, k=50)
    assert r["cosine"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
    assert r["k"] == 10 and r["topk_overlap"] == 1.0
    assert "z_cosine" not in r  # needs >= 2 controls
    assert "z_cosine" not in _C.compare_fingerprints(a, a, controls=[a])
    with pytest.raises(ValueError, match="same length"):
        _C.compare_fingerprints(a, a[:5])
    with pytest.raises(ValueError, match="finite"):
        _C.compare_fingerprints(a, a.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="k must"):
        _C.compare_fingerprints(a, a, k=0)
    with pytest.raises(ValueError, match=r"controls\[0\]"):
        _C.compare_fingerprints(a, a, controls=[a[:3], a[:3]])
