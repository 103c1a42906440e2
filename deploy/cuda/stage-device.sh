#!/usr/bin/env bash
# deploy/cuda/stage-device.sh: prepare what deploy/cuda/device-check.sh needs on a lent GPU
# machine (no network there), in .cache/gpu/ (ignored by git through /.cache, carried by the
# device tool with carry [".cache/gpu"]):
#   retouch.xz                      the CUDA build with every lever (deploy/cuda/build.sh
#                                   --stage: cuda,cudnn,flash-attn), xz; build-info.txt beside it
#                                   (features, compute capability, nvcc, the cuDNN linked against)
#   whl/diffusers-0.42.1-*.whl      diffusers for the baseline (the image has torch, transformers,
#                                   accelerate, safetensors, huggingface_hub, but no diffusers)
#   bpe_simple_vocab_16e6.txt.gz    CLIP merges for tests/fixtures/make_full_checkpoint.py, from
#                                   the open-clip-torch 3.3.0 wheel (sha256-checked there)
# Not staged: the CUDA libraries (cuBLAS, cudart, cuDNN: hundreds of MB). The device image's
# Python has them as pip packages (nvidia/cu13/lib, nvidia/cudnn/lib: torch 2.11's cuDNN
# 9.19.0.56, the version linked against here); device-check.sh finds and records them.
# Then checks that the working tree plus .cache/gpu stay under the tool's 64 MiB and prints the
# `run` call (docs/gpu.md "Device check").
#   deploy/cuda/stage-device.sh [--no-build]    # --no-build: keep an existing retouch.xz
# The feature set is build.sh's (RETOUCH_CUDA_FEATURES, default cuda,cudnn,flash-attn).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
STAGE=.cache/gpu
RETOUCH_CACHE=${RETOUCH_CACHE:-${HOME:-/root}/.cache/retouch}
DIFFUSERS=diffusers==0.42.1
OPEN_CLIP=3.3.0
BPE_SHA256=924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a
mkdir -p "$STAGE/whl"

if [ "${1:-}" != --no-build ] || [ ! -f "$STAGE/retouch.xz" ]; then
  deploy/cuda/build.sh --stage "$STAGE"
fi

if ! ls "$STAGE"/whl/diffusers-0.42.1-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$DIFFUSERS" -d "$STAGE/whl"
fi

if [ ! -f "$STAGE/bpe_simple_vocab_16e6.txt.gz" ]; then
  whl=$RETOUCH_CACHE/open_clip_torch-$OPEN_CLIP-py3-none-any.whl
  [ -f "$whl" ] || python3 -m pip download --quiet --no-deps --only-binary=:all: \
    "open-clip-torch==$OPEN_CLIP" -d "$RETOUCH_CACHE"
  python3 - "$whl" "$STAGE/bpe_simple_vocab_16e6.txt.gz" "$BPE_SHA256" <<'PY'
import hashlib, sys, zipfile
data = zipfile.ZipFile(sys.argv[1]).read("open_clip/bpe_simple_vocab_16e6.txt.gz")
if hashlib.sha256(data).hexdigest() != sys.argv[3]:
    sys.exit("bpe_simple_vocab_16e6.txt.gz: sha256 mismatch")
open(sys.argv[2], "wb").write(data)
PY
fi

# What travels: tracked + untracked-not-ignored files + the carried folder.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carry=$(find "$STAGE" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
limit=$((64 * 1024 * 1024))
printf 'staged in %s:\n' "$STAGE"
find "$STAGE" -type f -printf '  %p  %s bytes\n'
awk -v t="$tree" -v c="$carry" 'BEGIN {printf "working tree %.1f MiB + carry %.1f MiB = %.1f MiB (limit 64 MiB)\n", t / 1048576, c / 1048576, (t + c) / 1048576}'
if [ $((tree + carry)) -ge $limit ]; then
  echo "over the device tool's 64 MiB: ignore or remove large untracked files, or carry less." >&2
  echo "retouch.xz is $(stat -c %s "$STAGE/retouch.xz") bytes ($(sed -n 's/^features=//p' "$STAGE/build-info.txt" 2>/dev/null));" \
    "a build without flash-attn's kernels is far smaller:" >&2
  echo "  RETOUCH_CUDA_FEATURES=cuda,cudnn deploy/cuda/stage-device.sh   (device-check.sh then skips the flash lever)" >&2
  exit 1
fi
cat <<'EOF'
device tool call (docs/gpu.md):
  run(command="bash deploy/cuda/device-check.sh", carry=[".cache/gpu"], timeout_s=540)
EOF
