#!/usr/bin/env bash
# deploy/cuda/device-check.sh: the GPU check of a CUDA build of retouch, in one run on a lent
# H100/H200 (the device tool), from the repository root. docs/gpu.md "Device check" has the
# exact `run` call; deploy/cuda/stage-device.sh prepares what it carries.
#
# Reads ${RETOUCH_GPU_STAGE:-.cache/gpu}/: retouch.xz (or retouch), whl/*.whl (diffusers),
# bpe_simple_vocab_16e6.txt.gz (CLIP merges for the full-size checkpoint: no network there).
# The binary should be built with every lever (deploy/cuda/build.sh: cuda,cudnn,flash-attn);
# each lever is measured by choosing it at run time (`retouch --conv X --attention Y`):
#   stock        --conv im2col --attention math    candle's im2col + cuBLAS, f32 attention scores
#   cudnn        --conv cudnn  --attention math    + cuDNN convolutions
#   cudnn-flash  --conv cudnn  --attention flash   + FlashAttention-2
# Steps, in priority order (each time-boxed; the whole run keeps to RETOUCH_DEVICE_BUDGET_S,
# default 480 s, and a step that would not fit is skipped and reported):
#   env        GPU, driver, torch, cuDNN; unpack the binary; find its libraries (ldd, then the
#              image's pip nvidia/*/lib folders -- nvidia/cudnn/lib for libcudnn.so.9 -- and CUDA)
#              and record where each came from
#   ckpt       tests/fixtures/make_full_checkpoint.py (CPU, in the background meanwhile)
#   matmul     torch f16/bf16 8192^3 matmul rate
#   parity     deploy/cuda/parity.py, f16: every fixture case with the last (fullest) lever, a
#              subset with each other lever; f32 once (auto levers) while the checkpoint is
#              still being written, else later
#   bench      retouch bench --size 512 --steps 20 --batch 1/4/8 per lever, nvidia-smi polled
#              for peak memory (fullest lever first, then the diffusers baseline, then the others)
#   diffusers  bench/diffusers_bench.py fp16 (SDPA), same workload, FLOP count
#   tensorcores  which kernels run the convolutions: ncu (kernel names + tensor-pipe counters) on
#              a 1-step edit with --conv cudnn; without a usable ncu, cuDNN's API log
#              (CUDNN_LOGLEVEL_DBG=3) of the same run: algorithm and math type per call
#   parity-cpu a few cases on the CPU with the same binary
#   report     deploy/cuda/report.py -> $OUT/gpu-benchmarks.md (markdown for docs/benchmarks.md)
# $OUT gets: gpu-benchmarks.md, device-check.log, results.tar.gz (every JSON/log).
# Options (environment): RETOUCH_DEVICE_BUDGET_S, RETOUCH_GPU_STEPS (default all:
# env,ckpt,matmul,parity,bench,diffusers,tensorcores,parity-cpu), RETOUCH_BENCH_BATCHES (default
# "1 4 8"), RETOUCH_LEVERS (NAME:CONV:ATTENTION ..., fullest last; default above),
# RETOUCH_PARITY_SUBSET (cases for the other levers).
# Without a GPU (testing): RETOUCH_DEVICE=cpu runs the same steps on the CPU at toy sizes with
# the tiny fixture checkpoint; its levers are `stock` (im2col/math) and `auto`, the two a CPU
# build can run, so every step and table is exercised.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/out/device-check}
STAGE=${RETOUCH_GPU_STAGE:-.cache/gpu}
BUDGET=${RETOUCH_DEVICE_BUDGET_S:-480}
STEPS_WANTED=${RETOUCH_GPU_STEPS:-env,ckpt,matmul,parity,bench,diffusers,tensorcores,parity-cpu}
BATCHES=${RETOUCH_BENCH_BATCHES:-1 4 8}
PARITY_SUBSET=${RETOUCH_PARITY_SUBSET:-ea_default,euler_trailing,ddim,batch3,fp16_variant,b_ea}
DEV=${RETOUCH_DEVICE:-cuda}
if [ "$DEV" = cuda ]; then
  RDEV=cuda:0 SIZE=${RETOUCH_BENCH_SIZE:-512} NSTEPS=${RETOUCH_BENCH_STEPS:-20} TDTYPE=fp16 PDTYPE=f16
  LEVERS=${RETOUCH_LEVERS:-stock:im2col:math cudnn:cudnn:math cudnn-flash:cudnn:flash}
