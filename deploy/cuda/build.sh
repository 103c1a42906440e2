#!/usr/bin/env bash
# deploy/cuda/build.sh: build `retouch` for NVIDIA GPUs on a machine with no GPU and no system
# CUDA, with CUDA 13.0, cuDNN 9 and CUTLASS from NVIDIA's PyPI wheels (deploy/cuda/toolkit.sh,
# docs/gpu.md). Default features: cuda,cudnn,flash-attn (every GPU lever; `retouch --conv
# --attention` choose among them at run time).
#
# Usage:
#   deploy/cuda/build.sh [--features LIST] [--stage DIR] [--no-strip] [CARGO-ARGS...]
#     --features LIST  cargo features of retouch-cli (default $RETOUCH_CUDA_FEATURES, else
#                      cuda,cudnn,flash-attn); e.g. --features cuda for the stock build
#     --stage DIR      also write DIR/retouch.xz: the binary without debug info (--no-strip keeps
#                      it), xz-compressed, as a device run carries it (docs/gpu.md "Device check")
# Output: $TARGET/release/retouch, TARGET=${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda}.
# Then prints the binary's size, its NEEDED libraries, the PTX targets embedded in it and the
# machine code (cubins) of its static kernel libraries (libmoe.a, libflashattention.a).
#
# flash-attn: candle-flash-attn's build script compiles 52 FlashAttention-2 kernels (53 .cu files with flash_api.cu) with nvcc
# (the longest part of a cold build). retouch reaches 8 of them: fp16 and bf16, not causal, not
# split-KV, for the head sizes FLASH_KERNEL_HEAD_SIZES in crates/retouch-model/src/kernels.rs
# lists (read from that line). Only those (and flash_api.cu) are compiled; the other 44 become host-only stubs
# that abort if ever called (nvcc-cache.sh, RETOUCH_FLASH_KERNELS; RETOUCH_FLASH_KERNELS=all
# compiles all 53 files). Their objects are kept in CANDLE_FLASH_ATTN_BUILD_DIR
# (default $RETOUCH_CACHE/flash-attn/sm_$CUDA_COMPUTE_CAP, created), where cudaforge recompiles
# only kernels whose source, flags or architecture changed -- but it records them only once all
# 53 compiled, so nvcc is deploy/cuda/nvcc-cache.sh, which also keeps each finished object in
# $RETOUCH_CACHE/flash-attn/objects: an interrupted build resumes. CUTLASS's headers come from
# the toolkit tree (CUDAFORGE_HOME), so nothing is cloned. Parallel nvcc processes: CUDAFORGE_THREADS
# (default: one per 6 GiB of available memory, at most one per core; a FlashAttention kernel
# compile takes a few GiB).
#
# Environment: CUDA_COMPUTE_CAP (default 90 = H100/H200; cudaforge turns 90 into sm_90a),
# RETOUCH_CACHE (default ~/.cache/retouch), RETOUCH_CUDA_TARGET_DIR, RETOUCH_CUDA_FEATURES,
# CANDLE_FLASH_ATTN_BUILD_DIR, CUDAFORGE_THREADS, NVCC_CCBIN (another host compiler for nvcc),
# RETOUCH_NICE (default 19), CARGO_BUILD_JOBS. Idempotent: a second run with nothing changed is
# a no-op cargo build.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/cuda/toolkit.sh
source "$REPO/deploy/cuda/toolkit.sh"

features=${RETOUCH_CUDA_FEATURES:-cuda,cudnn,flash-attn} stage="" strip=1 cargo_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --features) features=${2:?--features needs a list}; shift ;;
    --features=*) features=${1#--features=} ;;
    --stage) stage=${2:?--stage needs a directory}; shift ;;
    --no-strip) strip=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) cargo_args+=("$1") ;;
  esac
  shift
done
case ",$features," in
  *,cuda,*|*,cudnn,*|*,flash-attn,*) ;;
  *) cuda_log "--features $features: no CUDA feature (cuda, cudnn, flash-attn)"; exit 2 ;;
esac

t0=$SECONDS
cuda_prepare full
cuda_env
TARGET=${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda}
export CARGO_TARGET_DIR=$TARGET
export CANDLE_FLASH_ATTN_BUILD_DIR=${CANDLE_FLASH_ATTN_BUILD_DIR:-$RETOUCH_CACHE/flash-attn/sm_$CUDA_COMPUTE_CAP}
mkdir -p "$CANDLE_FLASH_ATTN_BUILD_DIR"
# nvcc through the per-kernel object cache (nvcc-cache.sh): an interrupted build resumes.
RETOUCH_REAL_NVCC=$NVCC
NVCC=$(cuda_wrapper nvcc-cache)
export RETOUCH_REAL_NVCC NVCC
export RETOUCH_NVCC_CACHE=${RETOUCH_NVCC_CACHE:-$RETOUCH_CACHE/flash-attn/objects}
export RETOUCH_NVCC_LOG=$RETOUCH_CACHE/flash-attn/nvcc.log
# The kernels retouch can reach (see the header); "all" compiles every one.
if [ "${RETOUCH_FLASH_KERNELS:-}" = all ]; then
  unset RETOUCH_FLASH_KERNELS
elif [ -z "${RETOUCH_FLASH_KERNELS:-}" ]; then
  sizes=$(sed -n 's/^pub const FLASH_KERNEL_HEAD_SIZES: \[usize; [0-9]*\] = \[\(.*\)\];$/\1/p' \
    "$REPO/crates/retouch-model/src/kernels.rs" | tr -d ' ' | tr ',' ' ')
  [ -n "$sizes" ] || { cuda_log "cannot read FLASH_KERNEL_HEAD_SIZES from crates/retouch-model/src/kernels.rs"; exit 1; }
  RETOUCH_FLASH_KERNELS=flash_api
  for size in $sizes; do
    RETOUCH_FLASH_KERNELS="$RETOUCH_FLASH_KERNELS flash_fwd_hdim${size}_fp16_sm80 flash_fwd_hdim${size}_bf16_sm80"
  done
  export RETOUCH_FLASH_KERNELS
