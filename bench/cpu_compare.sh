#!/usr/bin/env bash
# bench/cpu_compare.sh: retouch vs HF diffusers on the CPU, stage by stage, on one checkpoint;
# the numbers behind docs/benchmarks.md ("CPU: retouch vs diffusers").
#
# Usage:
#   bench/cpu_compare.sh --model DIR [--retouch BIN] [--python PY] [--batches "1 4"] [--size 256]
#                        [--steps 10] [--threads 2] [--warmup 1] [--repeats 2] [--out DIR]
#                        [--dtypes "f32 bf16"] [--edit-repeats 1]
#   DIR: a diffusers checkpoint, e.g. a full-size random one from
#        tests/fixtures/make_full_checkpoint.py --out DIR
#   BIN: default release/retouch under $CARGO_TARGET_DIR, else ~/.cache/retouch/target (where
#        tests/run builds), else ./target (cargo build --release -p retouch-cli)
#   PY:  a Python with tests/fixtures/requirements.txt installed (default python3)
#   dtypes: f32 (diffusers fp32) and/or bf16 (retouch's oneDNN bf16 products vs diffusers
#        torch_dtype=bfloat16); default "f32"
# edit-repeats: timed runs of the whole edit per tool (the table shows their median; one edit
#        is noisy on a shared VM, ±10 % between runs)
# For each dtype and batch size N it runs `retouch bench` and bench/diffusers_bench.py one after
# the other (never together: they would share the cores), each with the same threads, size,
# steps and repeats, writes OUT/{retouch,diffusers}-DTYPE-bN.json, then bench/compare_table.py
# renders the markdown table (median seconds per stage, peak RSS, diffusers/retouch ratio) to
# OUT/table.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=""
for t in ${CARGO_TARGET_DIR:-} "${RETOUCH_CACHE:-$HOME/.cache/retouch}/target" "$REPO/target"; do
  [ -x "$t/release/retouch" ] && { bin=$t/release/retouch; break; }
done
model="" py=python3
dtypes="f32" batches="1 4" size=256 steps=10 threads=2 warmup=1 repeats=2 edit_repeats=1 out=$REPO/out/cpu-bench
while [ $# -gt 0 ]; do
  case $1 in
    --model) model=$2; shift ;;
    --retouch) bin=$2; shift ;;
    --python) py=$2; shift ;;
    --batches) batches=$2; shift ;;
    --dtypes) dtypes=$2; shift ;;
    --size) size=$2; shift ;;
    --steps) steps=$2; shift ;;
    --threads) threads=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --repeats) repeats=$2; shift ;;
    --edit-repeats) edit_repeats=$2; shift ;;
    --out) out=$2; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$model" ] || { echo "--model DIR is required (see --help)" >&2; exit 2; }
[ -n "$bin" ] && [ -x "$bin" ] || { echo "no retouch binary at ${bin:-target/release/retouch}: cargo build --release -p retouch-cli, or pass --retouch" >&2; exit 2; }
mkdir -p "$out"

for dtype in $dtypes; do
  case $dtype in f32) torch_dtype=fp32 ;; bf16) torch_dtype=bf16 ;; *) echo "unknown dtype $dtype" >&2; exit 2 ;; esac
  for n in $batches; do
    echo "== $dtype batch $n: retouch" >&2
    "$bin" --threads "$threads" bench --model "$model" --dtype "$dtype" --size "$size" --steps "$steps" --batch "$n" \
      --warmup "$warmup" --repeats "$repeats" --edit-repeats "$edit_repeats" --json "$out/retouch-$dtype-b$n.json"
    echo "== $dtype batch $n: diffusers" >&2
    "$py" "$REPO/bench/diffusers_bench.py" --model "$model" --dtype "$torch_dtype" --size "$size" --steps "$steps" \
      --batches "$n" --threads "$threads" --warmup "$warmup" --repeats "$repeats" --edit-repeats "$edit_repeats" \
      --json "$out/diffusers-$dtype-b$n.json"
  done
done
"$py" "$REPO/bench/compare_table.py" "$out" | tee "$out/table.md"
