#!/usr/bin/env bash
# deploy/cuda/toolkit.sh: a CUDA 13.0 toolkit tree assembled from NVIDIA's PyPI wheels, for
# building `retouch --features cuda` on a machine with no GPU and no system CUDA (docs/gpu.md).
#
# Sourced by build.sh and check.sh; run directly it prepares the tree and prints `export` lines:
#   deploy/cuda/toolkit.sh [nvcc|full]        # default: full
#   eval "$(deploy/cuda/toolkit.sh full)"     # then plain `cargo build --features cuda` works
#
# Levels:
#   nvcc  nvcc + crt + nvvm (cicc, libdevice) + cudart + CCCL headers (requirements-nvcc.txt)
#         + CUTLASS's headers (requirements-cutlass.txt, 4 MB): enough for `cargo check` of every
#         CUDA feature (candle-kernels' and candle-flash-attn's build scripts run nvcc).
#   full  nvcc + cuBLAS, cuBLASLt, cuRAND, NVRTC (requirements-libs.txt) + cuDNN 9
#         (requirements-cudnn.txt) + a generated libcuda link stub: enough to link the binary.
#
# Tree: ${RETOUCH_CACHE:-$HOME/.cache/retouch}/cuda-13.0/
#   wheels/   the pinned wheels (pip download --no-deps --require-hashes; kept, so re-unpacking
#             needs no network)
#   root/     CUDA_HOME: bin/nvcc, nvvm/, include/ (+ include/cccl, cudnn*.h), lib/ (lib64 -> lib;
#             libcudnn*.so.9 too), lib/stubs/libcuda.so, unversioned .so links for -lcudart
#             -lcublas -lcudnn ...
# CUTLASS: ${RETOUCH_CACHE}/cudaforge/ is exported as CUDAFORGE_HOME; candle-flash-attn's build
#   script (cudaforge 0.1.6) reuses git/checkouts/cutlass-7d49e6c7e2f8896c/ there instead of
#   cloning github.com/NVIDIA/cutlass when include/ exists and `git rev-parse HEAD` prints the
#   commit it wants. This script fills include/ and tools/util/include/ from the nvidia-cutlass
#   wheel, checks them against CUTLASS_TREE_SHA256 (= that commit's tree), and writes the commit
#   id into a `git init`ed .git/HEAD: the checkout holds no git objects (docs/gpu.md says why).
# Idempotent: a stamp per level records the hash of the pins and of this script; a prepared
# tree is reused in milliseconds. Concurrent callers serialise on a lock.
# Needs: python3 with pip (download + unpack), gcc (host compiler for nvcc, and the stub), flock,
# git (cudaforge runs `git rev-parse HEAD` in the CUTLASS checkout).
# Environment: RETOUCH_CACHE, CUDA_COMPUTE_CAP (default 90 = H100/H200), PIP (default python3 -m pip),
# RETOUCH_CUDAFORGE_HOME (default $RETOUCH_CACHE/cudaforge).

set -euo pipefail

RT_CUDA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RETOUCH_CACHE=${RETOUCH_CACHE:-${HOME:-/root}/.cache/retouch}
CUDA_TREE=${RETOUCH_CUDA_TREE:-$RETOUCH_CACHE/cuda-13.0}
CUDA_ROOT_DIR=$CUDA_TREE/root
# CUTLASS for candle-flash-attn 0.11.1 (its build.rs: `.with_cutlass(Some(CUTLASS_COMMIT))`).
CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc
# sha256 of `sha256sum` lines (sorted paths) of include/ + tools/util/include/ (cutlass_tree_sum):
# the same for the wheel's headers and `git archive 7d49e6c7 include tools/util/include`.
CUTLASS_TREE_SHA256=783242f1b0ff544e2a75390bea25544014a3b84cf0dddd110048cd460abf8eda
CUDAFORGE_DIR=${RETOUCH_CUDAFORGE_HOME:-$RETOUCH_CACHE/cudaforge}
CUTLASS_DIR=$CUDAFORGE_DIR/git/checkouts/cutlass-${CUTLASS_COMMIT:0:16}

cuda_log() { printf '[cuda-toolkit] %s\n' "$*" >&2; }

# The stamp for a level: pins + this script, so editing either re-prepares.
cuda_stamp_value() {
  local files=("$RT_CUDA_DIR/requirements-nvcc.txt" "${BASH_SOURCE[0]}")
  case $1 in
    full) files+=("$RT_CUDA_DIR/requirements-libs.txt" "$RT_CUDA_DIR/requirements-cudnn.txt") ;;
    cutlass) files=("$RT_CUDA_DIR/requirements-cutlass.txt" "${BASH_SOURCE[0]}") ;;
  esac
  cat "${files[@]}" | sha256sum | cut -d' ' -f1
}

