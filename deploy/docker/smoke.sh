#!/usr/bin/env bash
# deploy/docker/smoke.sh: build the worker images from the committed Dockerfiles on a machine with
# a Docker engine and no image registry, and run them as the Helm chart does.
#
# Usage:
#   deploy/docker/smoke.sh [--cpu] [--cuda]      # default: both
#
# 1. Base images from Debian's packages, no registry: `debootstrap --variant=minbase bookworm`
#    (+ ca-certificates) against the machine's Debian mirror, slimmed like debian:bookworm-slim
#    (no apt lists, docs, man pages or translations), `docker import`ed as
#    retouch-smoke/debian:bookworm-<recipe>. The root filesystem is kept as a tarball in
#    $RETOUCH_CACHE/docker (about a minute to make, seconds to re-import).
# 2. CPU image: `cargo build --release --locked -p retouch-cli` on the host, then the run-time
#    stage of deploy/docker/Dockerfile.cpu around that binary (BINARY_FROM=prebuilt,
#    RUNTIME_BASE=the base above), tagged retouch:smoke-cpu. The Dockerfile stays the one
#    description of the image; only where the binary and the base come from differ from a
#    registry build.
# 3. CUDA image: `deploy/cuda/build.sh --features cuda` (CUDA 13.0 from NVIDIA's wheels), a
#    CUDA run-time base (the Debian base + the CUDA libraries the binary NEEDs, taken from the
#    same wheels, in /usr/local/cuda/lib64 as NVIDIA's images have them), then the run-time stage
#    of Dockerfile.cuda, tagged retouch:smoke-cuda. Also builds a libcuda.so.1 whose every call
#    answers CUDA_ERROR_NO_DEVICE (a driver library on a machine without a GPU).
# 4. Runs the container tests (tests/e2e/container.rs, `--ignored`) against the test services
#    (RETOUCH_TEST_* from tests/run): the CPU image as the chart runs it (uid 10001, read-only
#    root, capabilities dropped, the model from a mounted cache) edits jobs, serves /readyz and
#    drains on SIGTERM; the CUDA image's libraries all resolve but the driver's, --help runs, the
#    worker names the missing device.
# Prints each image's size and the container's start-to-ready time.
#
# Exit status: 0 all passed; 77 no Docker engine answers (tests/run reports the step skipped);
# anything else: a failure. Needs: a Docker engine with BuildKit (Docker 23+ with buildx, or an
# older client with DOCKER_BUILDKIT=1), debootstrap (installed with apt-get when missing and
# root), the test services' environment (run through tests/run, or `eval "$(tests/run
# --services-only)"` first).
# Environment: RETOUCH_CACHE (default ~/.cache/retouch), CARGO_TARGET_DIR, RETOUCH_DEBIAN_MIRROR
# (default: the first deb.debian.org-style URI of the machine's apt sources, else
# http://deb.debian.org/debian).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RETOUCH_CACHE=${RETOUCH_CACHE:-${HOME:-/root}/.cache/retouch}
CACHE_DIR=$RETOUCH_CACHE/docker
DEBIAN_RELEASE=bookworm
# Bump when the base recipe below changes: it names the cached tarball and the image tag.
BASE_RECIPE=1
BASE_TAG=retouch-smoke/debian:$DEBIAN_RELEASE-r$BASE_RECIPE
CPU_TAG=retouch:smoke-cpu
CUDA_TAG=retouch:smoke-cuda

log() { printf '[docker-smoke] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

want_cpu=0 want_cuda=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) want_cpu=1 ;;
    --cuda) want_cuda=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ "$want_cpu$want_cuda" = 00 ] && want_cpu=1 want_cuda=1

if ! docker info >/dev/null 2>&1; then
  log "no Docker engine answers (docker info failed)"
  exit 77
fi

