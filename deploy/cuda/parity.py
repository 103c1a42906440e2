#!/usr/bin/env python3
"""Run the diffusers parity fixtures (tests/fixtures/cases.json) through the `retouch` binary.

    deploy/cuda/parity.py --retouch BIN [--device cuda:0] [--dtype f16|f32] [--cases a,b]
                          [--conv auto|cudnn|im2col] [--attention auto|flash|math]
                          [--json OUT.json] [--markdown OUT.md] [--work DIR] [--timeout S]

Each image of each case is one `retouch edit` (a batch case's images run one by one: the results
are batch-invariant, and diffusers seeds one generator per image). `scheduler_overrides` are
applied by pointing --model at a copy of the checkpoint whose scheduler_config.json has them
(the parity test merges them into the same config). The output PNG is compared with the
diffusers golden: max |Δ|, mean |Δ| and the number of channel values beyond 2/255 (the CPU
acceptance bound).

--dtype: passed as `retouch edit --dtype X`; `default` leaves the binary's choice (f16 on
CUDA, f32 on the CPU). --conv/--attention: passed to `retouch edit` as they are (the GPU levers,
docs/gpu.md); not given, the binary's `auto` applies.

Standard library only (the PNG reader is below), so it runs under any python3 >= 3.8.
Exit status: 0 when every case ran (whatever the differences), 1 when a run failed, 2 on usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 2


# ---- PNG (8-bit gray/RGB/RGBA, non-interlaced) -----------------------------------------------

def read_png(path: Path) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if ihdr is None:
        raise ValueError(f"{path}: no IHDR")
    w, h, depth, color, _, _, interlace = ihdr
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"{path}: unsupported PNG (depth {depth}, color type {color}, interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = w * channels
    out = bytearray(h * stride)
    prev = bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
            elif f != 0:
                raise ValueError(f"{path}: bad filter {f}")
        out[y * stride:(y + 1) * stride] = line
        prev = line
    if channels == 3:
        return w, h, bytes(out)
    rgb = bytearray()
    for i in range(0, len(out), channels):
        px = out[i:i + channels]
        rgb += bytes(px[:3]) if channels == 4 else bytes([px[0]] * 3)
    return w, h, bytes(rgb)


def compare(a: Path, b: Path) -> dict:
    wa, ha, pa = read_png(a)
    wb, hb, pb = read_png(b)
    if (wa, ha) != (wb, hb):
        return {"size": f"{wa}x{ha} vs {wb}x{hb}", "max": None, "mean": None, "beyond": None}
    diffs = [abs(x - y) for x, y in zip(pa, pb)]
    return {
        "size": f"{wa}x{ha}",
        "max": max(diffs),
        "mean": sum(diffs) / len(diffs),
        "beyond": sum(d > TOLERANCE for d in diffs),
    }


# ---- driver ------------------------------------------------------------------------------------

def model_dir(fixtures: Path, case: dict, work: Path) -> Path:
    """The case's checkpoint, or a copy whose scheduler config carries the overrides."""
    src = fixtures / case["model"]
    overrides = case.get("scheduler_overrides") or {}
    if not overrides:
        return src
    dst = work / "models" / case["name"]
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "scheduler":
            os.symlink(entry.resolve(), dst / entry.name)
    (dst / "scheduler").mkdir()
    cfg = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    cfg.update(overrides)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dst


EDIT_LINE = re.compile(r"load ([0-9.]+) s, edit ([0-9.]+) s")