cuda_stamp_ok() { # STAMP-FILE PART
  [ -f "$1" ] && [ "$(cat "$1")" = "$(cuda_stamp_value "$2")" ]
}

# Every level includes the CUTLASS checkout (the check needs it too: cudaforge looks for it
# before it compiles anything).
cuda_ready() { # LEVEL
  cuda_stamp_ok "$CUDA_ROOT_DIR/.ready-$1" "$1" && cuda_stamp_ok "$CUTLASS_DIR/.git/retouch-ready" cutlass
}

# pip download the pinned wheels of one requirements file into wheels/ (hash-checked).
cuda_download() { # REQUIREMENTS-FILE
  local pip
  read -r -a pip <<<"${PIP:-python3 -m pip}"
  mkdir -p "$CUDA_TREE/wheels"
  # The wheels are py3-none-manylinux: name the platforms so the result does not depend on this
  # host's Python or glibc.
  "${pip[@]}" download --quiet --no-deps --require-hashes --only-binary=:all: \
    --implementation py --python-version 3.12 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    -d "$CUDA_TREE/wheels" -r "$1"
}

# Unpack the wheels named in a requirements file into DEST, keeping the executable bits: the
# entries under PREFIX (default nvidia/, i.e. not the dist-info), with PREFIX removed when STRIP=1.
cuda_unpack() { # REQUIREMENTS-FILE DEST [PREFIX STRIP]
  python3 - "$1" "$CUDA_TREE/wheels" "$2" "${3:-nvidia/}" "${4:-0}" <<'PY'
import os, re, sys, zipfile
req, wheels, dest, prefix, strip = sys.argv[1:]
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
            if not info.filename.startswith(prefix) or info.is_dir():
                continue  # dist-info, or not the part asked for
            if strip == "1":
                info.filename = info.filename[len(prefix):]
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
cuda_link_names() { # [ROOT]
  local lib=${1:-$CUDA_ROOT_DIR}/lib f
  for f in "$lib"/lib*.so.[0-9]*; do
    [ -e "$f" ] || continue
    case $f in *.alt.so.*|*builtins*) continue ;; esac
    ln -sfn "$(basename "$f")" "${f%%.so.*}.so"
  done
}

# The sha256 of a header tree: sorted `sha256sum` lines of every file under include/ and
# tools/util/include/, hashed again. Recompute it from CUTLASS's git repository with
#   git archive 7d49e6c7 include tools/util/include | tar -x -C DIR; (cd DIR && <the pipeline>)
cutlass_tree_sum() { # DIR
  (cd "$1" && find include tools/util/include -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
    | sha256sum | cut -d' ' -f1)
}

# CUTLASS's headers from the nvidia-cutlass wheel, laid out as cudaforge's checkout of
# $CUTLASS_COMMIT: include/, tools/util/include/, and a .git whose HEAD names the commit (cudaforge
# checks `git rev-parse HEAD`; the objects are not there, the content is verified instead).
cuda_prepare_cutlass() {
  local staging=$CUTLASS_DIR.staging sum head
  cuda_download "$RT_CUDA_DIR/requirements-cutlass.txt"
  rm -rf "$staging"
  cuda_unpack "$RT_CUDA_DIR/requirements-cutlass.txt" "$staging/include" cutlass_library/source/include/ 1
  cuda_unpack "$RT_CUDA_DIR/requirements-cutlass.txt" "$staging/tools/util/include" \
    cutlass_library/source/tools/util/include/ 1
  sum=$(cutlass_tree_sum "$staging")
  if [ "$sum" != "$CUTLASS_TREE_SHA256" ]; then
    cuda_log "CUTLASS headers from the wheel: tree sha256 $sum, expected $CUTLASS_TREE_SHA256 (commit $CUTLASS_COMMIT)"
    return 1
  fi
  git init -q "$staging"
  printf '%s\n' "$CUTLASS_COMMIT" >"$staging/.git/HEAD"
  head=$(git -C "$staging" rev-parse HEAD 2>&1) || true
  if [ "$head" != "$CUTLASS_COMMIT" ]; then
    cuda_log "git rev-parse HEAD in the CUTLASS checkout printed '$head', expected $CUTLASS_COMMIT"
    return 1
  fi
  cuda_stamp_value cutlass >"$staging/.git/retouch-ready"
  # Swap it in under cudaforge's own lock (flock on <checkouts>/cutlass-<16 hex>.lock), so a
  # build script that is reading the checkout meanwhile is not disturbed.
  (
    flock -w 600 8 || { cuda_log "timed out waiting for $CUTLASS_DIR.lock"; exit 1; }
    rm -rf "$CUTLASS_DIR"
    mv "$staging" "$CUTLASS_DIR"
  ) 8>"$CUTLASS_DIR.lock"
  cuda_log "CUTLASS $CUTLASS_COMMIT headers (tree sha256 ${sum:0:16}...) -> $CUTLASS_DIR"
}