# --- A BuildKit builder -------------------------------------------------------------------------
# The Dockerfiles need BuildKit (per-Dockerfile ignore files; stages the target does not use are
# skipped). Docker 23+ builds with buildx; without the buildx plugin, a client of Docker <= 20.10
# still drives the engine's built-in BuildKit with DOCKER_BUILDKIT=1.
BUILD=()
pick_builder() {
  if docker buildx version >/dev/null 2>&1; then
    BUILD=(docker buildx build --load)
    return 0
  fi
  local client
  for client in $(type -ap docker); do
    if printf 'FROM scratch\nLABEL org.retouch.probe=1\n' \
        | DOCKER_BUILDKIT=1 "$client" build -q -t retouch-smoke/probe:latest - >/dev/null 2>&1; then
      BUILD=(env DOCKER_BUILDKIT=1 "$client" build)
      return 0
    fi
  done
  return 1
}
pick_builder || die "no docker client here builds with BuildKit: install the buildx plugin (Docker 23+)"
log "builder: ${BUILD[*]}"

# --- 1. The Debian base -------------------------------------------------------------------------
debian_mirror() {
  if [ -n "${RETOUCH_DEBIAN_MIRROR:-}" ]; then echo "$RETOUCH_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -1 | tr -d ' ' || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base() {
  if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "base image $BASE_TAG: present"
    return
  fi
  local tarball=$CACHE_DIR/debian-$DEBIAN_RELEASE-minbase-r$BASE_RECIPE.tar.gz t0=$SECONDS
  if [ ! -s "$tarball" ]; then
    if ! command -v debootstrap >/dev/null; then
      [ "$(id -u)" = 0 ] || die "debootstrap is missing (apt-get install debootstrap)"
      log "installing debootstrap"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    mkdir -p "$CACHE_DIR"
    local work mirror
    work=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
    mirror=$(debian_mirror)
    log "debootstrap --variant=minbase $DEBIAN_RELEASE from $mirror (about a minute)"
    debootstrap --variant=minbase --include=ca-certificates "$DEBIAN_RELEASE" "$work/root" "$mirror" \
      >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; rm -rf "$work"; die "debootstrap failed"; }
    # As debian:*-slim: no package caches, lists, documentation, man pages or translations.
    rm -rf "$work/root"/var/cache/apt/archives/*.deb "$work/root"/var/lib/apt/lists/* \
      "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/* "$work/root"/usr/share/info/* \
      "$work/root"/usr/share/locale/* "$work/root"/var/log/*.log "$work/root"/var/cache/debconf/*-old
    tar --numeric-owner -C "$work/root" -czf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$work"
  fi
  docker import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_TAG" >/dev/null
  log "base image $BASE_TAG: imported in $((SECONDS - t0)) s ($(image_size "$BASE_TAG"))"
}

image_size() {
  docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'
}

# --- The run-time stage of a Dockerfile around a host binary ------------------------------------
# build_runtime DOCKERFILE BINARY RUNTIME_BASE TAG
build_runtime() {
  local dockerfile=$1 binary=$2 base=$3 tag=$4 t0=$SECONDS
  # As the Dockerfiles' build stages: without debug info (symbols stay, so a backtrace still
  # names functions), a sixth of the release binary's size.
  install -D -m 0755 "$binary" "$REPO/deploy/docker/prebuilt/retouch"
  strip --strip-debug "$REPO/deploy/docker/prebuilt/retouch"
  "${BUILD[@]}" --quiet -f "$REPO/$dockerfile" --target runtime \
    --build-arg BINARY_FROM=prebuilt --build-arg RUNTIME_BASE="$base" -t "$tag" "$REPO" >/dev/null
  log "$tag from $dockerfile: built in $((SECONDS - t0)) s; image size $(image_size "$tag")" \
    "(base $(image_size "$base"), binary $(stat -c %s "$REPO/deploy/docker/prebuilt/retouch" | awk '{printf "%.0f MB", $1 / 1e6}'))"
  rm -f "$REPO/deploy/docker/prebuilt/retouch"
  echo "image $tag $(docker image inspect -f '{{.Size}}' "$tag") bytes"
}

# The container tests, with the test services' environment.
container_tests() {
  [ -n "${RETOUCH_TEST_AMQP_URL:-}" ] \
    || die "RETOUCH_TEST_AMQP_URL is not set: run through tests/run, or eval \"\$(tests/run --services-only)\" first"
  (cd "$REPO" && cargo test --locked -p retouch-e2e --test e2e "$1" -- --ignored --nocapture --test-threads=1)
}

ensure_base
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

if [ "$want_cpu" = 1 ]; then
  t0=$SECONDS
  (cd "$REPO" && cargo build --release --locked -p retouch-cli)
  log "cargo build --release: $((SECONDS - t0)) s"
  build_runtime deploy/docker/Dockerfile.cpu "$CARGO_TARGET_DIR/release/retouch" "$BASE_TAG" "$CPU_TAG"
  RETOUCH_TEST_IMAGE_CPU=$CPU_TAG container_tests container::cpu_image
fi

if [ "$want_cuda" = 1 ]; then
  t0=$SECONDS
  "$REPO/deploy/cuda/build.sh" --features cuda >/dev/null
  # shellcheck source=deploy/cuda/toolkit.sh
  source "$REPO/deploy/cuda/toolkit.sh"
  cuda_prepare full
  cuda_bin=${RETOUCH_CUDA_TARGET_DIR:-$RETOUCH_CACHE/target-cuda}/release/retouch
  log "deploy/cuda/build.sh --features cuda: $((SECONDS - t0)) s"

  # The CUDA run-time base: the libraries the binary NEEDs that the toolkit tree has, and the
  # ones those NEED in turn (libcublas.so.13 needs libcublasLt.so.13); libcuda.so.1 is the
  # driver's, mounted by the NVIDIA runtime. NVRTC's builtins come along when NVRTC does (it
  # dlopens them).
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  mkdir -p "$ctx/lib"
  needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
  pending=$(needed "$cuda_bin")
  while [ -n "$pending" ]; do
    next=""
    for lib in $pending; do
      if [ "$lib" != libcuda.so.1 ] && [ -e "$CUDA_ROOT_DIR/lib/$lib" ] && [ ! -e "$ctx/lib/$lib" ]; then
        cp -L "$CUDA_ROOT_DIR/lib/$lib" "$ctx/lib/"
        next="$next $(needed "$ctx/lib/$lib")"
      fi
    done
    pending=$next
  done
  if ls "$ctx"/lib/libnvrtc.so.* >/dev/null 2>&1; then
    cp -L "$CUDA_ROOT_DIR"/lib/libnvrtc-builtins.so.* "$ctx/lib/"
  fi
  recipe=$( (cd "$ctx/lib" && sha256sum -- * | sha256sum) | cut -c1-12)
  cuda_base=retouch-smoke/cuda-runtime:13.0-$DEBIAN_RELEASE-$recipe
  if ! docker image inspect "$cuda_base" >/dev/null 2>&1; then
    cat >"$ctx/Dockerfile" <<EOF
FROM $BASE_TAG
COPY lib/ /usr/local/cuda/lib64/
RUN echo /usr/local/cuda/lib64 >/etc/ld.so.conf.d/cuda.conf && ldconfig
EOF
    "${BUILD[@]}" --quiet -t "$cuda_base" "$ctx" >/dev/null
    log "CUDA run-time base $cuda_base: $(ls "$ctx/lib" | tr '\n' ' ')"
  fi
  build_runtime deploy/docker/Dockerfile.cuda "$cuda_bin" "$cuda_base" "$CUDA_TAG"

  # libcuda.so.1 of a machine without a GPU: every entry point of cuda.h answers
  # CUDA_ERROR_NO_DEVICE (100); the error-text calls describe it.
  driver=$CACHE_DIR/no-gpu-driver
  mkdir -p "$driver"
  {
    echo '#include <stddef.h>'
    grep -vE '^(cuGetErrorString|cuGetErrorName)$' "$CUDA_ROOT_DIR/lib/stubs/libcuda.symbols" \
      | sed 's/.*/int &(void) { return 100; }/'
    echo 'int cuGetErrorString(int e, const char **s) { *s = e == 100 ? "no CUDA-capable device is detected" : "unknown error"; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s) { *s = e == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN"; return 0; }'
  } >"$ctx/no_gpu_driver.c"
  gcc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$driver/libcuda.so.1" "$ctx/no_gpu_driver.c"
  chmod 0755 "$driver" "$driver/libcuda.so.1"
  RETOUCH_TEST_IMAGE_CUDA=$CUDA_TAG RETOUCH_TEST_NO_GPU_DRIVER=$driver container_tests container::cuda_image
fi
log "all image checks passed"
