#!/usr/bin/env python3
"""Turn the results of deploy/cuda/device-check.sh into a markdown section for docs/benchmarks.md.

    deploy/cuda/report.py --res DIR [--out REPORT.md]

Reads from DIR (whatever is there; missing pieces are reported as missing):
  env.json                     GPU, driver, torch, cuDNN, retouch build facts, the levers run
  steps.tsv                    step, status, seconds
  matmul.json                  f16/bf16 8192^3 matmul rates (bench/diffusers_bench.py --matmul)
  parity-*.json, parity-*.md   deploy/cuda/parity.py results, one pair per lever and dtype
  retouch-bench-LEVER-bN.json  `retouch bench --json` per lever and images-per-call N
                               (retouch-bench-bN.json: a run without levers, shown as "default")
  mem-retouch-LEVER-bN.log     nvidia-smi memory.used samples (MiB) during that bench
  diffusers.json, mem-diffusers.log   bench/diffusers_bench.py
  ncu.csv                      ncu --csv of the convolution kernels of a short cuDNN run
  cudnn-api.log                cuDNN's API log of the same run (when ncu was not usable)
  ncu-unavailable.txt          why ncu did not run
FLOPs: the analytic UNet count (deploy/cuda/unet_flops.py) for batch 3N at the bench size; the
edit's rate counts only the UNet's 3N-batch calls (steps x one call), not CLIP or the VAE.
Ratios to diffusers are retouch's time / diffusers' time at the same N (> 1: retouch slower).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import Counter, defaultdict
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


BENCH_NAME = re.compile(r"retouch-bench-(?:(?P<lever>.+)-)?b(?P<n>\d+)\.json$")
# Kernel names of tensor-core code: cuDNN/CUTLASS/cuBLAS name their MMA kernels after the
# instruction or generation (hmma, gmma/wgmma, xmma, s16816, tensorop, sm80/sm90 ...).
TENSOR_NAME = re.compile(r"hmma|gmma|xmma|tensorop|tensor_op|s16816|h16816|s1688|h1688|884|sm80|sm86|sm89|sm90|"
                         r"cutlass|wgmma|_tc_|imma", re.I)


def lever_order(env, found):
    names = [lv.split(":", 1)[0] for lv in env.get("levers", [])]
    return [n for n in names if n in found] + sorted(set(found) - set(names))


def lever_desc(env):
    out = {}
    for lv in env.get("levers", []):
        parts = lv.split(":")
        if len(parts) == 3:
            out[parts[0]] = f"--conv {parts[1]} --attention {parts[2]}"
    return out


def ncu_section(res: Path):
    """Markdown lines about the convolution kernels from ncu.csv, or None."""
    try:
        text = (res / "ncu.csv").read_text(errors="replace")
    except OSError:
        return None
    start = text.find('"ID"')
    if start < 0:
        return None
    launches = defaultdict(dict)
    for row in csv.DictReader(io.StringIO(text[start:])):
        try:
            kid = int(row.get("ID", ""))
        except ValueError:
            continue
        d = launches[kid]
        d["name"] = row.get("Kernel Name", "?")
        val = (row.get("Metric Value") or "").replace(",", "")
        scale = {"usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(row.get("Metric Unit", ""), 1.0)  # -> ns
        try:
            d[row.get("Metric Name", "?")] = float(val) * scale
        except ValueError:
            pass
    if not launches:
        return None
    tensor_metrics = sorted({m for d in launches.values() for m in d if "tensor" in m})
    per = defaultdict(lambda: {"n": 0, "ns": 0.0, "tensor": Counter()})
    for d in launches.values():
        e = per[d["name"]]
        e["n"] += 1
        e["ns"] += d.get("gpu__time_duration.sum", 0.0)
        for m in tensor_metrics:
            e["tensor"][m] += d.get(m, 0.0)
    lines = [f"ncu profiled {len(launches)} launches of convolution kernels (names matching "
             f"fprop/conv/implicit/winograd/cudnn) in a 1-step edit with `--conv cudnn`; tensor-pipe counters: "
             + (", ".join(f"`{m}`" for m in tensor_metrics) if tensor_metrics else "none offered by this ncu") + ".", "",
             "| kernel | launches | GPU time ms | tensor cores |" + "".join(f" `{m}` |" for m in tensor_metrics),
             "|---|---|---|---|" + "---|" * len(tensor_metrics)]
    n_tc = 0
    for name, e in sorted(per.items(), key=lambda kv: -kv[1]["ns"]):
        if tensor_metrics:
            tc = any(v > 0 for v in e["tensor"].values())
            verdict = "yes (counters)" if tc else "no (counters 0)"
        else:
            tc = bool(TENSOR_NAME.search(name))
            verdict = "yes (by name)" if tc else "not by name"
        n_tc += e["n"] if tc else 0
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| `{short}` | {e['n']} | {e['ns'] / 1e6:.3f} | {verdict} |"
                     + "".join(f" {e['tensor'][m]:,.0f} |" for m in tensor_metrics))
    lines += ["", f"**{n_tc} of {len(launches)} profiled launches ran on tensor cores.**"]
    return lines


def cudnn_log_section(res: Path):
    """Markdown lines summarising cuDNN's API log (algorithm, math type per forward call), or None."""
    try:
        text = (res / "cudnn-api.log").read_text(errors="replace")
    except OSError:
        return None
    blocks = re.split(r"\n(?=I! CuDNN)", text)
    funcs, combos, version = Counter(), Counter(), None
    for b in blocks:
        m = re.search(r"CuDNN \(v(\d+)[^)]*\) function (\w+)\(\)", b)
        if not m:
            continue
        version = version or m.group(1)
        funcs[m.group(2)] += 1
        if m.group(2) == "cudnnConvolutionForward":
            x = re.search(r"xDesc:.*?dataType:[^\n]*val=(\w+)", b, re.S)
            math = re.search(r"mathType:[^\n]*val=(\w+)", b)
            algo = re.search(r"\balgo:[^\n]*val=(\w+)", b)
            combos[(x.group(1) if x else "?", math.group(1) if math else "?", algo.group(1) if algo else "?")] += 1
    lines = [f"cuDNN API log (CUDNN_LOGLEVEL_DBG=3) of a 1-step edit with `--conv cudnn`"
             + (f", cuDNN v{version}" if version else "") + f": {sum(funcs.values())} logged calls."]
    if not funcs:
        lines.append("No cuDNN call was logged (a CPU run, or the binary does not use cuDNN).")
        return lines
    if combos:
        lines += ["", "| input type | math type | algorithm | forward calls |", "|---|---|---|---|"]
        for (dt, math, algo), n in combos.most_common():
            lines.append(f"| {dt} | {math} | {algo} | {n} |")
        lines += ["", "`CUDNN_TENSOR_OP_MATH*` with f16 input allows tensor-core kernels; the log does not name the "
                      "kernel that ran (ncu does)."]
    lines += ["", "Calls per function: " + ", ".join(f"`{f}` {n}" for f, n in funcs.most_common(12)) + "."]
    return lines


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
        f"* retouch: {env.get('retouch_version', '?')}, `--features {env.get('build', {}).get('features', 'cuda')}`, "
        f"CUDA 13.0 wheels (linked against cuDNN {env.get('build', {}).get('cudnn', '?')}), "
        f"PTX {env.get('ptx_targets', '?')}; libraries at run time: {env.get('libs', '?')}; "
        f"cuDNN at run time: pip nvidia-cudnn-cu13 {env.get('nvidia-cudnn-cu13', '?')}.",
        f"* Matmul rate measured here (torch, 8192³, median of 10): f16 {fmt(f16, '.0f')} TFLOP/s, "
        f"bf16 {fmt(rates.get('bf16', {}).get('tflops'), '.0f')} TFLOP/s. The percentages below are of the f16 rate.",
    ]

    retouch = {}  # (lever, N) -> bench JSON
    for p in sorted(res.glob("retouch-bench-*.json")):
        m = BENCH_NAME.search(p.name)
        d = load(p)
        if m and d:
            retouch[(m.group("lever") or "default", int(d.get("batch", m.group("n"))))] = d
    levers = lever_order(env, {lv for lv, _ in retouch})
    desc = lever_desc(env)
    diff = load(res / "diffusers.json") or {}
    dbatch = {int(k): v for k, v in diff.get("batches", {}).items()}
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

    def kernels_of(d):
        k = d.get("kernels") or {}
        return f"{k.get('conv', '?')}/{k.get('attention', '?')}" if k else "?"

    def median(stages, name):
        return (stages.get(name) or {}).get("median_s")

    def ratio(a, b):
        return f"{a / b:.2f}×" if (a and b) else "–"

    # The lever table: what each lever buys, against diffusers on the same GPU in the same run.
    lines += ["", f"### Levers: edit at {size}×{size}, {steps} steps, Euler-ancestral (retouch {', '.join(levers) or '–'} vs "
                  f"diffusers {diff.get('versions', {}).get('diffusers', '')} {diff.get('dtype', '')} SDPA)", "",
              "| lever | conv/attention used | images per call N | UNet step s (batch 3N) | edit s | images/s "
              "| peak GPU MiB | UNet step vs diffusers | edit vs diffusers |",
              "|---|---|---|---|---|---|---|---|---|"]
    for lv in levers:
        for n in sorted(n for (l2, n) in retouch if l2 == lv):
            d = retouch[(lv, n)]
            st = d.get("stages", {})
            unet, edit = median(st, "unet_call"), median(st, "edit")
            m = mem_peak(res / f"mem-retouch-{lv}-b{n}.log") or mem_peak(res / f"mem-retouch-b{n}.log")
            dst = (dbatch.get(n) or {}).get("stages", {})
            name = f"{lv}" + (f" (`{desc[lv]}`)" if lv in desc else "")
            lines.append(f"| {name} | {kernels_of(d)} | {n} | {fmt(unet, '.4f')} | {fmt(edit)} | "
                         f"{fmt(n / edit if edit else None, '.2f')} | {f'{m[0]:,}' if m else '–'} | "
                         f"{ratio(unet, median(dst, 'unet_call'))} | {ratio(edit, median(dst, 'edit'))} |")
    for n, e in sorted(dbatch.items()):
        st = e["stages"]
        unet, edit = median(st, "unet_call"), median(st, "edit")
        alloc = e.get("max_memory_allocated_mib")
        lines.append(f"| diffusers ({diff.get('attention_processor', 'SDPA')}) | torch | {n} | {fmt(unet, '.4f')} | "
                     f"{fmt(edit)} | {fmt(n / edit if edit else None, '.2f')} | "
                     f"{f'{alloc:,.0f} (torch max allocated)' if alloc is not None else '–'} | 1.00× | 1.00× |")
    if not retouch and not dbatch:
        lines.append("| (no benchmark results) | | | | | | | | |")
    lines += ["", "Peak GPU MiB for retouch: nvidia-smi memory.used during the run minus the first sample "
                  "(100 ms polling). Ratios: retouch time / diffusers time at the same N."]

    lines += ["", f"### Edit at {size}×{size}, {steps} steps, Euler-ancestral, guidance 7.5 / 1.5: rates", "",
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

    for lv in levers:
        for n in sorted(n for (l2, n) in retouch if l2 == lv):
            d = retouch[(lv, n)]
            m = mem_peak(res / f"mem-retouch-{lv}-b{n}.log") or mem_peak(res / f"mem-retouch-b{n}.log")
            stages = {k: {"median_s": v["median_s"]} for k, v in d.get("stages", {}).items()}
            lines.append(row(f"retouch {lv} ({d.get('dtype', '?')}, {kernels_of(d)})", n, stages,
                             f"{m[0]:,}" if m else "–", d.get("load_seconds")))
    dm = mem_peak(res / "mem-diffusers.log")
    for n, e in sorted(dbatch.items()):
        alloc = e.get("max_memory_allocated_mib")
        peak = f"{alloc:,.0f} (torch max allocated)" if alloc is not None else "–"
        lines.append(row(f"diffusers {diff.get('versions', {}).get('diffusers', '')} (torch, {diff.get('dtype', '?')})", n,
                         e["stages"], peak, diff.get("load_s")))
    if dm:
        lines += ["", f"diffusers process, whole run: nvidia-smi peak {dm[0]:,} MiB above the idle card "
                      f"(one process for all batch sizes; attention: {diff.get('attention_processor', '?')})."]

    lines += ["", "Stage medians, seconds (warm-up 1, 3 timed runs; edit: 1 run):", "",
              "| implementation | N | text_encode | vae_encode | unet_call | vae_decode | edit |", "|---|---|---|---|---|---|---|"]
    for lv in levers:
        for n in sorted(n for (l2, n) in retouch if l2 == lv):
            st = retouch[(lv, n)].get("stages", {})
            lines.append(f"| retouch {lv} | {n} | " + " | ".join(fmt(st.get(k, {}).get("median_s"), ".4f") for k in
                                                                 ("text_encode", "vae_encode", "unet_call", "vae_decode", "edit")) + " |")
    for n, e in sorted(dbatch.items()):
        st = e["stages"]
        lines.append(f"| diffusers | {n} | " + " | ".join(fmt(st.get(k, {}).get("median_s"), ".4f") for k in
                                                         ("text_encode", "vae_encode", "unet_call", "vae_decode", "edit")) + " |")

    lines += ["", "### Convolution kernels: tensor cores?", ""]
    tc = ncu_section(res)
    if tc is None:
        why = (res / "ncu-unavailable.txt")
        if why.exists():
            lines += [why.read_text().strip() + ".", ""]
        tc = cudnn_log_section(res) or ["(no ncu or cuDNN log results)"]
    lines += tc

    lines += ["", "### Parity (tests/fixtures, against the diffusers CPU float32 goldens)", ""]
    summary = []
    for p in sorted(res.glob("parity-*.json")):
        d = load(p) or {}
        rows = d.get("rows", [])
        ok = [r for r in rows if r.get("max") is not None]
        levers_used = " ".join(x for x in (f"--conv {d['conv']}" if d.get("conv") else "",
                                           f"--attention {d['attention']}" if d.get("attention") else "") if x)
        summary.append(f"| {d.get('device', '?')} | {d.get('dtype', '?')} | {levers_used or 'auto'} | {len(ok)}/{len(rows)} | "
                       f"{sum(r['max'] <= 2 for r in ok)} | {max((r['max'] for r in ok), default='–')} | "
                       f"{fmt(sum(r['mean'] for r in ok) / len(ok) if ok else None, '.4f')} |"
                       + ("" if d.get("complete", True) else " (cut short)"))
    if summary:
        lines += ["| device | dtype | levers | images ran | within 2/255 | worst max \\|Δ\\| | mean \\|Δ\\| |",
                  "|---|---|---|---|---|---|---|"] + summary + [""]
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
