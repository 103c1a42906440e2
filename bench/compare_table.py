#!/usr/bin/env python3
"""Render bench/cpu_compare.sh's results as a markdown table (stdout).

    bench/compare_table.py OUT_DIR      # reads OUT_DIR/{retouch,diffusers}-DTYPE-bN.json

One row per (dtype, batch, stage): median wall seconds of retouch and diffusers and the ratio
diffusers / retouch (> 1: retouch is faster); then peak RSS of each process per batch.
"""

import json
import re
import sys
from pathlib import Path

STAGES = ["text_encode", "vae_encode", "unet_call", "vae_decode", "edit"]


def diffusers_batch(report: dict, n: int) -> dict:
    """bench/diffusers_bench.py's entry for batch n (cpu_compare.sh runs one process per n)."""
    return report["batches"][str(n)]


def main() -> None:
    out = Path(sys.argv[1])
    runs = sorted(
        (m.group(1), int(m.group(2)))
        for p in out.glob("retouch-*.json")
        if (m := re.match(r"retouch-(f32|bf16)-b(\d+)\.json", p.name))
    )
    rows = ["| dtype | batch | stage | retouch (s) | diffusers (s) | diffusers / retouch |", "|---|---:|---|---:|---:|---:|"]
    memory = [
        "| dtype | batch | retouch peak RSS (MiB) | diffusers peak RSS (MiB) | retouch / diffusers |",
        "|---|---:|---:|---:|---:|",
    ]
    for dtype, n in runs:
        ours = json.loads((out / f"retouch-{dtype}-b{n}.json").read_text())
        theirs_path = out / f"diffusers-{dtype}-b{n}.json"
        theirs = json.loads(theirs_path.read_text()) if theirs_path.exists() else None
        their_stages = diffusers_batch(theirs, n)["stages"] if theirs else {}
        for stage in STAGES:
            if stage not in ours["stages"]:
                continue
            a = ours["stages"][stage]["median_s"]
            b = their_stages[stage]["median_s"] if stage in their_stages else None
            rows.append(
                f"| {dtype} | {n} | {stage} | {a:.2f} | {b:.2f} | {b / a:.2f}× |" if b else f"| {dtype} | {n} | {stage} | {a:.2f} | – | – |"
            )
        # Both in MiB: retouch's peak_rss_mb and the diffusers process's peak_rss_mib.
        pa = ours["peak_rss_mb"]
        pb = theirs["peak_rss_mib"] if theirs else None
        memory.append(f"| {dtype} | {n} | {pa:.0f} | {pb:.0f} | {pa / pb:.2f} |" if pb else f"| {dtype} | {n} | {pa:.0f} | – | – |")
    print("\n".join(rows))
    print()
    print("\n".join(memory))


if __name__ == "__main__":
    main()