def run_case(args, fixtures: Path, case: dict, work: Path, dtype_flag: list[str]) -> list[dict]:
    rows = []
    model = model_dir(fixtures, case, work)
    for i, (image, instruction, seed, expected) in enumerate(
            zip(case["images"], case["instructions"], case["seeds"], case["expected"])):
        out = work / "out" / f"{case['name']}_{i}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.unlink()
        cmd = [args.retouch, "edit", "--model", str(model), "--image", str(fixtures / image),
               "--instruction", instruction, "--output", str(out), "--device", args.device,
               "--seed", str(seed), "--steps", str(case["steps"]), "--scheduler", case["scheduler"],
               "--guidance-scale", repr(case["guidance_scale"]),
               "--image-guidance-scale", repr(case["image_guidance_scale"]),
               "--max-side", str(case["max_side"])] + dtype_flag + args.lever_flags
        if case.get("variant"):
            cmd += ["--variant", case["variant"]]
        if case.get("init_latents"):
            cmd += ["--init-latents", str(fixtures / case["init_latents"])]
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            rc, stdout, stderr = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired:
            rc, stdout, stderr = "timeout", "", f"timed out after {args.timeout} s"
        wall = time.perf_counter() - t
        row = {"case": case["name"], "index": i, "wall_s": wall, "rc": rc}
        m = EDIT_LINE.search(stdout)
        if m:
            row["load_s"], row["edit_s"] = float(m.group(1)), float(m.group(2))
        if rc == 0 and out.exists():
            row.update(compare(out, fixtures / expected))
        else:
            row["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
            if args.verbose:
                print(" ".join(cmd), "\n", stderr, file=sys.stderr)
        rows.append(row)
        status = (f"max |Δ| {row['max']:>3}  mean {row['mean']:.4f}  >{TOLERANCE}: {row['beyond']}"
                  if row.get("max") is not None else f"FAILED ({row.get('error', row.get('size'))})")
        print(f"{case['name']:>20}[{i}] {row.get('size', '?'):>8}  {status}  ({wall:.2f} s)", flush=True)
    return rows


def markdown(title: str, rows: list[dict], note: str) -> str:
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    ok = [r for r in rows if r.get("max") is not None]
    if ok:
        worst = max(ok, key=lambda r: r["max"])
        within = sum(r["max"] <= TOLERANCE for r in ok)
        edit_times = sorted(r["edit_s"] for r in ok if "edit_s" in r)
        lines += [
            f"{len(ok)}/{len(rows)} images ran; {within} within {TOLERANCE}/255 on every channel value; "
            f"worst max |Δ| {worst['max']} ({worst['case']}[{worst['index']}]); "
            f"mean |Δ| over all images {sum(r['mean'] for r in ok) / len(ok):.4f}"
            + (f"; median edit time {edit_times[len(edit_times) // 2]:.3f} s" if edit_times else "")
            + ".", "",
        ]
    lines += ["| case | size | max \\|Δ\\| | mean \\|Δ\\| | values > 2 | edit s |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = f"`{r['case']}`" + (f"[{r['index']}]" if r["index"] or r["case"].startswith("batch") else "")
        if r.get("max") is not None:
            lines.append(f"| {name} | {r['size']} | {r['max']} | {r['mean']:.4f} | {r['beyond']} | "
                         f"{r.get('edit_s', float('nan')):.3f} |")
        else:
            lines.append(f"| {name} | {r.get('size', '–')} | failed | | | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retouch", required=True, help="the retouch binary")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", choices=["default", "f16", "f32"], default="default",
                    help="default: what the binary picks (CUDA f16, CPU f32)")
    ap.add_argument("--conv", default=None, help="retouch edit --conv (auto|cudnn|im2col)")
    ap.add_argument("--attention", default=None, help="retouch edit --attention (auto|flash|math)")
    ap.add_argument("--fixtures", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per edit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--title", default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    fixtures = Path(args.fixtures)
    cases = json.loads((fixtures / "cases.json").read_text())["cases"]
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = set(wanted) - {c["name"] for c in cases}
        if unknown:
            ap.error(f"unknown cases: {sorted(unknown)}")
        cases = [c for c in cases if c["name"] in wanted]

    on_cuda = args.device.startswith("cuda")
    native = "f16" if on_cuda else "f32"
    args.lever_flags = (["--conv", args.conv] if args.conv else []) + (
        ["--attention", args.attention] if args.attention else [])
    levers = " ".join(args.lever_flags)
    title = args.title or (f"retouch on {args.device}, {args.dtype if args.dtype != 'default' else native}"
                           + (f", `{levers}`" if levers else ""))
    dtype_flag = [] if args.dtype == "default" else ["--dtype", args.dtype]

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="retouch-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []

    def write(done: bool):
        # after every case, so a run cut short still leaves its results
        total = time.perf_counter() - t0
        text = (f"`retouch edit --device {args.device}{' ' + levers if levers else ''}` per image, "
                f"against the diffusers goldens "
                f"({total:.0f} s{'' if done else f'; cut short after {len(rows)} images'}).")
        if args.json:
            Path(args.json).write_text(json.dumps({"title": title, "device": args.device, "dtype": args.dtype,
                                                   "conv": args.conv, "attention": args.attention,
                                                   "seconds": total, "complete": done, "rows": rows}, indent=2) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(markdown(title, rows, text))

    for case in cases:
        rows += run_case(args, fixtures, case, work, dtype_flag)
        write(False)
    write(True)
    ok = [r for r in rows if r.get("max") is not None]
    print(f"{len(ok)}/{len(rows)} ran in {time.perf_counter() - t0:.1f} s; worst max |Δ| "
          f"{max((r['max'] for r in ok), default='-')}; within {TOLERANCE}/255: "
          f"{sum(r['max'] <= TOLERANCE for r in ok)}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
