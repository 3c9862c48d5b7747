"""`maetok pilot`: does MAETok beat plain AE / VAE tokenizers on *your* data, and what does it cost?

For each variant, with the same backbone, budget and seed: train the tokenizer (MAETok: stage 1, then its extra
decoder fine-tuning stage, as in the paper; the report says so), cache its latents, train the same diffusion
model, sample with and without CFG, and measure rFID / gFID / IS / precision-recall / PSNR / SSIM, GMM NLL per
K (one PCA dimension for all), linear-probe accuracy, parameters, GFLOPs and throughput. Writes `report.md`,
`report.json`, PNG grids and plots.
Every stage writes its result to disk before the next starts, so re-running with --resume continues.

Under torchrun every rank runs the training stages (DDP), and shares latent caching, generation and the
feature extraction of every FID (each rank its contiguous share); rank 0 alone computes the metrics from the
gathered features, fits the latent analysis and writes the report while the others wait at a barrier.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import (ConfigError, DiffusionRunConfig, SampleConfig, TokenizerRunConfig, from_dict, load_config,
                     to_dict)
from .io.distributed import DistInfo, barrier, cleanup, init_distributed
from .io.pretrained import load_sit, load_tokenizer

log = logging.getLogger("maetok.pilot")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class PilotBudget:
    """Everything a budget fixes; the same for every variant so the comparison is fair. Any field can be
    overridden on the command line (`maetok pilot --budget full image_size=256 tokenizer_preset=maetok-b-128`)."""
    image_size: int = 32
    tokenizer_preset: str = "cpu-32"    # tokenizer config (preset name or YAML) the overrides below apply to
    diffusion_preset: str = "sit-cpu"
    n_train: int = 2000                 # training images (0 = all)
    n_eval: int = 500                   # held-out images for rFID / reference; samples per gFID
    tokenizer: list[str] = field(default_factory=list)     # overrides on the cpu-32 preset
    tokenizer_steps: int = 400
    decoder_ft_steps: int = 100         # MAETok stage 2
    diffusion: list[str] = field(default_factory=list)     # overrides on the sit-cpu preset
    diffusion_steps: int = 1500
    sampler: str = "euler"
    sample_steps: int = 20
    cfg_scale: float = 2.0
    cfg_interval: tuple[float, float] = (0.0, 0.75)
    gmm_ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    analysis_max_train: int = 10000     # latents used to fit PCA/GMM and the probe (bounded for CPU time)
    classifier_steps: int = 300
    cache_flip: bool = True
    vae_kl_weight: float = 1e-4

    def validate(self, key: str) -> None:
        for name in ("image_size", "n_eval", "tokenizer_steps", "diffusion_steps", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("n_train", "decoder_ft_steps", "classifier_steps", "analysis_max_train"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.gmm_ks or min(self.gmm_ks) < 1:
            raise ConfigError(f"gmm_ks={list(self.gmm_ks)} must be positive mixture sizes")
        if self.vae_kl_weight < 0:
            raise ConfigError(f"vae_kl_weight={self.vae_kl_weight} must be >= 0")
        # sampler, cfg_scale and cfg_interval are checked by SampleConfig (Pilot.check_configs)


_TINY_TOK = ["model.enc_width=64", "model.enc_depth=2", "model.enc_heads=2", "model.dec_width=64",
             "model.dec_depth=2", "model.dec_heads=2", "model.latent_tokens=16", "model.latent_dim=8",
             "model.aux_width=32", "model.aux_depth=1", "model.aux_heads=1", "train.batch_size=32",
             # A model this small trains stably at a high rate: in 1500 steps 5e-3 gave the best rFID of
             # 1e-3..1e-2 for AE and MAETok (benchmarks/lr_sweep.py; results/lr-sweep-quick).
             "train.optim.lr=5e-3", "train.optim.warmup_steps=100", "train.log_every=20", "train.image_every=200",
             "train.ckpt_every=200", "stats_batches=10"]
# At 1.5e-3 (not 5e-4) CFG starts to matter within 800 steps: gFID 22.3 -> 14.9 with it on the AE latents.
_TINY_SIT = ["model.hidden=128", "model.depth=4", "model.heads=2", "train.batch_size=64",
             "train.optim.lr=1.5e-3", "train.optim.warmup_steps=100", "train.log_every=25", "train.image_every=500",
             "train.ckpt_every=500"]

BUDGETS: dict[str, PilotBudget] = {
    # ~10 minutes on 2 CPU cores (13 with one thread) for three variants on the built-in shapes. VAE KL weight
    # 1e-4 (the default): the best VAE gFID of 1e-4, 1e-5, 1e-6 here (benchmarks/results/vae-kl-quick).
    "quick": PilotBudget(n_train=5000, tokenizer=_TINY_TOK, diffusion=_TINY_SIT, tokenizer_steps=1500,
                         decoder_ft_steps=200, diffusion_steps=800),
    # ~60 minutes on 2 CPU cores on CIFAR-10 (one thread, the other core free): the small-scale reproduction of
    # the paper's table. Every stage is short of convergence; the budget is the same for every variant. Tokenizer
    # rate 4e-3: the best rFID for MAETok and (with 8e-3) for the AE in benchmarks/results/lr-sweep-standard;
    # the committed reports are benchmarks/results/pilot-cifar-lr4e-3-seed{0,1,2} (earlier runs at 2e-3:
    # pilot-cifar-standard, pilot-cifar-standard-tokseed1). VAE KL weight 1e-5: the best VAE gFID of 1e-4
    # (33.8, the weight those reports used), 1e-5 (27.5) and 1e-6 (28.7, better rFID); the VAE at 1e-5 is in
    # benchmarks/results/pilot-cifar-vae-kl1e-5-seed{0,1,2}.
    "standard": PilotBudget(
        n_train=0, n_eval=2000, tokenizer_steps=600, decoder_ft_steps=150, diffusion_steps=1000, sample_steps=16,
        tokenizer=["model.enc_width=128", "model.enc_depth=4", "model.enc_heads=4", "model.dec_width=128",
                   "model.dec_depth=4", "model.dec_heads=4", "model.latent_tokens=32", "model.latent_dim=12",
                   "model.aux_width=64", "model.aux_depth=2", "model.aux_heads=2", "train.batch_size=64",
                   "train.optim.lr=4e-3", "train.optim.warmup_steps=100", "train.log_every=25",
                   "train.image_every=500", "train.ckpt_every=250", "stats_batches=20"],
        diffusion=["model.hidden=128", "model.depth=4", "model.heads=2", "train.batch_size=64",
                   "train.optim.lr=5e-4", "train.optim.warmup_steps=200", "train.log_every=25",
                   "train.image_every=1000", "train.ckpt_every=500"],
        classifier_steps=0, cache_flip=False, gmm_ks=(1, 2, 4, 8, 16, 32), vae_kl_weight=1e-5),
    # A minute-long run of every stage, for tests and for checking a set-up; its numbers mean nothing.
    "smoke": PilotBudget(n_train=256, n_eval=64, tokenizer_steps=30, decoder_ft_steps=10, diffusion_steps=60,
                         sample_steps=4, classifier_steps=40, gmm_ks=(1, 2, 4), tokenizer=_TINY_TOK,
                         diffusion=_TINY_SIT),
    # GPU scale: the cpu presets at full width, longer; use torchrun for the training stages.
    "full": PilotBudget(n_train=0, n_eval=10000, tokenizer_steps=50000, decoder_ft_steps=10000,
                        diffusion_steps=100000, sampler="heun", sample_steps=50, classifier_steps=3000,
                        gmm_ks=(1, 2, 4, 8, 16, 32, 64),
                        tokenizer=["train.batch_size=256", "train.optim.warmup_steps=1000", "train.log_every=100",
                                   "train.image_every=5000", "train.ckpt_every=2000", "stats_batches=50"],
                        diffusion=["train.batch_size=256", "train.log_every=100", "train.image_every=10000",
                                   "train.ckpt_every=5000"]),
}


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_json(path: Path, data: dict) -> None:
    from .io.files import atomic_write_bytes

    atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=2, default=_jsonable).encode()))


def _jsonable(x: Any):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


PEAK_RSS, PEAK_GPU = "peak_rss_gib", "peak_gpu_memory_gib"


class Stage:
    """Run `fn` once: its result (a dict) is stored under `key` in results.json; later runs reuse it.

    Under torchrun, rank 0 runs a stage alone unless `every_rank` (training, latent caching, sampling,
    evaluation), rank 0 alone writes the file, and no rank leaves a stage before all have finished it. Every
    rank reads the file when the Stage is made, at the same point of the pilot and before any rank may write
    it, so all ranks agree on which stages are still to run.
    """

    def __init__(self, results_path: Path, dist: DistInfo):
        self.path, self.dist = results_path, dist
        self.results = _load_json(results_path)
        # Rank 0's peak memory so far, kept in the file across attempts but not among the stages (which every
        # rank must see alike).
        self.peaks = {k: self.results.pop(k) for k in (PEAK_RSS, PEAK_GPU) if k in self.results}
        # No rank may write the file before every rank has read it: a rank that read it after rank 0 recorded
        # a stage would skip that stage's barrier, and from then on the ranks' collectives would pair up wrongly
        # (seen as a hang at the next training run, under CPU contention).
        barrier(dist)

    def __call__(self, key: str, fn, every_rank: bool = False) -> dict:
        if key not in self.results:
            out: dict = {}
            if every_rank or self.dist.is_main:
                t0 = time.perf_counter()
                out = fn()
                out["wall_s"] = round(time.perf_counter() - t0, 1)
            self.results[key] = out  # other ranks keep an empty record: "done" is all they need to know
            if self.dist.is_main:
                for name, value in peak_memory(self.dist.device).items():
                    if isinstance(value, float):
                        self.peaks[name] = max(value, self.peaks.get(name, 0.0))
                _save_json(self.path, {**self.results, **self.peaks})
            barrier(self.dist)
        return self.results[key]


class PilotInterrupted(RuntimeError):
    """A training stage stopped early (signal): nothing is recorded, and --resume continues from its checkpoint.
    `exit_code`: 128 + the signal's number (130 Ctrl-C, 143 SIGTERM), 1 for any other early stop."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def _train_run(run_fn, cfg, out: Path, dist: DistInfo, device: torch.device) -> dict:
    """Train into `out`, resuming an interrupted run there; a finished run (model/ exists) is not redone."""
    done, started = (out / "model" / "config.json").is_file(), out.exists()
    barrier(dist)  # every rank looks before rank 0 creates anything, so all take the same branch
    if done:
        return {"skipped": "already trained"}
    from .train.run import exit_status

    summary = run_fn(cfg, out, resume=started, force=False, device=device.type)
    if not summary.get("finished"):
        raise PilotInterrupted(f"training in {out} stopped at step {summary.get('step')} "
                               f"({summary.get('stopped_by') or 'unfinished'}); rerun with --resume to continue",
                               exit_status(summary))
    return summary


