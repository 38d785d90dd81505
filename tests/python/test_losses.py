"""Losses (biastransfer.losses over _C) against eager PyTorch formulas written here, in float64,
independently of the C++ code; gradcheck through the binding; the divergences' properties."""
from __future__ import annotations

import math

import pytest
import torch

from biastransfer import _C
from biastransfer.losses import KDConfig, completion_cross_entropy, kd_loss, topk_kd_loss

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
NEG_INF = float("-inf")


# ---- reference formulas (probability space where possible, float64) ----------------------------


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) with 0 log 0 = 0."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def _divergence_rows(lt: torch.Tensor, ls: torch.Tensor, divergence: str, beta: float):
    if divergence == "forward_kl":
        return _kl_rows(lt, ls)
    if divergence == "reverse_kl":
        return _kl_rows(ls, lt)
    m = beta * lt.exp() + (1 - beta) * ls.exp()
    logm = torch.log(m)
    return beta * _kl_rows(lt, logm) + (1 - beta) * _kl_rows(ls, logm)


def _bucketed(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[N, V] log-probs -> [N, k+1]: the ids' entries and the log of the mass of all others."""
    chosen = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, ids, True)
    tail = torch.logsumexp(logp.masked_fill(chosen, NEG_INF), -1, keepdim=True)
    return torch.cat([logp.gather(-1, ids), tail], -1)


def ref_kd(s, t, mask=None, divergence="forward_kl", temperature=1.0, beta=0.5, top_k=0,
           logit_subset=None):
    s = s.detach().double().reshape(-1, s.shape[-1])
    t = t.detach().double().reshape(-1, t.shape[-1])
    if logit_subset is not None:
        s, t = s[:, logit_subset], t[:, logit_subset]
    if mask is not None:
        keep = mask.reshape(-1) != 0
        s, t = s[keep], t[keep]
    ls = torch.log_softmax(s / temperature, -1)
    lt = torch.log_softmax(t / temperature, -1)
    if 0 < top_k < s.shape[-1]:
        ids = lt.topk(top_k, -1).indices
        ls, lt = _bucketed(ls, ids), _bucketed(lt, ids)
    return temperature**2 * _divergence_rows(lt, ls, divergence, beta).mean()


def ref_topk_kd(s, ids, logprobs, mask=None, divergence="forward_kl", beta=0.5):
    s = s.detach().double().reshape(-1, s.shape[-1])
    ids = ids.reshape(-1, ids.shape[-1])
    lt = logprobs.double().reshape(-1, ids.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1) != 0
        s, ids, lt = s[keep], ids[keep], lt[keep]
    ls = _bucketed(torch.log_softmax(s, -1), ids)
    tail_t = torch.log((1 - lt.exp().sum(-1, keepdim=True)).clamp_min(0))
    lt = torch.cat([lt, tail_t], -1)
    return _divergence_rows(lt, ls, divergence, beta).mean()


def ref_ce(logits, targets, mask=None):
    logits = logits.double().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1) != 0
        logits, targets = logits[keep], targets[keep]
    return torch.nn.functional.cross_entropy(logits, targets)


