"""`maetok sample`: images from a diffusion model and its tokenizer, as an ADM .npz, a PNG grid and the settings."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import SampleConfig, from_dict
from ..eval.generate import SETTINGS_FILE, check_compatible, generate_to_dir
from ..io.distributed import resolve_device
from ..io.pretrained import load_sit, load_tokenizer
from .common import CLIError, finished_output, is_main_process


def cmd_sample(args: argparse.Namespace) -> int:
    # Every rank, before the work: under torchrun only rank 0 writes, after a collective every rank joins, so no
    # rank can see another's new files here. With --force the files are overwritten when the samples are written.
    finished_output(args.out, ("samples.npz", "samples.png", SETTINGS_FILE), "samples", args.force)
    low, high = args.interval
    cfg = from_dict(SampleConfig, {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg,
                                   "cfg_interval": [low, high], "seed": args.seed})
    model = load_sit(args.model)
    if not model.config.num_classes:  # an unconditional model: no labels, so nothing to guide or balance
        if args.cfg != 1.0:
            raise CLIError(f"--cfg {args.cfg:g}: classifier-free guidance needs a class-conditional model, but "
                           f"--model {args.model} is unconditional (num_classes=0); use --cfg 1")
        if args.balanced:
            raise CLIError(f"--balanced: --model {args.model} is unconditional (num_classes=0), so there are no "
                           f"classes to balance; leave out --balanced")
    tok = load_tokenizer(args.tokenizer)
    check_compatible(model, tok, f"--model {args.model}", f"--tokenizer {args.tokenizer}")  # before any sampling
    where = {"model": recorded_path(args.model), "tokenizer": recorded_path(args.tokenizer),
             "batch_size": args.batch_size}  # batch size and process count fix the SDE sampler's noise
    path = generate_to_dir(model, tok, args.num_samples, cfg, Path(args.out), balanced=args.balanced,
                           batch_size=args.batch_size, device=resolve_device(args.device), settings=where,
                           compile=args.compile)
    if is_main_process():  # under torchrun only rank 0 writes the files
        print(f"wrote {path}, {path.with_suffix('.png')} and {path.with_name(SETTINGS_FILE)}")
    return 0


def recorded_path(text: str) -> str:
    """A local path made absolute (the record stays meaningful from another folder); a hub id as given."""
    p = Path(text).expanduser()
    return str(p.resolve()) if p.exists() else text
