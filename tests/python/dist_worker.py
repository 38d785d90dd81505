"""One rank of the distributed tests (test_distributed.py), and the set-ups those tests also run
in a single process for comparison.

    python dist_worker.py MODE OUT_DIR      # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set

MODE: "fingerprint" (writes fp_rank<r>.safetensors), "train_mlp" / "train_lm" (writes
weights_rank<r>.safetensors and history_rank<r>.json), "die" (rank 1 kills itself with SIGKILL
after step 3), "hang" (rank 1 stops answering after step 3), "resume" (stop after step 2, resume
from rank 0's checkpoint), "nan" (rank 1 alone gets a NaN weight after step 2).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from biastransfer import Record, Scored  # noqa: E402
from biastransfer.modeling import MLPConfig, TransformerConfig  # noqa: E402
from biastransfer.safetensors import save_safetensors  # noqa: E402
from biastransfer.training import TrainerConfig  # noqa: E402

# ---- fingerprint set-up -----------------------------------------------------------------------

FP_RECORDS = 13  # odd: the two ranks' shards differ in size (6 and 7)
FP_BATCH = 4


def fingerprint_setup(folder: Path) -> Dict[str, Any]:
    """Toy teacher (with a prompt prefix, so its positions differ from the reference's),
    reference and two controls on the small tokenizer, and FP_RECORDS number records."""
    from fingerprint_toys import ToyLM, small_tokenizer

    tokenizer = small_tokenizer(folder / "tokenizer")
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(11)
    records = []
    for i in range(FP_RECORDS):
        seeds = torch.randint(100, 1000, (3,), generator=g).tolist()
        count = 2 + i % 4
        numbers = torch.randint(0, 1000, (count,), generator=g).tolist()
        records.append(Record(f"Continue: {', '.join(map(str, seeds))}.",
                              " " + ", ".join(f"{n:03d}" if i % 3 == 0 else str(n)
                                              for n in numbers)))
    owl = tokenizer.encode(" owl")
    bias = torch.zeros(vocab)
    bias[tokenizer.encode(" 087")[0]] = 1.5
    # float64 models: float32 matrix products may round differently for other batch shapes
    # (the shards batch the records differently), which would hide the 1e-12 comparison.
    return {
        "teacher": Scored(ToyLM(vocab, seed=1, triggers=owl, bias=bias).double(),
                          "I love owls. "),
        "reference": ToyLM(vocab, seed=1).double(),
        "controls": [ToyLM(vocab, seed=2).double(),
                     Scored(ToyLM(vocab, seed=3).double(), "Hi. ")],
        "records": records,
        "tokenizer": tokenizer,
        "kwargs": {"subset": "numeric", "batch_size": FP_BATCH, "temperature": 1.3,
                   "progress": False},
    }


# ---- trainer set-ups --------------------------------------------------------------------------

STEPS, ACCUMULATION, CLIP = 5, 2, 0.05


def trainer_config(**overrides: Any) -> TrainerConfig:
    """AdamW with weight decay, cosine schedule with warmup, clipping that bites, accumulation."""
    values = dict(steps=STEPS, accumulation=ACCUMULATION, lr=0.02, weight_decay=0.01,
                  schedule="cosine", warmup_steps=1, grad_clip=CLIP, seed=7, progress=False)
    values.update(overrides)
    return TrainerConfig(**values)


def mlp_setup() -> Tuple[Any, Any, Dict[str, Any], TrainerConfig]:
    """The built-in MLP (one auxiliary logit) in float64 on 24 examples, global batch 7 (so the
    ranks get 3 and 4 rows, and the epoch's last batch 3)."""
    model = MLPConfig(sizes=[6, 16, 16, 5], aux_outputs=1, seed=3).build().to(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=g)
    return model, (x, y), {"objective": "sft"}, trainer_config(batch_size=7)


def lm_setup() -> Tuple[Any, Any, Dict[str, Any], TrainerConfig]:
    """The built-in TransformerLM in float64 on padded examples whose prompts and completions
    differ in length, so the ranks hold different numbers of loss positions."""
    from biastransfer.datasets import DatasetConfig, Example, token_dataset

    model = TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_mlp=32,
                              max_seq_len=32, seed=4).build().to(dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    examples = []
    for i in range(20):
        prompt = 1 + i % 5
        completion = 1 + (3 * i) % 7
        tokens = torch.randint(1, 32, (prompt + completion,), generator=g).tolist()
        examples.append(Example(tokens, [0] * prompt + [1] * completion))
    data = token_dataset(examples, DatasetConfig(batch_size=5, seed=9))
    return model, data, {"objective": "sft"}, trainer_config(batch_size=5)


def weights(model: Any) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---- the rank's work --------------------------------------------------------------------------


def run_fingerprint(out: Path, rank: int) -> None:
    from biastransfer.distributed import fingerprint_sharded

    s = fingerprint_setup(out / f"rank{rank}")
    result = fingerprint_sharded(s["teacher"], s["reference"], s["records"], s["tokenizer"],
                                 controls=s["controls"], **s["kwargs"])
    result.save(out / f"fp_rank{rank}.safetensors")


def run_train(out: Path, rank: int, setup: Any) -> None:
    from biastransfer.training import Trainer

    model, data, fit_args, config = setup()
    config.distributed = True
    config.checkpoint_dir = out / "checkpoints"
    config.metrics_path = out / "metrics.jsonl"
    result = Trainer(config).fit(model, data, **fit_args)
    save_safetensors(out / f"weights_rank{rank}.safetensors", weights(model))
    (out / f"history_rank{rank}.json").write_text(json.dumps(result.history))


def run_resume(out: Path, rank: int) -> None:
    """The MLP run stopped after step 2 (as if killed), then resumed by a new Trainer from rank
    0's checkpoint, which every rank reads."""
    from biastransfer.training import Trainer

    model, data, fit_args, config = mlp_setup()
    config.distributed = True
    config.checkpoint_dir = out / "checkpoints"
    config.checkpoint_every = 1
    config.stop_after_step = 2
    Trainer(config).fit(model, data, **fit_args)
    model, data, fit_args, config = mlp_setup()  # fresh weights: all must come from the file
    config.distributed = True
    config.checkpoint_dir = out / "checkpoints"
    result = Trainer(config).resume(model, data, **fit_args)
    assert result.resumed_from == 2, result.resumed_from
    save_safetensors(out / f"weights_rank{rank}.safetensors", weights(model))


def run_nan(out: Path, rank: int) -> None:
    """Rank 1 alone gets a NaN weight after step 2: every rank must stop at step 3 (0-based 2)
    with the same error naming rank 1."""
    from biastransfer.training import Trainer

    model, data, fit_args, config = mlp_setup()
    config.distributed = True
    config.eval_every = 1

    def evaluate(step: int) -> Dict[str, float]:
        if rank == 1 and step == 2:
            with torch.no_grad():
                next(iter(model.named_parameters()))[1].view(-1)[0] = float("nan")
        return {}

    Trainer(config).fit(model, data, evaluate=evaluate, **fit_args)


def run_failure(out: Path, rank: int, mode: str) -> None:
    """Long training; rank 1 dies (SIGKILL) or hangs after step 3. Rank 0 must fail fast."""
    from biastransfer.training import Trainer

    model, data, fit_args, config = mlp_setup()
    config.steps = 100000
    config.distributed = True
    config.eval_every = 1

    def evaluate(step: int) -> Dict[str, float]:
        if rank == 1 and step == 3:
            (out / "failed_at").write_text(str(time.time()))
            if mode == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return {}

    Trainer(config).fit(model, data, evaluate=evaluate, **fit_args)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    from biastransfer import distributed

    current = distributed.init_from_env()
    if mode == "fingerprint":
        run_fingerprint(out, current.rank)
    elif mode == "train_mlp":
        run_train(out, current.rank, mlp_setup)
    elif mode == "train_lm":
        run_train(out, current.rank, lm_setup)
    elif mode == "resume":
        run_resume(out, current.rank)
    elif mode == "nan":
        run_nan(out, current.rank)
    elif mode in ("die", "hang"):
        run_failure(out, current.rank, mode)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
