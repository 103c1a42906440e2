#!/usr/bin/env python3
"""Analytic FLOP count of one UNet2DConditionModel evaluation (SD 1.5 / InstructPix2Pix layout).

    deploy/cuda/unet_flops.py [--size 512] [--batch 1] [--config unet/config.json] [--json]

Counts 2 FLOPs per multiply-add in every convolution, linear layer and attention matmul
(Q·Kᵀ and P·V), the work a GPU's matrix units do; GroupNorm/LayerNorm, SiLU, GELU, softmax and
the residual adds are listed separately (`elementwise`, a rough 10 FLOPs per element for norms
and softmax, 1 per add/activation) and are NOT in `matmul_flops`. This is the convention of
torch.utils.flop_counter.FlopCounterMode (which the device check runs as a cross-check).

Default config = timbrooks/instruct-pix2pix unet/config.json (SD 1.5 with 8 input channels):
block_out_channels [320, 640, 1280, 1280], 2 layers per block, 8 heads, cross_attention_dim
768, 77 text tokens, use_linear_projection false. Image side S px -> latent S/8.
"""

from __future__ import annotations

import argparse
import json
import sys

SD15_IP2P = {
    "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "transformer_layers_per_block": 1,
}


class Counter:
    def __init__(self):
        self.mm = {}          # category -> FLOPs (matrix work)
        self.elementwise = 0  # rough, not in mm

    def add(self, cat, flops):
        self.mm[cat] = self.mm.get(cat, 0) + flops

    def conv(self, cin, cout, k, h, w, b, cat="conv"):
        self.add(cat, 2 * b * h * w * cin * cout * k * k)

    def linear(self, fin, fout, tokens, b, cat="linear"):
        self.add(cat, 2 * b * tokens * fin * fout)


def resnet(c, cin, cout, h, w, b, temb=1280):
    c.elementwise += b * h * w * (cin + cout) * (10 + 1) + b * h * w * cout  # 2 norms+silu, add
    c.conv(cin, cout, 3, h, w, b, "resnet conv")
    c.linear(temb, cout, 1, b, "resnet temb")
    c.conv(cout, cout, 3, h, w, b, "resnet conv")
    if cin != cout:
        c.conv(cin, cout, 1, h, w, b, "resnet shortcut")


def transformer(c, ch, h, w, b, ctx_dim, ctx_len, layers=1, linear_proj=False, heads=8):
    n = h * w
    c.elementwise += b * n * ch * 10
    if linear_proj:
        c.linear(ch, ch, n, b, "attn proj in/out")
    else:
        c.conv(ch, ch, 1, h, w, b, "attn proj in/out")
    for _ in range(layers):
        c.elementwise += b * n * ch * (3 * 10 + 3)
        # self-attention
        c.linear(ch, 3 * ch, n, b, "self-attn qkv/out")
        c.add("self-attn QK^T, PV", 2 * 2 * b * n * n * ch)
        c.elementwise += b * heads * n * n * 5  # scale, max, exp, sum, divide
        c.linear(ch, ch, n, b, "self-attn qkv/out")
        # cross-attention
        c.linear(ch, ch, n, b, "cross-attn q/out")
        c.linear(ctx_dim, 2 * ch, ctx_len, b, "cross-attn k/v")
        c.add("cross-attn QK^T, PV", 2 * 2 * b * n * ctx_len * ch)
        c.linear(ch, ch, n, b, "cross-attn q/out")
        # GEGLU feed-forward
        c.linear(ch, 8 * ch, n, b, "feed-forward")
        c.elementwise += b * n * 4 * ch * 10
        c.linear(4 * ch, ch, n, b, "feed-forward")
    if linear_proj:
        c.linear(ch, ch, n, b, "attn proj in/out")
    else:
        c.conv(ch, ch, 1, h, w, b, "attn proj in/out")


def heads_of(ahd, i):
    return ahd[i] if isinstance(ahd, list) else ahd


def count(cfg: dict, latent_h: int, latent_w: int, batch: int, ctx_len: int = 77) -> Counter:
    c = Counter()
    boc = cfg["block_out_channels"]
    lpb = cfg["layers_per_block"]
    ctx = cfg["cross_attention_dim"]
    tl = cfg.get("transformer_layers_per_block", 1)
    lin = cfg.get("use_linear_projection", False)
    ahd = cfg.get("attention_head_dim", 8)  # diffusers' legacy name: the number of heads
    temb = boc[0] * 4
    b, h, w = batch, latent_h, latent_w
    c.linear(boc[0], temb, 1, b, "time embedding")
    c.linear(temb, temb, 1, b, "time embedding")
    c.conv(cfg["in_channels"], boc[0], 3, h, w, b, "conv in/out")
    skips = [boc[0]]
    ch = boc[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        out = boc[i]
        for _ in range(lpb):
            resnet(c, ch, out, h, w, b, temb)
            if kind.startswith("CrossAttn"):
                transformer(c, out, h, w, b, ctx, ctx_len, tl, lin, heads_of(ahd, i))
            ch = out
            skips.append(ch)
        if i < len(boc) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            c.conv(ch, ch, 3, h, w, b, "down/upsample conv")
            skips.append(ch)
    # mid block
    resnet(c, ch, ch, h, w, b, temb)
    transformer(c, ch, h, w, b, ctx, ctx_len, tl, lin, heads_of(ahd, -1))
    resnet(c, ch, ch, h, w, b, temb)
    rev = list(reversed(boc))
    rev_heads = list(reversed(ahd)) if isinstance(ahd, list) else ahd
    for i, kind in enumerate(cfg["up_block_types"]):
        out = rev[i]
        for _ in range(lpb + 1):
            skip = skips.pop()
            resnet(c, ch + skip, out, h, w, b, temb)
            if kind.startswith("CrossAttn"):
                transformer(c, out, h, w, b, ctx, ctx_len, tl, lin, heads_of(rev_heads, i))
            ch = out
        if i < len(boc) - 1:
            h, w = h * 2, w * 2
            c.conv(ch, ch, 3, h, w, b, "down/upsample conv")
    c.elementwise += b * h * w * ch * 11
    c.conv(ch, cfg["out_channels"], 3, h, w, b, "conv in/out")
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in px (latent = size/8)")
    ap.add_argument("--batch", type=int, default=1, help="UNet batch (3 per image with guidance)")
    ap.add_argument("--config", help="a diffusers unet/config.json (default: SD 1.5 InstructPix2Pix)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    cfg = dict(SD15_IP2P)
    if args.config:
        cfg.update(json.load(open(args.config)))
    lat = args.size // 8
    c = count(cfg, lat, lat, args.batch)
    total = sum(c.mm.values())
    if args.json:
        json.dump({"size": args.size, "latent": lat, "batch": args.batch, "matmul_flops": total,
                   "by_category": c.mm, "elementwise_flops_rough": c.elementwise}, sys.stdout, indent=2)
        print()
        return
    print(f"UNet at {args.size}x{args.size} px (latent {lat}x{lat}), batch {args.batch}: "
          f"{total / 1e9:.1f} GFLOP in convolutions, linears and attention matmuls")
    for k, v in sorted(c.mm.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<22} {v / 1e9:10.2f} GFLOP  {100 * v / total:5.1f}%")
    print(f"  (norms, activations, softmax, adds: roughly {c.elementwise / 1e9:.1f} GFLOP more, not counted)")


if __name__ == "__main__":
    main()
