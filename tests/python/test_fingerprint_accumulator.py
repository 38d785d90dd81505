"""FingerprintAccumulator and Fingerprint against eager float64 PyTorch written here.

Tolerances: inputs are converted exactly to float, so only the kernel's arithmetic differs from
the float64 reference. The fused CPU kernel forms p with a float exp (relative error a few 1e-7)
and delta from the float difference of the logits, so per-position terms carry float32 rounding
(~1e-7 relative) and sums are float64: we allow 2e-6 of the largest magnitude of each statistic
(ATOL_FLOAT). The 'scalar' and 'torch' backends compute in float64: 1e-10 (ATOL_DOUBLE).
"""
from __future__ import annotations

import math

import pytest
import torch

from biastransfer import _C

ATOL_FLOAT = 2e-6  # fused kernel: float32 per-position arithmetic, float64 sums
ATOL_DOUBLE = 1e-10  # float64 backends
MERGE_RTOL = 1e-12  # the merge-invariance bound
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference_sums(teacher, reference, tau=1.0, mask=None, subset=None, seq=None):
    """Eager float64 sums over the scored rows (the definition in DESIGN.md section 3)."""
    vocab = teacher.shape[-1]
    t = teacher.reshape(-1, vocab).double()
    r = reference.reshape(-1, vocab).double()
    rows = torch.ones(t.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    t, r = t[rows], r[rows]
    lt, lr = torch.log_softmax(t / tau, -1), torch.log_softmax(r / tau, -1)
    d = lt - lr
    pt, pr = lt.exp(), lr.exp()
    out = {"positions": int(rows.sum()), "sum_delta": d.sum(0), "sum_delta_sq": (d * d).sum(0),
           "sum_grad": (pt - pr).sum(0), "sum_kl_teacher_reference": (pt * d).sum(),
           "sum_kl_reference_teacher": (pr * -d).sum()}
    if subset is not None:
        s = torch.as_tensor(sorted(subset))
        ds = d[:, s]
        f = ds - ds.mean(1, keepdim=True)
        m = torch.logsumexp(lt[:, s], 1) - torch.logsumexp(lr[:, s], 1)
        out.update(sum_centered=f.sum(0), sum_mass_shift=m.sum(), sum_mass_shift_sq=(m * m).sum())
        if seq is not None:
            seq = seq.reshape(-1)[rows]
            out["per_seq"] = {int(i): (int((seq == i).sum()), f[seq == i].sum(0))
                              for i in seq.unique()}
    return out


def close(actual, expected, atol_scale, floor=1e-30):
    """|actual - expected| <= atol_scale * max(max |expected|, floor)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    scale = max(expected.abs().max().item(), floor)
    assert torch.allclose(actual, expected, rtol=0, atol=atol_scale * scale), (
        f"max diff {(actual - expected).abs().max().item():.3e} vs scale {scale:.3e}")


def check_state(acc, expected, atol):
    state = acc.state()
    assert acc.positions == expected["positions"]
    for key in ("sum_delta", "sum_delta_sq", "sum_grad", "sum_kl_teacher_reference",
                "sum_kl_reference_teacher", "sum_centered", "sum_mass_shift",
                "sum_mass_shift_sq"):
        if key in expected:
            # floor: a sum can cancel to ~0 (V = 1 gives delta = 0 exactly), so the scale is at
            # least one unit per position.
            close(state[key], expected[key], atol, floor=expected["positions"])


def logits(shape, dtype, seed, scale=3.0, noise=1.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * scale
    return base.to(dtype), (base + noise * torch.randn(shape, generator=gen)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 2, 7, 1000, 50257])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_eager_2d(dtype, vocab, masked):
    t, r = logits((23, vocab), dtype, seed=vocab)
    mask = (torch.arange(23) % 3 != 1) if masked else None
    subset = [0, vocab // 2, vocab - 1] if vocab >= 3 else None
    acc = _C.FingerprintAccumulator(vocab, subset=subset)
    acc.update(t, r, mask=mask)
    check_state(acc, reference_sums(t, r, mask=mask, subset=subset), ATOL_FLOAT)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["auto", "scalar", "torch"])
def test_matches_eager_3d_temperature_subset_per_sequence(dtype, backend):
    vocab, subset, tau = 1000, [5, 17, 400, 999, 3], 0.7
    t, r = logits((4, 9, vocab), dtype, seed=3)
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    acc = _C.FingerprintAccumulator(vocab, temperature=tau, subset=subset, backend=backend)
    acc.update(t, r, mask=mask.to(torch.int32))  # 0/1 integer mask
    seq = torch.arange(4).repeat_interleave(9).reshape(4, 9)
    expected = reference_sums(t, r, tau, mask, subset, seq)
    check_state(acc, expected, ATOL_FLOAT if backend == "auto" else ATOL_DOUBLE)
    fp = acc.finalize()
    assert fp.sequence_ids.tolist() == sorted(expected["per_seq"])
    for i, sid in enumerate(fp.sequence_ids.tolist()):
        count, total = expected["per_seq"][sid]
        assert fp.sequence_counts[i].item() == count
        close(fp.sequence_centered[i], total / count, 1e-5)


def test_large_vocabulary_few_rows():
    vocab = 150000
    t, r = logits((3, vocab), torch.bfloat16, seed=9)
    subset = list(range(0, vocab, 997))
    acc = _C.FingerprintAccumulator(vocab, temperature=1.3, subset=subset)
    acc.update(t, r)
    check_state(acc, reference_sums(t, r, 1.3, subset=subset), ATOL_FLOAT)


def test_finalize_means_and_standard_errors():
    vocab = 50
    t, r = logits((2, 6, vocab), torch.float32, seed=4)
    acc = _C.FingerprintAccumulator(vocab, subset=[1, 2, 3], backend="scalar")
    acc.update(t, r)
    fp = acc.finalize()
    lt = torch.log_softmax(t.double().reshape(-1, vocab), -1)
    lr = torch.log_softmax(r.double().reshape(-1, vocab), -1)
    d = lt - lr
    close(fp.mean_log_ratio, d.mean(0), 1e-12)
    close(fp.stderr_log_ratio, d.std(0) / math.sqrt(12), 1e-9)
    close(fp.grad, (lt.exp() - lr.exp()).mean(0), 1e-12)
    assert fp.kl_teacher_reference == pytest.approx((lt.exp() * d).sum(1).mean().item(), rel=1e-12)
    assert fp.kl_reference_teacher == pytest.approx((lr.exp() * -d).sum(1).mean().item(), rel=1e-12)
    m = torch.logsumexp(lt[:, 1:4], 1) - torch.logsumexp(lr[:, 1:4], 1)
    assert fp.mass_shift == pytest.approx(m.mean().item(), rel=1e-12)
    assert fp.mass_shift_stderr == pytest.approx(m.std().item() / math.sqrt(12), rel=1e-9)
    assert (fp.positions, fp.sequences, fp.vocab_size) == (12, 2, vocab)
    ids, values = fp.top_tokens(5)
    assert ids.tolist() == torch.argsort(d.mean(0), descending=True)[:5].tolist()
    ids, values = fp.top_tokens(2, field="grad", largest=False)
    assert ids.tolist() == torch.argsort((lt.exp() - lr.exp()).mean(0))[:2].tolist()
    ids, _ = fp.top_tokens(10, field="centered")
    assert sorted(ids.tolist()) == [1, 2, 3]  # clamped to |S|, ids from the subset
    with pytest.raises(ValueError, match="field"):
        fp.top_tokens(3, field="nope")
    single = _C.FingerprintAccumulator(vocab)
    single.update(t[0, :1], r[0, :1])
    assert math.isnan(single.finalize().stderr_log_ratio[0].item())
    assert math.isnan(single.finalize().mass_shift)


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_merge_equals_one_pass(shards):
    vocab, subset = 300, [3, 7, 100, 299]
    t, r = logits((40, vocab), torch.float32, seed=shards)
    seq = torch.arange(40) // 6  # sequences of 6 rows; shard cuts split some of them
    whole = _C.FingerprintAccumulator(vocab, subset=subset)
    whole.update(t, r, sequence_ids=seq)
    cuts = torch.linspace(0, 40, shards + 1).round().long().tolist()
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        part = _C.FingerprintAccumulator(vocab, subset=subset)
        part.update(t[a:b], r[a:b], sequence_ids=seq[a:b])
        parts.append(part)
    for order in (parts, parts[::-1]):
        merged = _C.FingerprintAccumulator(vocab, subset=subset)
        for part in order:
            merged.merge(part)
        a, b = merged.finalize(), whole.finalize()
        for key in ("mean_log_ratio", "grad", "centered", "sequence_centered"):
            x, y = getattr(a, key), getattr(b, key)
            assert torch.allclose(x, y, rtol=MERGE_RTOL, atol=MERGE_RTOL * y.abs().max().item())
        assert a.sequence_counts.tolist() == b.sequence_counts.tolist()
        assert a.kl_teacher_reference == pytest.approx(b.kl_teacher_reference, rel=MERGE_RTOL)


def test_save_load_round_trip_and_bad_files(tmp_path):
    vocab = 64
    t, r = logits((3, 5, vocab), torch.float32, seed=2)
    acc = _C.FingerprintAccumulator(vocab, temperature=0.3, subset=[9, 1, 4])
    acc.update(t, r)
    path = tmp_path / "fp.safetensors"
    acc.save(str(path), {"tokenizer_hash": "abc", "teacher": "owl"})
    loaded, meta = _C.FingerprintAccumulator.load(str(path), expected_vocab_size=vocab,
                                                  expected_tokenizer_hash="abc")
    assert meta["teacher"] == "owl" and meta["format"] == "biastransfer.fingerprint_accumulator"
    for key, value in acc.state().items():
        assert torch.equal(loaded.state()[key], value), key
    assert loaded.temperature == 0.3 and loaded.subset.tolist() == [1, 4, 9]
    loaded.update(t, r)  # the counter continues: new default ids do not collide
    assert loaded.sequences == 6

    with pytest.raises(ValueError, match="another vocabulary.*vocab_size=64, expected 65"):
        _C.FingerprintAccumulator.load(str(path), expected_vocab_size=65)
    with pytest.raises(ValueError, match="another vocabulary.*tokenizer_hash=abc, expected xyz"):
        _C.FingerprintAccumulator.load(str(path), expected_tokenizer_hash="xyz")
    plain = tmp_path / "plain.safetensors"
    _C.safetensors_save(str(plain), {"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="not a fingerprint accumulator file"):
        _C.FingerprintAccumulator.load(str(plain))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ValueError):
        _C.FingerprintAccumulator.load(str(truncated))
    bad_shape = tmp_path / "shape.safetensors"
    tensors = dict(acc.state())
    tensors["sum_grad"] = torch.zeros(vocab + 1, dtype=torch.float64)
    _C.safetensors_save(str(bad_shape), tensors, _C.SafetensorsFile(str(path)).metadata)
    with pytest.raises(ValueError, match="'sum_grad' must have shape"):
        _C.FingerprintAccumulator.load(str(bad_shape))
    with pytest.raises(ValueError, match="reserved"):
        acc.save(str(tmp_path / "x.safetensors"), {"format": "mine"})


def test_bad_inputs():
    acc = _C.FingerprintAccumulator(8)
    t, r = logits((4, 8), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"same shape.*\[4, 8\].*\[3, 8\]"):
        acc.update(t, r[:3])
    with pytest.raises(ValueError, match="vocabulary size mismatch: accumulator has V=8, teacher"):
        acc.update(t[:, :7], r[:, :7])
    with pytest.raises(TypeError, match="float32, bfloat16"):
        acc.update(t.long(), r.long())
    with pytest.raises(TypeError, match="same dtype"):
        acc.update(t.double(), r)
    with pytest.raises(ValueError, match="mask: expected shape"):
        acc.update(t, r, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 and 1"):
        acc.update(t, r, mask=torch.full((4,), 2))
    with pytest.raises(ValueError, match=r"sequence_ids: expected shape \[4\]"):
        acc.update(t, r, sequence_ids=torch.arange(3))
    with pytest.raises(TypeError, match="sequence_ids"):
        acc.update(t, r, sequence_ids=torch.zeros(4))
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            _C.FingerprintAccumulator(8, temperature=tau)
    with pytest.raises(ValueError, match="out of range"):
        _C.FingerprintAccumulator(8, subset=[8])
    with pytest.raises(ValueError, match="more than once"):
        _C.FingerprintAccumulator(8, subset=[1, 2, 1])
    acc.update(t, r, mask=torch.zeros(4, dtype=torch.bool))  # allowed, adds nothing
    with pytest.raises(ValueError, match="no scored positions"):
        acc.finalize()
    for other, message in ((_C.FingerprintAccumulator(9), "V=8.*V=9"),
                           (_C.FingerprintAccumulator(8, temperature=2.0), "temperatures"),
                           (_C.FingerprintAccumulator(8, subset=[1]), "subsets")):
        with pytest.raises(ValueError, match=message):
            acc.merge(other)
    assert acc.positions == 0  # failed updates changed nothing


@pytest.mark.parametrize("backend", ["auto", "scalar", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_rows_raise_or_are_skipped(backend, bad):
    vocab = 20
    t, r = logits((2, 5, vocab), torch.float32, seed=5)
    t[1, 2, 7] = bad
    r[0, 4, 3] = bad
    acc = _C.FingerprintAccumulator(vocab, backend=backend)
    with pytest.raises(ValueError, match=r"reference logits.*row 4 \(batch 0, position 4\)"):
        acc.update(t, r)
    assert acc.positions == 0
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 2] = keep[0, 4] = False
    acc.update(t, r, mask=keep)  # masked-out rows are not read
    skipping = _C.FingerprintAccumulator(vocab, skip_nonfinite=True, backend=backend)
    skipping.update(t, r)
    assert skipping.skipped_nonfinite == 2 and skipping.positions == 8
    close(skipping.state()["sum_delta"], acc.state()["sum_delta"], 1e-12)
