"""`maetok tokenizer train`, `maetok diffusion train` and `maetok diffusion distill`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import DiffusionRunConfig, TokenizerRunConfig, load_config
from ..config.distill import DistillRunConfig
from ..io.rundir import RESUME_MODES, resume_mode
from ..train.run import exit_status, run_diffusion, run_distill, run_tokenizer
from .common import is_main_process, out_folder


def resume_request(args: argparse.Namespace) -> tuple[str | bool, list[str]]:
    """--resume's mode (False without the flag) and the overrides. argparse hands an override written right after
    a bare --resume (`--resume train.optim.lr=1e-4`) to the flag as its value: it goes back in front of the
    others, where it stood unless overrides came before the flag too."""
    value, overrides = args.resume, list(args.overrides or [])
    if isinstance(value, str) and value not in RESUME_MODES and "=" in value:
        return "latest", [value, *overrides]
    # An unknown mode is refused there; True and False come from a namespace built in code.
    return resume_mode(value) or False, overrides


def run_training(args: argparse.Namespace, config_cls, run_fn) -> int:
    """Load the run's config, train, print the summary (rank 0), and return the exit status."""
    out_folder(args.out, "training runs")  # an --out that cannot be made: refused before data and model are built
    resume, overrides = resume_request(args)
    # `default`: a preset the user did not name, so that --resume may keep the run's own. Resuming without
    # --config starts from the run's own config.yaml: the command's default preset may not even validate alone
    # (a diffusion run needs its latents), and the run's saved config replaces it anyway.
    default = getattr(args, "default_config", None)
    saved = Path(args.out) / "config.yaml"
    if resume and args.config is None and saved.is_file():
        default = str(saved)
    cfg = load_config(config_cls, args.config, overrides, default=default)
    summary = run_fn(cfg, args.out, resume=resume, force=args.force, device=args.device)
    if is_main_process():  # under torchrun every rank returns the summary; one copy is printed
        print(json.dumps(summary, indent=2))
    return exit_status(summary)  # 128 + N after signal N: a scheduler must not take a pre-empted run as done


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    return run_training(args, TokenizerRunConfig, run_tokenizer)


def cmd_diffusion_train(args: argparse.Namespace) -> int:
    return run_training(args, DiffusionRunConfig, run_diffusion)


def cmd_diffusion_distill(args: argparse.Namespace) -> int:
    """--teacher is the override distill.teacher, made absolute and quoted (a YAML string whatever the path);
    without it, a resumed run keeps its own teacher."""
    if args.teacher is not None:
        teacher = json.dumps(str(Path(args.teacher).expanduser().resolve()))
        args.overrides = [f"distill.teacher={teacher}", *(args.overrides or [])]
    return run_training(args, DistillRunConfig, run_distill)
