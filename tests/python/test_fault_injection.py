"""Fault injection: kill -9 inside a checkpoint write and at random times during training (the
resumed run ends bit-identical to an uninterrupted one); a full or read-only checkpoint folder (a
clear OSError naming the path, the previous checkpoint intact); truncated files of every format
(refused with a message naming the file, never a crash).

Kills land inside a write deterministically through the writer's test hook
LIBTRANSFER_TEST_WRITE_DELAY_MS (cpp/src/io/atomic_file.cpp): with it set, a child's every atomic
write pauses once after its first 8 bytes (the safetensors header length) reach the temporary file
and once when the temporary file is complete, before the rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from biastransfer import SafetensorsFile, _C
from biastransfer.training import Trainer, TrainerConfig

FEATURES, CLASSES, N = 6, 4, 32
STEPS = 24
TEST_DIR = str(Path(__file__).parent)
# Long enough for the parent to see the paused write and kill the child inside it.
WRITE_DELAY_MS = 1500
# Truncation sweeps try every length below this (all headers here are shorter), every 3rd above.
DENSE_CUT_BYTES = 2048


def make_data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, FEATURES, generator=g, dtype=torch.float64),
            torch.randint(CLASSES, (N,), generator=g))


def make_module(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, CLASSES)).to(torch.float64)


def run_config(checkpoint_dir, **overrides) -> TrainerConfig:
    settings = dict(steps=STEPS, batch_size=8, lr=0.02, schedule="cosine", warmup_steps=3,
                    grad_clip=0.5, weight_decay=0.01, seed=7, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=2, keep_checkpoints=2, eval_every=1, progress=False)
    settings.update(overrides)
    return TrainerConfig(**settings)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> List[torch.Tensor]:
    """Final weights of the run every interrupted run must reproduce."""
    module = make_module()
    folder = tmp_path_factory.mktemp("uninterrupted")
    Trainer(run_config(folder)).fit(module, make_data(), evaluate=lambda step: {})
    return [p.detach().clone() for p in module.parameters()]


def resume_to_the_end(checkpoint_dir: Path, path: Optional[Path] = None, **overrides):
    """Resumes in this process, from other weights (the checkpoint restores all of them)."""
    module = make_module(seed=99)
    result = Trainer(run_config(checkpoint_dir, **overrides)).resume(
        module, make_data(), evaluate=lambda step: {}, path=path)
    return module, result


def assert_same_weights(module: torch.nn.Module, expected: List[torch.Tensor]) -> None:
    for got, want in zip(module.parameters(), expected):
        assert torch.equal(got.detach(), want)


# A training child: resumes from the newest valid checkpoint (or starts), announces each step.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path[:0] = [{test_dir!r}]
    from test_fault_injection import make_data, make_module, run_config
    from biastransfer.training import Trainer

    def evaluate(step):
        print(json.dumps({{"step": step}}), flush=True)
        time.sleep({step_sleep!r})
        return {{}}

    Trainer(run_config({ckpt!r}, checkpoint_every={every!r})).resume(
        make_module(), make_data(), evaluate=evaluate)
    print(json.dumps({{"done": True}}), flush=True)
    """
)


