#!/usr/bin/env bash
# GPU check of the CUDA backend: runs its staged test executables on the GPU machine and
# prints a short summary. Needs no Rust toolchain there.
#
# 1. On the build machine, from the worktree root:
#      ../shared/tools/device-stage --tests -p kv-backend-cuda
#    (stages test-kv-backend-cuda, test-conformance and test-device-stress into .device/bin)
# 2. On the GPU machine (run tool, carry [".device"]), from the worktree root:
#      bash kv-backend-cuda/device-check.sh
#    Full logs go to $OUT/cuda-logs when $OUT is set (else .device/logs).
#
# VRAMKV_REQUIRE_CUDA=1 is set, so a missing driver/device fails instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.device/bin
logs="${OUT:-.device}/cuda-logs"
mkdir -p "$logs"
export VRAMKV_REQUIRE_CUDA=1
export RUST_BACKTRACE=1

if [ ! -d "$bin" ]; then
  echo "device-check: no $bin; stage first: ../shared/tools/device-stage --tests -p kv-backend-cuda" >&2
  exit 2
fi
echo "== GPU"
nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap --format=csv,noheader 2>&1 ||
  echo "(nvidia-smi failed)"

declare -a summary
fail=0
run() { # name, timeout seconds, args...
  local name=$1 secs=$2
  shift 2
  local exe="$bin/$name"
  if [ ! -x "$exe" ]; then
    summary+=("MISSING  $name (not staged)")
    fail=1
    return
  fi
  echo
  echo "== $name $*"
  local start=$SECONDS
  timeout --kill-after=10 "$secs" "$exe" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  # Show the report lines and failures, not the whole log.
  grep -E '^(  |skipped|test result)|FAILED|panicked' "$logs/$name.log" | grep -v '^test .*\.\.\. ok$' | head -40
  [ $rc -ne 0 ] && sed -n '/^failures:/,/^failures:/p' "$logs/$name.log" | head -60
  local result
  result=$(grep -E '^test result' "$logs/$name.log" | tail -1)
  if [ $rc -eq 0 ]; then
    summary+=("PASS     $name (${took}s) ${result#test result: }")
  else
    [ $rc -eq 124 ] && result="timed out after ${secs}s"
    summary+=("FAIL     $name rc=$rc (${took}s) ${result#test result: }")
    fail=1
  fi
}

run test-kv-backend-cuda 60
run test-conformance 200
# One trial at a time: the OOM trial fills the GPU, and the throughput report wants it alone.
run test-device-stress 300 --test-threads=1

echo
echo "== summary (logs in $logs)"
printf '  %s\n' "${summary[@]}"
exit $fail
