"""`make bench`: runs every bench/bench_*.py in one process tree and lets each print its rows.

Each benchmark measures ours against its named baseline in the same run, on the same inputs,
and prints the ratio; targets are reported, never asserted (timing belongs here, not in tests).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    scripts = sorted(here.glob("bench_*.py"))
    failures = 0
    for script in scripts:
        result = subprocess.run([sys.executable, str(script)])
        if result.returncode != 0:
            print(f"{script.name}: exited with {result.returncode}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
