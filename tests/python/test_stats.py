"""Tests of biastransfer._C's statistics against scipy and brute force written here."""
from __future__ import annotations

import itertools
import math
from typing import List

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from biastransfer import _C


def log_poisson_sum(y: float, L: int) -> float:
    """log sum_{k<L} y^k / k!, so that log P(chi2_{2L} >= 2y) = -y + log_poisson_sum(y, L)."""
    return float(scipy.special.logsumexp([k * math.log(y) - math.lgamma(k + 1) for k in range(L)]))


# ---- distribution tails -----------------------------------------------------------------------

@pytest.mark.parametrize("df", [1.0, 2.5, 7.0, 40.0])
@pytest.mark.parametrize("x", [0.0, 0.3, 2.0, 9.0, 60.0])
def test_t_and_chi2_tails_match_scipy(x: float, df: float) -> None:
    assert _C.t_sf(x, df) == pytest.approx(scipy.stats.t.sf(x, df), rel=1e-10, abs=1e-300)
    assert _C.t_sf(-x, df) == pytest.approx(scipy.stats.t.sf(-x, df), rel=1e-10)
    assert _C.chi2_sf(x, df) == pytest.approx(scipy.stats.chi2.sf(x, df), rel=1e-10, abs=1e-300)
    if scipy.stats.chi2.sf(x, df) > 0:
        assert _C.chi2_logsf(x, df) == pytest.approx(scipy.stats.chi2.logsf(x, df), rel=1e-10)


@pytest.mark.parametrize("x", [-3.0, 0.0, 1.5, 8.0, 35.0])
def test_normal_tails_match_scipy(x: float) -> None:
    assert _C.normal_sf(x) == pytest.approx(scipy.stats.norm.sf(x), rel=1e-12)
    assert _C.normal_logsf(x) == pytest.approx(scipy.stats.norm.logsf(x), rel=1e-10)


def test_log_tails_stay_finite_where_scipy_underflows() -> None:
    # chi2 with even df: log Q(L, y) = -y + log sum_{k<L} y^k / k!, y = x / 2 (closed form).
    for x, df in [(3000.0, 2), (5000.0, 10), (1e5, 40)]:
        y, L = x / 2, df // 2
        expected = -y + log_poisson_sum(y, L)
        assert _C.chi2_logsf(x, df) == pytest.approx(expected, rel=1e-12)
    # Student t far tail: sf = z^a (1 - z)^(1/2) / (2 a B(a, 1/2)) (1 + O(z)), z = df / (df + x^2).
    for x, df in [(1e80, 10.0), (1e200, 3.0)]:
        a = df / 2
        log_z = math.log(df) - 2 * math.log(x)
        expected = a * log_z - math.log(a) - scipy.special.betaln(a, 0.5) - math.log(2)
        assert _C.t_logsf(x, df) == pytest.approx(expected, rel=1e-12)
    # Where scipy is still finite, both agree (the switch to the series is seamless).
    assert _C.t_logsf(1e28, 10.0) == pytest.approx(scipy.stats.t.logsf(1e28, 10.0), rel=1e-9)
    assert math.isfinite(_C.t_logsf(1e200, 3.0))


def test_bad_degrees_of_freedom_are_value_errors() -> None:
    for f in (_C.t_sf, _C.chi2_sf, _C.chi2_logsf):
        with pytest.raises(ValueError, match="degrees of freedom"):
            f(1.0, 0.0)


