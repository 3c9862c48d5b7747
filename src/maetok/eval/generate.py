"""Generate images: noise -> sampler -> denormalise -> tokenizer.decode -> uint8, sharded across ranks.

Sample i always gets the same initial noise (seeded by (seed, i)) and label, whatever the number of processes,
so a torchrun job writes every sample exactly once and the set equals a single-process run's (ODE samplers).
Output: an ADM-evaluator-compatible `.npz` (`arr_0` uint8 NHWC, `arr_1` labels) and a PNG grid.
A shortcut student samples with its own update (`samplers.sample` routes it), one model call per step.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, SampleConfig, to_dict
from ..data.images import save_image_grid
from ..diffusion.samplers import sample, shortcut_steps_of
from ..diffusion.shortcut import student_sample_config
from ..io.distributed import init_distributed, resolve_device
from ..io.files import atomic_write_bytes
from ..progress import progress_bar
from ..train.compiled import CompiledOrEager

SETTINGS_FILE = "sampling.json"  # beside samples.npz: how the samples were drawn


class IncompatibleModelsError(ConfigError):
    """A diffusion model and a tokenizer that cannot work together (their latent shapes differ)."""


def check_compatible(model, tokenizer, model_name: str = "the diffusion model",
                     tokenizer_name: str = "the tokenizer") -> None:
    """Refuse a SiT whose latents the tokenizer cannot decode, before any sampling (which would fail only at
    the first decode, after the whole first batch was drawn). A SiT trained on a prefix cache generates the first
    K of the tokenizer's L tokens: allowed where the tokenizer was trained to decode from K (nested dropout)."""
    sit, tok = model.config, tokenizer.config
    made = (int(sit.num_tokens), int(sit.in_channels))
    decodes = (int(tok.latent_tokens), int(tok.latent_dim))
    allowed = tok.allowed_token_counts
    if made[1] == decodes[1] and made[0] in allowed:
        return
    if made[1] == decodes[1] and made[0] < decodes[0]:
        raise IncompatibleModelsError(
            f"{model_name} generates the first {made[0]} latent tokens, but {tokenizer_name} ({decodes[0]} latent "
            f"tokens, model.token_dropout={tok.token_dropout}) decodes from K in {allowed} only; pass the "
            f"tokenizer whose prefix cache the diffusion model was trained on")
    if made != decodes:
        raise IncompatibleModelsError(
            f"{model_name} generates latents of {made[0]} tokens x {made[1]} channels (num_tokens x in_channels), "
            f"but {tokenizer_name} decodes {decodes[0]} x {decodes[1]} (latent_tokens x latent_dim); pass the "
            f"tokenizer the diffusion model was trained on")


def sample_labels(num: int, num_classes: int, balanced: bool, seed: int) -> torch.Tensor | None:
    """Labels for `num` samples: class-balanced (i mod K, i.e. num/K per class) or uniform at random."""
    if num_classes <= 0:
        return None
    if balanced:
        return torch.arange(num) % num_classes
    return torch.randint(0, num_classes, (num,), generator=torch.Generator().manual_seed(seed + 1))


