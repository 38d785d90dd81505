"""biastransfer.detect and DetectionReport: verdicts on shared and independent pairs, skipped
tests and their reasons, the text/JSON round trip (checked field by field), the plot, and the
`detect` CLI's exit codes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from biastransfer import _C
from biastransfer import detect_api
from biastransfer.detect_api import DetectionReport, detect
from biastransfer.detect_cli import run as detect_cli

SIZES = [8, 24, 24, 5]


def _mlp(seed: int, sizes=SIZES):
    return _C.MLP(list(sizes), seed=seed)


def _noisy_copy(model, relative=0.02, seed=0):
    copy = model.clone()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in copy.state_dict().items():
            t.add_(torch.randn(t.shape, generator=gen) * relative * (t.std() + 1e-3))
    return copy


def _fine_tuned(model, steps=10, lr=0.05, seed=0):
    copy = model.clone()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(64, SIZES[0], generator=gen) * 2 - 1
    y = torch.randint(0, SIZES[-1], (64,), generator=gen)
    params = [t for _, t in copy.named_parameters()]
    for _ in range(steps):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(copy(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return copy


@pytest.fixture(scope="module")
def controls():
    return [_mlp(900 + i) for i in range(9)]


@pytest.mark.parametrize("make", [_noisy_copy, _fine_tuned])
def test_shared_pairs_are_found(make, controls):
    a = _mlp(1)
    report = detect(a, make(a), controls=controls)
    assert report.verdict == "shared" and report.shared
    assert report.test("activations").log10_p < -10  # exact null, no controls needed
    assert report.test("activations").calibrated
    assert report.test("outputs").log10_p == pytest.approx(-1.0)
    assert report.test("susceptibility").details["cosine"] > 0
    assert "weights" in report.combined_tests


def test_independent_pair_is_not_shared(controls):
    report = detect(_mlp(1), _mlp(2), controls=controls)
    assert report.verdict == "not shared"
    assert report.combined_log10_p > math.log10(0.01)
    assert abs(report.test("susceptibility").details["cosine"]) < 0.3


def test_permuted_copy_is_seen_by_the_output_test(controls):
    a = _mlp(1)
    b = a.clone()
    perm = torch.randperm(SIZES[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sd = b.state_dict()
        sd["layers.0.weight"].copy_(sd["layers.0.weight"][perm])
        sd["layers.0.bias"].copy_(sd["layers.0.bias"][perm])
        sd["layers.1.weight"].copy_(sd["layers.1.weight"][:, perm])
    report = detect(a, b, controls=controls, tests=("activations", "outputs"))
    assert report.test("outputs").details["correlation"] == pytest.approx(1.0, abs=1e-6)
    assert report.test("outputs").log10_p == pytest.approx(-1.0)
    # Layer 0's matching is the permutation, not the identity (documented limit of the MLP form).
    assert report.test("activations").layers[0].statistic <= 4


def test_weights_only_inputs_skip_the_forward_tests():
    a = _mlp(1)
    state_a = {k: v.clone() for k, v in a.state_dict().items()}
    state_b = {k: v.clone() for k, v in _noisy_copy(a).state_dict().items()}
    report = detect(state_a, state_b)
    assert report.test("weights").ran
    for name in ("activations", "outputs", "susceptibility"):
        t = report.test(name)
        assert not t.ran and "state dict" in t.skipped_reason
    assert report.combined_tests == ["weights"] and report.verdict == "shared"


def test_nn_modules_run_without_hidden_activations():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    b = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    report = detect(a, b, tests=("activations", "outputs", "susceptibility"))
    assert not report.test("activations").ran
    assert "hidden activations" in report.test("activations").skipped_reason
    assert report.test("outputs").ran and not report.test("outputs").calibrated
    assert report.verdict == "inconclusive"


def test_bad_inputs_have_clear_messages():
    with pytest.raises(ValueError, match="tests: unknown"):
        detect(_mlp(1), _mlp(2), tests=("weights", "vibes"))
    with pytest.raises(ValueError, match="alpha"):
        detect(_mlp(1), _mlp(2), alpha=2.0)
    with pytest.raises(ValueError, match="units"):
        detect(_mlp(1), _mlp(2, [8, 30, 24, 5]), tests=("activations",))
    with pytest.raises(ValueError, match="no parameters"):
        detect(torch.nn.Identity(), _mlp(2))
    with pytest.raises(ValueError, match="inputs"):
        detect(_mlp(1), _mlp(2), tests=("outputs",), inputs=torch.empty(0, 8))
    with pytest.raises(TypeError, match="expected a biastransfer Model"):
        detect(42, _mlp(2))
    with pytest.raises(FileNotFoundError):
        detect("/nonexistent/model.safetensors", _mlp(2))


def test_report_text_and_json_round_trip(tmp_path, controls):
    a = _mlp(1)
    report = detect(a, _noisy_copy(a), controls=controls[:4], random_directions=10)
    text = str(report)
    assert report.verdict in text.splitlines()[0]
    for t in report.tests:
        assert f"[{t.test}]" in text
        for layer in t.layers:
            assert layer.name in text
    path = tmp_path / "report.json"
    returned = report.to_json(path)
    parsed = json.loads(path.read_text())
    assert parsed == json.loads(returned)
    assert parsed["alpha"] == report.alpha
    assert parsed["verdict"] == report.verdict
    assert parsed["combined_log10_p"] == pytest.approx(report.combined_log10_p, rel=1e-12)
    assert parsed["combined_tests"] == report.combined_tests
    assert len(parsed["tests"]) == len(report.tests)
    for entry, t in zip(parsed["tests"], report.tests):
        for key in ("test", "ran", "skipped_reason", "statistic_name", "method", "calibrated"):
            assert entry[key] == getattr(t, key), key
        assert entry["statistic"] == pytest.approx(t.statistic, rel=1e-12)
        if math.isfinite(t.log10_p):
            assert entry["log10_p"] == pytest.approx(t.log10_p, rel=1e-12)
            if t.log10_p >= -300:
                assert entry["p"] == pytest.approx(10 ** t.log10_p, rel=1e-9)
        assert len(entry["layers"]) == len(t.layers)
        for le, layer in zip(entry["layers"], t.layers):
            assert le["name"] == layer.name and le["kind"] == layer.kind
            assert le["units"] == layer.units
            assert le["statistic"] == pytest.approx(layer.statistic, rel=1e-12)
            assert le["matched_fraction"] == pytest.approx(layer.matched_fraction, rel=1e-12)
            assert le["note"] == layer.note
    by_test = {entry["test"]: entry for entry in parsed["tests"]}
    assert by_test["susceptibility"]["details"]["cosine"] == report.test(
        "susceptibility").details["cosine"]
    # With controls the weight test is joined by its control-calibrated agreement form.
    assert "weights_agreement" in by_test
    # Rebuilding a report from its tests gives the same combination and verdict.
    again = DetectionReport.from_tests(report.tests, report.alpha)
    assert again.verdict == report.verdict and again.combined_log10_p == report.combined_log10_p


def test_report_combines_with_bonferroni():
    exact = detect_api.TestReport(test="weights", ran=True, log10_p=-5.0, method="fisher over 2 layers")
    approx = detect_api.TestReport(test="susceptibility", ran=True, log10_p=-50.0,
                        method="approximate null: random direction")
    no_p = detect_api.TestReport(test="outputs", ran=True, skipped_reason="no p-value: give controls")
    calibrated = detect_api.TestReport(test="activations", ran=True, log10_p=-1.0, method="empirical")
    report = DetectionReport.from_tests([exact, approx, no_p, calibrated], alpha=0.01)
    assert report.combined_tests == ["weights", "activations"]
    assert report.combined_log10_p == pytest.approx(-5.0 + math.log10(2))
    assert [t.calibrated for t in report.tests] == [True, False, False, True]
    assert DetectionReport.from_tests([approx, no_p]).verdict == "inconclusive"


def test_plot_writes_a_png(tmp_path, controls):
    a = _mlp(1)
    report = detect(a, _noisy_copy(a), controls=controls[:4])
    path = tmp_path / "detect.png"
    fig = report.plot(path)
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_cli_exit_codes(tmp_path, capsys):
    a = _mlp(1)
    a.save(str(tmp_path / "a.safetensors"))
    _noisy_copy(a).save(str(tmp_path / "copy.safetensors"))
    _mlp(2).save(str(tmp_path / "other.safetensors"))
    out = tmp_path / "r.json"
    assert detect_cli([str(tmp_path / "a.safetensors"), str(tmp_path / "copy.safetensors"),
                       "--json", str(out), "--quiet"]) == 1
    assert json.loads(out.read_text())["verdict"] == "shared"
    assert detect_cli([str(tmp_path / "a.safetensors"), str(tmp_path / "other.safetensors"),
                       "--tests", "weights", "activations"]) == 0
    assert "not shared" in capsys.readouterr().out
    assert detect_cli([str(tmp_path / "a.safetensors"), str(tmp_path / "missing.safetensors")]) == 2
    assert "error" in capsys.readouterr().err
    assert detect_cli([str(tmp_path / "a.safetensors"), str(tmp_path / "copy.safetensors"),
                       "--alpha", "3"]) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown test name
        detect_cli([str(tmp_path / "a.safetensors"), "b", "--tests", "vibes"])
    assert exit_info.value.code == 2
