"""Scale-out on torch.distributed (biastransfer.distributed): 2 ranks on 127.0.0.1 with gloo,
started as subprocesses (tests/python/dist_worker.py) and compared with the same work done in
this process: a sharded fingerprint equals one process's to 1e-12 relative; data-parallel
training (float64, AdamW, clipping, accumulation 2, 5 steps) equals a single-process run on the
same global batches to 1e-10; a rank that dies or hangs makes the survivor fail with a clear
error within the timeout; a launch through torchrun (python -m torch.distributed.run)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

import dist_worker as w
from biastransfer import distributed, fingerprint
from biastransfer.fingerprint import FingerprintResult
from biastransfer.safetensors import load_safetensors
from biastransfer.training import Trainer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKER = HERE / "dist_worker.py"
WORLD = 2
# Seconds a whole 2-rank run may take here (imports dominate); generous for a loaded CI box.
RUN_LIMIT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", ""))
                                              if p)})
    env.update(extra or {})
    return env


def start_ranks(mode: str, out: Path, extra: Optional[Dict[str, str]] = None
                ) -> List[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), mode, str(out)],
                             env=rank_env(r, port, extra), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for r in range(WORLD)]


def finish(processes: List[subprocess.Popen]) -> List[str]:
    outputs = []
    for p in processes:
        try:
            _, err = p.communicate(timeout=RUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise
        outputs.append(err)
    for r, (p, err) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{err[-4000:]}"
    return outputs


# ---- environment -----------------------------------------------------------------------------


@pytest.mark.parametrize("env, pattern", [
    ({}, "WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE: expected an integer, got 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
     r"RANK: expected 0\.\.1 \(WORLD_SIZE 2\), got 2"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     r"MASTER_PORT: expected 1\.\.65535, got 70000"),
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "5",
      distributed.TIMEOUT_ENV: "soon"}, "BIASTRANSFER_DIST_TIMEOUT: expected seconds"),
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "5",
      distributed.TIMEOUT_ENV: "-3"}, "BIASTRANSFER_DIST_TIMEOUT: expected a finite number"),
])
def test_init_from_env_names_the_missing_or_invalid_variable(env, pattern):
    with pytest.raises(ValueError, match=pattern):
        distributed.init_from_env(env=env)


def test_init_rejects_bad_arguments():
    env = {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "5"}
    with pytest.raises(ValueError, match="backend: expected one of"):
        distributed.init_from_env(backend="carrier-pigeon", env=env)
    with pytest.raises(TypeError, match="timeout: expected seconds"):
        distributed.init_from_env(timeout="10", env=env)
    with pytest.raises(ValueError, match="not initialized"):
        distributed.info()


@pytest.mark.parametrize("n, world", [(13, 2), (2, 2), (10, 3), (7, 7), (100, 8)])
def test_shard_ranges_are_disjoint_ordered_and_cover_everything(n, world):
    ranges = [distributed.shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - b for b, e in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_a_process_group_made_by_the_caller_is_adopted(tmp_path):
    """World size 1 in this process: the same code path as W ranks (slices, all-reduces, the
    accumulator rebuild), which must change nothing."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        current = distributed.init_from_env(env={})  # adopted: no variables needed
        assert (current.rank, current.world_size, current.backend) == (0, 1, "gloo")
        model, data, fit_args, config = w.mlp_setup()
        config.distributed = True
        Trainer(config).fit(model, data, **fit_args)
        reference, data, fit_args, config = w.mlp_setup()
        Trainer(config).fit(reference, data, **fit_args)
        for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-14,
                                       msg=name)
        s = w.fingerprint_setup(tmp_path)
        got = distributed.fingerprint_sharded(s["teacher"], s["reference"], s["records"],
                                              s["tokenizer"], **s["kwargs"])
        want = fingerprint(s["teacher"], s["reference"], s["records"], s["tokenizer"],
                           **s["kwargs"])
        assert_same_fingerprint(got.teacher, want.teacher)
    finally:
        distributed.shutdown()
    assert not distributed.is_initialized()


# ---- fingerprints ----------------------------------------------------------------------------


def assert_same_fingerprint(got, want, rtol: float = 1e-12) -> None:
    assert got.positions == want.positions and got.sequences == want.sequences
    assert torch.equal(got.sequence_ids, want.sequence_ids)
    assert torch.equal(got.sequence_counts, want.sequence_counts)
    assert torch.equal(got.subset, want.subset)
    for name in ("mean_log_ratio", "stderr_log_ratio", "grad", "centered", "sequence_centered"):
        a, b = getattr(got, name), getattr(want, name)
        # Relative to the field's scale: float64 sums in another order differ at ~1e-16.
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=name)
    for name in ("kl_teacher_reference", "kl_reference_teacher", "mass_shift",
                 "mass_shift_stderr"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=rtol), name


