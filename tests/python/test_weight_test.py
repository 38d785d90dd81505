"""The weight test through Python: input kinds, p-values against scipy and brute force, null
calibration over many independent pairs, the permutation test, errors."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from biastransfer import _C
from biastransfer.detection import UnitGroup, permutation_test, weight_groups, weight_test
from biastransfer.safetensors import save_safetensors

SIZES = (20, 16, 16, 5)  # small MLPs: many pairs in a few seconds


def mlp(seed: int, sizes=SIZES) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def noisy(model: torch.nn.Module, scale: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_spearman_matches_scipy_one_sided():
    rng = np.random.default_rng(0)
    for n in (12, 30, 200):
        for _ in range(5):
            perm = np.arange(n)
            # Partly ordered permutations: a range of rho values, not only near 0.
            k = int(rng.integers(0, n))
            idx = rng.choice(n, size=k, replace=False)
            perm[idx] = rng.permutation(perm[idx])
            rho, log10_p, exact = _C.spearman_identity_test(perm.tolist())
            ref = scipy.stats.spearmanr(np.arange(n), perm, alternative="greater")
            assert not exact
            assert rho == pytest.approx(ref.correlation, abs=1e-12)
            floor = -math.lgamma(n + 1) / math.log(10)
            expected = max(math.log10(ref.pvalue), floor) if ref.pvalue > 0 else floor
            assert log10_p == pytest.approx(min(expected, 0.0), rel=1e-6, abs=1e-9)


def test_spearman_exact_small_n_is_brute_force():
    for perm in ([1, 0, 2, 3], [2, 0, 1, 4, 3, 5], [0, 2, 1, 3, 5, 4, 7, 6, 8]):
        n = len(perm)
        rho = scipy.stats.spearmanr(np.arange(n), perm).correlation
        # Spearman of a permutation with the identity, by its definition (no ties).
        others = [1 - 6 * sum((q[i] - i) ** 2 for i in range(n)) / (n * (n * n - 1))
                  for q in itertools.permutations(range(n))] if n <= 7 else None
        got_rho, log10_p, exact = _C.spearman_identity_test(perm)
        assert exact and got_rho == pytest.approx(rho)
        if others is not None:
            expected = np.mean(np.asarray(others) >= rho - 1e-12)
            assert 10 ** log10_p == pytest.approx(expected, rel=1e-12)


def test_fixed_points_closed_form():
    assert _C.fixed_points_log10_p(0) == 0.0
    assert _C.fixed_points_log10_p(7) == pytest.approx(-math.log10(math.factorial(7)))


@pytest.mark.parametrize("kind", ["module", "state_dict", "file_f32", "file_bf16"])
def test_inputs_of_every_kind_detect_a_noisy_copy(kind, tmp_path):
    a = mlp(0)
    b = noisy(a, 0.01)
    if kind == "module":
        args = (a, torch.nn.Sequential(*[m for m in mlp(0)]).requires_grad_(False))
        args[1].load_state_dict(b)
    elif kind == "state_dict":
        args = (a.state_dict(), b)
    else:
        dtype = torch.float32 if kind == "file_f32" else torch.bfloat16
        save_safetensors(tmp_path / "a.safetensors", {k: v.to(dtype) for k, v in a.state_dict().items()})
        save_safetensors(tmp_path / "b.safetensors", {k: v.to(dtype) for k, v in b.items()})
        args = (str(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    r = weight_test(*args)
    assert r.ran and r.test == "weights"
    assert [e.name for e in r.layers] == ["0", "2"]
    assert all(e.matched_fraction == 1.0 and e.units == 16 for e in r.layers)
    assert r.log10_p < -20
    assert r.p_value == pytest.approx(10 ** r.log10_p)
    d = r.to_dict()
    assert d["layers"][0]["name"] == "0" and d["log10_p"] == r.log10_p
    assert "fisher over 2 groups" in str(r)


def test_reinitialized_group_is_localized():
    a = mlp(1, (20, 16, 16, 16, 5))
    b = {k: v.clone() for k, v in a.state_dict().items()}
    other = mlp(99, (20, 16, 16, 16, 5)).state_dict()
    for k in ("2.weight", "2.bias", "4.weight"):  # hidden group "2": rows of 2, columns of 4
        b[k] = other[k]
    r = weight_test(a, b)
    table = {e.name: e for e in r.layers}
    assert table["2"].log10_p > -2
    # Group "0" keeps all its tensors; group "4" only its bias and the 5-dim columns of "6".
    assert table["0"].log10_p < -5
    assert r.p_value < 0.01


def test_null_calibration_over_independent_pairs():
    # Spearman p-values (nearly continuous): uniform, KS p > 0.01. Fixed points (discrete,
    # conservative: p = 1 whenever K <= 1): super-uniform, P(p <= a) <= a.
    spearman_p, fixed_p = [], []
    for k in range(120):
        a, b = mlp(10_000 + 2 * k).state_dict(), mlp(10_001 + 2 * k).state_dict()
        spearman_p.append(weight_test(a, b, statistic="spearman").layers[0].p_value)
        fixed_p.append(weight_test(a, b).p_value)
    assert scipy.stats.kstest(spearman_p, "uniform").pvalue > 0.01
    fixed_p = np.asarray(fixed_p)
    for alpha in (0.05, 0.1, 0.2):
        # Binomial(120, alpha) upper 1% quantile as the allowance.
        assert np.sum(fixed_p <= alpha) <= scipy.stats.binom.ppf(0.99, 120, alpha)


def test_permutation_test_uniform_under_null_and_tiny_for_shared():
    p = [permutation_test(mlp(20_000 + 2 * k), mlp(20_001 + 2 * k), n_permutations=99,
                          seed=k).p_value for k in range(100)]
    assert scipy.stats.kstest(p, "uniform").pvalue > 0.01
    a = mlp(3)
    shared = permutation_test(a, noisy(a, 0.01), n_permutations=99, seed=1)
    assert shared.p_value == pytest.approx(1 / 100)
    assert shared.test == "weights_permutation" and len(shared.layers) == 2
    again = permutation_test(a, noisy(a, 0.01), n_permutations=99, seed=1)
    assert again.to_dict() == shared.to_dict()


def test_permutation_test_with_a_python_statistic():
    a = mlp(4)
    calls = []

    def neg_distance(x: dict, y: dict) -> float:
        calls.append(1)
        assert set(x) == set(y)
        return -float(sum(((x[k] - y[k]) ** 2).sum() for k in x))

    r = permutation_test(a, noisy(a, 0.001), statistic=neg_distance, n_permutations=49)
    assert len(calls) == 50
    assert r.p_value == pytest.approx(1 / 50)
    assert r.statistic_name == "neg_distance"


def test_explicit_groups_and_mapping():
    a = mlp(5)
    b = {k.replace("0.", "first."): v for k, v in noisy(a, 0.01).items()}
    groups = [UnitGroup("hidden", [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)])]
    r = weight_test(a, b, groups=groups, mapping={"0.weight": "first.weight",
                                                  "0.bias": "first.bias"})
    assert [e.name for e in r.layers] == ["hidden"] and r.layers[0].kind == "custom"
    assert r.layers[0].matched_fraction == 1.0
    layout = weight_groups(a)
    assert layout["architecture"] == "mlp_chain"
    assert layout["groups"][0]["members"] == [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]


def test_errors_are_clear():
    a = mlp(6)
    with pytest.raises(TypeError, match="a: expected an nn.Module"):
        weight_test(42, a)
    wrong = mlp(7, (20, 15, 16, 5))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \[16, 20\] in model A but \[15, 20\]"):
        weight_test(a, wrong)
    b = dict(a.state_dict())
    b["2.weight"] = b["2.weight"].clone()
    b["2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2.weight' of model B has 1 non-finite"):
        weight_test(a, b)
    del b["2.weight"]
    with pytest.raises(ValueError, match="no tensor '2.weight'.*similar names"):
        weight_test(a, b)
    with pytest.raises(ValueError, match="statistic"):
        weight_test(a, a, statistic="median")
    with pytest.raises(ValueError, match="no 2-D floating weight"):
        weight_test({"x": torch.ones(3)}, {"x": torch.ones(3)})
    with pytest.raises(OSError):
        weight_test("/nonexistent/a.safetensors", a)


def test_solver_auto_is_default_and_switches_to_greedy_above_the_threshold():
    a, b = mlp(1).state_dict(), noisy(mlp(1), 0.01)
    exact = weight_test(a, b)
    assert "auto assignment (exact up to 4096 units)" in exact.method
    assert all(e.note == "exact assignment" for e in exact.layers)
    greedy = weight_test(a, b, auto_exact_max_units=15)
    assert all(e.note == "greedy assignment (auto: 16 units > 15)" for e in greedy.layers)
    assert all(e.matched_fraction == 1.0 for e in greedy.layers)
    with pytest.raises(ValueError, match="'auto'"):
        weight_test(a, b, solver="hungarian")


def _fixed_points_tail(k: int, n: int) -> float:
    """P(K >= k), K the fixed points of a uniform permutation of n, by enumeration."""
    hits = sum(sum(p[i] == i for i in range(n)) >= k for p in itertools.permutations(range(n)))
    return hits / math.factorial(n)


def _fixed_points_pmf(n: int) -> list:
    """P(K = j), j = 0..n: C(n, j) D(n - j) / n!, D the derangement numbers (exact integers)."""
    d = [1, 0]
    for m in range(2, n + 1):
        d.append((m - 1) * (d[m - 1] + d[m - 2]))
    return [math.comb(n, j) * d[n - j] / math.factorial(n) for j in range(n + 1)]


def test_fixed_points_tail_matches_the_derangement_formula():
    for n in (1, 2, 5, 16, 40):
        pmf = _fixed_points_pmf(n)
        for k in range(n + 1):
            expected = sum(pmf[k:])
            assert 10 ** _C.fixed_points_tail_log10_p(k, n) == pytest.approx(expected, rel=1e-9)


def test_agreement_null_at_initialization_is_calibrated():
    # At initialization the forward and backward matchings depend on independent weights, so the
    # agreements K of a layer are the fixed points of a uniform permutation: E[K] = 1, and the
    # p-values are super-uniform (discrete: P(p <= a) <= a).
    per_layer, combined, agreements = [], [], []
    for k in range(100):
        a, b = mlp(30_000 + 2 * k).state_dict(), mlp(30_001 + 2 * k).state_dict()
        r = weight_test(a, b, statistic="agreement")
        assert r.method.startswith("approximate null: ")
        combined.append(r.p_value)
        per_layer += [e.p_value for e in r.layers]
        agreements += [e.statistic for e in r.layers]
    assert abs(np.mean(agreements) - 1.0) < 3.5 / math.sqrt(len(agreements))
    # Randomized p-values P(K > k) + U P(K = k) are exactly uniform under the null: KS.
    pmf = _fixed_points_pmf(SIZES[1])
    u = np.random.default_rng(0).uniform(size=len(agreements))
    randomized = [sum(pmf[int(k) + 1:]) + ui * pmf[int(k)] for k, ui in zip(agreements, u)]
    assert scipy.stats.kstest(randomized, "uniform").pvalue > 0.01
    for values in (np.asarray(per_layer), np.asarray(combined)):
        for alpha in (0.05, 0.1, 0.2):
            assert np.sum(values <= alpha) <= scipy.stats.binom.ppf(0.99, len(values), alpha)
    # The reported per-layer p is the exact tail P(K >= k) (checked on a small layer).
    small = (6, 5, 3)
    for k in range(5):
        r = weight_test(mlp(40 + 2 * k, small).state_dict(), mlp(41 + 2 * k, small).state_dict(),
                        statistic="agreement")
        e = r.layers[0]
        assert e.p_value == pytest.approx(_fixed_points_tail(int(e.statistic), 5), rel=1e-9)


def _permute_hidden(state: dict, perms: dict) -> dict:
    """nn.Sequential state with hidden layers permuted: perms {linear index: permutation}."""
    out = {k: v.clone() for k, v in state.items()}
    keys = sorted({k.split(".")[0] for k in state}, key=int)
    for i, p in perms.items():
        out[f"{keys[i]}.weight"] = out[f"{keys[i]}.weight"][p]
        out[f"{keys[i]}.bias"] = out[f"{keys[i]}.bias"][p]
        out[f"{keys[i + 1]}.weight"] = out[f"{keys[i + 1]}.weight"][:, p]
    return out


def test_agreement_detects_a_trained_copy_with_permuted_hidden_units():
    from biastransfer.training import Trainer, TrainerConfig

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, SIZES[0], generator=g)
    y = (x[:, :SIZES[-1]] + 0.5 * x[:, SIZES[-1]:2 * SIZES[-1]]).argmax(1)
    model = mlp(5)
    Trainer(TrainerConfig(steps=150, batch_size=64, lr=3e-3, seed=1, progress=False)).fit(
        model, (x, y), objective="ce")
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = {i: torch.randperm(SIZES[i + 1], generator=g) for i in range(len(SIZES) - 2)}
    model.load_state_dict(_permute_hidden(a, perms))
    # The suspect: the permuted copy, fine-tuned further with another seed.
    Trainer(TrainerConfig(steps=50, batch_size=64, lr=1e-3, seed=2, progress=False)).fit(
        model, (x, y), objective="ce")
    b = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert weight_test(a, b).p_value > 0.01  # the identity statistic cannot see it
    r = weight_test(a, b, statistic="agreement")
    assert r.log10_p < -10
    robust = weight_test(a, b, robust=True)
    assert [e.statistic_name for e in robust.layers] == ["fixed_points"] * 2 + ["agreement"] * 2
    assert robust.log10_p == pytest.approx(math.log10(2) + r.log10_p, abs=1e-9)


def test_agreement_test_needs_controls_and_counts_them() -> None:
    """The control-calibrated agreement p: (1 + #{X_control >= X}) / (1 + n), checked against
    the Fisher X of each (a, control) pair computed from the uncalibrated agreement rows."""
    import math

    from biastransfer.detection import agreement_test, weight_test as wt

    def mlp(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        sizes = [12, 10, 10, 4]
        return {f"{i}.weight": torch.randn(sizes[i + 1], sizes[i], generator=g)
                for i in range(3)}

    a, b = mlp(0), mlp(1)
    controls = [mlp(s) for s in range(2, 9)]
    with pytest.raises(ValueError, match="control"):
        agreement_test(a, b, [])

    def fisher_x(x: dict, y: dict) -> float:
        rows = wt(x, y, statistic="agreement").layers
        return sum(-2 * r.log10_p * math.log(10) for r in rows if r.statistic_name == "agreement")

    x = fisher_x(a, b)
    expected = (1 + sum(fisher_x(a, c) >= x for c in controls)) / (1 + len(controls))
    result = agreement_test(a, b, controls)
    assert result.test == "weights_agreement"
    assert result.statistic == pytest.approx(x)
    assert 10 ** result.log10_p == pytest.approx(expected)
