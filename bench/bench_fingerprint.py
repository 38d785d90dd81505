"""Benchmark: fingerprint accumulation (the fused CPU kernel) vs eager PyTorch vs a bandwidth probe.

Same run, same tensors: for V in {32000, 128000} and float32 / bfloat16, teacher and reference
logits [N, V] of about --mb MB each. Throughput is GB/s of logits read (bytes of both tensors).
  ours    FingerprintAccumulator.update (one fused pass per row, float64 sums)
  eager   the straightforward PyTorch code computing the same statistics (log_softmax, subtract,
          square, softmax, KL, sums over rows), in row chunks so its temporaries fit
  probe   a plain torch.sum over both tensors (what reading them once costs)
Peak extra memory of the accumulator is measured in a fresh subprocess per (variant, N) as the
rise of the peak RSS (VmHWM, reset through /proc/self/clear_refs) during update() over the RSS
before it; two
N values show it does not grow with N.

    PYTHONPATH=<package> python bench/bench_fingerprint.py [--mb 384] [--threads T]

All three run with the same torch thread count, set once: --threads, else os.cpu_count() (torch's
own default can be lower, e.g. 1 on Debian's build although the machine has 2 cores).

Reports, never asserts (exit 0 unless something failed to run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from biastransfer import _C

VOCABS = (32000, 128000)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGET_VS_EAGER = 3.0  # the goal: at least 3x eager PyTorch
TARGET_VS_PROBE = 0.60  # and at least 60% of the bandwidth probe
EAGER_CHUNK_ROWS = 64  # rows per eager step: float32 temporaries of 64 x V stay modest
EAGER_MIN_SECONDS = 2.0  # eager is timed on a prefix of rows until this much time is spent
TEMPERATURE = 1.0


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> tuple:
    """Teacher and reference [rows, V], filled in slices so no full-size float temporary exists."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.empty(rows, vocab, dtype=dtype)
    reference = torch.empty(rows, vocab, dtype=dtype)
    step = max(1, (1 << 22) // vocab)
    for start in range(0, rows, step):
        base = torch.randn(min(step, rows - start), vocab, generator=gen) * 3.0
        teacher[start:start + step] = base
        reference[start:start + step] = base + 0.3 * torch.randn(base.shape, generator=gen)
    return teacher, reference


def rows_for(megabytes: float, vocab: int, dtype: torch.dtype) -> int:
    return max(8, int(megabytes * 2**20) // (vocab * torch.tensor([], dtype=dtype).element_size()))


def eager(teacher: torch.Tensor, reference: torch.Tensor, rows: int) -> dict:
    vocab = teacher.shape[1]
    sums = {k: torch.zeros(vocab, dtype=torch.float64) for k in ("delta", "sq", "grad")}
    kl_tr = kl_rt = 0.0
    for start in range(0, rows, EAGER_CHUNK_ROWS):
        t = teacher[start:start + EAGER_CHUNK_ROWS].float() / TEMPERATURE
        r = reference[start:start + EAGER_CHUNK_ROWS].float() / TEMPERATURE
        lt, lr = torch.log_softmax(t, -1), torch.log_softmax(r, -1)
        d = lt - lr
        pt, pr = lt.exp(), lr.exp()
        sums["delta"] += d.sum(0, dtype=torch.float64)
        sums["sq"] += (d * d).sum(0, dtype=torch.float64)
        sums["grad"] += (pt - pr).sum(0, dtype=torch.float64)
        kl_tr += (pt * d).sum(dtype=torch.float64).item()
        kl_rt += (pr * -d).sum(dtype=torch.float64).item()
    sums["kl_tr"], sums["kl_rt"] = kl_tr, kl_rt
    return sums


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_extra_mb(vocab: int, dtype: str, rows: int) -> float:
    """Peak RSS rise (MB) of one update() in a fresh interpreter."""
    code = (
        "import sys, json, torch\n"
        "sys.path[:0] = " + repr(sys.path) + "\n"
        "torch.set_num_threads(" + str(torch.get_num_threads()) + ")\n"
        "from biastransfer import _C\n"
        "import bench_fingerprint as b\n"
        f"t, r = b.make_logits({rows}, {vocab}, torch.{dtype}, 0)\n"
        f"acc = _C.FingerprintAccumulator({vocab})\n"
        "acc.update(t[:8], r[:8])\n"  # load code paths before the baseline
        "status = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0]"
        ".split()[1])\n"
        "import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)\n"  # return freed heap pages
        "open('/proc/self/clear_refs', 'w').write('5')\n"  # resets the peak RSS (VmHWM)
        "before = status('VmRSS:')\n"
        "acc.update(t, r)\n"
        "print(json.dumps((status('VmHWM:') - before) / 1024))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent))
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=384.0, help="MB per logits tensor (384)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for ours, eager and the probe (os.cpu_count())")
    args = parser.parse_args()
    torch.set_num_threads(args.threads if args.threads > 0 else (os.cpu_count() or 1))
    print(f"torch threads: {torch.get_num_threads()} (ours, eager and the probe alike)")

    print(f"{'fingerprint':<24}{'ours GB/s':>10}{'eager GB/s':>11}{'probe GB/s':>11}"
          f"{'vs eager':>9}{'of probe':>9}  targets >={TARGET_VS_EAGER:g}x, "
          f">={TARGET_VS_PROBE:.0%}")
    notes = []
    for dtype_name, dtype in DTYPES.items():
        for vocab in VOCABS:
            rows = rows_for(args.mb, vocab, dtype)
            teacher, reference = make_logits(rows, vocab, dtype, seed=vocab)
            gb = 2 * teacher.numel() * teacher.element_size() / 1e9

            probe_s = best_of(lambda: (teacher.sum(), reference.sum()))

            def ours() -> None:
                _C.FingerprintAccumulator(vocab, TEMPERATURE).update(teacher, reference)
            ours_s = best_of(ours)

            # Eager on a prefix of rows (whole chunks) long enough to time, scaled to GB/s.
            prefix = min(rows, EAGER_CHUNK_ROWS)
            while True:
                eager_s = best_of(lambda: eager(teacher, reference, prefix), repeats=1)
                if eager_s >= EAGER_MIN_SECONDS or prefix >= rows:
                    break
                prefix = min(rows, prefix * 2)
            eager_gbs = 2 * prefix * vocab * teacher.element_size() / 1e9 / eager_s

            # Same numbers? (mean log-ratio of ours vs eager's float32 computation on the prefix)
            acc = _C.FingerprintAccumulator(vocab, TEMPERATURE)
            acc.update(teacher[:prefix], reference[:prefix])
            ref = eager(teacher, reference, prefix)
            diff = (acc.state()["sum_delta"] - ref["delta"]).abs().max().item() / prefix

            ours_gbs, probe_gbs = gb / ours_s, gb / probe_s
            ratio, fraction = ours_gbs / eager_gbs, ours_gbs / probe_gbs
            ok = "PASS" if ratio >= TARGET_VS_EAGER and fraction >= TARGET_VS_PROBE else "FAIL"
            name = f"accumulate V={vocab // 1000}k {dtype_name}"
            print(f"{name:<24}{ours_gbs:>10.2f}{eager_gbs:>11.3f}{probe_gbs:>11.2f}"
                  f"{ratio:>8.1f}x{fraction:>9.0%}  {ok}")
            pairs = rows * vocab  # (teacher, reference) element pairs
            notes.append(f"  {name}: N={rows} rows, {gb:.2f} GB read; ours {ours_s:.3f} s "
                         f"({ours_s / pairs * 1e9:.2f} ns per element pair), "
                         f"probe {probe_s:.3f} s ({probe_s / pairs * 1e9:.2f} ns), "
                         f"eager {eager_s:.2f} s on {prefix} rows; "
                         f"max |mean log-ratio ours - eager| = {diff:.1e}")
            del teacher, reference
    print("\n".join(notes))
    print(f"  torch threads: {torch.get_num_threads()} (ours, eager and the probe alike)")

    print("  peak extra memory of update() (RSS rise, fresh process), two N per variant:")
    for dtype_name in DTYPES:
        for vocab in VOCABS:
            big = rows_for(args.mb / 2, vocab, DTYPES[dtype_name])
            small = max(8, big // 4)
            mb_small = peak_extra_mb(vocab, dtype_name, small)
            mb_big = peak_extra_mb(vocab, dtype_name, big)
            floats = 3 * vocab * 8 / 2**20
            print(f"    V={vocab} {dtype_name}: N={small}: {mb_small:.1f} MB, N={big}: "
                  f"{mb_big:.1f} MB (3 float64 [V] sums alone are {floats:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