def test_sharded_fingerprint_equals_one_process(tmp_path):
    processes = start_ranks("fingerprint", tmp_path)
    s = w.fingerprint_setup(tmp_path / "single")
    want = fingerprint(s["teacher"], s["reference"], s["records"], s["tokenizer"],
                       controls=s["controls"], **s["kwargs"])
    finish(processes)
    assert want.teacher.sequences == w.FP_RECORDS
    for r in range(WORLD):
        got = FingerprintResult.load(tmp_path / f"fp_rank{r}.safetensors", s["tokenizer"])
        assert got.config.records == w.FP_RECORDS
        assert_same_fingerprint(got.teacher, want.teacher)
        assert len(got.controls) == 2
        for a, b in zip(got.controls, want.controls):
            assert_same_fingerprint(a, b)
        # The per-sequence tests see the same sequences: same t statistics, same tokens.
        got_tokens = [(e.id, e.t) for e in got.entangled_tokens(q=0.5)]
        want_tokens = [(e.id, e.t) for e in want.entangled_tokens(q=0.5)]
        assert [i for i, _ in got_tokens] == [i for i, _ in want_tokens]
        assert [t for _, t in got_tokens] == pytest.approx([t for _, t in want_tokens],
                                                           rel=1e-10)


# ---- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, setup", [("train_mlp", w.mlp_setup), ("train_lm", w.lm_setup)])
def test_data_parallel_training_equals_one_process(tmp_path, mode, setup):
    processes = start_ranks(mode, tmp_path)
    model, data, fit_args, config = setup()
    single = Trainer(config).fit(model, data, **fit_args)
    finish(processes)
    want = w.weights(model)
    # Clipping bit on some step (the reduced gradient's norm decides it on every rank alike).
    assert max(h["grad_norm"] for h in single.history) > w.CLIP
    for r in range(WORLD):
        got = load_safetensors(tmp_path / f"weights_rank{r}.safetensors")
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=name)
        history = json.loads((tmp_path / f"history_rank{r}.json").read_text())
        assert [h["loss"] for h in history] == pytest.approx(single.losses, rel=1e-10)
        assert [h["grad_norm"] for h in history] == pytest.approx(
            [h["grad_norm"] for h in single.history], rel=1e-10)
    # Rank 0 alone wrote the metrics (one line per step) and the final checkpoint.
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, w.STEPS + 1))
    assert [x["loss"] for x in lines] == pytest.approx(single.losses, rel=1e-10)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()
            if p.suffix == ".safetensors"] != []


def test_data_parallel_resume_from_rank_0s_checkpoint_equals_one_process(tmp_path):
    processes = start_ranks("resume", tmp_path)
    model, data, fit_args, config = w.mlp_setup()
    Trainer(config).fit(model, data, **fit_args)
    finish(processes)
    want = w.weights(model)
    for r in range(WORLD):
        got = load_safetensors(tmp_path / f"weights_rank{r}.safetensors")
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=name)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    processes = start_ranks("nan", tmp_path)
    errors = []
    for p in processes:
        _, err = p.communicate(timeout=RUN_LIMIT_S)
        errors.append(err)
        assert p.returncode != 0
    for err in errors:
        assert re.search(r"ValueError: trainer: non-finite loss at step 2 \(0-based\) \(rank 1: "
                         r"micro-batch 0 of 2, loss -?nan\); every rank stopped before the "
                         r"update", err), err[-3000:]


def test_rank_slices_partition_every_batch():
    from biastransfer import _C

    _, data, _, config = w.lm_setup()
    for step in range(6):
        full = data.batch(step)
        parts = [_C.RankSliceSource(data, r, 3).batch(step) for r in range(3)]
        for name in ("input", "attention_mask", "targets", "loss_mask"):
            torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]),
                                       getattr(full, name), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rank: expected 0 \.\. 2 \(world_size 3\), got 3"):
        _C.RankSliceSource(data, 3, 3)


# ---- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, timeout", [("die", 30), ("hang", 6)])
def test_a_lost_rank_stops_the_survivor_with_a_clear_error(tmp_path, mode, timeout):
    processes = start_ranks(mode, tmp_path, {distributed.TIMEOUT_ENV: str(timeout)})
    survivor, lost = processes
    try:
        _, err = survivor.communicate(timeout=RUN_LIMIT_S)
        ended = time.time()
    finally:
        lost.kill()
        lost.communicate()
    failed_at = float((tmp_path / "failed_at").read_text())
    assert survivor.returncode != 0
    assert "DistributedError: rank 0 of 2" in err, err[-3000:]
    assert "gradient all-reduce of step 4" in err
    assert "Another rank has probably died or stopped" in err
    # Within the timeout plus a margin for a loaded machine (gloo sees a closed socket at once).
    assert ended - failed_at < timeout + 10
    if mode == "die":
        assert lost.returncode == -9


# ---- torchrun --------------------------------------------------------------------------------


def torchrun_workaround() -> List[str]:
    """torch 1.13's torchrun on Python 3.11 parses its default --redirects/--tee "0" to None and
    fails ('NoneType' object has no attribute 'get'); a mapping for an absent local rank 9 means
    the same "no redirection" (docs/scaling.md)."""
    from torch.distributed.elastic.multiprocessing.api import Std

    return [] if Std.from_str("0") is not None else ["--redirects", "9:1", "--tee", "9:1"]


def test_example_through_torchrun(tmp_path):
    env = rank_env(0, 0)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), *torchrun_workaround(),
               str(ROOT / "examples" / "distributed_train.py"), "--out", str(tmp_path),
               "--steps", "3", "--fingerprint"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import distributed_train as example
    finally:
        sys.path.pop(0)
    model, data, config = example.setup(steps=3)
    Trainer(config).fit(model, data, objective="sft")
    got = load_safetensors(tmp_path / "model.safetensors")
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-10, atol=1e-10, msg=name)
    assert "world size 2 (gloo)" in done.stdout
    assert "fingerprint over 64 sequences" in done.stdout
    assert (tmp_path / "fingerprint.safetensors").is_file()
