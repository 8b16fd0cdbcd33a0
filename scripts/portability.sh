#!/usr/bin/env bash
# Run the test suite under conditions that change which CPU kernels torch and Inductor pick, so a
# test that only passes on one machine's kernels shows up here rather than on the next CPU:
#   - the machine's best instruction set, with 1 and with 2 intra-op threads;
#   - ATEN_CPU_CAPABILITY=avx2 and =default (ATen's dispatch and Inductor's vector ISA follow it).
# Usage: scripts/portability.sh [pytest args...]   (e.g. scripts/portability.sh tests/passes)
# Prints one summary line per condition; exits non-zero if any condition failed.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
run() {
  local label=$1; shift
  local log
  log=$(mktemp)
  env "$@" python -m pytest -q -p no:cacheprovider "${ARGS[@]}" >"$log" 2>&1
  local rc=$?
  echo "$label: $(tail -n 1 "$log")"
  grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
  rm -f "$log"
  [ $rc -eq 0 ] || status=1
}
ARGS=("$@")
run "best ISA, 1 thread " DLMC_TEST_THREADS=1
run "best ISA, 2 threads" DLMC_TEST_THREADS=2
run "avx2,     1 thread " DLMC_TEST_THREADS=1 ATEN_CPU_CAPABILITY=avx2
run "default,  1 thread " DLMC_TEST_THREADS=1 ATEN_CPU_CAPABILITY=default
exit $status
