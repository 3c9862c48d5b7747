"""`maetok tokenizer reconstruct`: a grid of images above their reconstructions, with PSNR and SSIM."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import ConfigError
from ..data import open_dataset
from ..data.datasets import held_out_split
from ..data.images import save_image_grid
from ..data.latents import check_prefix_tokens
from ..eval.recon import psnr, ssim, to_uint8_levels
from ..io.pretrained import load_tokenizer
from .common import CLIError, finished_output

RECON_FILES = ("reconstructions.png", "metrics.json")


def cmd_tokenizer_reconstruct(args: argparse.Namespace) -> int:
    # Before loading anything: a second run into the same folder would overwrite the first one's results.
    finished_output(args.out, RECON_FILES, "reconstructions", args.force)
    model = load_tokenizer(args.model)
    try:  # before the images are opened, with the rule and message `latents cache` and `eval recon` use
        check_prefix_tokens(model, args.tokens)
    except ConfigError as e:
        raise CLIError(f"--tokens {args.tokens}: --model {args.model}: {e}") from None
    size = model.config.image_size
    split = args.split or held_out_split(args.images)  # no --split: test/, else val/
    ds = open_dataset(args.images, split=split, image_size=size, limit=args.num_samples)
    x = torch.stack([ds[i][0] for i in range(min(args.num_samples, len(ds)))])
    with torch.no_grad():
        # Rounded to the 8-bit levels the PNG holds, as `eval recon` and the pilot measure reconstructions.
        recon = to_uint8_levels(torch.cat([model.decode(model.encode(b, tokens=args.tokens))
                                           for b in x.split(16)]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nrow = min(8, x.shape[0])
    # Interleave rows: originals, then their reconstructions, so pairs sit one above the other; a short last row
    # is padded with white so the pairs stay aligned.
    pad = (-x.shape[0]) % nrow
    x_p, r_p = (torch.cat([t, torch.ones(pad, *t.shape[1:])]) for t in (x, recon))
    rows = [t for i in range(0, x_p.shape[0], nrow) for t in (x_p[i:i + nrow], r_p[i:i + nrow])]
    save_image_grid(torch.cat(rows), out / "reconstructions.png", nrow=nrow)
    metrics = {"psnr": psnr(recon, x).mean().item(), "ssim": ssim(recon, x).mean().item(),
               "num_images": int(x.shape[0]), "images": args.images, "split": split}
    if args.tokens is not None:
        metrics["tokens"] = args.tokens
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({**metrics, "grid": str(out / "reconstructions.png")}, indent=2))
    return 0
