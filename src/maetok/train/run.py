"""Entry points that wire config -> data -> task -> Trainer for each run kind (the CLI calls these)."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import (SHARED_BY_VARIANTS, ConfigError, TokenizerConfig, TokenizerRunConfig, apply_overrides,
                      config_source, fit_model_to_latents, from_dict, ignored_settings, set_config_source, to_dict,
                      without_validation)
from ..data import class_count, open_dataset
from ..data.datasets import parse_spec
from ..data.latents import LatentDataset
from ..eval.recon import psnr
from ..io.checkpoint import CheckpointError, checkpoint_config, latest_checkpoint
from ..io.distributed import cleanup, init_distributed
from ..io.pretrained import load_tokenizer, save_pretrained
from ..io.rundir import RUN_MARKER, RunDir, RunDirExists, check_run_flags, read_run_marker
from ..io.weights import ensure_run_weights
from ..plugins import plugins_for_config, reload_plugins
from ..version import __version__
from .diffusion_task import DiffusionTask
from .distill_task import DistillTask, load_teacher, with_teacher_settings
from .logs import LogBuffer, setup_logging
from .loop import Trainer, check_global_batch
from .tokenizer_task import TokenizerTask, stage2_config
from .tracking import check_tracker

log = logging.getLogger("maetok.train")


def _open_training_data(data_cfg, image_size: int):
    # Flips happen in the training step on the main RNG (resumable), so the dataset never flips.
    return open_dataset(data_cfg.spec, split=data_cfg.split, image_size=image_size, random_flip=False,
                        strict=data_cfg.strict, limit=data_cfg.limit, cache_dir=data_cfg.cache_dir or None)


# What refuses a run before anything is built (rank 0 decides, and the other ranks raise the same).
REFUSALS = (RunDirExists, ConfigError, CheckpointError)


class _TrainingRun:
    """Process group, run directory and log file of one training.

    Everything that can fail on bad input (config, data, model) is built between `start` and `open_run`: only
    then is the run directory created, reused or (--force) emptied, so a typo neither leaves a directory that
    blocks the retry nor costs the old run.
    """

    def __init__(self, out_dir: str | Path, resume: bool | str, force: bool, kind: str, info,
                 early_logs: LogBuffer):
        self.info, self.kind, self._early_logs = info, kind, early_logs
        self._saved_config: dict[str, Any] | None = None
        self.log_file: logging.FileHandler | None = None  # train.log, once the run directory is open
        refused = None
        try:
            self.run_dir = RunDir(Path(out_dir), resume, force, info.is_main)
        except REFUSALS as e:
            refused = e
        if info.enabled:
            # Rank 0 alone decides on the directory and the checkpoint to resume from. Share its verdict, so that a
            # refusal stops every rank now instead of leaving the others in their next collective until the
            # timeout, and every rank resumes from the checkpoint rank 0 verified.
            refusal = None if refused is None else (
                next(i for i, cls in enumerate(REFUSALS) if isinstance(refused, cls)), str(refused))
            resumed_from = self.run_dir.checkpoint.name if refused is None and self.run_dir.checkpoint else None
            verdict = [refusal, resumed_from]
            torch.distributed.broadcast_object_list(verdict, src=0)
            if refused is None and verdict[0] is not None:
                refused = REFUSALS[verdict[0][0]](verdict[0][1])
            elif refused is None and verdict[1] is not None:
                self.run_dir.checkpoint = self.run_dir.out / "checkpoints" / verdict[1]
        if refused is not None:
            raise refused
        self.out = self.run_dir.out

    def config(self, requested):
        """The config to train with: on resume from a checkpoint, the run's saved one (checked against the
        request); otherwise the request."""
        if not self.run_dir.resuming:
            return with_absolute_paths(requested)
        marker = read_run_marker(self.out)
        if marker and marker.get("run") not in (None, self.kind):
            raise ConfigError(f"{self.out} is a {marker['run']} run; it cannot be resumed as a {self.kind} run")
        # Before the task builds the targets: a plugin's target is unknown until its plugin is loaded.
        reload_plugins((marker or {}).get("plugins"), self.out / RUN_MARKER)
        return resolve_resume_config(requested, self.out, marker, self.saved_config(), self.run_dir.checkpoint)

    def saved_config(self) -> dict[str, Any] | None:
        """The config of the checkpoint a resumed run continues from (None for a new run); read once."""
        if self._saved_config is None and self.run_dir.resuming:
            self._saved_config = saved_run_config(self.run_dir.checkpoint)
        return self._saved_config

    def open_run(self, cfg) -> Path:
        source = config_source(cfg)
        marker = {"run": self.kind, "maetok_version": __version__,
                  "preset": source.preset if source else None,
                  "preset_path": source.preset_path if source else None,
                  "overrides": list(source.overrides) if source else None}
        plugins = plugins_for_config(cfg)
        if plugins:  # only then: the marker of a run without plugins stays as it was
            marker["plugins"] = plugins
        out = self.run_dir.open(marker)
        logging.getLogger("maetok").removeHandler(self._early_logs)
        self.log_file = setup_logging(out, self.info.is_main, self._early_logs.records)
        return out

    @classmethod
    @contextlib.contextmanager
    def start(cls, out_dir, resume: bool | str, force: bool, device: str, kind: str):
        check_run_flags(resume, force)
        info = init_distributed(device)
        early_logs = LogBuffer()
        session = None
        try:
            setup_logging(None, info.is_main)
            logging.getLogger("maetok").addHandler(early_logs)
            session = cls(out_dir, resume, force, kind, info, early_logs)
            yield session
        finally:
            logging.getLogger("maetok").removeHandler(early_logs)
            if session is not None:
                session.run_dir.close()
                if session.log_file is not None:  # what is logged after this run is not this run's
                    logging.getLogger("maetok").removeHandler(session.log_file)
                    session.log_file.close()
            cleanup(info)


# Settings a resumed run may change: how long it runs, how often it reports and saves, and how it computes
# (workers, compile, precision, activation checkpointing) -- not what it computes. Entries ending in "." are
# prefixes. Anything else differing from the saved config is refused.
# decoder_ft.init_from: a resumed stage 2 reads nothing from it (its checkpoint holds the weights and the config)
# train.optim.lr and grad_clip: the way out of a run stopped by non-finite steps (its emergency checkpoint).
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.image_every", "train.ckpt_every", "train.keep_last",
                     "train.snapshot_every",
                     "train.max_bad_steps", "train.tracker", "train.optim.lr", "train.optim.grad_clip",
                     "train.compile", "train.precision", "data.num_workers",
                     "data.cache_dir", "model.grad_checkpointing", "teacher_precision", "stats_batches", "sample.",
                     "decoder_ft.init_from")


def _may_change_on_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_differences(saved: Any, requested: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, requested value) for every leaf of two configs that differs."""
    a, b = _leaves(to_dict(saved)), _leaves(to_dict(requested))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _same_targets_used(saved: list, requested: list) -> bool:
    """A run records the auxiliary targets it actually used: optional ones whose weights were missing at the
    start are left out, and stay out when it is resumed."""
    names = {t["name"] for t in saved}
    return saved == [t for t in requested if not (t.get("optional") and t["name"] not in names)]


