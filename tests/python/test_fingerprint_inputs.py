"""Tests of the top-k and samples-only fingerprint inputs in biastransfer._C against eager
PyTorch / scipy written here, calibration of the G-test's permutation p-value, and bad inputs."""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List, Tuple

import numpy as np
import pytest
import scipy.stats
import torch

from biastransfer import _C


# ---- top-k log-probs with tail mass -----------------------------------------------------------

def eager_topk(lt: torch.Tensor, lr: torch.Tensor, k: int) -> Dict[str, torch.Tensor]:
    """The top-k fingerprint from full log-probs [N, V], written densely with torch."""
    vt, it = lt.topk(k, dim=1)
    vr, ir = lr.topk(k, dim=1)
    in_t = torch.zeros_like(lt, dtype=torch.bool).scatter_(1, it, True)
    in_r = torch.zeros_like(lr, dtype=torch.bool).scatter_(1, ir, True)
    tail_t = (1 - vt.exp().sum(1)).clamp_min(0)
    tail_r = (1 - vr.exp().sum(1)).clamp_min(0)
    bound_t = torch.minimum(vt.min(1).values, tail_t.clamp_min(1e-12).log())[:, None]
    bound_r = torch.minimum(vr.min(1).values, tail_r.clamp_min(1e-12).log())[:, None]
    both, only_t, only_r = in_t & in_r, in_t & ~in_r, ~in_t & in_r
    delta = torch.where(both, lt - lr, torch.zeros_like(lt))
    delta = torch.where(only_t, lt - bound_r, delta)
    delta = torch.where(only_r, bound_t - lr, delta)
    seen = (both | only_t | only_r).sum(0)
    return {
        "mean_log_ratio": delta.sum(0) / seen,  # NaN (0/0) where never seen
        "mean_log_ratio_exact": (torch.where(both, lt - lr, torch.zeros_like(lt)).sum(0)
                                 / both.sum(0)),
        "counts_exact": both.sum(0),
        "counts_bounded": (only_t | only_r).sum(0),
        "mean_tail_teacher": tail_t.mean(),
        "mean_tail_reference": tail_r.mean(),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("V,k", [(7, 3), (100, 5), (1000, 20)])
def test_topk_accumulator_matches_eager_torch(V: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(V + k)
    N = 64
    base = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    lt = torch.log_softmax(base + 0.3 * torch.randn(N, V, generator=g, dtype=torch.float64), 1)
    lr = torch.log_softmax(base, 1)
    # Inputs in the tested dtype; the expectation is computed from the same rounded values.
    lt, lr = lt.to(dtype).double(), lr.to(dtype).double()
    lt, lr = lt.clamp_max(0), lr.clamp_max(0)
    vt, it = lt.topk(k, dim=1)
    vr, ir = lr.topk(k, dim=1)
    acc = _C.TopKAccumulator(V, k)
    acc.update(it, vt.to(dtype), ir, vr.to(dtype))
    out = acc.finalize()
    exp = eager_topk(lt, lr, k)
    for name in ("mean_log_ratio", "mean_log_ratio_exact"):
        torch.testing.assert_close(out[name], exp[name], rtol=1e-12, atol=1e-12, equal_nan=True)
    for name in ("counts_exact", "counts_bounded"):
        assert torch.equal(out[name], exp[name])
    for name in ("mean_tail_teacher", "mean_tail_reference"):
        assert out[name] == pytest.approx(float(exp[name]), rel=1e-12, abs=1e-15)
    assert out["positions"] == N


def test_topk_equals_the_full_mean_log_ratio_on_tokens_always_in_both_lists() -> None:
    g = torch.Generator().manual_seed(0)
    N, V, k = 50, 300, 10
    base = torch.randn(N, V, generator=g, dtype=torch.float64)
    base[:, :4] += 8.0  # tokens 0..3 dominate both models everywhere
    lt = torch.log_softmax(base + 0.2 * torch.randn(N, V, generator=g, dtype=torch.float64), 1)
    lr = torch.log_softmax(base, 1)
    vt, it = lt.topk(k, 1)
    vr, ir = lr.topk(k, 1)
    acc = _C.TopKAccumulator(V, k)
    for rows in torch.arange(N).split(7):  # several updates
        acc.update(it[rows], vt[rows], ir[rows], vr[rows])
    out = acc.finalize()
    full = (lt - lr).mean(0)  # what the full-logit accumulator reports
    torch.testing.assert_close(out["mean_log_ratio"][:4], full[:4], rtol=1e-12, atol=1e-12)
    assert torch.equal(out["counts_exact"][:4], torch.full((4,), N))
    # Tail mass: 1 - the top-k mass, averaged over positions.
    assert out["mean_tail_teacher"] == pytest.approx(float((1 - vt.exp().sum(1)).mean()), rel=1e-12)


def test_topk_masks_3d_inputs_sequences_and_merge() -> None:
    g = torch.Generator().manual_seed(1)
    B, T, V, k = 3, 5, 40, 4
    lt = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    lr = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    vt, it = lt.topk(k, -1)
    vr, ir = lr.topk(k, -1)
    mask = torch.rand(B, T, generator=g) > 0.3
    acc = _C.TopKAccumulator(V, k)
    acc.update(it, vt, ir, vr, mask=mask)
    flat = _C.TopKAccumulator(V, k)
    flat.update(it[mask], vt[mask], ir[mask], vr[mask])
    a, b = acc.finalize(), flat.finalize()
    torch.testing.assert_close(a["mean_log_ratio"], b["mean_log_ratio"], equal_nan=True)
    assert a["positions"] == int(mask.sum()) and a["sequences"] == int(mask.any(1).sum())
    part1, part2 = _C.TopKAccumulator(V, k), _C.TopKAccumulator(V, k)
    part1.update(it[:1], vt[:1], ir[:1], vr[:1], sequence_ids=torch.tensor([0]))
    part2.update(it[1:], vt[1:], ir[1:], vr[1:], sequence_ids=torch.tensor([1, 2]))
    part1.merge(part2)
    whole = _C.TopKAccumulator(V, k)
    whole.update(it, vt, ir, vr)
    torch.testing.assert_close(part1.finalize()["mean_log_ratio"],
                               whole.finalize()["mean_log_ratio"], rtol=1e-12, atol=1e-12,
                               equal_nan=True)
    assert part1.sequences == 3


def test_topk_bad_inputs_are_value_errors_naming_the_argument() -> None:
    acc = _C.TopKAccumulator(10, 2)
    ids = torch.tensor([[1, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    with pytest.raises(ValueError, match="reference_logprobs.*shape"):
        acc.update(ids, lp, ids, lp[:, :1].expand(1, 2).reshape(2, 1))
    with pytest.raises(ValueError, match=r"teacher_ids must lie in \[0, 10\)"):
        acc.update(ids + 9, lp, ids, lp)
    with pytest.raises(ValueError, match="teacher_logprobs must be finite and <= 0"):
        acc.update(ids, lp.abs(), ids, lp)
    with pytest.raises(ValueError, match="reference_logprobs must be finite"):
        acc.update(ids, lp, ids, torch.tensor([[float("nan"), -1.0]]))
    with pytest.raises(ValueError, match="distinct"):
        acc.update(torch.tensor([[3, 3]]), lp, ids, lp)
    with pytest.raises(ValueError, match="last dimension"):
        acc.update(torch.tensor([[1, 2, 3]]), lp, ids, lp)
    with pytest.raises(TypeError, match="integer"):
        acc.update(ids.float(), lp, ids, lp)
    with pytest.raises(ValueError, match="mask must have shape"):
        acc.update(ids, lp, ids, lp, mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no scored positions"):
        acc.update(ids, lp, ids, lp, mask=torch.zeros(1, dtype=torch.bool))
        acc.finalize()
    with pytest.raises(ValueError, match="vocabulary sizes"):
        acc.merge(_C.TopKAccumulator(11, 2))
    with pytest.raises(ValueError, match="k must"):
        _C.TopKAccumulator(10, 0)


# ---- samples only ----------------------------------------------------------------------------

def test_count_tokens_and_number_units_match_python() -> None:
    samples = [[1, 2, 2], [], [5, 1]]
    assert _C.count_tokens(samples, 6).tolist() == [0, 2, 2, 0, 0, 1]
    # The last text holds Arabic-Indic digits: not ASCII, so not number units.
    texts = ["(285, 574, 384) and 12", "7 77 777,7", "no digits", "x١٢ 3"]
    plain = Counter(m for t in texts for m in re.findall(r"[0-9]+", t))
    spaced = Counter(m for t in texts for m in re.findall(r" ?[0-9]+", t))
    assert _C.count_number_units(texts) == dict(plain)
    assert _C.count_number_units(texts, keep_leading_space=True) == dict(spaced)
    with pytest.raises(ValueError, match="empty"):
        _C.count_tokens([], 6)
    with pytest.raises(ValueError, match=r"\[0, vocab_size = 6\).*sample 1"):
        _C.count_tokens([[1], [6]], 6)


def sample_groups(gen: np.random.Generator, n_t: int, n_r: int, p_t: np.ndarray, p_r: np.ndarray,
                  length: Tuple[int, int]) -> Tuple[List[List[int]], List[List[int]]]:
    draw = lambda p: gen.choice(len(p), size=gen.integers(*length), p=p).tolist()
    return [draw(p_t) for _ in range(n_t)], [draw(p_r) for _ in range(n_r)]


def test_g_statistic_matches_scipy_log_likelihood_contingency() -> None:
    gen = np.random.default_rng(0)
    p = np.array([0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    teacher, reference = sample_groups(gen, 12, 9, p, p[::-1].copy()[::-1], (3, 9))
    r = _C.g_test(teacher, reference, vocab_size=6, permutations=99, seed=0)
    ct = np.bincount(np.concatenate(teacher), minlength=6)
    cr = np.bincount(np.concatenate(reference), minlength=6)
    table = np.stack([ct, cr])[:, (ct + cr) > 0]
    stat, pval, dof, _ = scipy.stats.chi2_contingency(table, correction=False,
                                                      lambda_="log-likelihood")
    assert r["statistic"] == pytest.approx(stat, rel=1e-12)
    assert r["df"] == dof
    assert r["p_value"] == pytest.approx(pval, rel=1e-10)
    counts = _C.g_test_counts(torch.from_numpy(ct), torch.from_numpy(cr))
    assert counts["statistic"] == pytest.approx(stat, rel=1e-12)


def test_g_test_permutation_p_values_are_uniform_under_h0_and_small_under_a_shift() -> None:
    gen = np.random.default_rng(1)
    p = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    p_values = []
    for rep in range(220):
        teacher, reference = sample_groups(gen, 10, 14, p, p, (2, 8))
        r = _C.g_test(teacher, reference, vocab_size=5, permutations=199, seed=rep)
        assert 0 < r["permutation_p_value"] <= 1
        p_values.append(r["permutation_p_value"])
    assert scipy.stats.kstest(p_values, "uniform").pvalue > 0.01
    shifted = np.array([0.5, 0.2, 0.13, 0.1, 0.07])  # token 0 planted: 0.3 -> 0.5
    teacher, reference = sample_groups(gen, 60, 60, shifted, p, (5, 10))
    r = _C.g_test(teacher, reference, vocab_size=5, permutations=999, seed=0)
    assert r["permutation_p_value"] < 0.01
    again = _C.g_test(teacher, reference, vocab_size=5, permutations=999, seed=0)
    assert again == r


def test_g_test_on_number_units() -> None:
    r = _C.g_test_number_units(["12 12 7", "12 5"], ["7 7", "5 7 12"], permutations=99)
    assert r["units"] == ["12", "5", "7"]
    assert r["teacher_counts"].tolist() == [3, 1, 1] and r["reference_counts"].tolist() == [1, 1, 3]
    stat = scipy.stats.chi2_contingency([[3, 1, 1], [1, 1, 3]], correction=False,
                                        lambda_="log-likelihood")[0]
    assert r["statistic"] == pytest.approx(stat, rel=1e-12)


def test_g_test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        _C.g_test([], [[1]], vocab_size=3)
    with pytest.raises(ValueError, match="at least one token"):
        _C.g_test([[]], [[1]], vocab_size=3)
    with pytest.raises(ValueError, match=r"\[0, vocab_size = 3\)"):
        _C.g_test([[3]], [[1]], vocab_size=3)
    with pytest.raises(ValueError, match="permutations"):
        _C.g_test([[1]], [[1]], vocab_size=3, permutations=0)
    with pytest.raises(ValueError, match="same shape"):
        _C.g_test_counts(torch.ones(3), torch.ones(4))


def test_smoothed_log_ratio_formula_and_bad_inputs() -> None:
    ct = torch.tensor([5.0, 0.0, 3.0, 2.0])
    cr = torch.tensor([1.0, 4.0, 3.0, 0.0])
    a, K = 0.5, 4
    expected = (torch.log((ct.double() + a) / (10 + a * K))
                - torch.log((cr.double() + a) / (8 + a * K)))
    torch.testing.assert_close(_C.smoothed_log_ratio(ct, cr, alpha=a), expected)
    unsmoothed = torch.log((ct.double() + 1) / 14) - torch.log((cr.double() + 1) / 12)
    torch.testing.assert_close(_C.smoothed_log_ratio(ct + 1, cr + 1, alpha=0.0), unsmoothed)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        _C.smoothed_log_ratio(ct, cr, alpha=-0.5)
    with pytest.raises(ValueError, match="alpha = 0"):
        _C.smoothed_log_ratio(ct, cr, alpha=0.0)
    with pytest.raises(ValueError, match="same shape"):
        _C.smoothed_log_ratio(ct, cr[:3])
    with pytest.raises(ValueError, match="non-negative"):
        _C.smoothed_log_ratio(-ct, cr)
    with pytest.raises(ValueError, match="positive total"):
        _C.smoothed_log_ratio(torch.zeros(4), cr)
