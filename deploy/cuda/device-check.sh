#!/usr/bin/env bash
# deploy/cuda/device-check.sh: the GPU check of a CUDA build of retouch, in one run on a lent
# H100/H200 (the device tool), from the repository root. docs/gpu.md "Device check" has the
# exact `run` call; deploy/cuda/stage-device.sh prepares what it carries.
#
# Reads ${RETOUCH_GPU_STAGE:-.cache/gpu}/: retouch.xz (or retouch), whl/*.whl (diffusers),
# bpe_simple_vocab_16e6.txt.gz (CLIP merges for the full-size checkpoint: no network there).
# Steps (each time-boxed; the whole run keeps to RETOUCH_DEVICE_BUDGET_S, default 480 s):
#   env      GPU, driver, torch; unpack the binary; find its CUDA libraries (ldd, then the
#            image's CUDA and pip nvidia/*/lib folders) and record where each came from
#   ckpt     tests/fixtures/make_full_checkpoint.py (CPU, in the background meanwhile)
#   matmul   torch f16/bf16 8192^3 matmul rate
#   parity   deploy/cuda/parity.py on cuda:0 in f16 and f32, and a few cases on the CPU with
#            the same binary
#   bench    retouch bench --size 512 --steps 20 --batch 1/4/8 --device cuda:0, nvidia-smi polled
#   diffusers  deploy/cuda/diffusers_gpu_bench.py fp16, same workload, FLOP count
#   report   deploy/cuda/report.py -> $OUT/gpu-benchmarks.md (markdown for docs/benchmarks.md)
# $OUT gets: gpu-benchmarks.md, device-check.log, results.tar.gz (every JSON/log).
# Options (environment): RETOUCH_DEVICE_BUDGET_S, RETOUCH_GPU_STEPS (default all:
# env,ckpt,matmul,parity,bench,diffusers), RETOUCH_BENCH_BATCHES (default "1 4 8").
# Without a GPU (testing): RETOUCH_DEVICE=cpu runs the same steps on the CPU at toy sizes.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/out/device-check}
STAGE=${RETOUCH_GPU_STAGE:-.cache/gpu}
BUDGET=${RETOUCH_DEVICE_BUDGET_S:-480}
STEPS_WANTED=${RETOUCH_GPU_STEPS:-env,ckpt,matmul,parity,bench,diffusers}
BATCHES=${RETOUCH_BENCH_BATCHES:-1 4 8}
DEV=${RETOUCH_DEVICE:-cuda}
if [ "$DEV" = cuda ]; then
  RDEV=cuda:0 SIZE=${RETOUCH_BENCH_SIZE:-512} NSTEPS=${RETOUCH_BENCH_STEPS:-20} TDTYPE=fp16
else
  RDEV=cpu SIZE=${RETOUCH_BENCH_SIZE:-64} NSTEPS=${RETOUCH_BENCH_STEPS:-2} TDTYPE=fp32
fi
mkdir -p "$OUT"
W=$(mktemp -d /tmp/retouch-gpu.XXXXXX)
RES=$W/res
mkdir -p "$RES"
exec > >(tee -a "$OUT/device-check.log") 2>&1
export PYTHONUNBUFFERED=1
# The driver caches JIT-compiled PTX here: the first CUDA process compiles candle's kernels.
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-$W/nv-cache} CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}

log() { printf '[device-check %4ss] %s\n' "$SECONDS" "$*"; }
wanted() { case ",$STEPS_WANTED," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
left() { echo $((BUDGET - SECONDS)); }

# step NAME CAP CMD...: run CMD with a timeout of min(CAP, budget left - 30 s); record it.
# A shell function runs in this shell (it may export variables) and gets the limit as
# STEP_LIMIT, to pass to `timeout` itself.
STEP_LIMIT=60
step() {
  local name=$1 cap=$2 t0=$SECONDS limit rc
  shift 2
  limit=$(($(left) - 30))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    log "SKIP $name: budget spent"
    printf '%s\tskipped (budget)\t-\n' "$name" >>"$RES/steps.tsv"
    return 0
  fi
  log "=== $name (limit ${limit}s): $*"
  if declare -F "$1" >/dev/null; then
    STEP_LIMIT=$limit "$@"
  else
    timeout --kill-after=10 "$limit" "$@"
  fi
  rc=$?
  local status=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="timed out (${limit} s)"
  [ "$rc" != 0 ] && [ "$status" = ok ] && status="failed (rc $rc)"
  printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) >>"$RES/steps.tsv"
  log "--- $name: $status in $((SECONDS - t0)) s"
  return 0
}