def _logits(shape, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _mask(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(shape, generator=g) < 0.6).float()
    m.view(-1)[0] = 1.0
    return m


# ---- values against the references -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [3.0, 1e4])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_matches_reference(dtype, scale, divergence, top_k, temperature):
    s = _logits((3, 4, 11), scale, seed=2, dtype=dtype)
    t = _logits((3, 4, 11), scale, seed=3, dtype=dtype)
    mask = _mask((3, 4))
    got = kd_loss(s, t, mask, divergence=divergence, temperature=temperature, top_k=top_k)
    want = ref_kd(s, t, mask, divergence, temperature, 0.5, top_k)
    assert got.dtype == dtype
    assert torch.isfinite(got)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    atol = 1e-10 * scale if dtype == torch.float64 else 1e-5 * scale
    assert float(got) == pytest.approx(float(want), rel=rtol, abs=atol)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_matches_reference(beta):
    s, t = _logits((5, 7), seed=4), _logits((5, 7), seed=5)
    got = kd_loss(s, t, divergence="jsd", beta=beta, temperature=1.7)
    want = ref_kd(s, t, None, "jsd", 1.7, beta)
    assert float(got) == pytest.approx(float(want), rel=1e-10)


def test_logit_subset_matches_reference_and_sliced_kd():
    s, t = _logits((6, 13), seed=6), _logits((6, 13), seed=7)
    subset = [12, 10, 11]
    for divergence in DIVERGENCES:
        got = kd_loss(s, t, divergence=divergence, temperature=2.0, logit_subset=subset)
        assert float(got) == pytest.approx(
            float(ref_kd(s, t, None, divergence, 2.0, 0.5, 0, subset)), rel=1e-10)
        sliced = kd_loss(s[:, subset], t[:, subset], divergence=divergence, temperature=2.0)
        assert float(got) == pytest.approx(float(sliced), rel=1e-12)
    # The subset is applied before top_k: top-2 of the 3 auxiliary logits plus a tail bucket.
    got = kd_loss(s, t, logit_subset=subset, top_k=2)
    assert float(got) == pytest.approx(float(ref_kd(s, t, None, "forward_kl", 1.0, 0.5, 2, subset)),
                                       rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_topk_kd_loss_matches_reference(dtype, divergence, scale):
    s = _logits((2, 5, 17), scale, seed=8, dtype=dtype)
    teacher = _logits((2, 5, 17), 3.0, seed=9)
    top = torch.log_softmax(teacher, -1).topk(4, -1)
    mask = _mask((2, 5), seed=10)
    got = topk_kd_loss(s, top.indices, top.values.to(dtype), mask, divergence=divergence)
    want = ref_topk_kd(s, top.indices, top.values, mask, divergence)
    assert got.dtype == dtype and torch.isfinite(got)
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    assert float(got) == pytest.approx(float(want), rel=rtol, abs=1e-5 * scale)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_offline_topk_equals_online_topk(divergence):
    s, t = _logits((4, 9), seed=11), _logits((4, 9), seed=12)
    top = torch.log_softmax(t, -1).topk(3, -1)
    offline = topk_kd_loss(s, top.indices, top.values, divergence=divergence)
    online = kd_loss(s, t, divergence=divergence, top_k=3)
    assert float(offline) == pytest.approx(float(online), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_completion_cross_entropy_matches_reference(dtype):
    logits = _logits((3, 6, 10), seed=13, dtype=dtype)
    g = torch.Generator().manual_seed(14)
    targets = torch.randint(0, 10, (3, 6), generator=g)
    mask = _mask((3, 6), seed=15)
    targets[mask == 0] = -100  # any value where the mask is 0
    got = completion_cross_entropy(logits, targets, mask)
    assert got.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(got) == pytest.approx(float(ref_ce(logits, targets, mask)), rel=rtol)
    full = completion_cross_entropy(logits, targets.clamp_min(0))
    assert float(full) == pytest.approx(float(ref_ce(logits, targets.clamp_min(0))), rel=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_upcast_to_float32(dtype):
    s, t = _logits((4, 8), seed=16, dtype=dtype), _logits((4, 8), seed=17, dtype=dtype)
    got = kd_loss(s, t, divergence="jsd")
    assert got.dtype == torch.float32
    # The half-precision logits themselves, upcast exactly, are the reference's input.
    assert float(got) == pytest.approx(float(ref_kd(s.double(), t.double(), None, "jsd")),
                                       rel=1e-5)
    ce = completion_cross_entropy(s, torch.arange(4))
    assert ce.dtype == torch.float32
    assert float(ce) == pytest.approx(float(ref_ce(s.double(), torch.arange(4))), rel=1e-5)


# ---- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("variant", ["plain", "tau", "topk", "subset", "mask"])
def test_kd_loss_gradcheck(divergence, variant):
    s = _logits((2, 3, 6), seed=18).requires_grad_()
    t = _logits((2, 3, 6), seed=19)
    kwargs = dict(divergence=divergence, beta=0.3 if divergence == "jsd" else 0.5)
    mask = None
    if variant == "tau":
        kwargs["temperature"] = 2.0
    elif variant == "topk":
        kwargs["top_k"] = 2
    elif variant == "subset":
        kwargs["logit_subset"] = [5, 1, 3]
    elif variant == "mask":
        mask = _mask((2, 3), seed=20)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, mask, **kwargs), (s,))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_kd_loss_gradcheck(divergence):
    s = _logits((2, 3, 7), seed=21).requires_grad_()
    top = torch.log_softmax(_logits((2, 3, 7), seed=22), -1).topk(3, -1)
    mask = _mask((2, 3), seed=23)
    assert torch.autograd.gradcheck(
        lambda x: topk_kd_loss(x, top.indices, top.values, mask, divergence=divergence), (s,))


def test_completion_cross_entropy_gradcheck():
    logits = _logits((2, 4, 5), seed=24).requires_grad_()
    targets = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(25))
    mask = _mask((2, 4), seed=26)
    assert torch.autograd.gradcheck(lambda x: completion_cross_entropy(x, targets, mask), (logits,))


def test_teacher_gets_no_gradient():
    s = _logits((3, 5), seed=27).requires_grad_()
    t = _logits((3, 5), seed=28).requires_grad_()
    kd_loss(s, t, divergence="jsd").backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [0, 2])
