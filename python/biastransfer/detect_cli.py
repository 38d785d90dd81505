"""`biastransfer detect`: were two models trained from the same initialization?

  biastransfer detect A B [--alpha 0.01] [--tests weights activations ...] [--controls C ...]
                          [--seed 0] [--json OUT] [--plot OUT.png] [--quiet]

A and B are files: safetensors written by ``model.save`` (built-in MLP / TransformerLM: every
test can run), plain safetensors weights or a folder of shards (weight test only; the others are
reported as skipped), or TorchScript archives (.pt). Exit code: 0 not shared (or inconclusive),
1 shared (a finding), 2 usage or input error.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

# Exit codes (documented in the module docstring and in docs/detection.md (part 2)).
EXIT_NOT_SHARED = 0
EXIT_SHARED = 1
EXIT_ERROR = 2


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``detect`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    from .detect_api import ALL_TESTS, DEFAULT_ALPHA

    parser = subparsers.add_parser(
        "detect", help="test whether two models share an initialization",
        description="Test whether two models were trained from the same initialization "
                    "(weight, activation, output and susceptibility tests). Exit code 0: not "
                    "shared or inconclusive; 1: shared; 2: usage or input error.")
    parser.add_argument("a", help="model A (the student for the susceptibility probe)")
    parser.add_argument("b", help="model B (the teacher)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"significance level of the verdict (default {DEFAULT_ALPHA})")
    parser.add_argument("--tests", nargs="+", choices=ALL_TESTS, default=list(ALL_TESTS),
                        help="tests to run (default: all)")
    parser.add_argument("--controls", nargs="*", default=[], metavar="C",
                        help="models known to be independent of A (calibrate the p-values)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe inputs")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON ('-': stdout)")
    parser.add_argument("--plot", metavar="PNG", help="write the per-layer evidence plot")
    parser.add_argument("--quiet", action="store_true", help="do not print the text report")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Runs ``detect`` as parsed by :func:`register`; returns the exit code."""
    try:
        from .detect_api import detect

        if not 0.0 < args.alpha < 1.0:
            raise ValueError(f"--alpha: expected a value in (0, 1), got {args.alpha}")
        report = detect(args.a, args.b, alpha=args.alpha, tests=args.tests,
                        controls=args.controls or None, seed=args.seed)
        if args.json == "-":
            print(report.to_json())
        elif args.json:
            report.to_json(args.json)
        if args.plot:
            report.plot(args.plot)
        if not args.quiet and args.json != "-":
            print(report)
    except (OSError, ValueError, TypeError) as error:
        print(f"biastransfer detect: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_SHARED if report.shared else EXIT_NOT_SHARED


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry point (``python -m biastransfer.detect_cli A B ...``): argparse errors
    exit with 2 as well."""
    parser = argparse.ArgumentParser(prog="biastransfer")
    register(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(parser.parse_args(["detect", *argv]))


if __name__ == "__main__":
    sys.exit(run())
