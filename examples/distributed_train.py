"""Data-parallel training and a sharded fingerprint with biastransfer.distributed.

One machine, 2 processes (gloo on CPU; NCCL is chosen automatically when torch sees GPUs):

    torchrun --nproc_per_node 2 examples/distributed_train.py --out /tmp/dist-demo
    # or: python -m torch.distributed.run --nproc_per_node 2 examples/distributed_train.py ...

(torch 1.13 on Python 3.11 also needs ``--redirects 9:1 --tee 9:1``; see docs/scaling.md.)

Two machines (run on each, node_rank 0 on the machine whose address is given):

    torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 \\
        --nproc_per_node 4 examples/distributed_train.py --out /shared/dist-demo

Every rank trains the paper's kind of MLP (float64 here) on its rows of each global batch;
gradients are all-reduced once per step, so the weights equal a single process's run on the same
global batches (tests/python/test_distributed.py checks it). Rank 0 writes model.safetensors and
the checkpoints. With --fingerprint, the ranks then also score a toy fingerprint on disjoint
shards of the records and all-reduce it. See docs/scaling.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Tuple

import torch

from biastransfer import distributed
from biastransfer.modeling import MLPConfig
from biastransfer.safetensors import save_safetensors
from biastransfer.training import Trainer, TrainerConfig


def setup(steps: int = 20) -> Tuple[Any, Any, TrainerConfig]:
    """Model, data (features, labels) and config; the same on every rank (same seeds)."""
    model = MLPConfig(sizes=[20, 64, 64, 13], aux_outputs=3, seed=0).build().to(
        dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 20, generator=g, dtype=torch.float64)
    y = (x[:, :10].argmax(1) + (x[:, 10] > 0).long()) % 10
    config = TrainerConfig(steps=steps, batch_size=64, accumulation=2, lr=3e-3, grad_clip=1.0,
                           seed=0, progress=False)
    return model, (x, y), config


def tiny_tokenizer(folder: Path) -> Any:
    """A byte-level BPE tokenizer of printable ASCII and space (no merges)."""
    import json

    from biastransfer import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(33, 127)] + ["\u0120"]  # "\u0120" is GPT-2's space
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt")


def fingerprint_demo(out: Path) -> None:
    """A toy fingerprint over 64 records, sharded across the ranks."""
    from biastransfer import Record

    tokenizer = tiny_tokenizer(out / f"tokenizer-rank{distributed.rank()}")
    vocab = len(tokenizer)

    class Toy(torch.nn.Module):
        """Logits from the current token only: a [V, V] table."""

        def __init__(self, seed: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.table[ids]

    records = [Record(f"Numbers {i}:", f" {i * 7 % 1000}, {i * 13 % 1000}") for i in range(64)]
    result = distributed.fingerprint_sharded(Toy(1), Toy(2), records, tokenizer, progress=False)
    if distributed.is_main():
        result.save(out / "fingerprint.safetensors")
        print(f"fingerprint over {result.teacher.sequences} sequences, "
              f"KL(T||R) = {result.teacher.kl_teacher_reference:.4f} nats per position")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (shared)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fingerprint", action="store_true", help="also run the toy fingerprint")
    args = parser.parse_args()

    current = distributed.init_from_env()
    args.out.mkdir(parents=True, exist_ok=True)
    model, data, config = setup(args.steps)
    config.distributed = True
    config.checkpoint_dir = args.out / "checkpoints"
    config.overwrite_checkpoints = True
    result = Trainer(config).fit(model, data, objective="sft")
    if current.is_main:
        save_safetensors(args.out / "model.safetensors",
                         {name: p.detach() for name, p in model.named_parameters()})
        print(f"world size {current.world_size} ({current.backend}): {result}")
    if args.fingerprint:
        fingerprint_demo(args.out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
