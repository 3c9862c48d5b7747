"""The CPU demo: train a small MAETok on the built-in shapes data, then reconstruct held-out images.

A first look that runs anywhere in a few minutes; `maetok pilot` is the full comparison.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import TokenizerRunConfig, load_config


def run_demo(out: Path, resume: bool = False, force: bool = False, steps: int | None = None) -> dict:
    from .cli import main as cli_main
    from .train.run import run_tokenizer

    overrides = ["train.batch_size=32", "train.log_every=10", "train.image_every=100", "train.ckpt_every=100",
                 f"train.steps={steps or 400}", "data.limit=4096"]
    cfg = load_config(TokenizerRunConfig, "cpu-32", overrides)
    summary = run_tokenizer(cfg, out / "tokenizer", resume=resume, force=force)
    if not summary.get("finished"):
        return summary
    cli_main(["tokenizer", "reconstruct", "--model", str(out / "tokenizer" / "model"), "--images", "shapes",
              "--split", "test", "--num", "32", "--out", str(out / "reconstruct")])
    metrics = json.loads((out / "reconstruct" / "metrics.json").read_text())
    print(f"\nDemo finished. Tokenizer weights: {out / 'tokenizer' / 'model'}\n"
          f"Reconstructions (held-out): {out / 'reconstruct' / 'reconstructions.png'}  "
          f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")
    return {**summary, **metrics}