def saved_run_config(ckpt: Path) -> dict[str, Any]:
    """The run config a checkpoint was written with, as a dict; ConfigError if it cannot be read."""
    try:
        saved = yaml.safe_load(checkpoint_config(ckpt))
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{ckpt}: cannot read the run's saved config ({e})") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"{ckpt}: the run's saved config is not a mapping")
    return saved


def _absolute(text: str) -> str:
    """A local path (or a data spec's path part, zip:runs/x.zip) made absolute; hub ids, `shapes`, names in the
    shared data folder and paths that do not exist stay as given."""
    if not text:
        return text
    _, location = parse_spec(text)
    if not location or not Path(location).expanduser().exists():
        return text
    prefix = text[: len(text) - len(location)] if text.endswith(location) else ""
    return prefix + str(Path(location).expanduser().resolve())


def with_absolute_paths(cfg):
    """The config with its input paths absolute (latents, tokenizer, data.spec, decoder_ft.init_from,
    distill.teacher), so that a run saved from one folder resumes from any other, and `x` and `./x` are the same
    input."""
    cfg = copy.deepcopy(cfg)  # keeps the config source too
    for owner, name in ((cfg, "latents"), (cfg, "tokenizer"), (getattr(cfg, "data", None), "spec"),
                        (getattr(cfg, "decoder_ft", None), "init_from"),
                        (getattr(cfg, "distill", None), "teacher")):
        if owner is not None and isinstance(getattr(owner, name, None), str):
            setattr(owner, name, _absolute(getattr(owner, name)))
    return cfg


