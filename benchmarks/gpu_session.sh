#!/usr/bin/env bash
# One prepared benchmark session for a lent GPU machine (1x H200, 16 cores), at most ~8 minutes of wall time.
#
#   bash benchmarks/gpu_session.sh [--smoke] [--data DIR] [--budget-s S] [OUT_DIR]
#
# OUT_DIR (default: $OUT, the device tool's output folder) receives summary.json (every section's numbers, or why
# it was skipped), session.log (everything printed), train_history.csv and gpu_util.csv: four files, within what
# the device tool brings back. Scratch (image cache, run folder, synthetic data, section files, wheels installed)
# goes to $GPU_SESSION_WORK (kept), default a new folder under $TMPDIR or /tmp (removed at the end); never into the
# data folder.
#
# Sections (each with its own time budget, run under `timeout`; a section that does not fit in what is left of the
# session budget is skipped and the reason recorded): deps (missing pure-Python packages from benchmarks/wheels,
# never torch), env, data, train_speed, loader, train, infer. benchmarks/gpu_bench.py holds the Python side and
# docs/benchmarks/README.md explains every key of summary.json.
#
# --smoke: every section on the CPU with tiny settings (img 64, a few steps, synthetic data), well under 2 minutes;
#          the GPU-only numbers are null with a reason. --data DIR: the ham10000_200x150 folder (else searched:
#          $SKINLESION_BENCH_DATA, shared/data/, ../shared/data/, .devdata/, /work/shared/data/; else synthetic).
# Python: $PYTHON, else .venv/bin/python where it imports torch, else python3 (the device machine's).
set -u -o pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
SMOKE=0
DATA=""
BUDGET=""
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --data) DATA=${2:?--data needs a folder}; shift ;;
    --data=*) DATA=${1#*=} ;;
    --budget-s) BUDGET=${2:?--budget-s needs seconds}; shift ;;
    --budget-s=*) BUDGET=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done
OUT_DIR=${OUT_DIR:-${OUT:-}}
if [ -z "$OUT_DIR" ]; then
  echo "no output folder: pass one, or set OUT" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
if [ -n "${GPU_SESSION_WORK:-}" ]; then
  WORK=$GPU_SESSION_WORK # kept afterwards
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/skinlesion-gpu-session.XXXXXX") || exit 2
  trap 'rm -rf "$WORK"' EXIT # our own scratch (image cache, runs): removed at the end
fi
mkdir -p "$WORK/sections" || exit 2
: >"$WORK/status.tsv"
exec > >(tee -a "$OUT_DIR/session.log") 2>&1

# Section budgets in seconds; the session budget caps their sum (what is left when a section starts).
if [ "$SMOKE" = 1 ]; then
  # One intra-op thread: a small CPU footprint, and no OpenMP barrier stalls when other jobs hold the cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
  BUDGET=${BUDGET:-240}  # generous: the test runs it under nice while other tests hold the cores
  declare -A WANT=([deps]=20 [env]=30 [data]=20 [train_speed]=30 [loader]=30 [train]=80 [infer]=90)
else
  BUDGET=${BUDGET:-470}
  declare -A WANT=([deps]=30 [env]=20 [data]=60 [train_speed]=120 [loader]=70 [train]=110 [infer]=120)
fi

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$ROOT/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SKINLESION_CACHE_DIR="$WORK/cache"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" MPLCONFIGDIR="$WORK/mpl"

COMMON=(--work "$WORK" --out-dir "$OUT_DIR")
[ "$SMOKE" = 1 ] && COMMON+=(--smoke)
[ -n "$DATA" ] && COMMON+=(--data "$DATA")

START=$(date +%s)
echo "gpu_session: $( [ "$SMOKE" = 1 ] && echo smoke || echo gpu ) run, budget ${BUDGET} s, python $PY, out $OUT_DIR, work $WORK"
echo "gpu_session: $(date -Is) on $(hostname), $(getconf _NPROCESSORS_ONLN) CPUs"

run_section() {
  local name=$1 want=${WANT[$1]} now left t rc s0 s1
  now=$(date +%s)
  left=$((START + BUDGET - now - 10)) # 10 s kept for the summary
  if [ "$left" -lt 8 ]; then
    echo "=== $name: skipped, session budget used up ($((now - START)) of ${BUDGET} s)"
    printf '%s\t\t\t%s\t%s\n' "$name" "$want" "session budget used up ($((now - START)) of ${BUDGET} s)" >>"$WORK/status.tsv"
    return
  fi
  t=$want
  [ "$left" -lt "$t" ] && t=$left
  echo "=== $name (budget ${t} s, $((now - START)) s into the session)"
  s0=$(date +%s.%N)
  # The section stops itself 5 s before its budget; timeout is the backstop (rc 124, or 137 after -k).
  timeout -k 10 "$t" "$PY" benchmarks/gpu_bench.py "$name" "${COMMON[@]}" --budget-s $((t - 5))
  rc=$?
  s1=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN {printf \"%.1f\", $s1 - $s0}")" "$t" \
    "$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "killed at its ${t} s budget")" >>"$WORK/status.tsv"
  echo "=== $name: exit $rc after $(awk "BEGIN {printf \"%.1f\", $s1 - $s0}") s"
}

for section in deps env data train_speed loader train infer; do
  run_section "$section"
done

timeout 30 "$PY" benchmarks/gpu_bench.py merge "${COMMON[@]}" --budget-s "$BUDGET"
rc=$?
echo "gpu_session: done in $(($(date +%s) - START)) s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $rc
