#!/usr/bin/env bash
# Builds the torch-free code and its Catch2 tests (tests/cpp/io) with AddressSanitizer and
# UndefinedBehaviorSanitizer (build/sanitize) and runs them: any report fails the run.
#
#   SANITIZE_BUILD_DIR=build/sanitize   SANITIZE_CXX=clang++-14 (default when installed, else c++)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SANITIZE_BUILD_DIR:-$root/build/sanitize}
[[ "$build" = /* ]] || build="$root/$build"
if [[ -z "${SANITIZE_CXX:-}" ]]; then
  if command -v clang++-14 >/dev/null; then SANITIZE_CXX=clang++-14; else SANITIZE_CXX=c++; fi
fi
mkdir -p "$build"
if [[ ! -f "$build/CMakeCache.txt" ]]; then
  CXX=$SANITIZE_CXX cmake -S "$root/fuzz" -B "$build" -DLIBTRANSFER_FUZZ_TARGETS=OFF \
    -DLIBTRANSFER_SANITIZE_TESTS=ON \
    -DLIBTRANSFER_FIXTURES_DIR="${BIASTRANSFER_FIXTURES:-$root/.cache/fixtures}" \
    >"$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
fi
cmake --build "$build" -j "${JOBS:-$(nproc)}" --target test_io_sanitized >"$build/build.log" 2>&1 ||
  { tail -40 "$build/build.log"; exit 1; }
# halt_on_error and -fno-sanitize-recover: the first report ends the run with a failure.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cd "$build" || exit 1
if ./test_io_sanitized >"$build/test.log" 2>&1; then
  echo "sanitize: $(grep -E 'All tests passed|test cases' "$build/test.log" | tail -1)"
else
  tail -60 "$build/test.log"
  echo "sanitize: FAILED (log: $build/test.log)"
  exit 1
fi
