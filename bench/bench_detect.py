"""Benchmark: the weight test on two random models with the shapes of a 1B-parameter transformer.

Two independent random models in Llama-style names (16 blocks, hidden 2048, GLU MLP 8192,
vocabulary 32000, 16 heads; ~1.2B parameters each) are written as bf16 safetensors files (~2.4 GB
each) by our writer, one model per subprocess so that generation memory never adds up; then a
fresh subprocess runs ``weight_test`` on the two paths (files read lazily, one unit group at a
time) and reports its wall time and peak resident memory (ru_maxrss). Independent models are the
solver's hardest case (no dominant matching). The files are deleted afterwards.

The assignment solver itself against scipy (n = 512 .. 4096) is bench_linear_assignment.py.

    PYTHONPATH=<package> python bench/bench_detect.py [--layers 16] [--hidden 2048] [--mlp 8192]
        [--vocab 32000] [--heads 16] [--solver auto] [--dir /tmp]

Targets (issue 4): under 10 minutes and under 8 GiB peak RSS. Set BIASTRANSFER_SKIP_BENCH_DETECT=1
to skip it in routine runs (it needs ~5 GB of free disk and several minutes); `make bench` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TARGET_SECONDS = 600.0  # the goal: a 1B pair in under 10 minutes
TARGET_RSS_GIB = 8.0  # ... and under 8 GiB of memory
THREADS = 2  # this machine's cores; the bench uses both

_WRITE = r"""
import json, sys, torch
from biastransfer.safetensors import save_safetensors
cfg = json.loads(sys.argv[1]); path = sys.argv[2]; seed = int(sys.argv[3])
torch.manual_seed(seed)
d, m, v, layers, heads = cfg["hidden"], cfg["mlp"], cfg["vocab"], cfg["layers"], cfg["heads"]
def w(r, c):  # N(0, 0.02), generated in float32 blocks, stored as bf16
    out = torch.empty(r, c, dtype=torch.bfloat16)
    for s in range(0, r, 1024):
        out[s:s + 1024] = (0.02 * torch.randn(min(1024, r - s), c)).to(torch.bfloat16)
    return out
t = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
     "lm_head.weight": w(v, d)}
for i in range(layers):
    p = f"model.layers.{i}."
    for n in ("q", "k", "v", "o"):
        t[p + f"self_attn.{n}_proj.weight"] = w(d, d)
    t[p + "mlp.gate_proj.weight"] = w(m, d)
    t[p + "mlp.up_proj.weight"] = w(m, d)
    t[p + "mlp.down_proj.weight"] = w(d, m)
    t[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    t[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
save_safetensors(path, t, metadata={"num_attention_heads": str(heads)})
print(sum(x.numel() for x in t.values()))
"""

_TEST = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from biastransfer.detection import weight_test
start = time.perf_counter()
r = weight_test(sys.argv[1], sys.argv[2], solver=sys.argv[3])
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
tested = [e for e in r.layers if not e.skipped]
print(json.dumps({"wall_s": wall, "peak_rss_gib": rss, "log10_p": r.log10_p,
                  "groups": len(tested), "method": r.method}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--solver", default="auto", choices=["auto", "exact", "greedy"])
    parser.add_argument("--dir", default=None, help="where to write the two files")
    args = parser.parse_args()
    if os.environ.get("BIASTRANSFER_SKIP_BENCH_DETECT"):
        print("weight_test_1b: skipped (BIASTRANSFER_SKIP_BENCH_DETECT is set)")
        return 0
    cfg = {k: getattr(args, k) for k in ("layers", "hidden", "mlp", "vocab", "heads")}
    folder = tempfile.mkdtemp(prefix="bench_detect_", dir=args.dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    try:
        paths = [os.path.join(folder, f"{name}.safetensors") for name in ("a", "b")]
        start = time.perf_counter()
        for seed, path in enumerate(paths):
            out = subprocess.run([sys.executable, "-c", _WRITE, json.dumps(cfg), path, str(seed)],
                                 check=True, capture_output=True, text=True, env=env)
            params = int(out.stdout.split()[-1])
        write_s = time.perf_counter() - start
        size_gib = os.path.getsize(paths[0]) / 2**30
        out = subprocess.run([sys.executable, "-c", _TEST, *paths, args.solver, str(THREADS)],
                             check=True, capture_output=True, text=True, env=env)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ok_time = res["wall_s"] <= TARGET_SECONDS
    ok_rss = res["peak_rss_gib"] <= TARGET_RSS_GIB
    print(f"{'bench':<22}{'params':>8}{'file GiB':>10}{'write s':>9}{'test s':>9}{'target':>8}"
          f"{'peak GiB':>10}{'target':>8}{'groups':>8}{'log10 p':>9}  result")
    print(f"{'weight_test_1b_bf16':<22}{params / 1e9:>7.2f}B{size_gib:>10.2f}{write_s:>9.0f}"
          f"{res['wall_s']:>9.0f}{TARGET_SECONDS:>8.0f}{res['peak_rss_gib']:>10.2f}"
          f"{TARGET_RSS_GIB:>8.1f}{res['groups']:>8}{res['log10_p']:>9.2f}  "
          f"{'PASS' if ok_time and ok_rss else 'FAIL'} ({args.solver} solver, {THREADS} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
