#!/usr/bin/env bash
# deploy/cuda/build.sh: build `retouch` with `--features cuda` on a machine with no GPU and no
# system CUDA, with CUDA 13.0 from NVIDIA's PyPI wheels (deploy/cuda/toolkit.sh, docs/gpu.md).
#
# Usage:
#   deploy/cuda/build.sh [--stage DIR] [--no-strip] [CARGO-ARGS...]
#     --stage DIR   also write DIR/retouch.xz: the binary without debug info (--no-strip keeps
#                   it), xz-compressed, as a device run carries it (docs/gpu.md "Device check")
# Output: $TARGET/release/retouch, TARGET=${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda}.
# Then prints the binary's size, its NEEDED libraries and the PTX targets embedded in it.
#
# Environment: CUDA_COMPUTE_CAP (default 90 = H100/H200; cudaforge turns 90 into sm_90a),
# RETOUCH_CACHE (default ~/.cache/retouch), RETOUCH_CUDA_TARGET_DIR, RETOUCH_NICE (default 19),
# CARGO_BUILD_JOBS. Idempotent: a second run with nothing changed is a no-op cargo build.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/cuda/toolkit.sh
source "$REPO/deploy/cuda/toolkit.sh"

stage="" strip=1 cargo_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --stage) stage=${2:?--stage needs a directory}; shift ;;
    --no-strip) strip=0 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) cargo_args+=("$1") ;;
  esac
  shift
done

t0=$SECONDS
cuda_prepare full
cuda_env
TARGET=${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda}
export CARGO_TARGET_DIR=$TARGET
cuda_log "toolkit ready after $((SECONDS - t0)) s: $(nvcc --version | tail -2 | head -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; target $TARGET"

cd "$REPO"
t1=$SECONDS
nice -n "${RETOUCH_NICE:-19}" cargo build --release --locked -p retouch-cli --features cuda ${cargo_args[@]+"${cargo_args[@]}"}
bin=$TARGET/release/retouch
cuda_log "cargo build: $((SECONDS - t1)) s; total $((SECONDS - t0)) s"

# What the binary is: size, run-time libraries, PTX targets.
echo "binary: $bin ($(du -h "$bin" | cut -f1), $(stat -c %s "$bin") bytes)"
echo "NEEDED:"
readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
echo "embedded PTX (.version/.target lines, counted):"
strings -n 6 "$bin" | grep -E '^\.(target|version) ' | sort | uniq -c | sed 's/^/  /'
if [ "$(strings -n 6 "$bin" | grep -cE '^\.target sm_')" = 0 ]; then
  cuda_log "no PTX found in $bin: not a CUDA build?"
  exit 1
fi

if [ -n "$stage" ]; then
  mkdir -p "$stage"
  tmp=$(mktemp "$stage/.retouch.XXXXXX")
  cp "$bin" "$tmp"
  [ "$strip" = 1 ] && strip --strip-debug "$tmp"
  xz -T0 -6 -c "$tmp" >"$tmp.xz" && mv "$tmp.xz" "$stage/retouch.xz"
  echo "staged: $stage/retouch.xz ($(du -h "$stage/retouch.xz" | cut -f1); $(du -h "$tmp" | cut -f1) unpacked$([ "$strip" = 1 ] && echo ", debug info stripped"))"
  rm -f "$tmp"
fi
