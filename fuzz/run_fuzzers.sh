#!/usr/bin/env bash
# Builds the libFuzzer targets (build/fuzz, clang-14) and runs each for a bounded time.
#
#   fuzz/run_fuzzers.sh [target ...]        (default: every fuzz/targets/fuzz_*.cpp)
#   FUZZ_SECONDS=60    time per target (libFuzzer -max_total_time)
#   FUZZ_RSS_MB=2048   memory per target (-rss_limit_mb; malloc_limit_mb follows it)
#   FUZZ_TIMEOUT=10    seconds one input may take before it counts as a hang (-timeout)
#   FUZZ_BUILD_DIR=build/fuzz
#
# Per target: first every file of fuzz/regressions/<target>/ is replayed (each once: a past crash
# must stay fixed), then the fuzzer runs on a scratch copy of fuzz/corpus/<target>/ (the committed
# corpus is never modified) with fuzz/dicts/<target>.dict when present. Prints executions per
# target; a crash, leak, sanitizer report, timeout or out-of-memory fails the run, and the input
# is kept under $FUZZ_BUILD_DIR/findings/<target>/.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${FUZZ_SECONDS:-60}
rss_mb=${FUZZ_RSS_MB:-2048}
timeout_s=${FUZZ_TIMEOUT:-10}
build=${FUZZ_BUILD_DIR:-$root/build/fuzz}
[[ "$build" = /* ]] || build="$root/$build"
cc=${FUZZ_CC:-clang-14}
cxx=${FUZZ_CXX:-clang++-14}
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz: $cxx not found; run \`make deps\` (Debian packages clang-14 libclang-rt-14-dev)" >&2
  exit 1
fi

mkdir -p "$build"
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  CC=$cc CXX=$cxx cmake -S "$root/fuzz" -B "$build" >"$build/configure.log" 2>&1 ||
    { cat "$build/configure.log"; exit 1; }
fi
cmake --build "$build" -j "${JOBS:-$(nproc)}" >"$build/build.log" 2>&1 ||
  { tail -40 "$build/build.log"; exit 1; }

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  for source in "$root"/fuzz/targets/fuzz_*.cpp; do targets+=("$(basename "$source" .cpp)"); done
fi

# Corpus copies and the targets' scratch files, in memory when /dev/shm is there; removed at exit.
scratch_parent=${TMPDIR:-/tmp}
[[ -d /dev/shm && -w /dev/shm ]] && scratch_parent=/dev/shm
scratch=$(mktemp -d "$scratch_parent/libtransfer_fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export LIBTRANSFER_FUZZ_SCRATCH="$scratch/files"
mkdir -p "$LIBTRANSFER_FUZZ_SCRATCH"
failed=()
printf '%-24s %12s %10s %8s  %s\n' target executions exec/s corpus result
for target in "${targets[@]}"; do
  binary="$build/$target"
  log="$build/$target.log"
  findings="$build/findings/$target"
  rm -rf "$findings"
  mkdir -p "$findings"
  # Replay the regressions: libFuzzer runs each file given as an argument once.
  regressions=("$root/fuzz/regressions/$target"/*)
  if [[ -e "${regressions[0]}" ]]; then
    if ! "$binary" -rss_limit_mb="$rss_mb" -timeout="$timeout_s" "${regressions[@]}" \
      >"$build/$target.regressions.log" 2>&1; then
      echo "$target: a regression input fails again; see $build/$target.regressions.log"
      tail -30 "$build/$target.regressions.log"
      failed+=("$target(regression)")
      continue
    fi
  fi
  corpus="$scratch/$target"
  mkdir -p "$corpus"
  cp -r "$root/fuzz/corpus/$target/." "$corpus/"
  dict=()
  [[ -f "$root/fuzz/dicts/$target.dict" ]] && dict=(-dict="$root/fuzz/dicts/$target.dict")
  "$binary" "$corpus" "${dict[@]}" -max_total_time="$seconds" -rss_limit_mb="$rss_mb" \
    -timeout="$timeout_s" -use_value_profile=1 -print_final_stats=1 \
    -artifact_prefix="$findings/" >"$log" 2>&1
  status=$?
  executions=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$')
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$')
  size=$(find "$corpus" -type f | wc -l)
  if [[ $status -eq 0 ]]; then
    result=ok
  else
    result="FAILED (exit $status; input in $findings, log $log)"
    failed+=("$target")
  fi
  printf '%-24s %12s %10s %8s  %s\n' "$target" "${executions:-?}" "${rate:-?}" "$size" "$result"
  if [[ $status -ne 0 ]]; then
    grep -E -m 12 'ERROR|runtime error|invariant|exception|SUMMARY|Test unit written' "$log"
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: no findings in ${#targets[@]} targets (${seconds}s each)"
