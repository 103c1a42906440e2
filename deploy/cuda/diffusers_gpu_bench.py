#!/usr/bin/env python3
"""GPU timings of HF diffusers' InstructPix2Pix pipeline, defined as `retouch bench` defines its
stages (and as bench/diffusers_bench.py does on the CPU), plus the device's matmul rate and the
UNet's FLOP count. Used by deploy/cuda/device-check.sh; runs on a CPU too (for testing).

    deploy/cuda/diffusers_gpu_bench.py --model DIR --size 512 --steps 20 --batches 1,4,8 \
        --device cuda --dtype fp16 --json OUT.json [--matmul] [--flops]

Stages per batch N (images of S x S px, K steps, guidance on: the UNet runs at batch 3N):
  text_encode  pipe._encode_prompt(N prompts, guidance) -> [3N, 77, 768]
  vae_encode   vae.encode(image [N,3,S,S]).latent_dist.mode()
  unet_call    unet(x [3N,8,S/8,S/8], t=999, ctx [3N,77,768])
  vae_decode   vae.decode(latents [N,4,S/8,S/8] / scaling_factor)
  edit         pipe(prompt=[...]*N, image=[...]*N, K steps EulerAncestral, gs 7.5, igs 1.5)
Each stage: --warmup untimed runs, then --repeats timed runs (--edit-repeats for `edit`),
each bracketed by torch.cuda.synchronize(); median/min/max. Peak GPU memory per batch:
torch.cuda.max_memory_allocated / max_memory_reserved (the caching allocator's view; the
device check also polls nvidia-smi).
--matmul: f16 and bf16 8192^3 matmul rates (CUDA events, 3 warm-ups, median of 10), first.
--flops:  torch.utils.flop_counter.FlopCounterMode over one UNet call at batch 3.
Attention: diffusers uses torch's scaled_dot_product_attention (flash/memory-efficient kernels
on the GPU); the report names the torch and diffusers versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def matmul_rates(torch, device) -> dict:
    out = {}
    n = 8192 if device.type == "cuda" else 512
    for name, dt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        if device.type != "cuda" and dt != torch.bfloat16:
            dt = torch.float32
            name = "f32"
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dt, generator=g)
        b = torch.randn(n, n, device=device, dtype=dt, generator=g)
        times = []
        if device.type == "cuda":
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers InstructPix2Pix checkpoint directory")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="1,4,8", help="comma-separated images per call")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--edit-repeats", type=int, default=1)
    ap.add_argument("--stages", default="text_encode,vae_encode,unet_call,vae_decode,edit")
    ap.add_argument("--matmul", action="store_true", help="measure the matmul rates first")
    ap.add_argument("--flops", action="store_true", help="count one UNet call's FLOPs (torch)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.size % 8:
        ap.error("--size must be a multiple of 8")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]

    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    report = {
        "tool": "diffusers", "device": args.device, "dtype": args.dtype, "size": args.size,
        "steps": args.steps, "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    if cuda:
        p = torch.cuda.get_device_properties(device)
        report["gpu"] = {"name": p.name, "sm": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                         "memory_gib": p.total_memory / 2**30}
    if args.matmul:
        report["matmul"] = matmul_rates(torch, device)
        print("matmul:", {k: f"{v['tflops']:.1f} TFLOP/s" for k, v in report["matmul"].items()}, flush=True)
    if not args.model:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
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
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        report["versions"]["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    report["versions"]["diffusers"] = diffusers.__version__
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model, torch_dtype=dtype,
                                                                  safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    sync()
    report["load_s"] = time.perf_counter() - t0
    report["attention_processor"] = type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__
    s = args.size
    lat = (s // pipe.vae_scale_factor, s // pipe.vae_scale_factor)
    ctx_dim = pipe.text_encoder.config.hidden_size

    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.randn((3, pipe.unet.config.in_channels) + lat, device=device, dtype=dtype)
        ctx = torch.randn((3, 77, ctx_dim), device=device, dtype=dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            pipe.unet(x, torch.tensor(999.0, device=device), encoder_hidden_states=ctx, return_dict=False)
        report["unet_flops_batch3"] = fc.get_total_flops()
        print(f"UNet FLOPs at batch 3, {s} px: {fc.get_total_flops() / 1e12:.3f} TFLOP (torch FlopCounterMode)",
              flush=True)

    report["batches"] = {}
    for n in batches:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
        base = np.stack([xx, yy, 1 - xx * yy], -1)
        images = [Image.fromarray((255 * np.roll(base, 17 * i, axis=1)).astype(np.uint8), "RGB") for i in range(n)]
        prompts = [f"make it look like winter, variant {i}" for i in range(n)]
        g = torch.Generator("cpu").manual_seed(0)
        with torch.no_grad():
            emb = pipe._encode_prompt(prompts, device, 1, True)  # [3N, 77, D]: prompt, negative, negative
            pix = pipe.image_processor.preprocess(images).to(device=device, dtype=dtype)
            x_unet = torch.randn((3 * n, pipe.unet.config.in_channels) + lat, generator=g).to(device, dtype)
            latents = torch.randn((n, pipe.vae.config.latent_channels) + lat, generator=g).to(device, dtype)
        t_unet = torch.tensor(999.0, device=device)
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
        res = {}
        for name in stages:
            reps = args.edit_repeats if name == "edit" else args.repeats
            times = []
            with torch.no_grad():
                for _ in range(args.warmup):
                    fns[name]()
                sync()
                for _ in range(max(1, reps)):
                    t = time.perf_counter()
                    fns[name]()
                    sync()
                    times.append(time.perf_counter() - t)
            res[name] = {"median_s": statistics.median(times), "runs_s": times}
            print(f"batch {n} {name}: median {statistics.median(times):.4f} s", flush=True)
        entry = {"stages": res}
        if cuda:
            entry["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            entry["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        report["batches"][str(n)] = entry
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a kill
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
