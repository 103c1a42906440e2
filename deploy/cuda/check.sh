#!/usr/bin/env bash
# deploy/cuda/check.sh: the cheap CUDA guard: `cargo check --features cuda` of retouch-model and
# retouch-cli with only nvcc + headers from the CUDA 13.0 wheels (deploy/cuda/toolkit.sh, level
# nvcc: ~100 MB of wheels, no cuBLAS). It type-checks every `#[cfg(feature = "cuda")]` line and
# still runs candle-kernels' build script (nvcc compiles its PTX and the static MoE/GGUF kernel
# library for CUDA_COMPUTE_CAP, default 90); it does not link, so no libraries are needed.
#
#   deploy/cuda/check.sh [CARGO-ARGS...]      # e.g. --all-targets, --message-format short
# Target dir: ${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda} (kept apart from ./target:
# other features, same crates). Timings: docs/gpu.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/cuda/toolkit.sh
source "$REPO/deploy/cuda/toolkit.sh"
case ${1:-} in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

t0=$SECONDS
cuda_prepare nvcc
cuda_env
export CARGO_TARGET_DIR=${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda}
cd "$REPO"
nice -n "${RETOUCH_NICE:-19}" cargo check --locked -p retouch-model -p retouch-cli --features cuda "$@"
cuda_log "cuda check passed in $((SECONDS - t0)) s (toolkit + cargo check)"
