#!/usr/bin/env python3
"""HF diffusers' InstructPix2Pix pipeline, timed stage by stage as `retouch bench` defines its
stages: the baseline for Retouch on the CPU (bench/cpu_compare.sh) and on a GPU
(deploy/cuda/device-check.sh), with one JSON schema for both.

    bench/diffusers_bench.py --model DIR --size 256 --steps 10 --batches 1 --threads 2 --json out.json
    bench/diffusers_bench.py --model DIR --size 512 --steps 20 --batches 1,4,8 --device cuda \\
        --dtype fp16 --flops --json out.json
    bench/diffusers_bench.py --matmul --device cuda --json matmul.json      # no model needed

Stages per batch N (images of S x S px, K = --steps, guidance on: the UNet runs at batch 3N):
  text_encode   pipe._encode_prompt(N instructions, guidance on): tokenizer + CLIP text encoder on
                the N prompts and the N empty negative prompts -> embeddings [3N, 77, D]
  vae_encode    vae.encode(image [N,3,S,S] in [-1,1]).latent_dist.mode()
  unet_call     one unet(x [3N,8,S/8,S/8], t=999.0, encoder_hidden_states [3N,77,D]) call
  vae_decode    vae.decode(latents [N,4,S/8,S/8] / scaling_factor)
  edit          the whole pipe(prompt=[...]*N, image=[...]*N, num_inference_steps=K,
                guidance_scale=7.5, image_guidance_scale=1.5, EulerAncestral, output_type="pil")
Each stage: --warmup untimed runs, then --repeats timed runs (--edit-repeats for `edit`), each
ended by a device synchronisation on a GPU; median, min and max wall seconds. No safety checker
runs (retouch's bench has none either).

Memory, in MiB (2^20 bytes): on every device the process's peak RSS (getrusage ru_maxrss, and
where Linux allows, /proc/self/clear_refs + VmHWM: the peak RSS during each stage's warm-up and
timed runs); on a GPU also torch.cuda.max_memory_allocated / max_memory_reserved per batch (the
caching allocator's view; the device check also polls nvidia-smi). diffusers memory-maps
safetensors, so the RSS right after loading is low; the weights count once a stage touched them.

--matmul: the device's matmul rate first (GPU: f16 and bf16 8192^3, CUDA events, 3 warm-ups,
          median of 10; CPU: f32 and bf16 512^3, median of 3).
--flops:  torch.utils.flop_counter.FlopCounterMode over one UNet call at batch 3.
Attention: diffusers uses torch's scaled_dot_product_attention (flash/memory-efficient kernels on
a GPU); the report names the attention processor and the torch and diffusers versions.

The JSON (written after every batch, so partial results survive a kill):
  tool "diffusers", model, variant, device, dtype, size, steps, threads, warmup, repeats,
  edit_repeats, versions {python, torch, diffusers, transformers}, cpu, gpu {name, sm,
  multiprocessors, memory_gib} (CUDA only), matmul {f16|f32|bf16: {n, median_s, tflops}}
  (--matmul), unet_flops_batch3 (--flops), load_s, attention_processor, rss_after_load_mib,
  peak_rss_after_load_mib, peak_rss_mib (the whole process so far),
  batches {"N": {stages {name: {what, repeats, median_s, min_s, max_s, runs_s, peak_rss_mib}},
                 per_step_s (edit median / K), peak_rss_mib, max_memory_allocated_mib,
                 max_memory_reserved_mib (CUDA only, else null)}}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

STAGES = ["text_encode", "vae_encode", "unet_call", "vae_decode", "edit"]


def rss_now_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def reset_hwm() -> bool:
    """Resets VmHWM (and ru_maxrss) to the current RSS, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def matmul_rates(torch, device) -> dict:
    out = {}
    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    for name, dt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        if not cuda and dt == torch.float16:
            name, dt = "f32", torch.float32
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dt, generator=g)
        b = torch.randn(n, n, device=device, dtype=dt, generator=g)
        times = []
        if cuda:
            for _ in range(3):
                a @ b
            torch.cuda.synchronize()
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                a @ b
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
        else:
            for _ in range(3):
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        out[name] = {"n": n, "median_s": med, "tflops": 2 * n**3 / med / 1e12}
        del a, b
    return out


