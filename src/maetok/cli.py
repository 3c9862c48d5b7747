"""`maetok` command line: thin wrappers over the Python API.

    maetok tokenizer train --config cpu-32 --out runs/tok model.latent_tokens=64 train.steps=2000
    maetok tokenizer reconstruct --model runs/tok/model --images shapes --out runs/recon
    maetok convert official-tokenizer --src DIR --out DIR [--weights FILE --config FILE]
    maetok convert official-sit --src DIR --out DIR [--weights FILE --config FILE]
    maetok demo --out runs/demo

Every training command takes dotted `key=value` overrides after its options.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_run_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config, help="YAML file or preset name under configs/")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent_tokens=64")


def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from .config import TokenizerRunConfig, load_config
    from .train.run import run_tokenizer

    cfg = load_config(TokenizerRunConfig, a.config, a.overrides)
    summary = run_tokenizer(cfg, a.out, resume=a.resume, force=a.force, device=a.device)
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("finished") or summary.get("stopped_by") else 1


def cmd_tokenizer_reconstruct(a: argparse.Namespace) -> int:
    import torch

    from .data import open_dataset
    from .data.images import save_image_grid
    from .eval.recon import psnr, ssim
    from .tokenizer import MAETok

    model = MAETok.from_pretrained(a.model)
    size = model.config.image_size
    ds = open_dataset(a.images, split=a.split, image_size=size, limit=a.num)
    x = torch.stack([ds[i][0] for i in range(min(a.num, len(ds)))])
    with torch.no_grad():
        recon = torch.cat([model.decode(model.encode(b)) for b in x.split(16)]).clamp(-1, 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nrow = min(8, x.shape[0])
    # Interleave rows: originals, then their reconstructions, so pairs sit one above the other.
    rows = [t for i in range(0, x.shape[0], nrow) for t in (x[i:i + nrow], recon[i:i + nrow])]
    save_image_grid(torch.cat(rows), out / "reconstructions.png", nrow=nrow)
    metrics = {"psnr": psnr(recon, x).mean().item(), "ssim": ssim(recon, x).mean().item(), "num_images": int(x.shape[0])}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({**metrics, "grid": str(out / "reconstructions.png")}, indent=2))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    if a.what == "official-tokenizer":
        from .tokenizer.convert import convert_official_tokenizer

        report = convert_official_tokenizer(a.src, a.out, a.weights, a.config)
        print(report.summary())
    else:
        from .diffusion.convert import convert_official_sit

        report = convert_official_sit(a.src, a.out, weights=a.weights, config=a.config)
        print(report.summary() if hasattr(report, "summary") else report)
    print(f"saved to {a.out}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(a.out), resume=a.resume, force=a.force, steps=a.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maetok", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train and use tokenizers").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a tokenizer (MAETok, AE, VAE, MAE) or fine-tune its decoder")
    _add_run_args(p, "cpu-32")
    p.set_defaults(fn=cmd_tokenizer_train)
    p = tok.add_parser("reconstruct", help="encode+decode images; writes a side-by-side PNG grid and PSNR/SSIM")
    p.add_argument("--model", required=True, help="weights folder (save_pretrained) or official checkpoint")
    p.add_argument("--images", required=True, help="data spec: folder, zip:FILE, cifar:DIR, npz:FILE or shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_tokenizer_reconstruct)

    p = sub.add_parser("convert", help="convert official MAETok checkpoints into maetok's format")
    p.add_argument("what", choices=["official-tokenizer", "official-sit"])
    p.add_argument("--src", required=True, help="folder with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None, help="weights file, if not in --src")
    p.add_argument("--config", default=None, help="config file, if not --src/config.json")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("demo", help="the CPU demo: train a tiny tokenizer on built-in shapes and reconstruct")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .nets.hub import MissingWeightsError
    from .train.loop import RunDirExists

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, MissingWeightsError, RunDirExists, FileNotFoundError) as e:
        print(f"maetok: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