def _log_series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    log_file = run_dir / "log.jsonl"
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            rec = json.loads(line)
            if key in rec:
                steps.append(rec["step"])
                values.append(rec[key])
    return steps, values


def _mean_throughput(run_dir: Path) -> float:
    _, ips = _log_series(run_dir, "images_per_s")
    ips = ips[1:] if len(ips) > 1 else ips  # the first window includes start-up
    return float(np.median(ips)) if ips else float("nan")


# --------------------------------------------------------------------------------------------------------------
# The pilot
# --------------------------------------------------------------------------------------------------------------
class Pilot:
    def __init__(self, data_spec: str, variants: list[str], budget: str, out: Path, device: str = "cpu",
                 inception: bool = False, dist: DistInfo | None = None, settings: PilotBudget | None = None):
        if budget not in BUDGETS:
            raise ConfigError(f"unknown budget {budget!r}; choose one of {sorted(BUDGETS)}")
        bad = [v for v in variants if v not in ("ae", "vae", "maetok", "mae")]
        if bad or not variants:
            raise ConfigError(f"unknown variants {bad or variants}; choose from ae, vae, maetok, mae")
        if len(set(variants)) != len(variants):
            raise ConfigError(f"variants {variants} name one twice")
        self.spec, self.variants, self.budget_name, self.out = data_spec, variants, budget, out
        self.dist = dist or DistInfo(device=torch.device(device))
        # Under torchrun each rank works on its own GPU (cuda:LOCAL_RANK); on CPU the device is as given.
        self.b, self.device, self.inception = settings or BUDGETS[budget], self.dist.device, inception
        self.train_set = self.test_set = None
        self.feature_net = self._inception_net = self._inception_ref = None

    # ----- data and the feature network ------------------------------------------------------------------------
    def open_data(self) -> None:
        from .data import DatasetError, open_dataset
        from .data.datasets import HELD_OUT_SPLITS, SplitNotFoundError

        if self.train_set is not None:
            return
        b = self.b
        train_set = open_dataset(self.spec, split="train", image_size=b.image_size, limit=b.n_train)
        if not getattr(train_set, "has_labels", True):
            # One placeholder class would make a feature network that has learnt nothing, and so meaningless FIDs.
            raise DatasetError(f"{self.spec}: the pilot needs class labels: it trains its feature network (for FID "
                               f"on data without a pretrained one) and the linear probe on them, and conditions "
                               f"the diffusion model on them. Give labelled images (class sub-folders, or arr_1 "
                               f"in an npz); the tokenizer and diffusion commands train on unlabelled data.")
        self.train_set = train_set
        errors: list[DatasetError] = []
        for split in HELD_OUT_SPLITS:  # the same order as every command's held-out default (test, then val)
            try:
                self.test_set = open_dataset(self.spec, split=split, image_size=b.image_size, limit=b.n_eval)
                break
            except DatasetError as e:  # try the next split name, report both if neither works
                errors.append(e)
        else:
            if all(isinstance(e, SplitNotFoundError) for e in errors):
                # The loaders' own advice (--split ...) is for the other commands: the pilot has no --split.
                found = sorted({s for e in errors for s in e.available}) or "no split folders"
                raise DatasetError(f"{self.spec}: the pilot needs a held-out split, a test/ or val/ folder of class "
                                   f"folders beside train/ (DIR/train/<class>/..., DIR/test/<class>/...); it found "
                                   f"{found}")
            raise DatasetError(f"{self.spec}: the pilot needs a held-out split (a test/ or val/ folder beside "
                               f"train/): " + "; ".join(dict.fromkeys(str(e) for e in errors)))
        self.num_classes = int(getattr(self.train_set, "num_classes", 0) or 0)
        if len(self.test_set) < self.b.n_eval:
            # Every metric is labelled with the count it was computed on: the held-out set's size, not n_eval.
            log.warning("held-out split has %d images, fewer than n_eval=%d: reference statistics, gFID samples "
                        "and rFID all use %d", len(self.test_set), self.b.n_eval, len(self.test_set))
        log.info("pilot data: %s, %d train / %d held-out images, %d classes", self.spec, len(self.train_set),
                 len(self.test_set), self.num_classes)

    @property
    def n_eval(self) -> int:
        """Images per evaluation: n_eval, or the whole held-out split when it is smaller (reference, samples
        and reconstructions then have the same count, as FID needs)."""
        return min(self.b.n_eval, len(self.test_set))

    def check_configs(self) -> None:
        """Open the data and build every run config the pilot will use (each variant's tokenizer stages, the
        diffusion model, the sampler), each checked against the training split's size, before any work or any
        deletion: a typo in an override fails at once instead of after hours of tokenizer training."""
        from .train.loop import check_global_batch

        self.open_data()
        for variant in self.variants:
            tcfg = self.tokenizer_config(variant, 1)
            if variant == "maetok" and self.b.decoder_ft_steps > 0:
                self.tokenizer_config(variant, 2, str(self.out / variant / "tokenizer"))
            dcfg = self.diffusion_config(self.out / variant, tcfg.model, self.tokenizer_dir(variant))
            for model, cfg in (("tokenizer", tcfg), ("diffusion", dcfg)):
                try:
                    check_global_batch(len(self.train_set), cfg.train.batch_size, self.dist.world)
                except ConfigError as e:
                    raise ConfigError(f"{self.spec}, {model} runs: {e}; change it with --{model}-set "
                                      f"train.batch_size=N, or add images") from None
        for scale in (1.0, self.b.cfg_scale):
            self.sample_config(scale)

    def sample_config(self, cfg_scale: float) -> SampleConfig:
        """The budget's sampler settings at one guidance scale (checked: a bad budget fails up front)."""
        b = self.b
        return from_dict(SampleConfig, {"sampler": b.sampler, "steps": b.sample_steps, "cfg_scale": cfg_scale,
                                        "cfg_interval": list(b.cfg_interval), "seed": 0}, key="pilot")

    def is_cifar10(self) -> bool:
        names = [str(n).lower() for n in (getattr(self.train_set, "class_names", None) or [])]
        return self.b.image_size == 32 and names == CIFAR10_CLASSES

    def build_feature_net(self) -> dict:
        from .eval.classifier import SmallCNN, train_classifier
        from .eval.features import build_feature_net, wrap_feature_net

        if self.is_cifar10():
            try:
                self.feature_net = build_feature_net("resnet56-cifar10", self.device)
                return {"feature_net": self.feature_net.name, "why": "pretrained CIFAR-10 ResNet-56"}
            except FileNotFoundError as e:
                log.warning("resnet56-cifar10 unavailable (%s); training a small classifier instead", e)
        tag = "cnn-" + Path(self.spec.split(":")[-1]).stem.replace("_", "-")
        ckpt = self.out / "feature_net"
        if (ckpt / "config.json").is_file():
            model, meta = SmallCNN.load(ckpt)
        else:
            steps = self.b.classifier_steps or 1000
            model, acc = train_classifier(self.train_set, self.test_set, max(self.num_classes, 1), steps=steps)
            meta = {"name": tag, "test_top1": acc, "steps": steps}
            model.save(ckpt, meta)
        self.feature_net = wrap_feature_net(model.to(self.device), meta["name"], input_size=self.b.image_size)
        return {"feature_net": meta["name"], "classifier_test_top1": meta["test_top1"],
                "why": "no pretrained feature network for this data: a small CNN trained on its training split"}

    def features(self, images, net=None) -> Any:
        """Features under the pilot's feature net (or `net`) of a Dataset, uint8 NHWC array or float tensor. Under
        torchrun every rank embeds a share and receives them all, in order. The Inception network (~5 images/s
        on a CPU) shows a progress bar; the small networks finish at once."""
        from .eval.features import features_of

        slow = net is not None and net.name == "inception"
        return features_of(net or self.feature_net, images, batch_size=256, progress=slow, dist=self.dist,
                           num_workers=self.loader_workers)

    @property
    def loader_workers(self) -> int:
        """On a GPU, worker processes decode images while it computes; on a CPU they would compete with it."""
        return 4 if self.device.type == "cuda" else 0

    def first(self, dataset, n: int):
        """The first `n` items of `dataset` (all of them when it is smaller)."""
        from torch.utils.data import Subset

        return Subset(dataset, range(min(n, len(dataset))))

    def set_reference(self) -> None:
        """Features of the held-out set under the feature network: every FID's reference (all ranks at once)."""
        self.ref_feats = self.features(self.first(self.test_set, self.n_eval))

    def real_images(self, dataset, n: int) -> torch.Tensor:
        n = min(n, len(dataset))
        return torch.stack([dataset[i][0] for i in range(n)])

    def inception_reference(self):
        """Inception features of the held-out set, computed once per pilot (and cached on disk: ~5 images/s on a
        CPU), shared by every variant's rFID and gFID."""
        from .eval.api import reference_features

        if self._inception_ref is None:  # every rank calls this at the same point: the ranks share the work
            self._inception_ref, _ = reference_features(self.first(self.test_set, self.n_eval), self.inception_net(),
                                                        batch_size=64, stats_cache=self.out / "reference-inception.npz",
                                                        progress=True, dist=self.dist)
        return self._inception_ref

    def inception_net(self):
        from .eval.features import build_feature_net

        if self._inception_net is None:
            self._inception_net = build_feature_net("inception", self.device)
        return self._inception_net

    # ----- one variant -----------------------------------------------------------------------------------------
    def tokenizer_config(self, variant: str, stage: int, init_from: str = "") -> TokenizerRunConfig:
        b = self.b
        over = [f"model.variant={variant}", f"model.image_size={b.image_size}", f"data.image_size={b.image_size}",
                f"data.spec={self.spec}", "data.split=train", f"data.limit={b.n_train}",
                f"train.steps={b.tokenizer_steps}", f"loss.kl_weight={b.vae_kl_weight}"]
        if self.is_cifar10() and variant == "maetok":
            # Small-scale semantic teacher: the CIFAR ResNet-56 stands in for DINOv2/SigLIP (cannot be had here).
            # A default, so it goes before the budget's overrides: `--tokenizer-set model.aux_targets=...` wins.
            over.append("model.aux_targets=[{name: hog, weight: 1.0}, {name: resnet-cifar, weight: 1.0, "
                        "options: {arch: resnet56, layer: layer2}}]")
        over += b.tokenizer
        if stage == 2:
            over += ["stage=2", f"decoder_ft.init_from={init_from}", f"train.steps={b.decoder_ft_steps}",
                     f"decoder_ft.anneal_steps={max(1, b.decoder_ft_steps // 2)}", "train.optim.warmup_steps=0"]
        return load_config(TokenizerRunConfig, b.tokenizer_preset, over)

    def run_variant(self, variant: str) -> dict:
        from .data.latents import cache_latents
        from .train.run import run_diffusion

        vdir = self.out / variant
        vdir.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)  # rank 0 made the folder; the others read its results.json next
        stage = Stage(vdir / "results.json", self.dist)
        b = self.b

        def train(run_fn, cfg, run_dir: Path) -> dict:
            return _summary(_train_run(run_fn, cfg, run_dir, self.dist, self.device))

        tok_dir = self.train_tokenizer(variant, stage)
        tok = load_tokenizer(tok_dir / "model").to(self.device)

        stage("reconstruction", lambda: self.eval_reconstruction(tok, vdir), every_rank=True)
        stage("latents", lambda: {  # under torchrun the ranks encode alternate shards
            "train": str(cache_latents(tok, self.train_set, vdir / "latents-train", flip=b.cache_flip,
                                       device=self.device, batch_size=256, dist=self.dist)),
            "test": str(cache_latents(tok, self.test_set, vdir / "latents-test", flip=False, device=self.device,
                                      batch_size=256, dist=self.dist))}, every_rank=True)

        dcfg = self.diffusion_config(vdir, tok.config, tok_dir)
        stage("diffusion_train", lambda: train(run_diffusion, dcfg, vdir / "diffusion"), every_rank=True)
        for name, scale in (("nocfg", 1.0), ("cfg", b.cfg_scale)):
            stage(f"generation_{name}", lambda scale=scale, name=name: self.eval_generation(
                vdir, tok, dcfg, scale, vdir / f"samples-{name}"), every_rank=True)
        stage("cost", lambda: self.measure_cost(tok, vdir, dcfg))
        return stage.results

    def train_tokenizer(self, variant: str, stage: Stage) -> Path:
        """The variant's tokenizer stages (MAETok: stage 1, then decoder fine-tuning on the frozen encoder),
        recorded in `stage`; returns the folder of the run whose weights the variant uses."""
        from .train.run import run_tokenizer

        vdir = self.out / variant

        def train(cfg, run_dir: Path) -> dict:
            return _summary(_train_run(run_tokenizer, cfg, run_dir, self.dist, self.device))

        stage("tokenizer_train", lambda: train(self.tokenizer_config(variant, 1), vdir / "tokenizer"), every_rank=True)
        tok_dir = self.tokenizer_dir(variant)
        if tok_dir.name == "tokenizer-ft":
            stage("decoder_finetune", lambda: train(self.tokenizer_config(variant, 2, str(vdir / "tokenizer")),
                                                    tok_dir), every_rank=True)
        return tok_dir

    def diffusion_config(self, vdir: Path, tok_config, tok_dir: Path,
                         extra: list[str] | None = None) -> DiffusionRunConfig:
        """The same diffusion model for every variant, sized to the latents of the tokenizer `tok_config`
        describes (a TokenizerConfig: the trained tokenizer's, or the one it will be trained with)."""
        b = self.b
        return load_config(DiffusionRunConfig, b.diffusion_preset, [
            f"latents={vdir / 'latents-train'}", f"tokenizer={tok_dir / 'model'}",
            f"model.num_tokens={tok_config.latent_tokens}", f"model.in_channels={tok_config.latent_dim}",
            f"model.num_classes={self.num_classes}", f"train.steps={b.diffusion_steps}",
            f"sample.sampler={b.sampler}", f"sample.steps={b.sample_steps}", *b.diffusion, *(extra or [])])

    def tokenizer_dir(self, variant: str) -> Path:
        """The run whose weights the variant's latents come from: MAETok's decoder fine-tuning when it has one."""
        vdir = self.out / variant
        return vdir / "tokenizer-ft" if variant == "maetok" and self.b.decoder_ft_steps > 0 else vdir / "tokenizer"

    @torch.no_grad()
    def eval_reconstruction(self, tok, vdir: Path) -> dict:
        """rFID (+ Inception rFID), PSNR and SSIM of the held-out set, one batch at a time; under torchrun each
        rank reconstructs a contiguous share, and every rank returns the same result. Reconstructions are
        rounded to uint8 levels first, as `maetok eval recon` does (and as generated samples are)."""
        from torch.utils.data import DataLoader, Subset

        from .data.images import save_image_grid
        from .eval.features import extract_features, gather_features
        from .eval.fid import fid
        from .eval.recon import ReconstructionMetrics, to_uint8_levels
        from .progress import progress_bar
        from .io.distributed import shard_range

        nets = [self.feature_net] + ([self.inception_net()] if self.inception else [])
        feats: list[list] = [[] for _ in nets]
        meter, grid = ReconstructionMetrics(lpips=None), []
        share = Subset(self.test_set, shard_range(self.n_eval, self.dist))
        loader = DataLoader(share, batch_size=256, shuffle=False, num_workers=self.loader_workers)
        for x, _ in progress_bar(loader, desc="reconstruct", disable=not self.dist.is_main):
            x = x.to(self.device)
            recon = to_uint8_levels(tok.decode(tok.encode(x)).float())
            meter.update(recon, x)
            for net, net_feats in zip(nets, feats):
                net_feats.append(extract_features(net, recon, batch_size=256, progress=False))
            if not grid:  # rank 0's share starts at the first image
                n = min(16, len(x))
                grid = [t.cpu() for i in range(0, n, 8) for t in (x[i:i + 8], recon[i:i + 8])]
        if self.dist.enabled:
            meter.all_gather(self.dist)
        recon_feats = [gather_features(f, self.dist) for f in feats]
        if self.dist.is_main:
            save_image_grid(torch.cat(grid), vdir / "reconstructions.png", nrow=8)
        out = {("r" + k): v for k, v in fid(recon_feats[0], self.ref_feats).items()}
        out |= meter.compute()  # psnr@N, ssim@N
        if self.inception:
            out |= {("r" + k): v for k, v in fid(recon_feats[1], self.inception_reference()).items()}
        return out

    def eval_generation(self, vdir: Path, tok, dcfg: DiffusionRunConfig, scale: float, out_dir: Path) -> dict:
        from .diffusion.generate import generate_to_dir
        from .eval.fid import fid, generation_metrics, load_adm_images

        model = load_sit(vdir / "diffusion" / "model").to(self.device)
        scfg = self.sample_config(scale)
        t0 = time.perf_counter()
        path = generate_to_dir(model, tok, self.n_eval, scfg, out_dir, balanced=True, batch_size=250,
                               device=self.device, progress=True)  # sharded across ranks under torchrun
        gen_s = time.perf_counter() - t0
        # uint8 NHWC, memory-mapped: each rank reads only the share it embeds (50k images at 256 px are 10 GB)
        images = load_adm_images(path, lazy=True)
        feats = self.features(images)
        inception = (self.features(images, self.inception_net()), self.inception_reference()) if self.inception \
            else None
        if not self.dist.is_main:  # the metrics below are cheap next to the features: rank 0 computes them
            return {}
        # KID subsets of at most half the samples: subsets as large as the sets would all be the same draw, and
        # the reported spread a meaningless 0.
        metrics = generation_metrics(feats, self.ref_feats, kid_subsets=50,
                                     kid_subset_size=min(1000, max(2, len(images) // 2)))
        metrics = {("g" + k if k.startswith("fid") else k): v for k, v in metrics.items()}
        if inception:
            metrics |= {("g" + k): v for k, v in fid(*inception).items()}
        metrics["sampling_images_per_s"] = len(images) / gen_s
        metrics["cfg_scale"] = scale
        return metrics

    def measure_cost(self, tok, vdir: Path, dcfg: DiffusionRunConfig) -> dict:
        from .diffusion.samplers import forward_passes_per_sample
        from .eval.cost import count_flops, count_params, throughput

        sit = load_sit(vdir / "diffusion" / "model").to(self.device).eval()
        x = self.real_images(self.test_set, 64).to(self.device)
        z = tok.encode(x[:1]).detach()
        t, y = torch.full((1,), 0.5, device=self.device), torch.zeros(1, dtype=torch.long, device=self.device)
        xb = x[:64]
        zb = tok.encode(xb).detach()
        decode_gflops = count_flops(lambda: tok.decode(z)) / 1e9
        sit_gflops = count_flops(lambda: sit(tok.normalize(z), t, y if sit.null_label else None)) / 1e9
        # What one image costs to generate with the pilot's sampler: every forward pass (two where guided) and
        # the decode.
        generation = {f"generation_gflops_per_image_{name}":
                      forward_passes_per_sample(self.sample_config(scale)) * sit_gflops + decode_gflops
                      for name, scale in (("nocfg", 1.0), ("cfg", self.b.cfg_scale))}
        return {
            "tokenizer_params_M": count_params(tok) / 1e6,
            "encoder_params_M": count_params(tok.encoder) / 1e6,
            "decoder_params_M": count_params(tok.decoder) / 1e6,
            "sit_params_M": count_params(sit) / 1e6,
            "encode_gflops": count_flops(lambda: tok.encode(x[:1])) / 1e9,
            "decode_gflops": decode_gflops,
            "sit_forward_gflops": sit_gflops,
            **generation,
            "latent_shape": list(z.shape[1:]),
            "encode_images_per_s": throughput(lambda: tok.encode(xb), len(xb), device=self.device),
            "decode_images_per_s": throughput(lambda: tok.decode(zb), len(zb), device=self.device),
            "tokenizer_train_images_per_s": _mean_throughput(vdir / "tokenizer"),
            "diffusion_train_images_per_s": _mean_throughput(vdir / "diffusion"),
        }

    # ----- across variants -------------------------------------------------------------------------------------
    def latent_analysis(self) -> dict:
        from .data.latents import LatentDataset
        from .eval.latent_analysis import (gmm_analysis, linear_probe, pca_dim_for_variance, plot_gmm_nll,
                                           token_statistics)

        m = self.b.analysis_max_train or None
        stats_of = {v: LatentDataset(self.out / v / "latents-train") for v in self.variants}
        train = {v: stats_of[v].first(m) for v in self.variants}  # (latents, labels)
        test = {v: LatentDataset(self.out / v / "latents-test").first() for v in self.variants}
        norm = {v: (train[v][0] - stats_of[v].mean) / stats_of[v].std for v in self.variants}
        norm_test = {v: (test[v][0] - stats_of[v].mean) / stats_of[v].std for v in self.variants}
        own_dims = {v: pca_dim_for_variance(norm[v], 0.9) for v in self.variants}
        # One dimension for all, so that per-sample NLLs compare: the largest of the variants' 90%-variance
        # dimensions. A variant that needs fewer keeps extra low-variance directions, which count as much in a
        # likelihood as any other, so the report shows each variant's own dimension and the variance kept.
        dim = max(own_dims.values())
        results, gmms = {}, {}
        for v in self.variants:
            g = gmm_analysis(norm[v], norm_test[v], ks=self.b.gmm_ks, pca_dim=dim)
            gmms[v] = g
            stats = token_statistics(train[v][0])
            results[v] = {"gmm": {"ks": g.ks, "nll": g.nll, "nll_se": g.nll_se, "bic": g.bic, "pca_dim": g.pca_dim,
                                  "explained_variance": g.explained_variance, "best_k_bic": g.best_k_bic,
                                  "own_pca_dim": own_dims[v]},
                          **linear_probe(norm[v], train[v][1], norm_test[v], test[v][1]),
                          "token_stats": {k: v2 for k, v2 in stats.items() if not isinstance(v2, (list, np.ndarray))}}
        plot_gmm_nll(gmms, self.out / "gmm_nll.png")
        return {"pca_dim": dim, "variants": results}

    def real_floor(self) -> dict:
        """FID of real training images against the held-out set at the same count: the best any model can do."""
        from .eval.fid import fid

        real_train = self.features(self.first(self.train_set, self.n_eval))
        return {("fid_train_vs_test" + k[3:]): v for k, v in fid(real_train, self.ref_feats).items()}

    def check_same_settings(self, plan: dict | None) -> None:
        """A resumed pilot must keep its settings: otherwise its finished stages and the new ones would not be
        comparable, and the report would silently mix them."""
        if not plan:
            return
        now = json.loads(json.dumps(to_dict(self.b), default=_jsonable))
        # A field added to PilotBudget after the pilot started counts as its default there.
        before = {**json.loads(json.dumps(to_dict(PilotBudget()), default=_jsonable)), **plan.get("settings", {})}
        diff = {k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)}
        if plan.get("data") != self.spec:
            diff["data"] = (plan.get("data"), self.spec)
        if diff:
            budget = plan.get("budget")
            why = (f"it ran --budget {budget}, this asks for --budget {self.budget_name}; "
                   if budget and budget != self.budget_name else "")
            raise ConfigError(f"pilot {self.out} was started with other settings ({why}{diff} as (before, now)); "
                              f"resume it with the same ones, or start over with --force (deletes it) or a new --out")

    def run(self) -> Path | None:
        """The report's path (None on ranks other than 0)."""
        self.open_data()
        top = Stage(self.out / "pilot_results.json", self.dist)
        self.check_same_settings(top.results.get("plan"))
        top("plan", lambda: {"data": self.spec, "variants": self.variants, "budget": self.budget_name,
                             "settings": to_dict(self.b), "device": str(self.device), "world_size": self.dist.world,
                             "torch": torch.__version__, "threads": torch.get_num_threads()})
        top("feature_net", self.build_feature_net)  # rank 0 trains it when there is no pretrained one
        if self.dist.is_main and self.feature_net is None:  # a resumed pilot (trains it if it went missing)
            self.build_feature_net()
        barrier(self.dist)
        if self.feature_net is None:  # the other ranks load what rank 0 has: no two ranks train and save it
            self.build_feature_net()
        self.set_reference()
        top("real_floor", self.real_floor, every_rank=True)
        per_variant = {v: self.run_variant(v) for v in self.variants}
        analysis = top("latent_analysis", self.latent_analysis)
        if not self.dist.is_main:
            return None
        plot_losses({v: self.out / v / "diffusion" for v in self.variants}, self.out / "diffusion_loss.png")
        from .report import write_report

        # The peak over every attempt of this pilot (each stage records its process's): a resumed pilot may have
        # run only the last stages itself.
        memory = peak_memory(self.device, self.dist.world)
        for path in (top.path, *(self.out / v / "results.json" for v in self.variants)):
            recorded = _load_json(path)
            for key in (PEAK_RSS, PEAK_GPU):
                if isinstance(recorded.get(key), float) and key in memory:
                    memory[key] = max(memory[key], recorded[key])
        return write_report(self.out, top.results, per_variant, analysis, memory)


def peak_memory(device: torch.device, world: int = 1) -> dict[str, Any]:
    """Peak memory of this process (rank 0's, when several run) since it started."""
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out: dict[str, Any] = {PEAK_RSS: round(rss_kib / 2 ** 20, 2)}
    if device.type == "cuda":
        out[PEAK_GPU] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    if world > 1:
        out["measured_on"] = f"rank 0 of {world}"
    return out


def _summary(s: dict) -> dict:
    return {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool, type(None)))}


