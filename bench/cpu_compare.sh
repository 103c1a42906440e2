#!/usr/bin/env bash
# bench/cpu_compare.sh: retouch vs HF diffusers on the CPU, stage by stage, on one checkpoint;
# the numbers behind docs/benchmarks.md ("CPU: retouch vs diffusers").
#
# Usage:
#   bench/cpu_compare.sh --model DIR [--retouch BIN] [--python PY] [--batches "1 4"] [--size 256]
#                        [--steps 10] [--threads 2] [--warmup 1] [--repeats 2] [--out DIR]
#   DIR: a diffusers checkpoint, e.g. a full-size random one from
#        tests/fixtures/make_full_checkpoint.py --out DIR
#   BIN: default release/retouch under $CARGO_TARGET_DIR, else ~/.cache/retouch/target (where
#        tests/run builds), else ./target (cargo build --release -p retouch-cli)
#   PY:  a Python with tests/fixtures/requirements.txt installed (default python3)
# For each batch size N it runs `retouch bench` and bench/diffusers_bench.py one after the other
# (never together: they would share the cores), each with the same threads, size, steps and
# repeats, writes OUT/{retouch,diffusers}-bN.json, then bench/compare_table.py renders the
# markdown table (median seconds per stage, peak RSS, diffusers/retouch ratio) to OUT/table.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=""
for t in ${CARGO_TARGET_DIR:-} "${RETOUCH_CACHE:-$HOME/.cache/retouch}/target" "$REPO/target"; do
  [ -x "$t/release/retouch" ] && { bin=$t/release/retouch; break; }
done
model="" py=python3
batches="1 4" size=256 steps=10 threads=2 warmup=1 repeats=2 out=$REPO/out/cpu-bench
while [ $# -gt 0 ]; do
  case $1 in
    --model) model=$2; shift ;;
    --retouch) bin=$2; shift ;;
    --python) py=$2; shift ;;
    --batches) batches=$2; shift ;;
    --size) size=$2; shift ;;
    --steps) steps=$2; shift ;;
    --threads) threads=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --repeats) repeats=$2; shift ;;
    --out) out=$2; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$model" ] || { echo "--model DIR is required (see --help)" >&2; exit 2; }
[ -n "$bin" ] && [ -x "$bin" ] || { echo "no retouch binary at ${bin:-target/release/retouch}: cargo build --release -p retouch-cli, or pass --retouch" >&2; exit 2; }
mkdir -p "$out"

for n in $batches; do
  echo "== batch $n: retouch" >&2
  "$bin" --threads "$threads" bench --model "$model" --size "$size" --steps "$steps" --batch "$n" \
    --warmup "$warmup" --repeats "$repeats" --edit-repeats 1 --json "$out/retouch-b$n.json"
  echo "== batch $n: diffusers" >&2
  "$py" "$REPO/bench/diffusers_bench.py" --model "$model" --size "$size" --steps "$steps" --batches "$n" \
    --threads "$threads" --warmup "$warmup" --repeats "$repeats" --edit-repeats 1 --json "$out/diffusers-b$n.json"
done
"$py" "$REPO/bench/compare_table.py" "$out" | tee "$out/table.md"
