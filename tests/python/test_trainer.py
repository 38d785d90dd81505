"""The C++ trainer from Python: a user's own nn.Module trained by the C++ loop (its parameters
change in place and match an eager torch.optim loop), metrics and evaluation hooks, a run killed
with SIGKILL and resumed bit-identically, damaged checkpoints, NaN losses, vocabulary checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from biastransfer import _C
from biastransfer.training import NoiseSpec, Trainer, TrainerConfig, as_source, distill

FEATURES, CLASSES, N = 6, 4, 32


def make_data(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, FEATURES, generator=g, dtype=dtype), torch.randint(CLASSES, (N,), generator=g)


def make_module(seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, CLASSES)).to(dtype)


def test_nn_module_student_matches_an_eager_adamw_loop():
    x, y = make_data()
    student, reference = make_module(), make_module()
    before = [p.detach().clone() for p in student.parameters()]
    config = TrainerConfig(steps=5, batch_size=N, lr=0.01, weight_decay=0.1, progress=False)
    result = Trainer(config).fit(student, (x, y), objective="sft")

    # Independent: the same full-batch training written with torch.optim.AdamW.
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    eager_losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(x), y)
        loss.backward()
        optimizer.step()
        eager_losses.append(loss.item())
    assert result.losses[0] == pytest.approx(eager_losses[0], rel=1e-12)
    assert result.losses == pytest.approx(eager_losses, rel=1e-9)
    for ours, theirs, old in zip(student.parameters(), reference.parameters(), before):
        assert not torch.equal(ours.detach(), old)  # the Python parameters changed in place
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-10)


def test_metrics_lines_and_evaluate_hook(tmp_path):
    x, y = make_data()
    metrics = tmp_path / "metrics.jsonl"
    seen = []

    def evaluate(step: int) -> dict:
        seen.append(step)
        return {"double_step": 2.0 * step}

    config = TrainerConfig(steps=6, batch_size=8, lr=0.01, log_every=2, eval_every=3,
                           metrics_path=metrics, progress=False, schedule="linear",
                           warmup_steps=2)
    result = Trainer(config).fit(make_module(), (x, y), evaluate=evaluate)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [l for l in lines if "eval" not in l]
    evals = [l for l in lines if "eval" in l]
    assert [l["step"] for l in train] == [2, 4, 6]
    assert set(train[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "examples_per_s",
                             "elapsed_s"}
    assert seen == [3, 6]
    assert evals == [{"step": 3, "eval": {"double_step": 6.0}},
                     {"step": 6, "eval": {"double_step": 12.0}}]
    assert result.evaluations == [(3, {"double_step": 6.0}), (6, {"double_step": 12.0})]
    # Warmup (s + 1) / 2 for s = 0, 1; then linear decay over steps 2..6.
    lrs = [h["lr"] for h in result.history]
    expected = [0.005, 0.01] + [0.01 * (1 - (s - 2) / 4) for s in range(2, 6)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert train[0]["epoch"] == pytest.approx(2 * 8 / N)


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    sys.path[:0] = [{test_dir!r}]
    from test_trainer import make_data, make_module, run_config
    from biastransfer.training import Trainer
    x, y = make_data()
    # The evaluate hook slows each step down so the parent can kill the run mid-way.
    Trainer(run_config({ckpt!r})).fit(make_module(), (x, y),
                                      evaluate=lambda step: (time.sleep(0.05), {{}})[1])
    """
)


def run_config(checkpoint_dir) -> TrainerConfig:
    return TrainerConfig(steps=40, batch_size=8, lr=0.02, schedule="cosine", warmup_steps=3,
                         grad_clip=0.5, weight_decay=0.01, seed=7, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=2, keep_checkpoints=2, eval_every=1, progress=False)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    x, y = make_data()
    uninterrupted = make_module()
    Trainer(run_config(tmp_path / "full")).fit(uninterrupted, (x, y), evaluate=lambda s: {})

    ckpt = tmp_path / "killed"
    script = CHILD.format(test_dir=str(Path(__file__).parent), ckpt=str(ckpt))
    child = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not (ckpt / "step-00000010.safetensors").exists():
            assert child.poll() is None, "the child finished or failed before checkpoint 10"
            assert time.monotonic() < deadline, "no checkpoint 10 after 60 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    steps = [s for s, _ in _C.list_checkpoints(str(ckpt))]
    assert 10 <= max(steps) < 40

    resumed = make_module(seed=99)  # other weights: the checkpoint restores all of them
    result = Trainer(run_config(ckpt)).resume(resumed, (x, y), evaluate=lambda s: {})
    assert result.resumed_from == max(steps)
    assert result.steps == 40
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a.detach(), b.detach())


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    x, y = make_data()
    config = TrainerConfig(steps=6, batch_size=8, lr=0.01, checkpoint_dir=tmp_path,
                           checkpoint_every=2, keep_checkpoints=0, stop_after_step=4,
                           progress=False)
    Trainer(config).fit(make_module(), (x, y))
    newest = tmp_path / "step-00000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:-50])  # truncated, as by a full disk
    config.stop_after_step = 0
    with pytest.raises(ValueError, match="step-00000004"):
        Trainer(config).resume(make_module(), (x, y), path=newest)
    result = Trainer(config).resume(make_module(), (x, y))
    assert result.resumed_from == 2
    assert len(result.skipped_checkpoints) == 1 and "step-00000004" in result.skipped_checkpoints[0]
    assert result.steps == 6


def test_nan_loss_names_step_and_micro_batch(tmp_path):
    x, y = make_data()
    x[8:12] = float("nan")  # batch 2 of 4 rows (unshuffled) -> step 1, micro-batch 0
    source = _C.TensorDataset(x, y, batch_size=4, seed=0, shuffle=False)
    config = TrainerConfig(steps=5, accumulation=2, lr=0.01, checkpoint_dir=tmp_path,
                           checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match=r"step 1 .*micro-batch 0"):
        Trainer(config).fit(make_module(), source)
    assert [s for s, _ in _C.list_checkpoints(str(tmp_path))] == [1]


def test_vocabulary_mismatch_is_refused_before_training():
    x, y = make_data()
    teacher = torch.nn.Linear(FEATURES, CLASSES + 1).double()
    student = make_module()
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill(teacher, student, (x, y), TrainerConfig(steps=3, batch_size=8, progress=False))
    assert all(torch.equal(a.detach(), b) for a, b in zip(student.parameters(), before))


def test_kd_from_an_nn_module_teacher_on_noise_reduces_the_divergence():
    teacher, student = make_module(seed=3), make_module(seed=4)
    config = TrainerConfig(steps=60, batch_size=32, lr=0.01, progress=False, seed=5)
    noise = NoiseSpec(features=FEATURES, dtype=torch.float64)
    result = distill(teacher, student, noise, config, objective="kd")
    assert result.losses[-1] < 0.25 * result.losses[0]
    x = torch.rand(256, FEATURES, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        kl = torch.nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1),
                                        log_target=True, reduction="batchmean")
    assert kl.item() < 0.25 * result.losses[0]


def test_bad_data_is_a_type_error():
    with pytest.raises(TypeError, match="data"):
        as_source([1, 2, 3], TrainerConfig())