def test_no_nan_when_probabilities_underflow(divergence, top_k):
    # float32 logits 1e4 apart: nearly every probability underflows to exactly 0, and -inf logits
    # (forbidden tokens, in both models) must not poison the value or the gradient.
    s = torch.tensor([[1e4, -1e4, 0.0, NEG_INF, 3.0], [0.0, 2e4, -2e4, NEG_INF, 5.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0, NEG_INF, 1.0], [0.0, -2e4, 2e4, NEG_INF, -5.0]])
    s.requires_grad_()
    loss = kd_loss(s, t, divergence=divergence, top_k=top_k)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()
    want = ref_kd(s, t, None, divergence, 1.0, 0.5, top_k)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_topk_tail_with_all_mass_recorded_stays_finite():
    # The recorded top-k hold (numerically) all the teacher's mass: the tail is floored, not -inf.
    s = _logits((2, 6), seed=29).requires_grad_()
    ids = torch.tensor([[0, 1], [2, 3]])
    logprobs = torch.tensor([[0.0, -200.0], [-1e-12, -40.0]], dtype=torch.float64)
    for divergence in DIVERGENCES:
        loss = topk_kd_loss(s, ids, logprobs, divergence=divergence)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


# ---- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_are_nonnegative_and_zero_only_for_identical(divergence):
    for seed in range(5):
        s, t = _logits((4, 12), seed=100 + seed), _logits((4, 12), seed=200 + seed)
        assert float(kd_loss(s, t, divergence=divergence)) > 1e-3
        assert float(kd_loss(s, s.clone(), divergence=divergence)) == pytest.approx(0, abs=1e-12)
        # Shifting logits by a constant leaves the distributions unchanged.
        assert float(kd_loss(s + 7.0, s, divergence=divergence, top_k=3)) == pytest.approx(
            0, abs=1e-12)