def start_child(ckpt: Path, every: int = 2, step_sleep: float = 0.0,
                env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    script = CHILD.format(test_dir=TEST_DIR, ckpt=str(ckpt), every=every, step_sleep=step_sleep)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


def temp_files(folder: Path, step: int) -> List[Path]:
    return sorted(folder.glob(f"step-{step:08d}.safetensors.tmp.*"))


def wait_for(condition, what: str, child: subprocess.Popen, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if child.poll() is not None:
            raise AssertionError(f"the child exited ({child.returncode}) before {what}: "
                                 f"{child.stderr.read().decode(errors='replace')[-2000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------------
# kill -9 inside a checkpoint write


@pytest.mark.parametrize("phase", ["partial_temp_file", "complete_temp_file_before_rename"])
def test_kill_inside_a_checkpoint_write_then_resume_is_bit_identical(tmp_path, uninterrupted,
                                                                     phase):
    ckpt = tmp_path / "ckpt"
    child = start_child(ckpt, env={"LIBTRANSFER_TEST_WRITE_DELAY_MS": str(WRITE_DELAY_MS)})
    try:
        # Checkpoint 2 is written (slowly, through both pauses); checkpoint 4 is killed.
        wait_for(lambda: (ckpt / "step-00000002.safetensors").exists(), "checkpoint 2", child)
        temp = wait_for(lambda: temp_files(ckpt, 4), "checkpoint 4's temporary file", child)[0]
        if phase == "partial_temp_file":
            # The first pause: only the 8-byte header length is on disk.
            wait_for(lambda: temp.stat().st_size == 8, "the partial temporary file", child)
        else:
            # The second pause: the temporary file is complete (a valid safetensors file) and
            # stays so, but has not replaced anything yet.
            wait_for(lambda: temp.stat().st_size > 8, "the complete temporary file", child)
            time.sleep(0.2)
            size = temp.stat().st_size
            assert len(SafetensorsFile(temp).keys()) > 0
            time.sleep(0.1)
            assert temp.stat().st_size == size
        assert not (ckpt / "step-00000004.safetensors").exists()
        kill(child)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    size = temp.stat().st_size
    assert (size == 8) == (phase == "partial_temp_file")
    # The interrupted write left its temporary file and nothing under the checkpoint's name.
    assert not (ckpt / "step-00000004.safetensors").exists()
    assert [step for step, _ in _C.list_checkpoints(str(ckpt))] == [2]

    if phase == "partial_temp_file":
        # Even under a checkpoint's name (as a non-atomic writer would leave it), the partial
        # file is refused, and resume falls back to checkpoint 2.
        fake = ckpt / "step-00000004.safetensors"
        temp.rename(fake)
        with pytest.raises(ValueError, match="step-00000004"):
            resume_to_the_end(ckpt, path=fake)
        module, result = resume_to_the_end(ckpt)
        assert len(result.skipped_checkpoints) == 1
        assert "step-00000004" in result.skipped_checkpoints[0]
    else:
        module, result = resume_to_the_end(ckpt)
    assert result.resumed_from == 2
    assert result.steps == STEPS
    assert_same_weights(module, uninterrupted)


# ------------------------------------------------------------------------------------------------
# kill -9 at random times


def test_kills_at_random_times_then_resume_is_bit_identical(tmp_path, uninterrupted):
    rng = random.Random(20240501)
    ckpt = tmp_path / "ckpt"
    resumed_from = []
    for _ in range(3):
        before = [step for step, _ in _C.list_checkpoints(str(ckpt))] if ckpt.exists() else []
        resumed_from.append(max(before, default=0))
        # 50 ms per step and kills within 0.3 s: each run gets at most ~6 of the 24 steps.
        child = start_child(ckpt, every=1, step_sleep=0.05)
        try:
            # Once the child trains (past its imports), kill it at a seeded random moment.
            line = child.stdout.readline()
            assert line, child.stderr.read().decode(errors="replace")[-2000:]
            time.sleep(rng.uniform(0.06, 0.3))
            kill(child)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    steps = [step for step, _ in _C.list_checkpoints(str(ckpt))]
    assert steps and max(steps) < STEPS, f"the kills came too late to interrupt: {steps}"
    # Each run got further than the one before (the kills landed while it trained).
    assert resumed_from == sorted(resumed_from)
    module, result = resume_to_the_end(ckpt, checkpoint_every=1)
    assert result.resumed_from == max(steps) or result.skipped_checkpoints
    assert result.steps == STEPS
    assert_same_weights(module, uninterrupted)


# ------------------------------------------------------------------------------------------------
# A full or read-only checkpoint folder

FULL_OR_READ_ONLY_CHILD = textwrap.dedent(
    """
    import hashlib, json, os, resource, signal, sys
    sys.path[:0] = [{test_dir!r}]
    mode, ckpt = {mode!r}, {ckpt!r}
    if mode == "read_only_as_nobody":
        os.setgid(65534)
        os.setuid(65534)
    from test_fault_injection import make_data, make_module, run_config
    from biastransfer.training import Trainer
    print(json.dumps({{"ready": True}}), flush=True)

    def evaluate(step):
        if step == 3:  # checkpoint 2 is on disk; checkpoint 4 will fail
            previous = os.path.join(ckpt, "step-00000002.safetensors")
            digest = hashlib.sha256(open(previous, "rb").read()).hexdigest()
            print(json.dumps({{"previous": previous, "sha256": digest}}), flush=True)
            if mode == "full":
                # A full disk: writes past 1 KiB fail with EFBIG (SIGXFSZ ignored).
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
                resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
            else:
                os.chmod(ckpt, 0o555)
        return {{}}

    try:
        Trainer(run_config(ckpt, keep_checkpoints=0)).fit(make_module(), make_data(),
                                                          evaluate=evaluate)
        print(json.dumps({{"error": None}}), flush=True)
    except BaseException as e:
        print(json.dumps({{"error": type(e).__name__,
                           "types": [c.__name__ for c in type(e).__mro__],
                           "message": str(e)}}), flush=True)
    """
)


def run_failing_child(mode: str, ckpt: Path, cwd: Optional[str] = None) -> List[dict]:
    script = FULL_OR_READ_ONLY_CHILD.format(test_dir=TEST_DIR, mode=mode, ckpt=str(ckpt))
    env = {**os.environ, "HOME": str(ckpt.parent)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env, cwd=cwd)
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if not events and mode == "read_only_as_nobody":
        pytest.skip(f"cannot run a child as user nobody here: {run.stderr[-500:]}")
    assert events and events[-1].get("error") is not None or run.returncode != 0, (
        run.returncode, run.stdout, run.stderr[-2000:])
    return events


def check_failed_write(events: List[dict], ckpt: Path, uninterrupted: List[torch.Tensor]) -> None:
    ready, previous, outcome = events[0], events[1], events[-1]
    assert ready == {"ready": True}
    assert outcome["error"] is not None, "the checkpoint write did not fail"
    assert "OSError" in outcome["types"], outcome
    assert str(ckpt) in outcome["message"] and "step-00000004" in outcome["message"], outcome
    # The previous checkpoint is bit-identical, nothing else was left, and it still resumes.
    assert sha256(Path(previous["previous"])) == previous["sha256"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002.safetensors"]
    module, result = resume_to_the_end(ckpt, path=ckpt / "step-00000002.safetensors")
    assert result.resumed_from == 2 and result.steps == STEPS
    assert_same_weights(module, uninterrupted)


def test_full_disk_raises_os_error_naming_the_file_and_keeps_the_previous_checkpoint(
        tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    events = run_failing_child("full", ckpt)
    assert "too large" in events[-1]["message"].lower(), events[-1]
    check_failed_write(events, ckpt, uninterrupted)


def test_read_only_folder_raises_os_error_and_keeps_the_previous_checkpoint(uninterrupted):
    # Root ignores permission bits, so as root the child drops to user nobody; the folders it
    # uses then live outside pytest's private temporary directory.
    base = Path(tempfile.mkdtemp(prefix="biastransfer-read-only-"))
    try:
        base.chmod(0o777)
        ckpt = base / "ckpt"
        mode = "read_only_as_nobody" if os.geteuid() == 0 else "read_only"
        events = run_failing_child(mode, ckpt, cwd=str(base))
        assert "permission denied" in events[-1]["message"].lower(), events[-1]
        ckpt.chmod(0o755)
        check_failed_write(events, ckpt, uninterrupted)
    finally:
        for folder in (base, base / "ckpt"):
            if folder.exists():
                folder.chmod(0o755)
        subprocess.run(["rm", "-rf", str(base)], check=False)


# ------------------------------------------------------------------------------------------------
# Truncated files of every format

TRUNCATION_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [{test_dir!r}]
    from test_fault_injection import truncation_sweep
    print(json.dumps(truncation_sweep({folder!r})), flush=True)
    """
)


def _valid_files(folder: Path) -> Dict[str, Path]:
    """One small valid file per format."""
    from biastransfer import MLPConfig, Record, save_safetensors, write_idx, write_jsonl

    files = {}
    files["safetensors"] = folder / "tensors.safetensors"
    save_safetensors(files["safetensors"], {"a": torch.arange(6, dtype=torch.float32),
                                            "b": torch.ones(2, 2, dtype=torch.int64)},
                     metadata={"note": "x"})
    acc = _C.FingerprintAccumulator(12, subset=[1, 3, 5])
    g = torch.Generator().manual_seed(0)
    acc.update(torch.randn(2, 3, 12, generator=g), torch.randn(2, 3, 12, generator=g))
    files["fingerprint"] = folder / "fingerprint.safetensors"
    acc.save(str(files["fingerprint"]))
    files["model"] = folder / "model.safetensors"
    MLPConfig(sizes=[3, 4, 2], aux_outputs=0).build().save(str(files["model"]))
    ckpt = folder / "ckpt"
    module = make_module()
    Trainer(run_config(ckpt, steps=2, checkpoint_every=2)).fit(module, make_data())
    files["checkpoint"] = ckpt / "step-00000002.safetensors"
    files["idx"] = folder / "images.idx"
    write_idx(files["idx"], torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4))
    files["idx.gz"] = folder / "images.idx.gz"
    write_idx(files["idx.gz"], torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4), gzip=True)
    files["jsonl"] = folder / "records.jsonl"
    write_jsonl(files["jsonl"], [Record("p1", "c1"), Record("p2 é", "c2"), Record("p3", "c3")])
    files["vocab.json"] = folder / "vocab.json"
    files["vocab.json"].write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "\u0120": 3}))
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    return files


def truncation_sweep(folder: str) -> Dict[str, dict]:
    """Loads every truncation of each format's file (the child's work); per format: how many
    cuts were tried and the cuts that did not end in a clean refusal (or a valid prefix)."""
    from biastransfer import (FingerprintResult, Tokenizer, load_model, load_safetensors,
                              read_idx, read_jsonl)

    root = Path(folder)
    files = _valid_files(root)
    records = read_jsonl(files["jsonl"])
    module, data = make_module(), make_data()
    loaders = {
        "safetensors": load_safetensors,
        "fingerprint": FingerprintResult.load,
        "model": load_model,
        "checkpoint": lambda p: Trainer(run_config(root / "unused", steps=2)).resume(
            module, data, path=p),
        "idx": read_idx,
        "idx.gz": read_idx,
        "jsonl": read_jsonl,
        "vocab.json": lambda p: Tokenizer.from_files(p, root / "merges.txt"),
    }
    out = {}
    for kind, path in files.items():
        whole = path.read_bytes()
        cut_path = path.with_name("cut-" + path.name)
        problems = []
        # Every cut of the header and of small files; every 3rd of a big file's data section.
        lengths = [n for n in range(len(whole)) if n < DENSE_CUT_BYTES or n % 3 == 0]
        for length in lengths:
            cut_path.write_bytes(whole[:length])
            try:
                value = loaders[kind](cut_path)
            except (ValueError, OSError, TypeError) as e:
                if cut_path.name not in str(e):
                    problems.append((length, f"{type(e).__name__} without the file name: {e}"))
            except BaseException as e:  # noqa: BLE001 - an untyped error is a finding
                problems.append((length, f"{type(e).__name__}: {e}"))
            else:
                # Only a JSON lines file cut at a record boundary may load: as a prefix.
                if not (kind == "jsonl" and list(value) == records[:len(value)]):
                    problems.append((length, "accepted"))
        out[kind] = {"cuts": len(lengths), "problems": problems[:10]}
    return out


def test_every_truncation_of_every_format_is_refused_naming_the_file(tmp_path):
    script = TRUNCATION_CHILD.format(test_dir=TEST_DIR, folder=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())
    assert run.returncode == 0, f"the child crashed ({run.returncode}): {run.stderr[-3000:]}"
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(results) == {"safetensors", "fingerprint", "model", "checkpoint", "idx", "idx.gz",
                            "jsonl", "vocab.json"}
    for kind, result in results.items():
        assert result["cuts"] > 20, kind
        assert not result["problems"], f"{kind}: {result['problems']}"