# poll_mem FILE: nvidia-smi memory.used (MiB) every 100 ms into FILE until stop_mem.
MEMPID=""
poll_mem() {
  if command -v nvidia-smi >/dev/null && [ "$DEV" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >"$1" 2>/dev/null &
    MEMPID=$!
    sleep 0.3
  fi
}
stop_mem() { [ -n "$MEMPID" ] && kill "$MEMPID" 2>/dev/null; wait "$MEMPID" 2>/dev/null; MEMPID=""; }

# facts: env.json for the report (at the end, when the carried wheels are importable).
facts() {
  python3 - "$RES" "$BIN" <<'PY'
import json, re, subprocess, sys, datetime
res, binary = sys.argv[1], sys.argv[2]
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        return ""
q = sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0").split(", ")
cuda = re.search(r"CUDA Version: ([0-9.]+)", sh("nvidia-smi"))
ptx = sorted(set(m.decode() for m in re.findall(rb"\n\.target (\w+)", open(binary, "rb").read())))
libs = []
for line in open(f"{res}/ldd.txt"):
    m = re.match(r"\s*(lib(?:cuda|cublas|cublasLt|curand|nvrtc|cudart)\.so\.\S+) => (\S+)", line)
    if m:
        libs.append(f"{m.group(1)} → {m.group(2)}")
env = {"date": datetime.date.today().isoformat(), "gpu": q[0] if q and q[0] else "?",
       "driver": q[1] if len(q) > 1 else "?", "gpu_memory": q[2] if len(q) > 2 else "?",
       "driver_cuda": cuda.group(1) if cuda else "?", "retouch_version": sh(f"{binary} --version"),
       "ptx_targets": ", ".join(ptx) or "?", "libs": "; ".join(libs) or "?"}
import importlib.metadata as md
for mod in ("torch", "diffusers", "transformers"):
    try:
        env[mod] = md.version(mod)
    except Exception:
        env[mod] = "?"
json.dump(env, open(f"{res}/env.json", "w"), indent=2)
print(json.dumps(env, indent=2))
PY
}

finish() {
  stop_mem
  [ -x "$BIN" ] && facts >/dev/null 2>&1
  log "=== report"
  python3 deploy/cuda/report.py --res "$RES" --out "$OUT/gpu-benchmarks.md" >/dev/null 2>"$RES/report.err" \
    || { log "report.py failed:"; cat "$RES/report.err"; }
  tar -C "$W" -czf "$OUT/results.tar.gz" res 2>/dev/null
  log "done in $SECONDS s; \$OUT: $(cd "$OUT" && printf '%s ' *)"
  echo
  cat "$OUT/gpu-benchmarks.md" 2>/dev/null
}
trap finish EXIT

# ---- env: facts, the binary, its libraries ---------------------------------------------------
BIN=$W/retouch
env_step() {
  {
    date -u
    uname -a
    nvidia-smi 2>&1 | head -20
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
    grep -E '^(NAME|VERSION)=' /etc/os-release
    ldd --version | head -1
  } >"$RES/env.txt" 2>&1
  cat "$RES/env.txt"
  if [ -f "$STAGE/retouch" ]; then
    cp "$STAGE/retouch" "$BIN"
  elif [ -f "$STAGE/retouch.xz" ]; then
    if command -v xz >/dev/null; then xz -dc "$STAGE/retouch.xz" >"$BIN"
    else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$STAGE/retouch.xz" "$BIN"
    fi
  else
    log "no $STAGE/retouch(.xz): build with deploy/cuda/stage-device.sh"
    return 1
  fi
  chmod +x "$BIN"
  # Libraries: the binary names sonames only (no rpath). Look where this image keeps them.
  local dirs=() d lib found
  while IFS= read -r d; do dirs+=("$d"); done < <(
    python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    for p in nvidia.__path__:
        for d in sorted(glob.glob(os.path.join(p, "*", "lib")) + glob.glob(os.path.join(p, "cu*", "lib"))):
            print(d)
except Exception:
    pass
PY
  )
  dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu)
  for lib in $(ldd "$BIN" | awk '/not found/ {print $1}'); do
    found=""
    for d in "${dirs[@]}"; do
      if [ -e "$d/$lib" ]; then found=$d; break; fi
    done
    if [ -z "$found" ]; then
      found=$(timeout 30 find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1 | xargs -r dirname)
    fi
    if [ -n "$found" ]; then
      export LD_LIBRARY_PATH=$found${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      log "$lib: found in $found"
    else
      log "$lib: NOT FOUND anywhere"
    fi
  done
  ldd "$BIN" | tee "$RES/ldd.txt"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >>"$RES/ldd.txt"
  "$BIN" --version
  ! grep -q 'not found' "$RES/ldd.txt"
}

# ---- carried wheels (diffusers) -----------------------------------------------------------------
wheels_step() {
  ls "$STAGE"/whl/*.whl >/dev/null 2>&1 || { log "no wheels in $STAGE/whl"; return 0; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$STAGE"/whl/*.whl \
    && export PYTHONPATH=$W/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -c 'import diffusers; print("diffusers", diffusers.__version__, diffusers.__file__)'
}

FULL=$W/ip2p-full
CKPT_PID=""
ckpt_start() {
  local bpe=()
  [ -f "$STAGE/bpe_simple_vocab_16e6.txt.gz" ] && bpe=(--clip-bpe "$STAGE/bpe_simple_vocab_16e6.txt.gz")
  if [ "$DEV" = cuda ]; then
    log "building the full-size random checkpoint in the background -> $FULL"
    (timeout $(($(left) - 60)) python3 tests/fixtures/make_full_checkpoint.py --out "$FULL" "${bpe[@]}" \
       >"$RES/checkpoint.log" 2>&1; echo $? >"$W/ckpt.rc") &
    CKPT_PID=$!
  else
    # toy run: the tiny fixture checkpoint stands in for the full one
    ln -sfn "$REPO/tests/fixtures/models/tiny-sd15" "$FULL"
    echo 0 >"$W/ckpt.rc"
  fi
}
ckpt_wait() {
  local t0=$SECONDS
  [ -n "$CKPT_PID" ] && wait "$CKPT_PID"
  local rc
  rc=$(cat "$W/ckpt.rc" 2>/dev/null || echo "?")
  tail -3 "$RES/checkpoint.log" 2>/dev/null
  printf 'checkpoint\t%s\t%s (waited)\n' "$([ "$rc" = 0 ] && echo ok || echo "failed (rc $rc)")" $((SECONDS - t0)) >>"$RES/steps.tsv"
  [ "$rc" = 0 ]
}

retouch_bench() { # N
  poll_mem "$RES/mem-retouch-b$1.log"
  timeout --kill-after=10 "$STEP_LIMIT" "$BIN" bench --model "$FULL" --size "$SIZE" --steps "$NSTEPS" --batch "$1" --device "$RDEV" \
    --warmup 1 --repeats 3 --edit-repeats 1 --json "$RES/retouch-bench-b$1.json"
  local rc=$?
  stop_mem
  return $rc
}

diffusers_bench() {
  poll_mem "$RES/mem-diffusers.log"
  timeout --kill-after=10 "$STEP_LIMIT" python3 deploy/cuda/diffusers_gpu_bench.py --model "$FULL" --size "$SIZE" --steps "$NSTEPS" \
    --batches "$(echo "$BATCHES" | tr ' ' ',')" --device "$DEV" --dtype "$TDTYPE" --flops --json "$RES/diffusers.json"
  local rc=$?
  stop_mem
  return $rc
}

# ---- the run ------------------------------------------------------------------------------------
log "budget ${BUDGET}s, steps $STEPS_WANTED, device $DEV, work $W"
if wanted env; then step env 120 env_step || true; else env_step >/dev/null 2>&1 || true; fi
[ -x "$BIN" ] || { log "no usable binary; stopping"; exit 1; }
step wheels 60 wheels_step
wanted ckpt && ckpt_start
wanted matmul && step matmul 60 python3 deploy/cuda/diffusers_gpu_bench.py --matmul --device "$DEV" --json "$RES/matmul.json"
if wanted parity; then
  step parity-f16 150 python3 deploy/cuda/parity.py --retouch "$BIN" --device "$RDEV" --dtype f16 --timeout 120 \
    --work "$W/parity-f16" --json "$RES/parity-1-$DEV-f16.json" --markdown "$RES/parity-1-$DEV-f16.md"
  step parity-f32 150 python3 deploy/cuda/parity.py --retouch "$BIN" --device "$RDEV" --dtype f32 --timeout 120 \
    --work "$W/parity-f32" --json "$RES/parity-2-$DEV-f32.json" --markdown "$RES/parity-2-$DEV-f32.md"
  step parity-cpu 60 python3 deploy/cuda/parity.py --retouch "$BIN" --device cpu --timeout 50 \
    --cases ea_default,euler_trailing,ddim,batch3,fp16_variant,b_ea --title "same binary on the CPU, f32 (subset)" \
    --work "$W/parity-cpu" --json "$RES/parity-3-cpu.json" --markdown "$RES/parity-3-cpu.md"
fi
if wanted bench || wanted diffusers; then
  if wanted ckpt && ckpt_wait; then
    if wanted bench; then
      for n in $BATCHES; do step "retouch-bench-b$n" 150 retouch_bench "$n"; done
    fi
    wanted diffusers && step diffusers 200 diffusers_bench
  else
    log "no full-size checkpoint: benchmarks skipped"
  fi
fi
