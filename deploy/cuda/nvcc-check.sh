#!/usr/bin/env bash
# deploy/cuda/nvcc-check.sh: the `nvcc` that deploy/cuda/check.sh hands to cargo (through NVCC,
# which cudaforge reads), so that `cargo check --features flash-attn` stays cheap.
#
# `cargo check` still runs build scripts: candle-flash-attn's compiles 52 FlashAttention-2
# kernels with nvcc (hours on two cores) and candle-kernels' compiles the static MoE/GGUF kernel
# library libmoe.a for the target architecture (most of a cold check's time, once per feature
# set). A check never links, so for those sources -- a `-c` compile of a .cu file under a
# `candle-flash-attn*/kernels/` folder, or of candle-kernels' `src/moe/`, `src/mmq_gguf/` or
# `src/mmvq_gguf.cu` -- this writes an empty host object to the `-o` path instead of compiling.
# Everything else runs the real nvcc, $RETOUCH_REAL_NVCC: above all candle-kernels' PTX of every
# kernel retouch runs (`--ptx`), so a toolkit/kernel incompatibility still shows, and
# `--version` and the `--lib` steps that archive the empty objects. deploy/cuda/build.sh
# compiles all of them for real.
#
# check.sh installs this file as <toolkit>/bin/nvcc-check (a fixed path: cudaforge derives the
# toolkit's include/ from it, and the NVCC value is part of cargo's build-script fingerprint).
# Never use it for a build that links: the objects it fakes would leave the kernels undefined.
# RETOUCH_NVCC_CHECK_LOG, if set: a file that gets one line per faked kernel.
set -euo pipefail

real=${RETOUCH_REAL_NVCC:?RETOUCH_REAL_NVCC: the real nvcc (deploy/cuda/check.sh sets it)}
out="" src="" compile=0 prev=""
for a in "$@"; do
  case $prev in -o|--output-file) out=$a ;; esac
  case $a in
    -c|--compile) compile=1 ;;
    *.cu) src=$a ;;
  esac
  prev=$a
done

if [ "$compile" = 1 ] && [ -n "$out" ] && [ -n "$src" ]; then
  case $src in /*) abs=$src ;; *) abs=$PWD/$src ;; esac
  case $abs in
    */candle-flash-attn*/kernels/*.cu | */candle-kernels-*/src/moe/*.cu | */candle-kernels-*/src/mmq_gguf/*.cu \
      | */candle-kernels-*/src/mmvq_gguf.cu)
      # An empty, valid ELF object, so that `nvcc --lib` can archive it.
      "${NVCC_CCBIN:-cc}" -x c -c -o "$out" /dev/null
      [ -n "${RETOUCH_NVCC_CHECK_LOG:-}" ] && printf 'faked %s -> %s\n' "$abs" "$out" >>"$RETOUCH_NVCC_CHECK_LOG"
      exit 0
      ;;
  esac
fi
exec "$real" "$@"