fi
# Neither cargo nor cudaforge sees the kernel list (an environment variable of the nvcc wrapper):
# when it differs from the last build's, rebuild candle-flash-attn from scratch.
kernel_stamp=$CANDLE_FLASH_ATTN_BUILD_DIR/.retouch-flash-kernels
if [ "$(cat "$kernel_stamp" 2>/dev/null)" != "${RETOUCH_FLASH_KERNELS:-all}" ]; then
  cuda_log "flash-attn kernel set changed: rebuilding candle-flash-attn (${RETOUCH_FLASH_KERNELS:-all})"
  rm -f "$CANDLE_FLASH_ATTN_BUILD_DIR"/.cudaforge_cache.json "$CANDLE_FLASH_ATTN_BUILD_DIR"/*.o "$CANDLE_FLASH_ATTN_BUILD_DIR"/*.a
  (cd "$REPO" && CARGO_TARGET_DIR=$TARGET cargo clean --release -p candle-flash-attn >/dev/null 2>&1) || true
  echo "${RETOUCH_FLASH_KERNELS:-all}" >"$kernel_stamp"
fi
touch "$RETOUCH_NVCC_LOG"
log_start=$(wc -l <"$RETOUCH_NVCC_LOG")
if [ -z "${CUDAFORGE_THREADS:-}" ]; then
  mem_gib=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo)
  CUDAFORGE_THREADS=$((mem_gib / 6))
  [ "$CUDAFORGE_THREADS" -gt "$(nproc)" ] && CUDAFORGE_THREADS=$(nproc)
  [ "$CUDAFORGE_THREADS" -lt 1 ] && CUDAFORGE_THREADS=1
fi
export CUDAFORGE_THREADS
cuda_log "toolkit ready after $((SECONDS - t0)) s: $(nvcc --version | tail -2 | head -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; features $features; target $TARGET"
case ",$features," in *,flash-attn,*)
  cuda_log "flash-attn kernels: objects in $CANDLE_FLASH_ATTN_BUILD_DIR, $(find "$RETOUCH_NVCC_CACHE" -name '*.o' 2>/dev/null | wc -l) cached in $RETOUCH_NVCC_CACHE; $CUDAFORGE_THREADS nvcc at a time; progress: $RETOUCH_NVCC_LOG"
esac

cd "$REPO"
t1=$SECONDS
nice -n "${RETOUCH_NICE:-19}" cargo build --release --locked -p retouch-cli --features "$features" ${cargo_args[@]+"${cargo_args[@]}"}
bin=$TARGET/release/retouch
cuda_log "cargo build: $((SECONDS - t1)) s; total $((SECONDS - t0)) s"
tail -n +"$((log_start + 1))" "$RETOUCH_NVCC_LOG" | awk '
  $2 == "compiled" {n++; s += $5} $2 == "hit" {h++} $2 == "FAILED" {f++}
  END {if (n + h + f) printf "[cuda-toolkit] flash-attn kernels this run: %d compiled (%d s of nvcc time), %d from the cache, %d failed\n", n, s, h, f}' >&2

# What the binary is: size, run-time libraries, PTX targets, cubins.
echo "binary: $bin ($(du -h "$bin" | cut -f1), $(stat -c %s "$bin") bytes); features $features"
echo "NEEDED:"
readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
echo "embedded PTX (.version/.target lines, counted):"
strings -n 6 "$bin" | grep -E '^\.(target|version) ' | sort | uniq -c | sed 's/^/  /'
if [ "$(strings -n 6 "$bin" | grep -cE '^\.target sm_')" = 0 ]; then
  cuda_log "no PTX found in $bin: not a CUDA build?"
  exit 1
fi
echo "embedded machine code (fatbin entries in .nv_fatbin: kind, architecture, count, bytes):"
python3 "$REPO/deploy/cuda/fatbin.py" "$bin" | sed 's/^/  /'
case ",$features," in *,cudnn,*)
  readelf -d "$bin" | grep -q 'NEEDED.*\[libcudnn\.so\.9\]' \
    || { cuda_log "built with cudnn but libcudnn.so.9 is not NEEDED"; exit 1; }
esac

if [ -n "$stage" ]; then
  mkdir -p "$stage"
  tmp=$(mktemp "$stage/.retouch.XXXXXX")
  cp "$bin" "$tmp"
  [ "$strip" = 1 ] && strip --strip-debug "$tmp"
  xz -T0 -6 -c "$tmp" >"$tmp.xz" && mv "$tmp.xz" "$stage/retouch.xz"
  {
    echo "features=$features"
    echo "compute_cap=$CUDA_COMPUTE_CAP"
    echo "nvcc=$(nvcc --version | sed -n 's/.*, V//p')"
    echo "cudnn=$(sed -n 's/^nvidia-cudnn-cu13==\([^ ]*\).*/\1/p' "$RT_CUDA_DIR/requirements-cudnn.txt")"
    echo "built=$(date -u +%Y-%m-%dT%H:%MZ) $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || echo +changes)"
  } >"$stage/build-info.txt"
  echo "staged: $stage/retouch.xz ($(du -h "$stage/retouch.xz" | cut -f1), $(stat -c %s "$stage/retouch.xz") bytes; $(du -h "$tmp" | cut -f1) unpacked$([ "$strip" = 1 ] && echo ", debug info stripped"))"
  rm -f "$tmp"
fi