def write(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers InstructPix2Pix checkpoint directory (optional with --matmul)")
    ap.add_argument("--size", type=int, default=512, help="image side in px (multiple of 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="1", help="comma-separated images per call, e.g. 1,4,8")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per component stage")
    ap.add_argument("--edit-repeats", type=int, default=1, help="timed runs of the whole edit")
    ap.add_argument("--variant", default=None, help='weights variant, e.g. "fp16" (cast to --dtype)')
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--matmul", action="store_true", help="measure the matmul rates first")
    ap.add_argument("--flops", action="store_true", help="count one UNet call's FLOPs (torch)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.size % 8:
        ap.error("--size must be a multiple of 8")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := [s for s in stages if s not in STAGES]:
        ap.error(f"unknown stages {unknown}; known: {STAGES}")
    if not args.model and not args.matmul:
        ap.error("--model is required (unless only --matmul is wanted)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    report = {
        "tool": "diffusers",
        "model": str(Path(args.model).resolve()) if args.model else None,
        "variant": args.variant,
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "edit_repeats": args.edit_repeats,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "cpu": platform.processor() or platform.machine(),
    }
    if cuda:
        p = torch.cuda.get_device_properties(device)
        report["gpu"] = {"name": p.name, "sm": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                         "memory_gib": p.total_memory / 2**30}
    if args.matmul:
        report["matmul"] = matmul_rates(torch, device)
        print("matmul:", {k: f"{v['tflops']:.2f} TFLOP/s" for k, v in report["matmul"].items()}, flush=True)
    if not args.model:
        write(args.json, report)
        return

    import warnings

    warnings.filterwarnings("ignore")
    import diffusers
    import numpy as np
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import logging as dlog
    from PIL import Image

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    report["versions"]["diffusers"] = diffusers.__version__
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        report["versions"]["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        report["versions"]["transformers"] = None

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    kw = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if args.variant:
        kw["variant"] = args.variant
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model, **kw)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    sync()
    report["load_s"] = time.perf_counter() - t0
    report["attention_processor"] = type(next(iter(pipe.unet.attn_processors.values()))).__name__
    report["rss_after_load_mib"] = rss_now_mib()
    report["peak_rss_after_load_mib"] = peak_rss_mib()
    # getrusage's maxrss is reset by clear_refs too: keep the max of everything observed.
    observed_peaks = [report["peak_rss_after_load_mib"]]
    can_reset = reset_hwm()

    s = args.size
    vsf = pipe.vae_scale_factor
    lat_hw = (s // vsf, s // vsf)
    ctx_dim = pipe.text_encoder.config.hidden_size

    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.randn((3, pipe.unet.config.in_channels) + lat_hw, device=device, dtype=dtype)
        ctx = torch.randn((3, 77, ctx_dim), device=device, dtype=dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            pipe.unet(x, torch.tensor(999.0, device=device), encoder_hidden_states=ctx, return_dict=False)
        report["unet_flops_batch3"] = fc.get_total_flops()
        print(f"UNet FLOPs at batch 3, {s} px: {fc.get_total_flops() / 1e12:.3f} TFLOP (torch FlopCounterMode)",
              flush=True)

    print(f"diffusers {diffusers.__version__} / torch {torch.__version__}  model {args.model}  device {args.device} "
          f"{args.dtype}  threads {report['threads']}  load {report['load_s']:.2f}s", flush=True)
    report["batches"] = {}
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    base = np.stack([xx, yy, 1 - xx * yy], -1)
    t_unet = torch.tensor(999.0, device=device)
    for n in batches:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        images = [Image.fromarray((255 * np.roll(base, 17 * i, axis=1)).astype(np.uint8), "RGB") for i in range(n)]
        prompts = [f"make it look like a painting number {i}" for i in range(n)]
        g = torch.Generator("cpu").manual_seed(0)
        with torch.no_grad():
            emb = pipe._encode_prompt(prompts, device, 1, True)  # [3N, 77, D]: prompt, negative, negative
            pix = pipe.image_processor.preprocess(images).to(device=device, dtype=dtype)
            x_unet = torch.randn((3 * n, pipe.unet.config.in_channels) + lat_hw, generator=g).to(device, dtype)
            latents = torch.randn((n, pipe.vae.config.latent_channels) + lat_hw, generator=g).to(device, dtype)
        fns = {
            "text_encode": lambda: pipe._encode_prompt(prompts, device, 1, True),
            "vae_encode": lambda: pipe.vae.encode(pix).latent_dist.mode(),
            "unet_call": lambda: pipe.unet(x_unet, t_unet, encoder_hidden_states=emb, return_dict=False)[0],
            "vae_decode": lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0],
            "edit": lambda: pipe(prompt=prompts, image=images, num_inference_steps=args.steps, guidance_scale=7.5,
                                 image_guidance_scale=1.5,
                                 generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)],
                                 output_type="pil").images,
        }
        what = {
            "text_encode": f"{n}+{n} prompts -> {list(emb.shape)}",
            "vae_encode": f"{list(pix.shape)} -> [{n}, 4, {lat_hw[0]}, {lat_hw[1]}]",
            "unet_call": f"{list(x_unet.shape)}, ctx {list(emb.shape)}",
            "vae_decode": f"{list(latents.shape)} -> [{n}, 3, {s}, {s}]",
            "edit": f"{n} x {s}x{s}, {args.steps} steps EulerA, 3-way guidance",
        }
        res = {}
        for name in stages:
            reps = max(1, args.edit_repeats if name == "edit" else args.repeats)
            if can_reset:
                reset_hwm()
            times = []
            with torch.no_grad():
                for _ in range(args.warmup):
                    fns[name]()
                sync()
                for _ in range(reps):
                    t = time.perf_counter()
                    fns[name]()
                    sync()
                    times.append(time.perf_counter() - t)
            peak = hwm_mib() if can_reset else None
            if peak is not None:
                observed_peaks.append(peak)
            res[name] = {"what": what[name], "repeats": reps, "median_s": statistics.median(times),
                         "min_s": min(times), "max_s": max(times), "runs_s": times, "peak_rss_mib": peak}
        stage_peaks = [r["peak_rss_mib"] for r in res.values() if r["peak_rss_mib"] is not None]
        entry = {
            "stages": res,
            "per_step_s": res["edit"]["median_s"] / args.steps if "edit" in res else None,
            "peak_rss_mib": max(stage_peaks) if stage_peaks else peak_rss_mib(),
            "max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "max_memory_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        }
        report["batches"][str(n)] = entry
        report["peak_rss_mib"] = max(observed_peaks + [peak_rss_mib()])

        print(f"batch {n}, {s} px, {args.steps} steps")
        print(f"  {'stage':12s} {'median s':>10s} {'min s':>9s} {'max s':>9s} {'peak MiB':>9s}  what")
        for name, r in res.items():
            pk = r["peak_rss_mib"]
            print(f"  {name:12s} {r['median_s']:10.4f} {r['min_s']:9.4f} {r['max_s']:9.4f} "
                  f"{(f'{pk:.0f}' if pk is not None else '-'):>9s}  {r['what']}")
        if entry["per_step_s"] is not None:
            print(f"  edit per step: {entry['per_step_s']:.4f} s")
        if cuda:
            print(f"  GPU memory: {entry['max_memory_allocated_mib']:.0f} MiB allocated, "
                  f"{entry['max_memory_reserved_mib']:.0f} MiB reserved at most")
        print(f"  peak RSS (process so far): {report['peak_rss_mib']:.0f} MiB", flush=True)
        write(args.json, report)  # partial results survive a kill
    write(args.json, report)


if __name__ == "__main__":
    main()
