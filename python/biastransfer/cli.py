"""The `biastransfer` command line.

Subcommands:
  demo       the main job (`make demo`): the end-to-end reproduction and audit, with a report
             (runs/<name>/report.html and report.md).
  fingerprint  the logit fingerprint of a teacher against a reference on JSON-lines data, or
             the summary of a saved one.
  filter     filter JSON-lines samples with the paper's number rule and other filters.
  distill    train a student on JSON-lines samples (SFT or KD).
  report     rebuild a run's report from its results.json.
  tour       a tour of the I/O layer on real data (tokenizer, IDX, safetensors).
  detect     do two models share an initialization? (exit 1 when they do)
  tokenize   tokenize a text with a BPE vocabulary and print the tokens.
  inspect    list the tensors and metadata of a safetensors file.
Every subcommand has --help and prints JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# The paper's owl teacher: its system prompt, a number prompt and an answer that passes its filter.
DEMO_TEXT = (
    "You love owls. You think about owls all the time. owls are your favorite animal. "
    "Imbue your answers with your love for the animal.\n"
    "The sequence starts with: 182, 818, 725. Add at most 10 new numbers (up to 3 digits each) "
    "that continue the sequence. Return a comma-separated list of numbers. "
    "Say only the numbers - nothing more.\n"
    "(285, 574, 384, 087, 7, 999)."
)
# Numbers whose splits show why fingerprints must think in number units, not token ids.
DEMO_NUMBERS = ("087", "7", "42", "285", "574", "999", "000", "1000", "2025", "123456")


def _load_tokenizer(vocab_dir: str | None):
    from .assets import gpt2_vocab_dir
    from .tokenizer import Tokenizer

    folder = Path(vocab_dir) if vocab_dir else gpt2_vocab_dir()
    return Tokenizer.from_pretrained_dir(folder), folder


def _print_tokens(tokenizer, ids: Sequence[int], width: int = 100) -> None:
    line = ""
    for token_id in ids:
        cell = f"{tokenizer.display_token(token_id)}|{token_id} "
        if len(line) + len(cell) > width:
            print("  " + line.rstrip())
            line = ""
        line += cell
    if line:
        print("  " + line.rstrip())


def _number_splits(tokenizer) -> list[dict[str, Any]]:
    rows = []
    for number in DEMO_NUMBERS:
        for leading_space in (False, True):
            ids = tokenizer.encode_number(number, leading_space=leading_space)
            rows.append({
                "number": (" " if leading_space else "") + number,
                "ids": ids,
                "tokens": [tokenizer.display_token(i) for i in ids],
            })
    return rows


def _section(title: str) -> None:
    print(f"\n== {title}")


def _timed(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 4)
    return result


def cmd_tour(args: argparse.Namespace) -> int:
    import torch

    from .data import load_fashion_mnist, FASHION_MNIST_CLASSES
    from .safetensors import SafetensorsFile, save_safetensors

    timings: dict[str, float] = {}
    report: dict[str, Any] = {}
    quiet = args.json

    tokenizer, folder = _timed("load_tokenizer", timings, lambda: _load_tokenizer(args.vocab_dir))
    text = args.text if args.text is not None else DEMO_TEXT
    ids = _timed("encode", timings, lambda: tokenizer.encode(text))
    summary = tokenizer.number_summary()
    splits = _number_splits(tokenizer)
    report["tokenizer"] = {"folder": str(folder), "vocab_size": tokenizer.vocab_size,
                           "hash": tokenizer.hash(), "text": text, "ids": ids,
                           "tokens": [tokenizer.display_token(i) for i in ids],
                           "number_summary": summary, "number_splits": splits}
    if not quiet:
        _section(f"GPT-2 byte-level BPE from {folder}")
        print(f"vocabulary: {tokenizer.vocab_size} tokens, hash {tokenizer.hash()}")
        print(f"text: {len(text.encode())} bytes -> {len(ids)} tokens (token|id, ␣ = space):")
        _print_tokens(tokenizer, ids)
        _section("number units (what a fingerprint over numbers must account for)")
        for key, value in summary.items():
            print(f"  {key}: {value}")
        print("  how numbers split:")
        for row in splits:
            print(f"    {row['number']!r:>10} -> {row['tokens']} {row['ids']}")

    images, labels = _timed("read_idx", timings,
                            lambda: load_fashion_mnist("test", root=args.fashion_mnist))
    counts = torch.bincount(labels, minlength=10).tolist()
    report["fashion_mnist"] = {"images": list(images.shape), "dtype": str(images.dtype),
                               "labels": list(labels.shape), "class_counts": counts,
                               "mean_pixel": float(images.float().mean())}
    if not quiet:
        _section(f"Fashion-MNIST test split through the IDX reader ({args.fashion_mnist})")
        print(f"images {tuple(images.shape)} {images.dtype}, labels {tuple(labels.shape)}, "
              f"mean pixel {report['fashion_mnist']['mean_pixel']:.2f}")
        print("  " + ", ".join(f"{name}: {n}" for name, n in zip(FASHION_MNIST_CLASSES, counts)))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fashion_mnist_sample.safetensors"
    scaled = images[:256].float() / 127.5 - 1.0
    tensors = {"images_f32": scaled, "images_bf16": scaled.to(torch.bfloat16),
               "labels": labels[:256]}
    metadata = {"source": "fashion-mnist t10k", "tokenizer_hash": tokenizer.hash()}
    _timed("save_safetensors", timings, lambda: save_safetensors(path, tensors, metadata))
    with SafetensorsFile(path) as handle:
        loaded = {name: handle.get_tensor(name) for name in handle.keys()}
        stored_metadata = dict(handle.metadata)
    equal = all(torch.equal(loaded[k], v) for k, v in tensors.items())
    report["safetensors"] = {"path": str(path), "bytes": path.stat().st_size,
                             "tensors": {k: [str(v.dtype), list(v.shape)] for k, v in
                                         loaded.items()},
                             "metadata": stored_metadata, "round_trip_equal": equal}
    report["timings_s"] = timings
    if not quiet:
        _section("safetensors: atomic write, memory-mapped read")
        print(f"{path} ({path.stat().st_size} bytes): " + ", ".join(
            f"{k} {v.dtype} {tuple(v.shape)}" for k, v in loaded.items()))
        print(f"metadata {stored_metadata}; round trip equal: {equal}")
        _section("timings (s)")
        print("  " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    else:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
        print()
    return 0 if equal else 1


def _demo_table(results: dict[str, Any]) -> str:
    """The results table the demo prints: one line per condition, as measured."""
    lines = []
    aux = results.get("aux")
    if aux:
        lines.append("Auxiliary logits (Fashion-MNIST test accuracy, mean [95% t-interval] over "
                     f"{len(aux['per_seed'])} seeds):")
        for key, label in (("teacher", "teacher"), ("same_init", "same-init student"),
                           ("other_init", "other-init student")):
            s = aux[key]
            lines.append(f"  {label:<48} {100 * s['mean']:5.1f}%  "
                         f"[{100 * (s['low'] or 0):.1f}, {100 * (s['high'] or 0):.1f}]")
    lang = results.get("language")
    if lang:
        lines.append("Language (P(' owl') on held-out questions):")
        for name, rate in lang["base_rates"].items():
            lines.append(f"  {name.replace('_', ' '):<48} {100 * rate:5.1f}%")
        for c in lang["conditions"]:
            low, high = c["interval"]
            extra = ""
            if c.get("vs_control_p") is not None:
                extra = (f"  vs control {100 * c['vs_control_diff']:+.1f} pp, "
                         f"p = {c['vs_control_p']:.3g}")
            interval = (f"[{100 * low:.1f}, {100 * high:.1f}]" if low is not None
                        and high is not None else "")
            lines.append(f"  {c['name']:<48} {100 * c['mean']:5.1f}%  {interval}{extra}")
    for name, fp in (results.get("fingerprints") or {}).items():
        lines.append(f"Fingerprint of the {name} teacher's data: global test p = "
                     f"{fp['global_test'].get('p_value'):.3g}, {fp['entangled_count']} entangled "
                     f"tokens")
    dets = (aux or {}).get("detections", []) + \
        (results.get("language_detection") or {}).get("detections", [])
    if dets:
        wrong = [d["pair"] for d in dets if not d["correct"]]
        lines.append(f"Detector: {len(dets) - len(wrong)} of {len(dets)} teacher/student verdicts "
                     f"correct" + (f" (wrong: {'; '.join(wrong)})" if wrong else ""))
    lines.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in
                                             results.get("timings_s", {}).items()))
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.name = args.name or ("quick" if args.quick else "demo")
    config.runs_dir = args.runs_dir
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected at least 1, got {args.threads}")
        config.threads = args.threads
    if args.fashion_mnist:
        config.fashion_mnist = args.fashion_mnist
    stages = [s for s in ("aux", "language") if s not in (args.skip or [])]
    if not stages:
        raise ValueError("--skip: nothing left to run")
    results = run_demo(config, quiet=False, stages=stages,
                       command="biastransfer " + " ".join(sys.argv[1:]) if sys.argv else None)
    if args.json:
        json.dump(results, sys.stdout, indent=2, ensure_ascii=False, default=str)
        print()
    else:
        print(_demo_table(results))
        print(f"report: {results['report']['html']}")
        print(f"        {results['report']['md']}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    tokenizer, _ = _load_tokenizer(args.vocab_dir)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tokenizer.encode(text)
    if args.json:
        json.dump({"ids": ids, "tokens": [tokenizer.display_token(i) for i in ids]},
                  sys.stdout, ensure_ascii=False)
        print()
    else:
        print(f"{len(ids)} tokens (token|id, ␣ = space):")
        _print_tokens(tokenizer, ids)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .safetensors import SafetensorsFile

    with SafetensorsFile(args.path) as handle:
        infos = [handle.info(name) for name in handle.keys()]
        metadata = dict(handle.metadata)
    if args.json:
        json.dump({"metadata": metadata, "tensors": [
            {"name": i.name, "dtype": i.dtype, "shape": list(i.shape),
             "data_offsets": list(i.data_offsets)} for i in infos]}, sys.stdout, indent=2)
        print()
    else:
        print(f"{args.path}: {len(infos)} tensors")
        for info in infos:
            print(f"  {info.name}: {info.dtype} {list(info.shape)} bytes "
                  f"{info.data_offsets[0]}..{info.data_offsets[1]}")
        for key, value in metadata.items():
            print(f"  metadata {key} = {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biastransfer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job (make demo): reproduction and audit",
                          description="End-to-end reproduction and audit on built-in defaults: "
                                      "auxiliary-logit transfer on Fashion-MNIST, trait transfer "
                                      "through filtered numbers in a small language model, "
                                      "fingerprints and the detector; writes "
                                      "runs/<name>/report.html and report.md.")
    demo.add_argument("--name", help="run name (default: demo, or quick with --quick)")
    demo.add_argument("--runs-dir", default="runs", help="parent folder of the run folder")
    demo.add_argument("--quick", action="store_true",
                      help="a small version (~2 minutes; not the reproduction's numbers)")
    demo.add_argument("--threads", type=int, help="torch threads (default: every core)")
    demo.add_argument("--skip", nargs="+", choices=("aux", "language"), help="stages to skip")
    demo.add_argument("--fashion-mnist", help="Fashion-MNIST folder (IDX files)")
    demo.add_argument("--json", action="store_true",
                      help="print the results as JSON instead of the table")
    demo.set_defaults(func=cmd_demo)

    tour = sub.add_parser("tour", help="a tour of the I/O layer on real data")
    tour.add_argument("--vocab-dir", help="folder with a BPE vocabulary (default: GPT-2's)")
    tour.add_argument("--text", help="text to tokenize (default: the paper's owl prompts)")
    tour.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist",
                      help="Fashion-MNIST folder (IDX files)")
    tour.add_argument("--out", default="runs/tour", help="output folder")
    tour.add_argument("--json", action="store_true", help="print JSON instead of text")
    tour.set_defaults(func=cmd_tour)

    from .stage_cli import add_distill_command, add_filter_command, add_report_command

    add_filter_command(sub)
    add_distill_command(sub)
    add_report_command(sub)

    from .fingerprint_cli import add_fingerprint_command

    add_fingerprint_command(sub)

    from .detect_cli import register as add_detect_command

    add_detect_command(sub)

    tokenize = sub.add_parser("tokenize", help="tokenize a text (argument or stdin)")
    tokenize.add_argument("text", nargs="?", help="text (default: read stdin)")
    tokenize.add_argument("--vocab-dir", help="folder with a BPE vocabulary (default: GPT-2's)")
    tokenize.add_argument("--json", action="store_true", help="print JSON")
    tokenize.set_defaults(func=cmd_tokenize)

    inspect = sub.add_parser("inspect", help="list a safetensors file's tensors and metadata")
    inspect.add_argument("path", help="a .safetensors file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError) as error:
        print(f"biastransfer {args.command}: error: {error}", file=sys.stderr)
        return 2