def resolve_resume_config(requested, out: Path, marker: dict[str, Any] | None = None,
                          saved_config: dict[str, Any] | None = None, ckpt: Path | None = None):
    """The config a run resumed from checkpoint `ckpt` (default: its newest) continues with: the config saved in
    the checkpoint, with the changes the request makes (`saved_config`: that config, when the caller has read it
    already).
    From `load_config`, the request is the overrides, applied to the saved
    config (so a resume without overrides continues as it was) -- unless it explicitly names another preset
    than the run was started from, which is compared in full, as is a config built in code. Changes to RESUME_MAY_CHANGE
    are applied and logged; any other is refused with a ConfigError listing each."""
    cls = type(requested)
    ckpt = ckpt or latest_checkpoint(out / "checkpoints")
    data = saved_config if saved_config is not None else saved_run_config(ckpt)
    try:
        with without_validation():  # rules added since it was saved apply to what the run continues with
            saved = from_dict(cls, data)
    except ValueError as e:  # ConfigError is a ValueError
        raise ConfigError(f"{ckpt}: cannot read the run's saved config ({e})") from e
    source = config_source(requested)
    started_from = (marker or {}).get("preset_path", "unknown")
    if source is None or (source.preset_given and started_from not in ("unknown", source.preset_path)):
        wanted, how = requested, ("built in code" if source is None else
                                  f"--config {source.preset}; the run was started from {(marker or {}).get('preset')}")
    else:
        wanted, how = from_dict(cls, apply_overrides(to_dict(saved), list(source.overrides))), "its overrides"
    model = getattr(saved, "model", None)
    if hasattr(model, "aux_targets") and _same_targets_used(to_dict(model.aux_targets),
                                                            to_dict(wanted.model.aux_targets)):
        wanted.model.aux_targets = copy.deepcopy(model.aux_targets)
    # Paths compare as absolute: a run started with latents=runs/lat resumes from another folder (its saved path
    # is absolute since) and with ./runs/lat; one saved relative resumes from the folder it was started in.
    saved, wanted = with_absolute_paths(saved), with_absolute_paths(wanted)
    diffs = config_differences(saved, wanted)
    refused = [d for d in diffs if not _may_change_on_resume(d[0])]
    if refused:
        lines = "\n".join(f"  {k}: saved {a!r}, requested {b!r}" for k, a, b in refused)
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
        raise ConfigError(
            f"cannot resume {out}: the requested config ({how}) differs from the one the run was trained with in\n"
            f"{lines}\nA resumed run may change only {allowed}. Resume without those changes, or start a new run "
            f"(another --out, or --force to delete this one).")
    for key, a, b in diffs:
        log.info("resume: %s changes from %r to %r", key, a, b)
    log.info("resuming %s from %s with the run's saved config%s", out, ckpt.name,
             f" ({len(diffs)} allowed changes)" if diffs else "")
    return set_config_source(wanted, source)


def exit_status(summary: dict[str, Any]) -> int:
    """The exit code for a training's summary: 0 finished; 128 + N when signal N stopped it (its checkpoint is
    written; schedulers must not take a pre-empted run for a finished one); 1 otherwise."""
    if summary.get("finished"):
        return 0
    if summary.get("stopped_by"):
        return 128 + int(signal.Signals[summary["stopped_by"]])
    return 1


