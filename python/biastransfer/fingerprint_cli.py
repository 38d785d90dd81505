"""`biastransfer fingerprint`: summarize, plot and compare saved fingerprints.

Fingerprints are taken in Python (``biastransfer.fingerprint(...)``, which needs the models) and
saved with ``FingerprintResult.save``; this subcommand reads such files:

  biastransfer fingerprint FILE [--vocab-dir DIR] [-k 20] [--plot out.png] [--compare OTHER]
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
    parser.add_argument("path", help="the teacher's .safetensors file")
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


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from .assets import gpt2_vocab_dir
    from .fingerprint import FingerprintResult
    from .tokenizer import Tokenizer

    if args.top < 1:
        raise ValueError(f"--top: expected at least 1, got {args.top}")
    tokenizer = Tokenizer.from_pretrained_dir(args.vocab_dir or gpt2_vocab_dir())
    result = FingerprintResult.load(args.path, tokenizer)
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