else
  RDEV=cpu SIZE=${RETOUCH_BENCH_SIZE:-64} NSTEPS=${RETOUCH_BENCH_STEPS:-2} TDTYPE=fp32 PDTYPE=f16
  LEVERS=${RETOUCH_LEVERS:-stock:im2col:math auto:auto:auto}
fi
read -r -a LEVER_LIST <<<"$LEVERS"
FULLEST=${LEVER_LIST[${#LEVER_LIST[@]} - 1]}
lever_name() { echo "${1%%:*}"; }
# Drop the levers the staged build lacks (build-info.txt's features; e.g. a `cuda,cudnn` build
# staged because the flash-attn one did not fit the tool's 64 MiB): asking for them is an error.
filter_levers() {
  local f=$STAGE/build-info.txt features kept=() lv
  [ -f "$f" ] || return 0
  features=,$(sed -n 's/^features=//p' "$f"),
  for lv in "${LEVER_LIST[@]}"; do
    case $lv in
      *:cudnn:*) case $features in *,cudnn,*) ;; *) log "lever $lv skipped: build features $features"; continue ;; esac ;;
    esac
    case $lv in
      *:flash) case $features in *,flash-attn,*) ;; *) log "lever $lv skipped: build features $features"; continue ;; esac ;;
    esac
    kept+=("$lv")
  done
  [ ${#kept[@]} -gt 0 ] || return 0
  LEVER_LIST=("${kept[@]}")
  LEVERS="${kept[*]}"
  FULLEST=${LEVER_LIST[${#LEVER_LIST[@]} - 1]}
}
lever_flags() { # NAME:CONV:ATTENTION -> --conv CONV --attention ATTENTION
  local rest=${1#*:}
  echo "--conv ${rest%%:*} --attention ${rest#*:}"
}
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
    m = re.match(r"\s*(lib(?:cuda|cublas|cublasLt|curand|nvrtc|cudart|cudnn)\.so\.\S+) => (\S+)", line)
    if m:
        libs.append(f"{m.group(1)} → {m.group(2)}")
env = {"date": datetime.date.today().isoformat(), "gpu": q[0] if q and q[0] else "?",
       "driver": q[1] if len(q) > 1 else "?", "gpu_memory": q[2] if len(q) > 2 else "?",
       "driver_cuda": cuda.group(1) if cuda else "?", "retouch_version": sh(f"{binary} --version"),
       "ptx_targets": ", ".join(ptx) or "?", "libs": "; ".join(libs) or "?"}
import importlib.metadata as md
for mod in ("torch", "diffusers", "transformers", "nvidia-cudnn-cu13"):
    try:
        env[mod] = md.version(mod)
    except Exception:
        env[mod] = "?"
try:
    env["levers"] = open(f"{res}/levers.txt").read().split()
except OSError:
    pass
try:  # written by deploy/cuda/build.sh --stage
    env["build"] = dict(l.strip().split("=", 1) for l in open(f"{res}/build-info.txt") if "=" in l)
except OSError:
    pass
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
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "cudnn", torch.backends.cudnn.version())' 2>&1
    python3 -m pip list 2>/dev/null | grep -iE '^(nvidia-|cuda-|torch |diffusers)'
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
  [ -f "$STAGE/build-info.txt" ] && cp "$STAGE/build-info.txt" "$RES/" && cat "$STAGE/build-info.txt"
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
  # libcudnn.so.9 is a small front that dlopens libcudnn_{graph,ops,cnn,engines_*}.so.9 by name
  # at run time: they must sit beside it (the pip wheel and CUDA images keep them together).
  d=$(ldd "$BIN" | awk '$1 == "libcudnn.so.9" {print $3}' | xargs -r dirname)
  if [ -n "$d" ]; then
    for f in "$d"/libcudnn_*.so.9; do [ -e "$f" ] && echo "  cuDNN part: ${f##*/}"; done
    [ -e "$d/libcudnn_cnn.so.9" ] || log "libcudnn_cnn.so.9 is not beside $d/libcudnn.so.9: cuDNN convolutions will fail"
  fi
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

retouch_bench() { # LEVER N
  local name flags
  name=$(lever_name "$1")
  read -r -a flags <<<"$(lever_flags "$1")"
  poll_mem "$RES/mem-retouch-$name-b$2.log"
  timeout --kill-after=10 "$STEP_LIMIT" "$BIN" bench --model "$FULL" --size "$SIZE" --steps "$NSTEPS" --batch "$2" --device "$RDEV" \
    "${flags[@]}" --warmup 1 --repeats 3 --edit-repeats 1 --json "$RES/retouch-bench-$name-b$2.json"
  local rc=$?
  stop_mem
  return $rc
}

# parity_step LEVER DTYPE CASES(all|subset) [ORDER]: deploy/cuda/parity.py with the lever's flags.
parity_step() {
  local name flags cases=() tag
  name=$(lever_name "$1")
  read -r -a flags <<<"$(lever_flags "$1")"
  [ "$3" = subset ] && cases=(--cases "$PARITY_SUBSET")
  tag=${4:-5}-$name-$2
  timeout --kill-after=10 "$STEP_LIMIT" python3 deploy/cuda/parity.py --retouch "$BIN" --device "$RDEV" --dtype "$2" \
    "${flags[@]}" "${cases[@]}" --timeout 60 --work "$W/parity-$name-$2" \
    --json "$RES/parity-$tag.json" --markdown "$RES/parity-$tag.md"
}

# tensorcores: one short edit with cuDNN convolutions under ncu (kernel names of the
# convolution launches and the tensor-pipe counters the tool offers), else cuDNN's API log.
tensorcores_step() {
  local att=math args metrics=(gpu__time_duration.sum) m rc=1
  if [ "$DEV" = cuda ]; then
    case " $LEVERS " in *:cudnn:*) ;; *) log "no cuDNN lever in this build: nothing to check"; return 0 ;; esac
  fi
  case " $LEVERS " in *:flash\ *) att=flash ;; esac
  [ "$DEV" = cuda ] || att=auto
  args=(bench --model "$FULL" --size "$SIZE" --steps 1 --batch 1 --device "$RDEV" --warmup 0 --repeats 1
        --edit-repeats 1 --conv "$([ "$DEV" = cuda ] && echo cudnn || echo auto)" --attention "$att")
  if command -v ncu >/dev/null && [ "$DEV" = cuda ]; then
    ncu --version | tail -1
    timeout 30 ncu --query-metrics >"$W/ncu-metrics.txt" 2>&1 || true
    for m in sm__inst_executed_pipe_tensor_op_hmma:sum sm__inst_executed_pipe_tensor_op_gmma:sum \
             sm__pipe_tensor_op_hmma_cycles_active:avg.pct_of_peak_sustained_active \
             sm__pipe_tensor_op_gmma_cycles_active:avg.pct_of_peak_sustained_active; do
      grep -qw "${m%%:*}" "$W/ncu-metrics.txt" && metrics+=("${m%%:*}.${m#*:}")
    done
    log "ncu metrics: ${metrics[*]}"
    # cuDNN's convolution kernels (and its layout transforms); cuBLAS's GEMMs are not matched.
    timeout --kill-after=10 $((STEP_LIMIT * 2 / 3)) ncu --clock-control none --target-processes all \
      --kernel-name "regex:fprop|conv|Conv|implicit|winograd|cudnn" --launch-count 40 \
      --metrics "$(IFS=,; echo "${metrics[*]}")" --csv --log-file "$RES/ncu.csv" "$BIN" "${args[@]}" >"$W/ncu-app.log" 2>&1
    rc=$?
    tail -3 "$W/ncu-app.log"
    if [ "$rc" = 0 ] && grep -q '"Kernel Name"' "$RES/ncu.csv" 2>/dev/null; then
      log "ncu: $(grep -c ',"gpu__time_duration.sum",' "$RES/ncu.csv") convolution kernel launches profiled"
      return 0
    fi
    log "ncu did not profile (rc $rc): $(grep -m1 -iE 'error|fail' "$RES/ncu.csv" "$W/ncu-app.log" 2>/dev/null)"
  else
    echo "ncu not available ($([ "$DEV" = cuda ] && echo "not on PATH" || echo "not a GPU run"))" | tee "$RES/ncu-unavailable.txt"
  fi
  log "falling back to cuDNN's API log (CUDNN_LOGLEVEL_DBG=3) of the same run"
  CUDNN_LOGLEVEL_DBG=3 CUDNN_LOGDEST_DBG="$RES/cudnn-api.log" \
    timeout --kill-after=10 $((STEP_LIMIT / 3)) "$BIN" "${args[@]}" >"$W/cudnn-log-app.log" 2>&1
  rc=$?
  tail -3 "$W/cudnn-log-app.log"
  [ -f "$RES/cudnn-api.log" ] || : >"$RES/cudnn-api.log"
  log "cuDNN API log: $(wc -c <"$RES/cudnn-api.log") bytes, $(grep -c 'cudnnConvolutionForward()' "$RES/cudnn-api.log") cudnnConvolutionForward calls"
  return $rc
}

diffusers_bench() {
  poll_mem "$RES/mem-diffusers.log"
  timeout --kill-after=10 "$STEP_LIMIT" python3 bench/diffusers_bench.py --model "$FULL" --size "$SIZE" --steps "$NSTEPS" \
    --batches "$(echo "$BATCHES" | tr ' ' ',')" --device "$DEV" --dtype "$TDTYPE" --flops --json "$RES/diffusers.json"
  local rc=$?
  stop_mem
  return $rc
}

# ---- the run ------------------------------------------------------------------------------------
log "budget ${BUDGET}s, steps $STEPS_WANTED, device $DEV, levers $LEVERS, work $W"
if wanted env; then step env 120 env_step || true; else env_step >/dev/null 2>&1 || true; fi
[ -x "$BIN" ] || { log "no usable binary; stopping"; exit 1; }
filter_levers
echo "$LEVERS" >"$RES/levers.txt"
step wheels 60 wheels_step
wanted ckpt && ckpt_start
wanted matmul && step matmul 45 python3 bench/diffusers_bench.py --matmul --device "$DEV" --json "$RES/matmul.json"
ckpt_running() { [ -n "$CKPT_PID" ] && kill -0 "$CKPT_PID" 2>/dev/null; }
F32_DONE=0
if wanted parity; then
  # While the checkpoint is written on the CPU: f16 parity, all cases with the fullest lever,
  # a subset with each other one.
  n=1
  step "parity-$PDTYPE-$(lever_name "$FULLEST")" 100 parity_step "$FULLEST" "$PDTYPE" all $n
  for lv in "${LEVER_LIST[@]}"; do
    [ "$lv" = "$FULLEST" ] && continue
    n=$((n + 1))
    step "parity-$PDTYPE-$(lever_name "$lv")-subset" 35 parity_step "$lv" "$PDTYPE" subset $n
  done
  if ckpt_running; then
    step parity-f32 80 parity_step auto:auto:auto f32 all 8
    F32_DONE=1
  fi
fi
if wanted bench || wanted diffusers || wanted tensorcores; then
  if wanted ckpt && ckpt_wait; then
    bench_lever() { local n; for n in $BATCHES; do step "bench-$(lever_name "$1")-b$n" "$((n >= 8 ? 60 : 40))" retouch_bench "$1" "$n"; done; }
    wanted bench && bench_lever "$FULLEST"
    wanted diffusers && step diffusers 90 diffusers_bench
    if wanted bench; then
      for lv in "${LEVER_LIST[@]}"; do [ "$lv" = "$FULLEST" ] || bench_lever "$lv"; done
    fi
    wanted tensorcores && step tensorcores 60 tensorcores_step
  else
    log "no full-size checkpoint: benchmarks skipped"
  fi
fi
if wanted parity && [ "$F32_DONE" = 0 ]; then
  step parity-f32 80 parity_step auto:auto:auto f32 all 8
fi
if wanted parity-cpu; then
  step parity-cpu 30 python3 deploy/cuda/parity.py --retouch "$BIN" --device cpu --timeout 25 \
    --cases ea_default,ddim,batch3,b_ea --title "same binary on the CPU, f32 (subset)" \
    --work "$W/parity-cpu" --json "$RES/parity-9-cpu.json" --markdown "$RES/parity-9-cpu.md"
fi
