"""The activation, output and susceptibility tests (biastransfer._C, libtransfer/detect): their
null distributions against exact counts, scipy and simulation, and the calibration of each
p-value over many small independent pairs (one-sided KS via scipy: no excess of small p)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from biastransfer import _C

# Calibration runs: enough pairs for a KS test to see a 2x excess of small p-values.
PAIRS = 60
# The one-sided KS test must not reject super-uniformity at this level.
KS_LEVEL = 1e-3


def derangements(m: int) -> int:
    d = [1, 0]
    for i in range(2, m + 1):
        d.append((i - 1) * (d[-1] + d[-2]))
    return d[m]


@pytest.mark.parametrize("n", [1, 2, 5, 12, 40])
def test_fixed_point_tail_is_exact(n):
    # P(K = j) = C(n, j) D(n - j) / n!, in exact rational arithmetic.
    for k in range(0, n + 1):
        tail = sum(Fraction(math.comb(n, j) * derangements(n - j), math.factorial(n))
                   for j in range(k, n + 1))
        got = _C.fixed_points_log10_sf(n, k)
        if tail == 0:
            assert got == -math.inf
        else:
            assert got == pytest.approx(math.log10(tail), rel=1e-11, abs=1e-13)


@pytest.mark.parametrize("dimension", [2, 3, 10, 101, 5000])
def test_random_direction_tail_matches_scipy_beta(dimension):
    a = (dimension - 1) / 2
    for c in (-0.8, -0.1, 0.0, 0.05, 0.3, 0.9):
        expected = stats.beta.sf((c + 1) / 2, a, a)
        got = 10 ** _C.random_direction_cosine_log10_sf(c, dimension)
        assert got == pytest.approx(expected, rel=1e-8, abs=1e-300)
    # Far tail: scipy's logsf where it is still finite.
    expected = stats.beta.logsf(0.6, 2499.5, 2499.5) / math.log(10)
    assert _C.random_direction_cosine_log10_sf(0.2, 5000) == pytest.approx(expected, rel=1e-6)


def test_random_direction_closed_form_matches_simulation():
    direction = torch.randn(30, dtype=torch.float64)
    sims = _C.random_direction_cosines(direction, 5000, seed=1).numpy()
    a = 29 / 2
    result = stats.kstest((sims + 1) / 2, stats.beta(a, a).cdf)
    assert result.pvalue > KS_LEVEL
    again = _C.random_direction_cosines(direction, 5000, seed=1).numpy()
    assert np.array_equal(sims, again)  # seeded


def test_column_correlations_match_numpy():
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64)
    expected = np.corrcoef(x.numpy().T, y.numpy().T)[:5, 5:]
    assert np.allclose(_C.column_correlations(x, y).numpy(), expected, atol=1e-12)


def _mlp(seed: int, sizes=(8, 16, 4)):
    return _C.MLP(list(sizes), seed=seed)


def _ks_super_uniform(p_values) -> float:
    """One-sided KS p-value against 'more small p-values than uniform'."""
    return stats.kstest(np.asarray(p_values), "uniform", alternative="greater").pvalue


def test_activation_p_values_are_calibrated_over_independent_pairs():
    x = torch.rand(200, 8) * 2 - 1
    ps = []
    for i in range(PAIRS):
        d = _C.activation_test(_mlp(1000 + 2 * i), _mlp(1001 + 2 * i), x)
        ps.append(10 ** d["log10_p"])
    assert _ks_super_uniform(ps) > KS_LEVEL
    assert np.mean(np.asarray(ps) <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / PAIRS)


def _calibration_pool(n_models: int, sizes=(8, 16, 4)):
    return [_mlp(5000 + i, sizes) for i in range(n_models)]


@pytest.mark.parametrize("which", ["outputs", "susceptibility"])
def test_control_calibrated_p_values_are_super_uniform(which):
    # Pool of independent models; pair i: a = pool[i], b = pool[i + 1], controls = 9 others.
    # Exchangeable under the null, so P(p <= k / 10) <= k / 10 exactly.
    pool = _calibration_pool(PAIRS + 10)
    x = torch.rand(64, 8) * 2 - 1
    ps = []
    for i in range(PAIRS):
        a, b = pool[i], pool[i + 1]
        controls = pool[i + 2:i + 11]
        if which == "outputs":
            d = _C.output_test(a, b, input=x, controls=controls)
        else:
            d = _C.susceptibility_probe(a, b, input=x, controls=controls)
        ps.append(10 ** d["log10_p"])
    assert _ks_super_uniform(ps) > KS_LEVEL
    for k in range(1, 10):
        u = k / 10
        assert np.mean(np.asarray(ps) <= u + 1e-12) <= u + 3 * math.sqrt(u * (1 - u) / PAIRS)


def _perturbed(model, relative: float, seed: int):
    copy = model.clone()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in copy.state_dict().items():
            t.add_(torch.randn(t.shape, generator=gen) * relative * t.std())
    return copy


def test_output_test_sees_noisy_copies_and_not_independent_models():
    a = _mlp(1, (8, 32, 32, 6))
    controls = [_mlp(100 + i, (8, 32, 32, 6)) for i in range(19)]
    copy = _C.output_test(a, _perturbed(a, 0.05, 3), controls=controls)
    assert copy["correlation"] > 0.95
    assert copy["log10_p"] == pytest.approx(math.log10(1 / 20))
    assert copy["z"] > 2.5  # independent random MLPs already correlate somewhat
    other = _C.output_test(a, _mlp(2, (8, 32, 32, 6)), controls=controls)
    assert other["log10_p"] > math.log10(1 / 20)
    bare = _C.output_test(a, _mlp(2, (8, 32, 32, 6)))
    assert bare["ran"] and "control" in bare["skipped_reason"] and not bare["calibrated"]


def test_susceptibility_theorem_on_the_paper_setting():
    # Teacher = base + one gradient step on a trait loss; the student (the base) imitating the
    # teacher on noise moves toward it (DESIGN.md section 1); independent teachers do not.
    base = _mlp(7, (8, 32, 6))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(128, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 6, (128,), generator=gen)

    def trait(model):
        return torch.nn.functional.cross_entropy(model(x), y)

    teacher = base.clone()
    params = [t for _, t in teacher.named_parameters()]
    grads = torch.autograd.grad(trait(teacher), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(0.5 * g)
    controls = [_mlp(300 + i, (8, 32, 6)) for i in range(9)]
    d = _C.susceptibility_probe(base, teacher, controls=controls, trait_loss=trait,
                                random_directions=100)
    assert d["cosine"] > 0.2
    assert d["log10_p"] == pytest.approx(-1.0)
    assert d["predicted_trait_change"] < 0
    assert d["random_cosines"].shape == (100,)
    assert all(abs(c) < d["cosine"] for c in d["control_cosines"])
    # Independent check of the predicted change: a step of step_size along -g in plain torch.
    student = base.clone()
    sparams = [t for _, t in student.named_parameters()]
    probes = _C.default_probe_inputs(base, seed=0)
    with torch.no_grad():
        target = torch.log_softmax(teacher(probes), -1)
    kd = torch.nn.functional.kl_div(torch.log_softmax(student(probes), -1), target,
                                    reduction="batchmean", log_target=True)
    g = torch.autograd.grad(kd, sparams)
    before = trait(student).item()
    with torch.no_grad():
        for p, gi in zip(sparams, g):
            p.sub_(1e-3 * gi)
    assert d["predicted_trait_change"] == pytest.approx(trait(student).item() - before, rel=0.05)


def test_probes_refuse_bad_inputs():
    a, wide = _mlp(1), _mlp(2, (8, 20, 4))
    with pytest.raises(ValueError, match="16 units in a but 20 in b"):
        _C.activation_test(a, wide, torch.rand(30, 8))
    with pytest.raises(ValueError, match="4 outputs, b has 5"):
        _C.output_test(a, _mlp(3, (8, 16, 5)))
    with pytest.raises(ValueError, match="layers.0.weight"):
        _C.susceptibility_probe(a, wide)
    with pytest.raises(ValueError, match="input"):
        _C.activation_test(a, a, torch.empty(0, 8))
    with pytest.raises(TypeError, match="trait_loss"):
        _C.susceptibility_probe(a, _mlp(4), trait_loss=3)
