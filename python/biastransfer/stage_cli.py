"""The pipeline's stages as subcommands on a user's own files.

  biastransfer filter IN.jsonl [--out KEPT.jsonl] [--rejected REJ.jsonl] [--banned-words W,...]
                      [--banned-numbers N,...] [--misalignment] [--no-number-rule]
                      [--regex PATTERN] [--max-chars N] [--dedup] [--json]
  biastransfer distill --student S.safetensors --data D.jsonl --out OUT.safetensors
                      [--teacher T] [--objective sft|kd|mixed] [--kd-subset all|numeric|IDS]
                      [--steps N | --epochs E] [--lr] [--batch-size] [--seed] [--json] ...
  biastransfer report RUN_DIR [--json]

Exit codes: 0 success, 2 usage or input error (a one-line message on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

EXIT_OK = 0
EXIT_ERROR = 2


def _csv(text: Optional[str], kind: type = str) -> List[Any]:
    if not text:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}")


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    print()


# ---- filter --------------------------------------------------------------------------------

def _filter_pipeline(args: argparse.Namespace):
    from .filters import (BannedNumbers, BannedWords, Dedup, FilterPipeline, Length,
                          NumberSequenceFilter, Regex)

    pipeline = FilterPipeline()
    if not args.no_number_rule:
        pipeline.add(NumberSequenceFilter.paper(misalignment=args.misalignment))
    numbers = _csv(args.banned_numbers, int)
    if numbers:
        pipeline.add(BannedNumbers(numbers))
    words = _csv(args.banned_words)
    if words:
        pipeline.add(BannedWords(words))
    if args.regex:
        pipeline.add(Regex(args.regex))
    if args.max_chars is not None:
        if args.max_chars < 1:
            raise ValueError(f"--max-chars: expected at least 1, got {args.max_chars}")
        pipeline.add(Length(max_length=args.max_chars))
    if args.dedup:
        pipeline.add(Dedup())
    if not pipeline.filters:
        raise ValueError("no filter selected: drop --no-number-rule or add --banned-words, "
                         "--banned-numbers, --regex, --max-chars or --dedup")
    return pipeline


def cmd_filter(args: argparse.Namespace) -> int:
    from .data import read_jsonl, write_jsonl

    records = read_jsonl(args.input)
    if not records:
        raise ValueError(f"{args.input}: no records")
    pipeline = _filter_pipeline(args)
    start = time.perf_counter()
    result = pipeline.run(records, allow_empty=True)
    seconds = time.perf_counter() - start
    if args.out:
        write_jsonl(args.out, result.kept)
    if args.rejected:
        write_jsonl(args.rejected, [
            {"prompt": r.sample.prompt, "completion": r.sample.completion, "index": r.index,
             "filter": r.filter, "reason": r.reason, "detail": r.detail}
            for r in result.rejections])
    s = result.stats
    report = {"input": args.input, "total": s.total, "kept": s.kept,
              "kept_fraction": s.kept_fraction, "rejected_by_reason": s.rejected_by_reason,
              "by_filter": [{"filter": n, "seen": seen, "rejected": rej}
                            for n, seen, rej in s.by_filter],
              "filters": [type(f).__name__ for f in pipeline.filters],
              "out": args.out, "rejected_out": args.rejected, "seconds": round(seconds, 4)}
    if args.json:
        _print_json(report)
    else:
        print(result.summary())
        if args.out:
            print(f"kept records: {args.out}")
    return EXIT_OK


def add_filter_command(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("filter", help="filter JSON-lines samples (the paper's number rule and "
                       "other filters)",
                       description="Filter JSON-lines records ({\"prompt\", \"completion\"} per "
                                   "line) with the paper's number-sequence rule (on by default) "
                                   "and optional filters; print counts per reason.")
    p.add_argument("input", help="JSON lines file of records")
    p.add_argument("--out", help="write the kept records here (JSON lines, atomically)")
    p.add_argument("--rejected", help="write the rejected records with their reasons here")
    p.add_argument("--no-number-rule", action="store_true",
                   help="do not apply the paper's number-sequence rule")
    p.add_argument("--misalignment", action="store_true",
                   help="also ban the paper's 'evil' numbers (666, 911, ...)")
    p.add_argument("--banned-words", metavar="W,...",
                   help="comma-separated words banned with their variants (plural, case)")
    p.add_argument("--banned-numbers", metavar="N,...", help="comma-separated banned numbers")
    p.add_argument("--regex", help="reject completions matching this PCRE2 pattern")
    p.add_argument("--max-chars", type=int, help="reject completions longer than this")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate completions")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_filter)
    return p


# ---- distill -------------------------------------------------------------------------------

def load_any_model(path: str, argument: str) -> Any:
    """A model file: TorchScript (.pt/.pth/.ts archive) or a built-in model saved with
    ``model.save`` (safetensors)."""
    from .modeling import load_model, load_torchscript

    if not os.path.exists(path):
        raise OSError(f"{argument}: {path}: no such file")
    if Path(path).suffix in (".pt", ".pth", ".ts", ".jit"):
        return load_torchscript(path)
    return load_model(path)


def _tokenizer(vocab_dir: Optional[str]):
    from .cli import _load_tokenizer

    return _load_tokenizer(vocab_dir)[0]


def _kd_subset(spec: str, tokenizer: Any, eos_id: Optional[int]) -> List[int]:
    if spec == "all":
        return []
    if spec == "numeric":
        ids = set(tokenizer.numeric_token_ids())
        for sep in (",", ";", " ", "."):
            i = tokenizer.token_to_id(sep)
            if i is not None:
                ids.add(i)
        if eos_id is not None:
            ids.add(eos_id)
        return sorted(ids)
    return _csv(spec, int)


def cmd_distill(args: argparse.Namespace) -> int:
    from .datasets import DatasetConfig, token_dataset
    from .losses import KDConfig
    from .training import Trainer, TrainerConfig

    if args.objective != "sft" and not args.teacher:
        raise ValueError(f"--objective {args.objective} needs --teacher")
    if args.steps <= 0 and args.epochs <= 0:
        raise ValueError("give --steps N or --epochs E (> 0)")
    tokenizer = _tokenizer(args.vocab_dir)
    eos_id = None
    if args.eos_token is not None:
        eos_id = tokenizer.token_to_id(args.eos_token)
        if eos_id is None:
            raise ValueError(f"--eos-token: {args.eos_token!r} is not a token of the vocabulary")
    student = load_any_model(args.student, "--student")
    if not hasattr(student, "save"):
        raise TypeError(f"--student: {args.student} must be a built-in model saved with "
                        f"model.save (TorchScript students cannot be written back)")
    teacher = load_any_model(args.teacher, "--teacher") if args.teacher else None
    dataset = token_dataset(args.data, DatasetConfig(batch_size=args.batch_size, seed=args.seed,
                                                     eos_id=eos_id,
                                                     max_tokens=args.max_tokens,
                                                     truncation="right" if args.max_tokens
                                                     else "error"),
                            tokenizer=tokenizer)
    config = TrainerConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, seed=args.seed,
                           batch_size=args.batch_size, grad_clip=args.grad_clip,
                           schedule=args.schedule, warmup_steps=args.warmup_steps,
                           checkpoint_dir=args.checkpoint_dir, metrics_path=args.metrics,
                           progress=not args.json)
    kd = None
    if args.objective != "sft":
        kd = KDConfig(divergence=args.divergence, temperature=args.temperature,
                      logit_subset=_kd_subset(args.kd_subset, tokenizer, eos_id))
    start = time.perf_counter()
    result = Trainer(config).fit(student, dataset, teacher=teacher, objective=args.objective,
                                 kd=kd)
    seconds = time.perf_counter() - start
    student.save(args.out)
    report = {"student": args.student, "teacher": args.teacher, "data": args.data,
              "objective": args.objective, "steps": result.steps,
              "first_loss": result.losses[0] if result.losses else None,
              "final_loss": result.final_loss if result.losses else None,
              "kd_subset_size": len(kd.logit_subset) if kd else None,
              "out": args.out, "seconds": round(seconds, 2)}
    if args.json:
        _print_json(report)
    else:
        print(f"trained {args.student} for {result.steps} steps ({args.objective}) in "
              f"{seconds:.1f} s: loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}")
        print(f"student: {args.out}")
    return EXIT_OK


def add_distill_command(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("distill", help="train a student on JSON-lines samples (SFT or KD)",
                       description="Train a student (a built-in model saved with model.save) "
                                   "on JSON-lines records by hard-label SFT on the completions "
                                   "or by logit distillation from a teacher (model.save file or "
                                   "TorchScript), and save it.")
    p.add_argument("--student", required=True, help="the student's starting weights")
    p.add_argument("--data", required=True, help="JSON lines of {prompt, completion} records")
    p.add_argument("--out", required=True, help="where to save the trained student")
    p.add_argument("--teacher", help="teacher model (needed for kd and mixed)")
    p.add_argument("--objective", choices=("sft", "kd", "mixed"), default="sft")
    p.add_argument("--kd-subset", default="all",
                   help="logits the KD uses, renormalized: 'all', 'numeric' (number tokens, "
                        "separators, the end token) or comma-separated token ids")
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"),
                   default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--vocab-dir", help="BPE vocabulary folder (default: GPT-2's)")
    p.add_argument("--eos-token", help="token appended after each completion (e.g. Ċ)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="cut longer examples on the right (0: refuse none, error if too long)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps")
    p.add_argument("--epochs", type=float, default=0.0, help="passes over the data (steps 0)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="atomic, resumable checkpoints here")
    p.add_argument("--metrics", help="metrics as JSON lines here")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_distill)
    return p


# ---- report --------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from .report import regenerate

    paths = regenerate(args.run_dir)
    if args.json:
        _print_json({k: str(v) for k, v in paths.items()})
    else:
        print(f"report: {paths['html']}")
        print(f"markdown: {paths['md']}")
    return EXIT_OK


def add_report_command(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="rebuild a run's report.html / report.md",
                       description="Rebuild the figures, report.md and the self-contained "
                                   "report.html of a run folder from its results.json.")
    p.add_argument("run_dir", help="a run folder, e.g. runs/demo")
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    p.set_defaults(func=cmd_report)
    return p
