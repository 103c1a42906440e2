#!/usr/bin/env bash
# deploy/cuda/toolkit.sh: a CUDA 13.0 toolkit tree assembled from NVIDIA's PyPI wheels, for
# building `retouch --features cuda` on a machine with no GPU and no system CUDA (docs/gpu.md).
#
# Sourced by build.sh and check.sh; run directly it prepares the tree and prints `export` lines:
#   deploy/cuda/toolkit.sh [nvcc|full]        # default: full
#   eval "$(deploy/cuda/toolkit.sh full)"     # then plain `cargo build --features cuda` works
#
# Levels:
#   nvcc  nvcc + crt + nvvm (cicc, libdevice) + cudart + CCCL headers (requirements-nvcc.txt):
#         enough for `cargo check --features cuda` (candle-kernels' build script runs nvcc).
#   full  nvcc + cuBLAS, cuBLASLt, cuRAND, NVRTC (requirements-libs.txt) + a generated libcuda
#         link stub: enough to link the binary.
#
# Tree: ${RETOUCH_CACHE:-$HOME/.cache/retouch}/cuda-13.0/
#   wheels/   the pinned wheels (pip download --no-deps --require-hashes; kept, so re-unpacking
#             needs no network)
#   root/     CUDA_HOME: bin/nvcc, nvvm/, include/ (+ include/cccl), lib/ (lib64 -> lib),
#             lib/stubs/libcuda.so, unversioned .so links for -lcudart -lcublas ...
# Idempotent: a stamp per level records the hash of the pins and of this script; a prepared
# tree is reused in milliseconds. Concurrent callers serialise on a lock.
# Needs: python3 with pip (download + unpack), gcc (host compiler for nvcc, and the stub), flock.
# Environment: RETOUCH_CACHE, CUDA_COMPUTE_CAP (default 90 = H100/H200), PIP (default python3 -m pip).

set -euo pipefail

RT_CUDA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RETOUCH_CACHE=${RETOUCH_CACHE:-${HOME:-/root}/.cache/retouch}
CUDA_TREE=${RETOUCH_CUDA_TREE:-$RETOUCH_CACHE/cuda-13.0}
CUDA_ROOT_DIR=$CUDA_TREE/root

cuda_log() { printf '[cuda-toolkit] %s\n' "$*" >&2; }

# The stamp for a level: pins + this script, so editing either re-prepares.
cuda_stamp_value() {
  local files=("$RT_CUDA_DIR/requirements-nvcc.txt" "${BASH_SOURCE[0]}")
  [ "$1" = full ] && files+=("$RT_CUDA_DIR/requirements-libs.txt")
  cat "${files[@]}" | sha256sum | cut -d' ' -f1
}

cuda_ready() { # LEVEL
  [ -f "$CUDA_ROOT_DIR/.ready-$1" ] && [ "$(cat "$CUDA_ROOT_DIR/.ready-$1")" = "$(cuda_stamp_value "$1")" ]
}

# pip download the pinned wheels of one requirements file into wheels/ (hash-checked).
cuda_download() { # REQUIREMENTS-FILE
  local pip
  read -r -a pip <<<"${PIP:-python3 -m pip}"
  mkdir -p "$CUDA_TREE/wheels"
  # The wheels are py3-none-manylinux: name the platforms so the result does not depend on this
  # host's Python or glibc.
  "${pip[@]}" download --quiet --no-deps --require-hashes --only-binary=:all: \
    --implementation py --python-version 3 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    -d "$CUDA_TREE/wheels" -r "$1"
}

# Unpack the wheels named in a requirements file into DEST, keeping the executable bits.
cuda_unpack() { # REQUIREMENTS-FILE DEST
  python3 - "$1" "$CUDA_TREE/wheels" "$2" <<'PY'
import os, re, sys, zipfile
req, wheels, dest = sys.argv[1:]
pins = []
for line in open(req):
    line = line.split("#", 1)[0].strip()
    if line:
        name, version = line.split()[0].split("==")
        pins.append((name.replace("-", "_"), version))
files = os.listdir(wheels)
for name, version in pins:
    found = [f for f in files if f.startswith(f"{name}-{version}-") and f.endswith(".whl")]
    if len(found) != 1:
        sys.exit(f"expected one wheel for {name}=={version} in {wheels}, found {found}")
    with zipfile.ZipFile(os.path.join(wheels, found[0])) as z:
        for info in z.infolist():
            if not info.filename.startswith("nvidia/"):
                continue  # dist-info
            path = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)
PY
}

