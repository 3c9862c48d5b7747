"""Entry points that wire config -> data -> task -> Trainer for each run kind (the CLI calls these)."""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, TokenizerRunConfig
from .distributed import cleanup, init_distributed
from .loop import Trainer, prepare_run_dir

log = logging.getLogger("maetok.train")


def setup_logging(out_dir: Path | None = None, is_main: bool = True) -> None:
    root = logging.getLogger("maetok")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if out_dir is not None and is_main:
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
                h.close()
        fh = logging.FileHandler(Path(out_dir) / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def _open_training_data(data_cfg, image_size: int):
    from ..data import open_dataset

    # Flips happen in the training step on the main RNG (resumable), so the dataset never flips.
    return open_dataset(data_cfg.spec, split=data_cfg.split, image_size=image_size, random_flip=False,
                        strict=data_cfg.strict, limit=data_cfg.limit, cache_dir=data_cfg.cache_dir or None)


@contextlib.contextmanager
def _run_context(out_dir: str | Path, resume: bool, force: bool, device: str, seed: int):
    """Process group, run directory (never silently overwritten), log file and seed; torn down on the way out."""
    info = init_distributed(device)
    try:
        out = prepare_run_dir(Path(out_dir), resume, force, info.is_main)
        setup_logging(out, info.is_main)
        torch.manual_seed(seed)
        yield info, out
    finally:
        cleanup(info)


def _fit(task, cfg, dataset, out: Path, info, resume: bool) -> tuple[Trainer, dict[str, Any]]:
    trainer = Trainer(task, cfg.train, dataset, out, cfg, info, num_workers=cfg.data.num_workers)
    if resume:
        trainer.try_resume()
    return trainer, trainer.fit()


def run_tokenizer(cfg: TokenizerRunConfig, out_dir: str | Path, resume: bool = False, force: bool = False,
                  device: str = "auto") -> dict[str, Any]:
    """Train a tokenizer; writes checkpoints, logs, PNG grids and the final EMA weights (`<out>/model`)."""
    with _run_context(out_dir, resume, force, device, cfg.train.seed) as (info, out):
        dataset = _open_training_data(cfg.data, cfg.model.image_size)
        log.info("data: %s (%d images)", cfg.data.spec, len(dataset))
        preview = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])
        from .tokenizer_task import TokenizerTask

        task = TokenizerTask(cfg, info.device, preview)
        n_params = sum(p.numel() for p in task.model.parameters())
        log.info("tokenizer %s: %.2fM parameters (%s stage %d)", cfg.model.variant, n_params / 1e6,
                 "training" if cfg.stage == 1 else "decoder fine-tuning", cfg.stage)
        trainer, summary = _fit(task, cfg, dataset, out, info, resume)
        if summary["finished"] and info.is_main:
            summary.update(finalize_tokenizer(trainer.ema, dataset, cfg, out, info.device))
        return summary


@torch.no_grad()
def measure_latent_stats(model, dataset, batches: int, batch_size: int, device) -> tuple[float, float]:
    """Global mean/std of the (unmasked) latents over the first `batches` batches of the data, in float64."""
    model.eval()
    n = min(len(dataset), batches * batch_size)
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(n, start + batch_size))]).to(device)
        z = model.encode(x).double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean ** 2, 1e-12))
    return mean, std


def finalize_tokenizer(ema_model, dataset, cfg: TokenizerRunConfig, out: Path, device) -> dict[str, Any]:
    """Measure the latent statistics, store them with the EMA weights, and save `<out>/model`."""
    from ..eval.recon import psnr

    mean, std = measure_latent_stats(ema_model, dataset, cfg.stats_batches, min(64, cfg.train.batch_size), device)
    ema_model.config.latent_mean, ema_model.config.latent_std = mean, std
    ema_model.save_pretrained(out / "model")
    x = torch.stack([dataset[i][0] for i in range(min(64, len(dataset)))]).to(device)
    recon = ema_model.decode(ema_model.encode(x)).clamp(-1, 1)
    value = psnr(recon, x).mean().item()
    log.info("saved %s (latent mean %.4f, std %.4f); train-set PSNR %.2f dB on %d images", out / "model", mean, std,
             value, x.shape[0])
    return {"latent_mean": mean, "latent_std": std, "psnr_train": value, "model_dir": str(out / "model")}


def run_diffusion(cfg, out_dir: str | Path, resume: bool = False, force: bool = False,
                  device: str = "auto") -> dict[str, Any]:
    """Train SiT / LightningDiT on a latent cache (or on images encoded online); saves `<out>/model` (EMA)."""
    from ..data.latents import LatentDataset
    from ..tokenizer import MAETok
    from .diffusion_task import DiffusionTask

    with _run_context(out_dir, resume, force, device, cfg.train.seed) as (info, out):
        tokenizer = MAETok.from_pretrained(cfg.tokenizer) if cfg.tokenizer else None
        if cfg.latents:
            dataset = LatentDataset(cfg.latents)
            mean, std, num_classes = dataset.mean, dataset.std, dataset.num_classes
            shape = tuple(dataset.meta["latent_shape"])
        else:
            dataset = _open_training_data(cfg.data, tokenizer.config.image_size)
            mean, std = tokenizer.config.latent_mean, tokenizer.config.latent_std
            num_classes = getattr(dataset, "num_classes", 0)
            shape = (tokenizer.config.latent_tokens, tokenizer.config.latent_dim)
        if shape != (cfg.model.num_tokens, cfg.model.in_channels):
            raise ConfigError(f"model.num_tokens/in_channels = {cfg.model.num_tokens}/{cfg.model.in_channels} but "
                              f"the latents are {shape[0]} tokens of dim {shape[1]}")
        if cfg.model.num_classes and num_classes and cfg.model.num_classes != num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has {num_classes} classes")
        task = DiffusionTask(cfg, info.device, mean, std, tokenizer, num_classes)
        log.info("diffusion %s: %.2fM parameters on %d latents (%d x %d), normalised with mean %.4f std %.4f",
                 cfg.model.variant, sum(p.numel() for p in task.model.parameters()) / 1e6, len(dataset), *shape,
                 mean, std)
        return _fit(task, cfg, dataset, out, info, resume)[1]
