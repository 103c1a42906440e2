#!/usr/bin/env bash
# deploy/cuda/check.sh: the cheap CUDA guard (tests/run's `cuda-check`): `cargo check` of
# retouch-model and retouch-cli for every CUDA feature set, with only nvcc + headers from the
# CUDA 13.0 wheels and CUTLASS's headers (deploy/cuda/toolkit.sh, level nvcc: ~108 MB of wheels,
# no cuBLAS/cuDNN). Feature sets, in order (RETOUCH_CUDA_CHECK_FEATURES, space-separated):
#   cuda                    the stock CUDA build
#   cuda,cudnn,flash-attn   + cuDNN convolutions (cudarc's cuDNN bindings) + FlashAttention-2
# It type-checks every `#[cfg(feature = ...)]` line against the real candle/cudarc APIs and runs
# the build scripts: candle-kernels' nvcc compiles its PTX and the static MoE/GGUF kernel library
# for CUDA_COMPUTE_CAP (default 90) for real, so a toolkit/kernel incompatibility shows.
# candle-flash-attn's 52 kernels are NOT compiled: nvcc is deploy/cuda/nvcc-check.sh, which
# writes an empty object for each .cu under candle-flash-attn's kernels/ (a check never links)
# and runs the real nvcc for everything else. Compiling those kernels is deploy/cuda/build.sh's
# job, with its own kernel cache (CANDLE_FLASH_ATTN_BUILD_DIR, unset here so the empty objects
# never land in it). Consequence: the debug profile of the target dir is for checks only; a
# `cargo build --features flash-attn` (dev profile) there would link the empty objects and fail.
#
#   deploy/cuda/check.sh [CARGO-ARGS...]      # e.g. --all-targets, --message-format short
# Target dir: ${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda} (kept apart from ./target:
# other features, same crates; debug/ here, build.sh's release/ beside it). Timings: docs/gpu.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/cuda/toolkit.sh
source "$REPO/deploy/cuda/toolkit.sh"
case ${1:-} in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

t0=$SECONDS
cuda_prepare nvcc
cuda_env
export CARGO_TARGET_DIR=${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda}

# The nvcc wrapper that fakes candle-flash-attn's kernel objects (see nvcc-check.sh).
wrapper=$(cuda_wrapper nvcc-check)
export RETOUCH_REAL_NVCC=$NVCC NVCC=$wrapper
unset CANDLE_FLASH_ATTN_BUILD_DIR
faked=$(mktemp "${TMPDIR:-/tmp}/retouch-nvcc-check.XXXXXX")
trap 'rm -f "$faked"' EXIT
export RETOUCH_NVCC_CHECK_LOG=$faked

cd "$REPO"
for features in ${RETOUCH_CUDA_CHECK_FEATURES:-cuda cuda,cudnn,flash-attn}; do
  t1=$SECONDS
  nice -n "${RETOUCH_NICE:-19}" cargo check --locked -p retouch-model -p retouch-cli --features "$features" "$@"
  cuda_log "cargo check --features $features: $((SECONDS - t1)) s"
done
n=$(wc -l <"$faked")
[ "$n" -gt 0 ] && cuda_log "candle-flash-attn: $n kernel compiles replaced by empty objects (build script rerun)"
cuda_log "cuda check passed in $((SECONDS - t0)) s (toolkit + cargo check)"