# libcuda.so.1 belongs to the driver: no wheel has it, not even a stub. Link against a stub
# with the same soname that defines every cu* entry point cuda.h declares (the raw names and
# the names after cuda.h's #define cuX cuX_v2 remapping, with and without per-thread default
# stream). The binary records NEEDED libcuda.so.1; the driver's library is used at run time.
cuda_make_libcuda_stub() {
  local inc=$CUDA_ROOT_DIR/include stubs=$CUDA_ROOT_DIR/lib/stubs tmp
  tmp=$(mktemp -d)
  {
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$inc/cuda.h"
    gcc -E -P -x c -I"$inc" "$inc/cuda.h"
    gcc -E -P -x c -I"$inc" -DCUDA_API_PER_THREAD_DEFAULT_STREAM "$inc/cuda.h"
  } | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' \t(' | sort -u >"$tmp/names"
  sed 's/.*/void &(void) {}/' "$tmp/names" >"$tmp/libcuda_stub.c"
  mkdir -p "$stubs"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$tmp/libcuda_stub.c"
  cp "$tmp/names" "$stubs/libcuda.symbols"
  cuda_log "libcuda stub: $(wc -l <"$tmp/names") symbols from cuda.h -> $stubs/libcuda.so (soname libcuda.so.1)"
  rm -rf "$tmp"
}

# Unversioned names for the linker (-lcudart finds libcudart.so); the soname stays versioned.
cuda_link_names() {
  local lib=$CUDA_ROOT_DIR/lib f
  for f in "$lib"/lib*.so.[0-9]*; do
    [ -e "$f" ] || continue
    case $f in *.alt.so.*|*builtins*) continue ;; esac
    ln -sfn "$(basename "$f")" "${f%%.so.*}.so"
  done
}

cuda_prepare_locked() { # LEVEL
  local level=$1 t0=$SECONDS
  if ! cuda_ready nvcc; then
    cuda_log "preparing nvcc level in $CUDA_TREE"
    cuda_download "$RT_CUDA_DIR/requirements-nvcc.txt"
    rm -rf "$CUDA_TREE/staging" "$CUDA_ROOT_DIR"
    cuda_unpack "$RT_CUDA_DIR/requirements-nvcc.txt" "$CUDA_TREE/staging"
    mv "$CUDA_TREE/staging/nvidia/cu13" "$CUDA_ROOT_DIR"
    rm -rf "$CUDA_TREE/staging"
    ln -sfn lib "$CUDA_ROOT_DIR/lib64"
    cuda_link_names
    "$CUDA_ROOT_DIR/bin/nvcc" --version | grep -q 'release 13\.0,' \
      || { cuda_log "unexpected nvcc: $("$CUDA_ROOT_DIR/bin/nvcc" --version | tail -2)"; return 1; }
    cuda_stamp_value nvcc >"$CUDA_ROOT_DIR/.ready-nvcc"
  fi
  if [ "$level" = full ] && ! cuda_ready full; then
    cuda_log "preparing full level in $CUDA_TREE"
    cuda_download "$RT_CUDA_DIR/requirements-libs.txt"
    rm -rf "$CUDA_TREE/staging"
    cuda_unpack "$RT_CUDA_DIR/requirements-libs.txt" "$CUDA_TREE/staging"
    cp -a "$CUDA_TREE/staging/nvidia/cu13/." "$CUDA_ROOT_DIR/"
    rm -rf "$CUDA_TREE/staging"
    cuda_link_names
    cuda_make_libcuda_stub
    cuda_stamp_value full >"$CUDA_ROOT_DIR/.ready-full"
  fi
  [ $((SECONDS - t0)) -gt 0 ] && cuda_log "prepared in $((SECONDS - t0)) s"
  return 0
}

# cuda_prepare LEVEL: make the tree (under a lock) unless it is ready.
cuda_prepare() {
  local level=${1:-full}
  case $level in nvcc|full) ;; *) cuda_log "unknown level $level (nvcc|full)"; return 2 ;; esac
  cuda_ready "$level" && return 0
  mkdir -p "$CUDA_TREE"
  (
    flock -w 1800 9 || { cuda_log "timed out waiting for $CUDA_TREE/.lock"; exit 1; }
    cuda_prepare_locked "$level"
  ) 9>"$CUDA_TREE/.lock"
}

# cuda_env: the variables the cudarc, cudaforge and candle-kernels build scripts read.
cuda_env() {
  export CUDA_HOME=$CUDA_ROOT_DIR
  # cudarc searches lib dirs under EVERY one of these that is set: keep only ours.
  unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB
  export NVCC=$CUDA_ROOT_DIR/bin/nvcc              # cudaforge (candle-kernels)
  case ":$PATH:" in *":$CUDA_ROOT_DIR/bin:"*) ;; *) export PATH=$CUDA_ROOT_DIR/bin:$PATH ;; esac
  export CUDARC_CUDA_VERSION=13000                 # cudarc bindings = the toolkit = the driver's CUDA
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}  # no nvidia-smi here; 90 = H100/H200
}

cuda_print_env() {
  local v
  for v in CUDA_HOME NVCC PATH CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  echo 'unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB'
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case ${1:-full} in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  esac
  cuda_prepare "${1:-full}"
  cuda_env
  cuda_print_env
fi
