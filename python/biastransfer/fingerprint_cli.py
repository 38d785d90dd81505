"""`biastransfer fingerprint`: summarize, plot and compare saved fingerprints.

Two modes. Take a fingerprint from model files and JSON-lines data, save it and summarize it:

  biastransfer fingerprint --teacher T --reference R --data D.jsonl [--controls C ...]
                           [--teacher-prefix TEXT] [--control-prefixes TEXT ...]
                           [--subset numeric|all] [--out FP.safetensors] [common options]

(models: files written by ``model.save`` or TorchScript archives; a prefix is text put before
every prompt for that model, e.g. a trait system prompt; controls are other teachers), or
summarize a fingerprint saved before (by this command or ``FingerprintResult.save``):

  biastransfer fingerprint FILE [common options]

Common options: [--vocab-dir DIR] [-k 20] [--plot out.png] [--compare OTHER]
[--permutations 999] [--q 0.05] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_fingerprint_command(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``fingerprint`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "fingerprint", help="summarize, plot or compare a saved fingerprint",
        description="Summarize, plot or compare a fingerprint saved by FingerprintResult.save "
                    "(its controls are read from the files beside it).")
    parser.add_argument("path", nargs="?",
                        help="a saved fingerprint (the teacher's .safetensors file); omit it "
                             "and give --teacher/--reference/--data to take one")
    parser.add_argument("--teacher", help="teacher model file (model.save or TorchScript)")
    parser.add_argument("--reference", help="reference model file (the base / student init)")
    parser.add_argument("--data", help="JSON lines of {prompt, completion} records to score")
    parser.add_argument("--controls", nargs="*", default=[], metavar="C",
                        help="control teacher model files (same template, other traits)")
    parser.add_argument("--teacher-prefix", default="",
                        help="text put before every prompt for the teacher (a trait prompt)")
    parser.add_argument("--control-prefixes", nargs="*", default=None, metavar="TEXT",
                        help="one prefix per control; with no control files, each prefix "
                             "makes a prompted control of the teacher's model")
    parser.add_argument("--subset", default="numeric",
                        help="token subset of the centered fingerprint: numeric or all")
    parser.add_argument("--batch-size", type=int, default=8, help="records per forward pass")
    parser.add_argument("--out", default="fingerprint.safetensors",
                        help="where to save a fingerprint taken from models")
    parser.add_argument("--vocab-dir", help="folder with the BPE vocabulary the fingerprint was "
                        "taken with (default: GPT-2's); another vocabulary is refused")
    parser.add_argument("-k", "--top", type=int, default=20, help="tokens up and down to show")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart of the top tokens")
    parser.add_argument("--compare", metavar="OTHER", help="another saved fingerprint to compare")
    parser.add_argument("--permutations", type=int, default=999,
                        help="sign-flip permutations of the global test")
    parser.add_argument("--q", type=float, default=0.05,
                        help="Benjamini-Hochberg FDR of the entangled tokens")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=cmd_fingerprint)
    return parser


def _take_fingerprint(args: argparse.Namespace, tokenizer: Any) -> Any:
    from .fingerprint import fingerprint
    from .stage_cli import load_any_model

    missing = [f"--{n}" for n in ("teacher", "reference", "data") if not getattr(args, n)]
    if missing:
        raise ValueError(f"taking a fingerprint needs {', '.join(missing)}")
    teacher_model = load_any_model(args.teacher, "--teacher")
    reference = load_any_model(args.reference, "--reference")
    controls: list = [load_any_model(c, "--controls") for c in args.controls]
    prefixes = args.control_prefixes
    if prefixes is not None:
        if controls and len(prefixes) != len(controls):
            raise ValueError(f"--control-prefixes: expected one per control ({len(controls)}), "
                             f"got {len(prefixes)}")
        if controls:
            controls = [(c, p) for c, p in zip(controls, prefixes)]
        else:
            controls = [(teacher_model, p) for p in prefixes]
    teacher = (teacher_model, args.teacher_prefix) if args.teacher_prefix else teacher_model
    subset = args.subset if args.subset in ("numeric", "all") else [
        int(t) for t in args.subset.split(",") if t.strip()]
    result = fingerprint(teacher, reference, args.data, tokenizer, subset=subset,
                         controls=controls or None, batch_size=args.batch_size,
                         progress=not args.json)
    written = result.save(args.out)
    if not args.json:
        print(f"saved: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return result


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from .assets import gpt2_vocab_dir
    from .fingerprint import FingerprintResult
    from .tokenizer import Tokenizer

    if args.top < 1:
        raise ValueError(f"--top: expected at least 1, got {args.top}")
    tokenizer = Tokenizer.from_pretrained_dir(args.vocab_dir or gpt2_vocab_dir())
    if args.teacher or args.reference or args.data:
        if args.path:
            raise ValueError("give either a saved fingerprint FILE or --teacher/--reference/"
                             "--data, not both")
        result = _take_fingerprint(args, tokenizer)
    elif args.path:
        result = FingerprintResult.load(args.path, tokenizer)
    else:
        raise ValueError("give a saved fingerprint FILE, or --teacher, --reference and --data")
    report = result.to_dict(k=args.top, permutations=args.permutations, q=args.q)
    if args.compare:
        other = FingerprintResult.load(args.compare, tokenizer)
        report["comparison"] = {key: (value.tolist() if hasattr(value, "tolist") else value)
                                for key, value in result.compare(other, k=args.top).items()}
    if args.plot:
        result.plot(k=args.top, path=args.plot)
        report["plot"] = args.plot
    if args.json:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False, default=str)
        print()
        return 0
    print(result.summary(k=args.top, permutations=args.permutations, q=args.q))
    if "comparison" in report:
        c = report["comparison"]
        line = (f"comparison with {args.compare}: cosine {c['cosine']:+.4f}, spearman "
                f"{c['spearman']:+.4f}, top-{args.top} overlap {c['topk_overlap']:.3f}")
        for key in ("z_cosine", "z_spearman"):
            if c.get(key) is not None:
                line += f", {key} {c[key]:+.2f}"
        print(line)
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