def initial_noise(indices: torch.Tensor, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


@torch.no_grad()
def generate(model, tokenizer, num: int, cfg: SampleConfig, labels: torch.Tensor | None = None,
             batch_size: int = 64, rank: int = 0, world: int = 1, device: str | torch.device = "cpu",
             progress: bool = True, compile: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """This rank's share: (indices, uint8 images NHWC). Sample i belongs to rank i % world.
    compile: run the diffusion model through torch.compile (eagerly if compilation fails), with static shapes:
    it compiles once per batch shape (guided steps double the batch; the last chunk may be smaller)."""
    check_compatible(model, tokenizer)
    transport_path = getattr(model, "transport_path", "linear")  # what the SDE's score conversion assumes
    model = CompiledOrEager(model.to(device).eval(), "the diffusion model", enabled=compile, dynamic=False)
    tokenizer = tokenizer.to(device).eval()
    mine = torch.arange(rank, num, world)
    shape = (model.config.num_tokens, model.config.in_channels)
    out = []
    for chunk in progress_bar(mine.split(batch_size), desc=f"sample[{rank}]", disable=not progress):
        noise = initial_noise(chunk, shape, cfg.seed).to(device)
        y = labels[chunk].to(device) if labels is not None else None
        gen = torch.Generator(device).manual_seed(cfg.seed * 7919 + int(chunk[0]))  # SDE increments
        x = sample(model, noise, y, cfg, generator=gen, path=transport_path).float()
        # A prefix (K < L) decodes with tokens=K; un-normalised with the tokenizer's statistics, which a prefix
        # cache also normalises with (data/latents.py says why).
        images = tokenizer.decode(tokenizer.denormalize(x), tokens=shape[0])
        out.append(to_uint8(images))
    return mine, (np.concatenate(out) if out else np.zeros((0, tokenizer.config.image_size,
                                                            tokenizer.config.image_size, 3), np.uint8))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC, rounding like the ADM evaluator's inputs."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def write_samples(out_dir: Path, images: np.ndarray, labels: torch.Tensor | None, grid_count: int = 64) -> Path:
    """samples.npz (arr_0 uint8 NHWC [+ arr_1 labels]) and samples.png (the first `grid_count`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    path = out_dir / "samples.npz"
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    grid = torch.from_numpy(images[:grid_count]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(grid, out_dir / "samples.png", nrow=min(8, max(1, len(grid))))
    return path


def write_settings(out_dir: Path, num: int, cfg: SampleConfig, balanced: bool, num_classes: int,
                   extra: dict | None = None) -> Path:
    """sampling.json: what it takes to draw the same samples again (and to tell two sample folders apart)."""
    settings = {"num_samples": int(num), **to_dict(cfg), "balanced": bool(balanced),
                "num_classes": int(num_classes), **(extra or {})}
    path = Path(out_dir) / SETTINGS_FILE
    atomic_write_bytes(path, lambda f: f.write((json.dumps(settings, indent=2) + "\n").encode()))
    return path


def generate_to_dir(model, tokenizer, num: int, cfg: SampleConfig, out_dir: Path, balanced: bool = True,
                    batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
                    settings: dict | None = None, compile: bool = False) -> Path:
    """Full generation under torchrun or alone: every rank samples its share, rank 0 assembles the npz and writes
    sampling.json (the sampler settings, the count, and `settings`, e.g. the model and tokenizer paths)."""
    if num < 1:
        raise ConfigError(f"number of samples {num} must be >= 1")
    check_compatible(model, tokenizer)  # before joining the process group: every rank fails alike, at once
    if shortcut_steps_of(model):
        # Its step count and guidance checked before any work, and recorded as run: the folded guidance.
        cfg = student_sample_config(model.config, cfg)
        settings = {**(settings or {}), "sampler": "shortcut", "shortcut_steps": shortcut_steps_of(model)}
    device = torch.device(resolve_device(str(device)))
    info = init_distributed(str(device))
    # Alone, the device as given (cuda:1, mps); under torchrun each rank uses its own (cuda:LOCAL_RANK or cpu).
    run_device = info.device if info.enabled else device
    labels = sample_labels(num, model.config.num_classes, balanced, cfg.seed)
    idx, imgs = generate(model, tokenizer, num, cfg, labels, batch_size, info.rank, info.world, run_device,
                         progress and info.is_main, compile)
    out_dir = Path(out_dir)
    record = (lambda: write_settings(out_dir, num, cfg, balanced, model.config.num_classes,
                                     {**(settings or {}), "processes": info.world, "compile": bool(compile)}))
    if not info.enabled:
        path = write_samples(out_dir, imgs, labels)
        record()
        return path
    # Each rank leaves its share in the output folder and rank 0 assembles them. Gathering the images through the
    # process group instead would copy all of them to every rank (50k samples at 256 px are 10 GB; under NCCL
    # through every GPU too). So --out must be on a filesystem every rank sees, as for the latent cache.
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_shard_file(out_dir, info.rank, info.world),
                       lambda f: np.savez(f, indices=idx.numpy(), images=imgs))
    dist.barrier()
    path = out_dir / "samples.npz"
    if info.is_main:
        full = np.zeros((num, *imgs.shape[1:]), np.uint8)
        seen = np.zeros(num, dtype=np.int64)
        for rank in range(info.world):
            shard = _shard_file(out_dir, rank, info.world)
            if not shard.is_file():
                raise FileNotFoundError(f"rank {rank}'s samples ({shard}) are not in {out_dir}: sampling under "
                                        f"torchrun needs --out on a filesystem that every rank sees")
            with np.load(shard) as part:
                full[part["indices"]] = part["images"]
                np.add.at(seen, part["indices"], 1)
        if not bool((seen == 1).all()):
            raise RuntimeError("sharded sampling did not produce every sample exactly once")
        path = write_samples(out_dir, full, labels)
        record()
        for shard in out_dir.glob(".shard-*-of-*.npz"):  # these, and any a killed run left
            shard.unlink(missing_ok=True)
    dist.barrier()  # no rank returns before the file exists
    return path


def _shard_file(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / f".shard-{rank:05d}-of-{world:05d}.npz"
