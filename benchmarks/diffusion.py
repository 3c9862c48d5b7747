"""What 1D tokens buy the diffusion model: FLOPs and CPU throughput of SiT on 128 tokens vs a 2D-latent layout.

    .venv/bin/python benchmarks/diffusion.py [--quick] [--threads N]

Part 1 times the same small SiT (hidden 192, depth 4, 3 heads) on
  - MAETok's 1D layout: 128 tokens x 32 channels,
  - a 2D latent grid flattened to 4x and 8x more tokens (512 / 1024 tokens x 16 channels, e.g. a 4-channel
    latent patchified 2x2),
measuring GFLOPs per forward pass (torch.utils.flop_counter on the meta device, 2 FLOPs per multiply-add),
training steps (forward + backward + AdamW) and Euler sampling in images per second.
Part 2 counts SiT-XL at 512 px the same way: 128 tokens vs 1024 tokens (SiT-XL/2 on a 64x64x4 SD-VAE latent).

Writes benchmarks/results/diffusion.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import RESULTS_DIR, machine, median_seconds, utc_now, write_json
from maetok.config import SampleConfig, SiTConfig, TransportConfig
from maetok.diffusion import SiT, sample, sit_config, training_loss
from maetok.io.convert_sit import build_meta

RESULTS = RESULTS_DIR / "diffusion.json"
LAYOUTS = [  # name, tokens, channels per token
    ("1D MAETok", 128, 32),
    ("2D latent, 4x tokens", 512, 16),
    ("2D latent, 8x tokens", 1024, 16),
]
PAPER_XL_GFLOPS = {128: 48.5, 1024: 373.3}


def forward_flops(cfg: SiTConfig, batch: int = 1) -> int:
    """FLOPs of one forward pass, counted on the meta device: exact for the matmuls, no memory or time spent.
    (On CPU the fused attention kernel has no registered FLOP formula; on meta SDPA decomposes into countable
    matmuls.)"""
    model = build_meta(cfg)
    with torch.device("meta"):
        x, t = torch.empty(batch, cfg.num_tokens, cfg.in_channels), torch.empty(batch)
        y = torch.zeros(batch, dtype=torch.long) if cfg.num_classes else None
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def analytic_macs(cfg: SiTConfig) -> float:
    """Multiply-adds per image from the layer shapes, as a cross-check of the counter."""
    n, h, f = cfg.num_tokens, cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
    per_block = n * (4 * h * h + 2 * h * f) + 2 * n * n * h + 6 * h * h   # qkv+proj, mlp, QK^T and AV, adaLN
    embed = n * cfg.in_channels * h * 2 + 256 * h + h * h + 2 * h * h        # in/out linears, t-MLP, final adaLN
    return cfg.depth * per_block + embed


def train_images_per_s(cfg: SiTConfig, batch: int, reps: int) -> float:
    torch.manual_seed(0)
    model = SiT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch, cfg.num_tokens, cfg.in_channels)
    y = torch.randint(0, cfg.num_classes, (batch,))
    g = torch.Generator().manual_seed(0)

    def step():
        loss = training_loss(model, x0, y, TransportConfig(), g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / median_seconds(step, reps)


def sample_images_per_s(cfg: SiTConfig, batch: int, steps: int, reps: int) -> float:
    torch.manual_seed(0)
    model = SiT(cfg).eval()
    noise = torch.randn(batch, cfg.num_tokens, cfg.in_channels)
    y = torch.randint(0, cfg.num_classes, (batch,))
    run_cfg = SampleConfig("euler", steps=steps, cfg_scale=1.0)
    return batch / median_seconds(lambda: sample(model, noise, y, run_cfg), reps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and steps (about 20 s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, reps, steps = (4, 2, 4) if args.quick else (8, 3, 10)

    rows = []
    for name, tokens, channels in LAYOUTS:
        cfg = sit_config("mini", in_channels=channels, num_tokens=tokens, num_classes=1000)
        flops = forward_flops(cfg)
        row = {"layout": name, "tokens": tokens, "channels": channels, "gflops_per_forward": flops / 1e9,
               "analytic_gflops": 2 * analytic_macs(cfg) / 1e9,
               "train_images_per_s": train_images_per_s(cfg, batch, reps),
               "sample_images_per_s": sample_images_per_s(cfg, batch, steps, reps)}
        rows.append(row)
        print(f"  measured {name}: {row['train_images_per_s']:.1f} train img/s, "
              f"{row['sample_images_per_s']:.2f} sample img/s", file=sys.stderr)
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = row["gflops_per_forward"] / base["gflops_per_forward"]
        row["train_speedup_of_1d"] = base["train_images_per_s"] / row["train_images_per_s"]
        row["sample_speedup_of_1d"] = base["sample_images_per_s"] / row["sample_images_per_s"]

    xl = []
    for tokens, channels in ((128, 32), (1024, 16)):
        cfg = sit_config("XL", in_channels=channels, num_tokens=tokens, num_classes=1000)
        flops = forward_flops(cfg)
        xl.append({"tokens": tokens, "channels": channels, "gflops_per_forward": flops / 1e9,
                   "gmacs_per_forward": flops / 2e9, "analytic_gmacs": analytic_macs(cfg) / 1e9,
                   "paper_gflops": PAPER_XL_GFLOPS[tokens]})

    result = {"machine": machine(), "date": utc_now(),
              "quick": args.quick,
              "settings": {"model": "SiT hidden 192, depth 4, heads 3, MLP 4x", "batch": batch, "reps": reps,
                           "sampler": f"Euler, {steps} steps, no CFG", "train": "fp32, AdamW, linear path",
                           "flops": "torch.utils.flop_counter on meta, batch 1, 2 FLOPs per multiply-add"},
              "small_sit": rows, "sit_xl_512px": xl}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}"
             f"{' (--quick)' if result['quick'] else ''}",
             f"Model: {s['model']}; batch {s['batch']}; sampling: {s['sampler']}", "",
             "| layout | tokens x ch | GFLOPs / fwd | FLOPs vs 1D | train img/s | 1D faster by | "
             "sample img/s | 1D faster by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["small_sit"]:
        lines.append(f"| {r['layout']} | {r['tokens']} x {r['channels']} | {r['gflops_per_forward']:.3f} | "
                     f"{r['flops_ratio']:.2f}x | {r['train_images_per_s']:.1f} | {r['train_speedup_of_1d']:.2f}x | "
                     f"{r['sample_images_per_s']:.2f} | {r['sample_speedup_of_1d']:.2f}x |")
    lines += ["", "SiT-XL at 512 px (counted, not timed):", "",
              "| tokens x ch | GFLOPs (2 / MAC) | GMACs | paper | ratio to 128 tokens |", "|---|---|---|---|---|"]
    base = result["sit_xl_512px"][0]["gflops_per_forward"]
    for r in result["sit_xl_512px"]:
        lines.append(f"| {r['tokens']} x {r['channels']} | {r['gflops_per_forward']:.1f} | "
                     f"{r['gmacs_per_forward']:.1f} | {r['paper_gflops']} | "
                     f"{r['gflops_per_forward'] / base:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