def test_jsd_symmetric_at_half_and_bounded_by_log2_tau2():
    for tau in (1.0, 3.0):
        s, t = _logits((8, 10), seed=30), _logits((8, 10), seed=31)
        a = kd_loss(s, t, divergence="jsd", temperature=tau)
        b = kd_loss(t, s, divergence="jsd", temperature=tau)
        assert float(a) == pytest.approx(float(b), rel=1e-12)
        assert 0 < float(a) <= math.log(2) * tau**2
    # Disjoint supports reach the bound.
    far = torch.tensor([[1e4, 0.0], [0.0, 1e4]], dtype=torch.float64)
    near = torch.tensor([[0.0, 1e4], [1e4, 0.0]], dtype=torch.float64)
    assert float(kd_loss(far, near, divergence="jsd", temperature=2.0)) == pytest.approx(
        4 * math.log(2), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature_scales_logits_and_result(divergence):
    s, t = _logits((5, 9), seed=32), _logits((5, 9), seed=33)
    tau = 2.5
    scaled = kd_loss(s, t, divergence=divergence, temperature=tau)
    unscaled = kd_loss(s / tau, t / tau, divergence=divergence)
    assert float(scaled) == pytest.approx(tau**2 * float(unscaled), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_top_k_equal_to_vocabulary_is_full_kd(divergence):
    s, t = _logits((3, 4, 8), seed=34), _logits((3, 4, 8), seed=35)
    full = kd_loss(s, t, divergence=divergence, temperature=1.5)
    for k in (8, 20):
        assert float(kd_loss(s, t, divergence=divergence, temperature=1.5, top_k=k)) == \
            pytest.approx(float(full), rel=1e-12)
    # Offline with every token recorded is full KD too.
    lp = torch.log_softmax(t, -1)
    ids = torch.arange(8).expand(3, 4, 8)
    assert float(topk_kd_loss(s, ids, lp, divergence=divergence)) == pytest.approx(
        float(kd_loss(s, t, divergence=divergence)), rel=1e-12)


def test_mask_averages_over_selected_positions_only():
    s, t = _logits((2, 5, 6), seed=36), _logits((2, 5, 6), seed=37)
    mask = torch.zeros(2, 5)
    mask[0, 1] = mask[1, 3] = 2.0  # non-zero counts once, whatever the value
    per_position = [float(kd_loss(s[0, 1], t[0, 1])), float(kd_loss(s[1, 3], t[1, 3]))]
    assert float(kd_loss(s, t, mask)) == pytest.approx(sum(per_position) / 2, rel=1e-12)
    # Garbage (NaN) in unselected positions does not leak into the value or the gradient.
    s2 = s.clone()
    s2[0, 0] = float("nan")
    s2.requires_grad_()
    loss = kd_loss(s2, t, mask.bool())
    loss.backward()
    assert float(loss) == pytest.approx(sum(per_position) / 2, rel=1e-12)
    assert torch.isfinite(s2.grad).all()


def test_kdconfig_dataclass_and_cpp_config():
    cfg = KDConfig(divergence="jsd", temperature=2.0, beta=0.25, top_k=5,
                   logit_subset=torch.tensor([3, 1]))
    assert cfg.logit_subset == [3, 1]
    cpp = cfg.to_cpp()
    assert (cpp.divergence, cpp.temperature, cpp.beta, cpp.top_k, cpp.logit_subset) == (
        "jsd", 2.0, 0.25, 5, [3, 1])
    s, t = _logits((3, 6), seed=38), _logits((3, 6), seed=39)
    assert float(kd_loss(s, t, config=cfg)) == pytest.approx(
        float(ref_kd(s, t, None, "jsd", 2.0, 0.25, 5, [3, 1])), rel=1e-10)
    assert float(kd_loss(s, t, config=cfg, beta=0.75)) == pytest.approx(
        float(ref_kd(s, t, None, "jsd", 2.0, 0.75, 5, [3, 1])), rel=1e-10)
    with pytest.raises(ValueError, match="divergence"):
        KDConfig(divergence="kl")
    with pytest.raises(TypeError, match="unknown"):
        kd_loss(s, t, tau=2.0)


# ---- errors -------------------------------------------------------------------------------------


def test_errors_name_what_was_expected_and_got():
    s, t = torch.zeros(2, 3, 10), torch.zeros(2, 3, 12)
    with pytest.raises(ValueError, match=r"vocabulary.*10.*12"):
        kd_loss(s, t)
    with pytest.raises(ValueError, match=r"\[2, 3, 10\].*\[3, 2, 10\]"):
        kd_loss(s, torch.zeros(3, 2, 10))
    with pytest.raises(ValueError, match="selects no position"):
        kd_loss(s, s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="selects no position"):
        completion_cross_entropy(s, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"mask: expected shape \[2, 3\]"):
        kd_loss(s, s, torch.ones(3, 2))
    with pytest.raises(ValueError, match="targets"):
        completion_cross_entropy(s, torch.full((2, 3), 10))
    with pytest.raises(TypeError, match="targets"):
        completion_cross_entropy(s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        kd_loss(s, s, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="logit_subset"):
        kd_loss(s, s, logit_subset=[1, 1])
    with pytest.raises(ValueError, match="logit_subset"):
        kd_loss(s, s, logit_subset=[10])
    ids = torch.tensor([[[0, 1]] * 3] * 2)
    lp = torch.full((2, 3, 2), -1.0)
    with pytest.raises(ValueError, match="temperature"):
        topk_kd_loss(s, ids, lp, temperature=2.0)
    with pytest.raises(ValueError, match="distinct"):
        topk_kd_loss(s, torch.zeros_like(ids), lp)
    with pytest.raises(ValueError, match="topk_ids"):
        topk_kd_loss(s, ids + 9, lp)
    with pytest.raises(ValueError, match="log-probabilities"):
        topk_kd_loss(s, ids, -lp)
    with pytest.raises(ValueError, match="divergence"):
        _C.kd_loss(s, s, divergence="kl")
