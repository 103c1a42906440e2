#!/usr/bin/env python3
"""Turn the results of deploy/cuda/device-check.sh into a markdown section for docs/benchmarks.md.

    deploy/cuda/report.py --res DIR [--out REPORT.md]

Reads from DIR (whatever is there; missing pieces are reported as missing):
  env.json                     GPU, driver, torch, retouch build facts
  steps.tsv                    step, status, seconds
  matmul.json                  f16/bf16 8192^3 matmul rates (diffusers_gpu_bench.py --matmul)
  parity-*.json                deploy/cuda/parity.py results
  retouch-bench-bN.json        `retouch bench --json` per images-per-call N
  mem-retouch-bN.log           nvidia-smi memory.used samples (MiB) during that bench
  diffusers.json, mem-diffusers.log   deploy/cuda/diffusers_gpu_bench.py
FLOPs: the analytic UNet count (deploy/cuda/unet_flops.py) for batch 3N at the bench size; the
edit's rate counts only the UNet's 3N-batch calls (steps x one call), not CLIP or the VAE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unet_flops  # noqa: E402


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mem_peak(path: Path):
    """(peak - first sample) MiB from an nvidia-smi memory.used log, or None."""
    try:
        vals = [int(x) for x in path.read_text().split() if x.strip().isdigit()]
    except OSError:
        return None
    return (max(vals) - vals[0], max(vals)) if vals else None


def fmt(v, spec=".3f", missing="–"):
    return missing if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = Path(args.res)
    env = load(res / "env.json") or {}
    mm = load(res / "matmul.json") or {}
    rates = mm.get("matmul", {})
    f16 = rates.get("f16", {}).get("tflops")
    lines = [f"## GPU: {env.get('gpu', '?')} ({env.get('date', '?')}, deploy/cuda/device-check.sh)", ""]
    lines += [
        f"* Device: {env.get('gpu', '?')}, driver {env.get('driver', '?')} (CUDA {env.get('driver_cuda', '?')}), "
        f"{env.get('gpu_memory', '?')}; torch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}.",
        f"* retouch: {env.get('retouch_version', '?')}, `--features cuda`, CUDA 13.0 wheels, "
        f"PTX {env.get('ptx_targets', '?')}; libraries at run time: {env.get('libs', '?')}.",
        f"* Matmul rate measured here (torch, 8192³, median of 10): f16 {fmt(f16, '.0f')} TFLOP/s, "
        f"bf16 {fmt(rates.get('bf16', {}).get('tflops'), '.0f')} TFLOP/s. The percentages below are of the f16 rate.",
    ]

    retouch = {}
    for p in sorted(res.glob("retouch-bench-b*.json")):
        d = load(p)
        if d:
            retouch[int(d["batch"])] = d
    diff = load(res / "diffusers.json") or {}
    size = next((d["size"] for d in retouch.values()), diff.get("size", 512))
    steps = next((d["steps"] for d in retouch.values()), diff.get("steps", 20))
    lat = size // 8
    cfg = dict(unet_flops.SD15_IP2P)
    model = next((d.get("model") for d in retouch.values()), None)
    try:  # the benchmarked checkpoint's own UNet config (the full-size one is SD 1.5)
        cfg.update(json.loads((Path(model) / "unet" / "config.json").read_text()))
    except (OSError, TypeError, ValueError):
        pass
    fl1 = sum(unet_flops.count(cfg, lat, lat, 1).mm.values())
    torch_fl = diff.get("unet_flops_batch3")
    lines.append(
        f"* One UNet evaluation at {size}×{size} px (latent {lat}×{lat}) = {fl1 / 1e9:.1f} GFLOP per sample "
        f"(convolutions, linears, attention matmuls; deploy/cuda/unet_flops.py"
        + (f"; torch FlopCounterMode on the diffusers UNet: {torch_fl / 3 / 1e9:.1f}" if torch_fl else "")
        + f"). An edit of N images runs {steps} UNet calls at batch 3N: {steps} × 3N × {fl1 / 1e9:.1f} GFLOP.")
    lines += ["", f"### Edit at {size}×{size}, {steps} steps, Euler-ancestral, guidance 7.5 / 1.5", "",
              "| implementation | images per call | edit s | images/s | s/step | UNet call s (batch 3N) "
              "| UNet call TFLOP/s | % of f16 matmul | edit TFLOP/s (UNet only) | % | peak GPU MiB (nvidia-smi) | load s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, n, stages, peak, load_s):
        edit = stages.get("edit", {}).get("median_s")
        unet = stages.get("unet_call", {}).get("median_s")
        fl = 3 * n * fl1
        call_rate = fl / unet / 1e12 if unet else None
        edit_rate = steps * fl / edit / 1e12 if edit else None
        pct = (lambda r: fmt(100 * r / f16, ".1f") if (r and f16) else "–")
        return (f"| {name} | {n} | {fmt(edit)} | {fmt(n / edit if edit else None, '.2f')} | "
                f"{fmt(edit / steps if edit else None, '.4f')} | {fmt(unet, '.4f')} | {fmt(call_rate, '.0f')} | "
                f"{pct(call_rate)} | {fmt(edit_rate, '.0f')} | {pct(edit_rate)} | {peak} | {fmt(load_s, '.1f')} |")

    for n, d in sorted(retouch.items()):
        m = mem_peak(res / f"mem-retouch-b{n}.log")
        stages = {k: {"median_s": v["median_s"]} for k, v in d.get("stages", {}).items()}
        lines.append(row(f"retouch (candle, {d.get('dtype', '?')})", n, stages,
                         f"{m[0]:,}" if m else "–", d.get("load_seconds")))
    dm = mem_peak(res / "mem-diffusers.log")
    for n, e in sorted(((int(k), v) for k, v in diff.get("batches", {}).items())):
        alloc = e.get("max_memory_allocated_mib")
        peak = f"{alloc:,.0f} (torch max allocated)" if alloc is not None else "–"
        lines.append(row(f"diffusers {diff.get('versions', {}).get('diffusers', '')} (torch, {diff.get('dtype', '?')})", n,
                         e["stages"], peak, diff.get("load_s")))
    if dm:
        lines += ["", f"diffusers process, whole run: nvidia-smi peak {dm[0]:,} MiB above the idle card "
                      f"(one process for all batch sizes; attention: {diff.get('attention_processor', '?')})."]
    if not retouch and not diff.get("batches"):
        lines.append("| (no benchmark results) | | | | | | | | | | | |")

    lines += ["", "Stage medians, seconds (warm-up 1, 3 timed runs; edit: 1 run):", "",
              "| implementation | N | text_encode | vae_encode | unet_call | vae_decode | edit |", "|---|---|---|---|---|---|---|"]
    for n, d in sorted(retouch.items()):
        st = d.get("stages", {})
        lines.append(f"| retouch | {n} | " + " | ".join(fmt(st.get(k, {}).get("median_s"), ".4f") for k in
                                                       ("text_encode", "vae_encode", "unet_call", "vae_decode", "edit")) + " |")
    for n, e in sorted(((int(k), v) for k, v in diff.get("batches", {}).items())):
        st = e["stages"]
        lines.append(f"| diffusers | {n} | " + " | ".join(fmt(st.get(k, {}).get("median_s"), ".4f") for k in
                                                         ("text_encode", "vae_encode", "unet_call", "vae_decode", "edit")) + " |")

    lines += ["", "### Parity (tests/fixtures, against the diffusers CPU float32 goldens)", ""]
    any_parity = False
    for p in sorted(res.glob("parity-*.md")):
        any_parity = True
        lines += [p.read_text().replace("### ", "#### ", 1).rstrip(), ""]
    if not any_parity:
        lines.append("(no parity results)")

    steps_tsv = res / "steps.tsv"
    if steps_tsv.exists():
        lines += ["", "### Steps of this run", "", "| step | status | seconds |", "|---|---|---|"]
        for line in steps_tsv.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                lines.append(f"| {parts[0]} | {parts[1]} | {parts[2]} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