def run_tokenizer(cfg: TokenizerRunConfig, out_dir: str | Path, resume: bool | str = False, force: bool = False,
                  device: str = "auto") -> dict[str, Any]:
    """Train a tokenizer; writes checkpoints, logs, PNG grids and the final EMA weights (`<out>/model`).
    `resume`: True or "latest" (the newest checkpoint, refused when it does not verify), "verified" (the newest
    one that verifies)."""
    with _TrainingRun.start(out_dir, resume, force, device, "tokenizer") as session:
        info = session.info
        # A resumed run's weights come from its checkpoint, which also records stage 1's model config: stage 2
        # then needs nothing from decoder_ft.init_from, which may have moved since.
        saved = session.saved_config()
        if cfg.stage == 2:  # before the resume check, so that compares the request as it was made the first time
            cfg = stage2_config(cfg, saved)
        cfg = session.config(cfg)
        check_tracker(cfg.train.tracker)
        for key, message in ignored_settings(cfg):
            (log.info if key in SHARED_BY_VARIANTS else log.warning)("%s", message)
        # Every pretrained network the run needs, found or fetched before any data is read: offline, one error
        # names all that are missing and the command that fetches them. On every rank (each its own downloads).
        ensure_run_weights(cfg)
        torch.manual_seed(cfg.train.seed)
        dataset = _open_training_data(cfg.data, cfg.model.image_size)
        log.info("data: %s (%d images)", cfg.data.spec, len(dataset))
        check_global_batch(len(dataset), cfg.train.batch_size, info.world)  # before the run dir is made
        preview = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])
        task = TokenizerTask(cfg, info.device, preview, resuming=saved is not None)
        n_params = sum(p.numel() for p in task.model.parameters())
        log.info("tokenizer %s: %.2fM parameters (%s stage %d)", cfg.model.variant, n_params / 1e6,
                 "training" if cfg.stage == 1 else "decoder fine-tuning", cfg.stage)
        out = session.open_run(cfg)
        trainer = Trainer(task, cfg.train, dataset, out, cfg, info, num_workers=cfg.data.num_workers)
        if session.run_dir.resuming:
            trainer.try_resume(session.run_dir.checkpoint)
        summary = trainer.fit()
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
    mean, std = measure_latent_stats(ema_model, dataset, cfg.stats_batches, min(64, cfg.train.batch_size), device)
    ema_model.config.latent_mean, ema_model.config.latent_std = mean, std
    save_pretrained(ema_model, out / "model")
    x = torch.stack([dataset[i][0] for i in range(min(64, len(dataset)))]).to(device)
    recon = ema_model.decode(ema_model.encode(x)).clamp(-1, 1)
    value = psnr(recon, x).mean().item()
    log.info("saved %s (latent mean %.4f, std %.4f); train-set PSNR %.2f dB on %d images", out / "model", mean, std,
             value, x.shape[0])
    return {"latent_mean": mean, "latent_std": std, "psnr_train": value, "model_dir": str(out / "model")}


def _latent_data(cfg, tokenizer) -> tuple[Any, float, float, int, tuple[int, int]]:
    """A diffusion run's data (diffusion training and distillation alike): the latent cache `cfg.latents`, else
    `cfg.data` encoded online by `tokenizer`. Returns (dataset, latent mean, std, class count, latent shape)."""
    if not cfg.latents:
        dataset = _open_training_data(cfg.data, tokenizer.config.image_size)
        return (dataset, tokenizer.config.latent_mean, tokenizer.config.latent_std, class_count(dataset),
                (tokenizer.config.latent_tokens, tokenizer.config.latent_dim))
    source = config_source(cfg)
    # The cache decides the data; only how it is read and flipped still applies.
    ignored = [k for k in (source.override_keys() if source else [])
               if k.startswith("data") and k not in ("data.num_workers", "data.random_flip")]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: no effect when training on the latent cache "
                          f"latents={cfg.latents} (its images were chosen when it was made; for fewer, make "
                          f"a cache with `maetok latents cache --limit N`)")
    dataset = LatentDataset(cfg.latents)
    if tokenizer is not None and "tokenizer_config" in dataset.meta:
        # The tokenizer decodes the preview grids and is saved with the model for `maetok sample`: one that
        # did not make the cache would decode these latents into nonsense (or fail at the first grid).
        # Read through the config class, so that fields added since the cache was written take their
        # defaults; grad_checkpointing does not change the latents.
        try:
            with without_validation():
                cached = from_dict(TokenizerConfig, dataset.meta["tokenizer_config"])
            diff = [d for d in config_differences(cached, tokenizer.config) if d[0] != "grad_checkpointing"]
        except ValueError as e:
            log.warning("%s: cannot read the tokenizer config the cache records (%s); not compared with "
                        "tokenizer=%s", cfg.latents, e, cfg.tokenizer)
            diff = []
        if diff:
            shown = "; ".join(f"{k}: cache {a!r}, tokenizer {b!r}" for k, a, b in diff[:6])
            raise ConfigError(f"tokenizer={cfg.tokenizer} did not make the latent cache {cfg.latents} "
                              f"({shown}); give the tokenizer the cache was encoded with")
    return dataset, dataset.mean, dataset.std, dataset.num_classes, tuple(dataset.meta["latent_shape"])