cuda_prepare_locked() { # LEVEL
  local level=$1 t0=$SECONDS
  if ! cuda_stamp_ok "$CUDA_ROOT_DIR/.ready-nvcc" nvcc; then
    cuda_log "preparing nvcc level in $CUDA_TREE"
    cuda_download "$RT_CUDA_DIR/requirements-nvcc.txt"
    # Built beside the tree and swapped in at the end: a build still using the old tree (another
    # checkout's check, say) loses it for a moment only, not for the whole preparation.
    local new=$CUDA_TREE/root.new
    rm -rf "$CUDA_TREE/staging" "$new" "$CUDA_TREE"/root.old.*
    cuda_unpack "$RT_CUDA_DIR/requirements-nvcc.txt" "$CUDA_TREE/staging"
    mv "$CUDA_TREE/staging/nvidia/cu13" "$new"
    rm -rf "$CUDA_TREE/staging"
    ln -sfn lib "$new/lib64"
    cuda_link_names "$new"
    "$new/bin/nvcc" --version | grep -q 'release 13\.0,' \
      || { cuda_log "unexpected nvcc: $("$new/bin/nvcc" --version | tail -2)"; return 1; }
    cuda_stamp_value nvcc >"$new/.ready-nvcc"
    [ -d "$CUDA_ROOT_DIR" ] && mv "$CUDA_ROOT_DIR" "$CUDA_TREE/root.old.$$"
    mv "$new" "$CUDA_ROOT_DIR"
    rm -rf "$CUDA_TREE/root.old.$$"
  fi
  if ! cuda_stamp_ok "$CUTLASS_DIR/.git/retouch-ready" cutlass; then
    mkdir -p "$(dirname "$CUTLASS_DIR")"
    cuda_prepare_cutlass
  fi
  if [ "$level" = full ] && ! cuda_stamp_ok "$CUDA_ROOT_DIR/.ready-full" full; then
    cuda_log "preparing full level in $CUDA_TREE"
    cuda_download "$RT_CUDA_DIR/requirements-libs.txt"
    cuda_download "$RT_CUDA_DIR/requirements-cudnn.txt"
    rm -rf "$CUDA_TREE/staging"
    cuda_unpack "$RT_CUDA_DIR/requirements-libs.txt" "$CUDA_TREE/staging"
    cp -a "$CUDA_TREE/staging/nvidia/cu13/." "$CUDA_ROOT_DIR/"
    rm -rf "$CUDA_TREE/staging"
    # cuDNN's wheel is laid out as nvidia/cudnn/{include,lib}, with libcudnn*.so.9 only.
    cuda_unpack "$RT_CUDA_DIR/requirements-cudnn.txt" "$CUDA_TREE/staging" nvidia/cudnn/ 1
    cp -a "$CUDA_TREE/staging/lib/." "$CUDA_ROOT_DIR/lib/"
    cp -a "$CUDA_TREE/staging/include/." "$CUDA_ROOT_DIR/include/"
    rm -rf "$CUDA_TREE/staging"
    [ -e "$CUDA_ROOT_DIR/lib/libcudnn.so.9" ] || { cuda_log "no libcudnn.so.9 in the cuDNN wheel"; return 1; }
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
  export NVCC=$CUDA_ROOT_DIR/bin/nvcc              # cudaforge (candle-kernels, candle-flash-attn)
  export CUDAFORGE_HOME=$CUDAFORGE_DIR             # cudaforge's CUTLASS checkout (no git clone)
  case ":$PATH:" in *":$CUDA_ROOT_DIR/bin:"*) ;; *) export PATH=$CUDA_ROOT_DIR/bin:$PATH ;; esac
  export CUDARC_CUDA_VERSION=13000                 # cudarc bindings = the toolkit = the driver's CUDA
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}  # no nvidia-smi here; 90 = H100/H200
}

# cuda_wrapper NAME: install deploy/cuda/NAME.sh as <tree>/bin/NAME (refreshed when the
# repository's copy differs) and print that path. The nvcc wrappers (nvcc-check, nvcc-cache) live
# there so that NVCC has the same value from any checkout (it is part of cargo's build-script
# fingerprint) and cudaforge, which takes CUDA_HOME to be NVCC's ../, finds include/.
cuda_wrapper() {
  local src=$RT_CUDA_DIR/$1.sh dst=$CUDA_ROOT_DIR/bin/$1 tmp
  if ! cmp -s "$src" "$dst"; then
    tmp=$(mktemp "$dst.XXXXXX")
    cp "$src" "$tmp" && chmod 755 "$tmp" && mv "$tmp" "$dst"
  fi
  echo "$dst"
}

cuda_print_env() {
  local v
  for v in CUDA_HOME NVCC CUDAFORGE_HOME PATH CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP; do
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