def plot_losses(run_dirs: dict[str, Path], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, run in run_dirs.items():
        steps, loss = _log_series(run, "loss")
        if steps:
            k = max(1, len(loss) // 50)  # light smoothing so the lines can be told apart
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, label=name)
    ax.set_xlabel("diffusion training step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("Diffusion training loss (same SiT, same seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


# Ranks other than 0 wait at barriers while rank 0 evaluates (minutes to hours at full size): the default
# collective timeout (10-30 min) would kill a healthy job.
PILOT_COLLECTIVE_TIMEOUT = timedelta(hours=12)


def pilot_settings(budget: str, overrides: list[str] | None = None, tokenizer_set: list[str] | None = None,
                   diffusion_set: list[str] | None = None) -> PilotBudget:
    """A budget with dotted overrides on its fields, and extra overrides appended to its tokenizer / diffusion
    run overrides (so they win over the budget's own)."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {sorted(BUDGETS)}")
    b = load_config(PilotBudget, to_dict(BUDGETS[budget]), overrides or [])
    b.tokenizer = [*b.tokenizer, *(tokenizer_set or [])]
    b.diffusion = [*b.diffusion, *(diffusion_set or [])]
    return b


def run_pilot(data_spec: str, variants: list[str], budget: str, out: Path, resume: bool = False,
              force: bool = False, device: str = "cpu", inception: bool = False,
              settings: PilotBudget | None = None, collective_timeout: float | None = None) -> Path | None:
    """Run (or continue) the pilot in `out`; alone or under torchrun. The report's path on rank 0, else None.
    `settings`: the budget's settings when changed from BUDGETS[budget] (see `pilot_settings`).
    `collective_timeout`: seconds a rank may wait for the others (default PILOT_COLLECTIVE_TIMEOUT); past it the
    waiting collective raises with a traceback instead of hanging."""
    from .io.rundir import RunDirExists
    from .train.run import setup_logging

    timeout = PILOT_COLLECTIVE_TIMEOUT if collective_timeout is None else timedelta(seconds=collective_timeout)
    dist = init_distributed(device, timeout=timeout)
    if not dist.enabled:
        dist.device = torch.device(device)
    try:
        setup_logging(None, dist.is_main)
        out = Path(out)
        pilot = Pilot(data_spec, variants, budget, out, device, inception, dist, settings)
        # Everything that can fail on a typo (configs, data) fails here: before hours of work, and before
        # --force deletes the old pilot.
        pilot.check_configs()
        existing = out.exists() and any(out.iterdir())
        barrier(dist)  # every rank looks before rank 0 deletes or creates anything
        if existing and not resume:
            if not (out / "pilot_results.json").is_file():  # --force deletes a pilot, never someone's folder
                raise RunDirExists(f"{out} is not empty and is not a maetok pilot (no pilot_results.json); "
                                   f"choose another --out")
            if not force:
                raise RunDirExists(f"pilot directory {out} already exists; pass --resume to continue it or --force "
                                   f"to delete it and start over")
            if dist.is_main:
                shutil.rmtree(out)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        barrier(dist)
        return pilot.run()
    finally:
        cleanup(dist)