def _train(session: _TrainingRun, task, cfg, dataset) -> dict[str, Any]:
    """Open the run folder (everything that can be refused is built by now), resume if asked, and train."""
    out = session.open_run(cfg)
    trainer = Trainer(task, cfg.train, dataset, out, cfg, session.info, num_workers=cfg.data.num_workers)
    if session.run_dir.resuming:
        trainer.try_resume(session.run_dir.checkpoint)
    return trainer.fit()


def run_diffusion(cfg, out_dir: str | Path, resume: bool | str = False, force: bool = False,
                  device: str = "auto") -> dict[str, Any]:
    """Train SiT / LightningDiT on a latent cache (or on images encoded online); saves `<out>/model` (EMA).
    `resume` as for run_tokenizer."""
    with _TrainingRun.start(out_dir, resume, force, device, "diffusion") as session:
        info = session.info
        cfg = session.config(cfg)
        check_tracker(cfg.train.tracker)
        torch.manual_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        dataset, mean, std, num_classes, shape = _latent_data(cfg, tokenizer)
        if cfg.latents:
            fit_model_to_latents(cfg, shape, f"latents={cfg.latents}")
        if shape != (cfg.model.num_tokens, cfg.model.in_channels):
            raise ConfigError(f"model.num_tokens/in_channels = {cfg.model.num_tokens}/{cfg.model.in_channels} but "
                              f"the latents are {shape[0]} tokens of dim {shape[1]}")
        if cfg.model.num_classes and not num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has no class labels; set "
                              f"model.num_classes=0 for an unconditional model")
        if cfg.model.num_classes and cfg.model.num_classes != num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has {num_classes} classes")
        check_global_batch(len(dataset), cfg.train.batch_size, info.world)  # before the run dir is made
        if cfg.transport.cos_loss_weight > 0 and cfg.train.optim.grad_clip <= 0:
            # 1 - cos(v, target) has a gradient of order 1/|v|: about 1e7 while the zero-initialised output is
            # still near 0, which unclipped would inflate Adam's second moments for many thousands of steps.
            log.warning("transport.cos_loss_weight=%g without gradient clipping (train.optim.grad_clip=%g): the "
                        "cosine term's first gradients are huge; LightningDiT clips at 1",
                        cfg.transport.cos_loss_weight, cfg.train.optim.grad_clip)
        task = DiffusionTask(cfg, info.device, mean, std, tokenizer, num_classes)
        log.info("diffusion %s: %.2fM parameters on %d latents (%d x %d), normalised with mean %.4f std %.4f",
                 cfg.model.variant, sum(p.numel() for p in task.model.parameters()) / 1e6, len(dataset), *shape,
                 mean, std)
        return _train(session, task, cfg, dataset)


def run_distill(cfg, out_dir: str | Path, resume: bool | str = False, force: bool = False,
                device: str = "auto") -> dict[str, Any]:
    """Distil the SiT distill.teacher into a shortcut student on the teacher's data (train/distill_task.py);
    saves `<out>/model` (EMA), which `maetok sample` reads like any model folder. `resume` as for run_tokenizer."""
    with _TrainingRun.start(out_dir, resume, force, device, "distill") as session:
        teacher, teacher_run = load_teacher(cfg.distill.teacher)
        cfg = session.config(with_teacher_settings(cfg, teacher, teacher_run))
        check_tracker(cfg.train.tracker)
        torch.manual_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        dataset, mean, std, num_classes, shape = _latent_data(cfg, tokenizer)
        sit = teacher.config
        if shape != (sit.num_tokens, sit.in_channels) or (sit.num_classes and sit.num_classes != num_classes):
            raise ConfigError(f"distill.teacher={cfg.distill.teacher} models {sit.num_tokens} tokens of dim "
                              f"{sit.in_channels} in {sit.num_classes} classes, but the data has {shape[0]} tokens "
                              f"of dim {shape[1]} in {num_classes}; give the data the teacher was trained on")
        check_global_batch(len(dataset), cfg.train.batch_size, session.info.world)  # before the run dir is made
        task = DistillTask(cfg, session.info.device, teacher, mean, std, tokenizer)
        d = cfg.distill
        log.info("distilling %s (%.2fM parameters) into a student of 1..%d steps, guidance %g on t in %s folded in",
                 d.teacher, sum(p.numel() for p in teacher.parameters()) / 1e6, d.max_steps, d.cfg_scale,
                 list(d.cfg_interval))
        return _train(session, task, cfg, dataset)