# ---- Kolmogorov-Smirnov -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 20, 100, 141, 400, 1000, 3000, 30000])
def test_ks_uniform_matches_scipy_kstest(n: int) -> None:
    gen = np.random.default_rng(n)
    for sample in (gen.uniform(size=n), gen.uniform(size=n) ** 1.3, gen.beta(2, 2, size=n)):
        ours = _C.ks_uniform(torch.from_numpy(sample))
        ref = scipy.stats.kstest(sample, "uniform")
        assert ours["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
        # scipy switches to the Pelz-Good approximation for n > 140 in the bulk; we stay exact
        # (Marsaglia-Tsang-Wang), so allow the approximation's error there.
        # Beyond ~10^4 draws in the bulk we use Kolmogorov's limit with Stephens' correction.
        rel = 1e-9 if n <= 140 else 1e-4 if n <= 10000 else 2e-3
        assert ours["p_value"] == pytest.approx(ref.pvalue, rel=rel, abs=1e-14)


def test_ks_tail_is_exact_against_scipys_exact_method() -> None:
    from scipy.stats import _ksstats  # scipy's own exact Durbin-matrix evaluation

    for n, d in [(141, 0.05), (500, 0.03), (1000, 0.02), (3000, 0.012)]:
        exact = float(_ksstats._kolmogn_DMTW(n, d, cdf=False))
        assert _C.ks_sf(d, n) == pytest.approx(exact, rel=1e-10)
    for x in [0.3, 0.8, 1.0, 1.36, 2.5]:
        assert _C.kolmogorov_sf(x) == pytest.approx(scipy.stats.kstwobign.sf(x), rel=1e-10)
    for n, d in [(10, 0.3), (200, 0.1), (5000, 0.02)]:
        assert _C.smirnov_sf(d, n) == pytest.approx(scipy.special.smirnov(n, d), rel=1e-9)


def test_ks_uniform_rejects_values_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _C.ks_uniform(torch.tensor([0.2, 1.5]))
    with pytest.raises(ValueError, match="finite"):
        _C.ks_uniform(torch.tensor([0.2, float("nan")]))
    with pytest.raises(ValueError, match="at least one"):
        _C.ks_uniform(torch.zeros(0))


# ---- Benjamini-Hochberg, Fisher ---------------------------------------------------------------

def brute_force_bh(p: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """The BH definition: reject p_(1..k), k = max{i: p_(i) <= i q / m}; adjusted p-values are
    min(1, min_{j >= i} m p_(j) / j)."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    ranks = np.arange(1, m + 1)
    below = np.nonzero(p[order] <= ranks * q / m)[0]
    rejected = np.zeros(m, dtype=bool)
    if len(below):
        rejected[order[: below.max() + 1]] = True
    adjusted = np.empty(m)
    for i in range(m):
        adjusted[order[i]] = min(1.0, min(p[order[j]] * m / (j + 1) for j in range(i, m)))
    return rejected, adjusted


@pytest.mark.parametrize("seed", range(5))
def test_benjamini_hochberg_matches_the_definition(seed: int) -> None:
    gen = np.random.default_rng(seed)
    p = np.concatenate([gen.uniform(size=40), gen.uniform(size=10) * 1e-3, [0.5, 0.5]])
    for q in (0.01, 0.05, 0.2):
        rejected, adjusted = _C.benjamini_hochberg(torch.from_numpy(p), q)
        exp_rejected, exp_adjusted = brute_force_bh(p, q)
        np.testing.assert_array_equal(rejected.numpy(), exp_rejected)
        np.testing.assert_allclose(adjusted.numpy(), exp_adjusted, rtol=1e-14)
        fdc = getattr(scipy.stats, "false_discovery_control", None)  # scipy >= 1.11
        if fdc is not None:
            np.testing.assert_allclose(adjusted.numpy(), fdc(p), rtol=1e-12)


def test_benjamini_hochberg_rejects_nan_and_bad_q() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _C.benjamini_hochberg(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="q must"):
        _C.benjamini_hochberg(torch.tensor([0.1]), q=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _C.benjamini_hochberg(torch.tensor([-0.1]))


def test_fisher_matches_scipy_and_stays_finite_for_tiny_p() -> None:
    p = np.array([0.01, 0.2, 0.7, 0.04])
    ours = _C.fisher_combine(torch.from_numpy(p))
    ref = scipy.stats.combine_pvalues(p, method="fisher")
    assert ours["statistic"] == pytest.approx(ref[0], rel=1e-13)
    assert ours["p_value"] == pytest.approx(ref[1], rel=1e-11)
    assert ours["df"] == 8
    # Where scipy underflows to 0: closed form log P(chi2_{2L} >= X), X = -2 sum log p.
    log_p = np.array([-400.0, -350.0, -300.0])
    x = -2 * log_p.sum()
    y, L = x / 2, len(log_p)
    expected = -y + log_poisson_sum(y, L)
    tiny = _C.fisher_combine(torch.from_numpy(np.exp(log_p)))
    assert tiny["log_p"] == pytest.approx(expected, rel=1e-12)
    assert scipy.stats.combine_pvalues(np.exp(log_p), method="fisher")[1] == 0.0
    from_logs = _C.fisher_combine_log(torch.tensor([-1e4, -2e4], dtype=torch.float64))
    assert from_logs["log_p"] == pytest.approx(-3e4 + math.log(1 + 3e4), rel=1e-12)


# ---- ranks, correlations, t tests ---------------------------------------------------------------

def test_rankdata_and_spearman_match_scipy_with_ties() -> None:
    gen = np.random.default_rng(0)
    a = gen.integers(0, 6, size=50).astype(np.float64)
    b = a + gen.integers(0, 4, size=50)
    np.testing.assert_allclose(_C.rankdata(torch.from_numpy(a)).numpy(), scipy.stats.rankdata(a))
    assert _C.spearman(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        scipy.stats.spearmanr(a, b)[0], rel=1e-12)
    assert _C.pearson(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        scipy.stats.pearsonr(a, b)[0], rel=1e-12)
    assert math.isnan(_C.spearman(torch.ones(5), torch.arange(5.0)))
    with pytest.raises(ValueError, match="same length"):
        _C.spearman(torch.ones(5), torch.ones(4))


def test_one_sample_t_matches_scipy() -> None:
    x = torch.randn(15, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.3
    t, p = _C.one_sample_t(x)
    ref = scipy.stats.ttest_1samp(x.numpy(), 0.0)
    np.testing.assert_allclose(t.numpy(), ref.statistic, rtol=1e-12)
    np.testing.assert_allclose(p.numpy(), ref.pvalue, rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2 rows"):
        _C.one_sample_t(torch.ones(1, 3))


# ---- permutation tests --------------------------------------------------------------------------

def brute_force_sign_flip(x: np.ndarray, statistic: str) -> float:
    def stat(y: np.ndarray) -> float:
        if statistic == "sumsq":
            return float((y.mean(0) ** 2).sum())
        sd = y.std(0, ddof=1)
        t = np.where(sd > 0, y.mean(0) / np.where(sd > 0, sd, 1) * math.sqrt(len(y)), 0.0)
        return float(np.abs(t).max())

    observed = stat(x)
    hits = [stat(x * np.array(s)[:, None]) >= observed * (1 - 1e-12)
            for s in itertools.product([1.0, -1.0], repeat=len(x))]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("n", [2, 5, 8, 10])
@pytest.mark.parametrize("statistic", ["sumsq", "maxt"])
def test_exact_sign_flip_equals_brute_force(n: int, statistic: str) -> None:
    x = np.random.default_rng(n).normal(0.4, 1.0, size=(n, 3))
    r = _C.sign_flip_test(torch.from_numpy(x), statistic=statistic, permutations=9999)
    assert r["exact"] and r["permutations"] == 2 ** n
    assert r["p_value"] == pytest.approx(brute_force_sign_flip(x, statistic), abs=1e-15)


def test_sign_flip_p_values_are_uniform_under_symmetric_noise() -> None:
    gen = torch.Generator().manual_seed(123)
    p_values: List[float] = []
    for rep in range(250):
        noise = torch.randn(20, 4, generator=gen, dtype=torch.float64)
        # Heteroscedastic rows: the sign-flip test needs symmetry only, not equal variances.
        noise = noise * torch.rand(20, 1, generator=gen, dtype=torch.float64)
        statistic = "sumsq" if rep % 2 else "maxt"
        r = _C.sign_flip_test(noise, statistic=statistic, permutations=199, seed=rep)
        p_values.append(r["p_value"])
    p = np.array(p_values)
    assert ((p > 0) & (p <= 1)).all()
    assert scipy.stats.kstest(p, "uniform").pvalue > 0.01
    assert _C.ks_uniform(torch.from_numpy(p))["p_value"] > 0.01


def test_sign_flip_detects_a_shift_and_is_seeded() -> None:
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    shifted = _C.sign_flip_test(x + 1.0, permutations=999, seed=1)
    assert shifted["p_value"] == pytest.approx(1 / 1000)
    first = _C.sign_flip_test(x, permutations=999, seed=2)
    assert first == _C.sign_flip_test(x, permutations=999, seed=2)
    with pytest.raises(ValueError, match="statistic"):
        _C.sign_flip_test(x, statistic="mean")
    with pytest.raises(ValueError, match="finite"):
        _C.sign_flip_test(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2 dimension"):
        _C.sign_flip_test(torch.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        _C.sign_flip_test(torch.ones(3, 2, dtype=torch.bool))


def test_permutation_p_value_is_in_the_unit_interval() -> None:
    null = torch.arange(1.0, 100.0)
    assert _C.permutation_p_value(1000.0, null) == pytest.approx(1 / 100)
    assert _C.permutation_p_value(-5.0, null) == 1.0
    assert _C.permutation_p_value(50.0, null, greater=False) == pytest.approx(51 / 100)
