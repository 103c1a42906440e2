#!/usr/bin/env python3
"""CPU timings of HF diffusers' InstructPix2Pix pipeline, stage by stage (the baseline for Retouch).

    python bench/diffusers_bench.py --model DIR --size 256 --steps 10 --batch 1 --threads 2 --json out.json

Stages (N = --batch images of S x S px, K = --steps, float32, CPU):
  text_encode   pipe._encode_prompt(N instructions, guidance on): tokenizer + CLIP text encoder on the
                N prompts and the N empty negative prompts -> embeddings [3N, 77, D]
  vae_encode    vae.encode(image [N,3,S,S] in [-1,1]).latent_dist.mode()
  unet_call     one unet(x [3N,8,S/8,S/8], t=999.0, encoder_hidden_states [3N,77,D]) call
  vae_decode    vae.decode(latents [N,4,S/8,S/8] / scaling_factor)
  edit          the whole pipe(prompt=[...]*N, image=[...]*N, num_inference_steps=K,
                guidance_scale=7.5, image_guidance_scale=1.5, EulerAncestral, output_type="pil")
Each stage: --warmup untimed runs, then --repeats timed runs (--edit-repeats for `edit`); the
median, min and max wall times are reported. Memory: peak RSS of the process (getrusage ru_maxrss)
after loading and overall, and where Linux allows (/proc/self/clear_refs + VmHWM), the peak RSS during
each stage (its warm-up and timed runs). diffusers memory-maps safetensors, so the RSS right after
loading is low; the weights count once a stage has touched them.
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


def rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="diffusers InstructPix2Pix checkpoint directory")
    ap.add_argument("--size", type=int, default=256, help="image side in px (multiple of 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="number of images edited in one call")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per component stage")
    ap.add_argument("--edit-repeats", type=int, default=1, help="timed runs of the whole edit")
    ap.add_argument("--variant", default=None, help='e.g. "fp16" (weights are upcast to float32)')
    ap.add_argument("--stages", default="text_encode,vae_encode,unet_call,vae_decode,edit")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.size % 8:
        ap.error("--size must be a multiple of 8")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import logging as dlog
    from PIL import Image

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch_dtype -> dtype rename in 0.42
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        transformers = None

    t0 = time.perf_counter()
    kw = {"torch_dtype": torch.float32}
    if args.variant:
        kw["variant"] = args.variant
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model, **kw)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    rss_after_load = rss_now_mb()
    peak_after_load = peak_rss_mb()

    n, s = args.batch, args.size
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    base = np.stack([xx, yy, 1 - xx * yy], -1)
    images = [Image.fromarray((255 * np.roll(base, 17 * i, axis=1)).astype(np.uint8), "RGB") for i in range(n)]
    prompts = [f"make it look like a painting number {i}" for i in range(n)]
    dev = torch.device("cpu")
    vsf = pipe.vae_scale_factor
    lat_hw = (s // vsf, s // vsf)
    g = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        emb = pipe._encode_prompt(prompts, dev, 1, True)
        pix = pipe.image_processor.preprocess(images)
        x_unet = torch.randn((3 * n, pipe.unet.config.in_channels) + lat_hw, generator=g)
        lat = torch.randn((n, pipe.vae.config.latent_channels) + lat_hw, generator=g)
    t_unet = torch.tensor(999.0)

    stage_fns = {
        "text_encode": lambda: pipe._encode_prompt(prompts, dev, 1, True),
        "vae_encode": lambda: pipe.vae.encode(pix).latent_dist.mode(),
        "unet_call": lambda: pipe.unet(x_unet, t_unet, encoder_hidden_states=emb, return_dict=False)[0],
        "vae_decode": lambda: pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0],
        "edit": lambda: pipe(
            prompt=prompts, image=images, num_inference_steps=args.steps, guidance_scale=7.5,
            image_guidance_scale=1.5, generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)],
            output_type="pil",
        ).images,
    }
    shapes = {
        "text_encode": f"{n}+{n} prompts -> {list(emb.shape)}",
        "vae_encode": f"{list(pix.shape)} -> [{n}, 4, {lat_hw[0]}, {lat_hw[1]}]",
        "unet_call": f"{list(x_unet.shape)}, ctx {list(emb.shape)}",
        "vae_decode": f"{list(lat.shape)} -> [{n}, 3, {s}, {s}]",
        "edit": f"{n} x {s}x{s}, {args.steps} steps EulerA, 3-way guidance",
    }

    results = {}
    can_reset = reset_hwm()
    observed_peaks = [peak_after_load]
    for name in [x.strip() for x in args.stages.split(",") if x.strip()]:
        fn = stage_fns[name]
        reps = args.edit_repeats if name == "edit" else args.repeats
        if can_reset:
            reset_hwm()
        with torch.no_grad():
            for _ in range(args.warmup):
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        results[name] = {
            "what": shapes[name],
            "repeats": reps,
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3,
            "stage_peak_rss_mb": hwm_mb() if can_reset else None,
        }
        if can_reset:
            observed_peaks.append(results[name]["stage_peak_rss_mb"])
        if name == "edit":
            results[name]["per_step_ms"] = results[name]["median_ms"] / args.steps

    report = {
        "tool": "diffusers",
        "model": str(Path(args.model).resolve()),
        "variant": args.variant,
        "size": s,
        "steps": args.steps,
        "batch": n,
        "threads": args.threads,
        "warmup": args.warmup,
        "dtype": "float32",
        "device": "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": getattr(transformers, "__version__", None),
        },
        "cpu": platform.processor() or platform.machine(),
        "load_s": load_s,
        "rss_after_load_mb": rss_after_load,
        "peak_rss_after_load_mb": peak_after_load,
        # getrusage's maxrss is reset by clear_refs too, so take the max of everything observed
        "peak_rss_mb": max(observed_peaks + [peak_rss_mb()]),
        "stages": results,
    }

    print(f"diffusers {report['versions']['diffusers']} / torch {torch.__version__}  model {args.model}")
    print(f"size {s}  batch {n}  steps {args.steps}  threads {args.threads}  load {load_s:.2f}s  "
          f"rss after load {rss_after_load:.0f} MB")
    print(f"{'stage':12s} {'median ms':>11s} {'min ms':>10s} {'max ms':>10s} {'peak MB':>9s}  what")
    for name, r in results.items():
        pk = r["stage_peak_rss_mb"]
        print(f"{name:12s} {r['median_ms']:11.1f} {r['min_ms']:10.1f} {r['max_ms']:10.1f} "
              f"{(f'{pk:.0f}' if pk is not None else '-'):>9s}  {r['what']}")
    if "edit" in results:
        print(f"edit per step: {results['edit']['per_step_ms']:.1f} ms")
    print(f"peak RSS (process): {report['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
