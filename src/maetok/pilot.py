"""`maetok pilot`: does MAETok beat plain AE / VAE tokenizers on *your* data, and what does it cost?

For each variant, with the same backbone, budget and seed: train the tokenizer (MAETok: stage 1, then decoder
fine-tuning), cache its latents, train the same diffusion model, sample with and without CFG, and measure
rFID / gFID / IS / precision-recall / PSNR / SSIM, GMM NLL per K (one PCA dimension for all), linear-probe
accuracy, parameters, GFLOPs and throughput. Writes `report.md` + `report.json` + PNG grids and plots.
Every stage writes its result to disk before the next starts, so re-running with --resume continues.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DiffusionRunConfig, TokenizerRunConfig, load_config, to_dict

log = logging.getLogger("maetok.pilot")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class PilotBudget:
    """Everything a budget fixes; the same for every variant so the comparison is fair."""
    image_size: int = 32
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


_TINY_TOK = ["model.enc_width=64", "model.enc_depth=2", "model.enc_heads=2", "model.dec_width=64",
             "model.dec_depth=2", "model.dec_heads=2", "model.latent_tokens=16", "model.latent_dim=8",
             "model.aux_width=32", "model.aux_depth=1", "model.aux_heads=1", "train.batch_size=32",
             "train.optim.lr=1e-3", "train.optim.warmup_steps=50", "train.log_every=20", "train.image_every=200",
             "train.ckpt_every=200", "stats_batches=10"]
_TINY_SIT = ["model.hidden=128", "model.depth=4", "model.heads=2", "train.batch_size=64",
             "train.optim.lr=5e-4", "train.optim.warmup_steps=100", "train.log_every=25", "train.image_every=500",
             "train.ckpt_every=500"]

BUDGETS: dict[str, PilotBudget] = {
    # ~10 minutes on 2 CPU cores for three variants on the built-in shapes.
    "quick": PilotBudget(tokenizer=_TINY_TOK, diffusion=_TINY_SIT, tokenizer_steps=800, decoder_ft_steps=150,
                         diffusion_steps=800),
    # ~75 minutes on 2 CPU cores on CIFAR-10 (one thread, the other core free): the small-scale reproduction of
    # the paper's table. Every stage is short of convergence; the budget is the same for every variant.
    "standard": PilotBudget(
        n_train=0, n_eval=2000, tokenizer_steps=600, decoder_ft_steps=150, diffusion_steps=1000, sample_steps=16,
        tokenizer=["model.enc_width=128", "model.enc_depth=4", "model.enc_heads=4", "model.dec_width=128",
                   "model.dec_depth=4", "model.dec_heads=4", "model.latent_tokens=32", "model.latent_dim=12",
                   "model.aux_width=64", "model.aux_depth=2", "model.aux_heads=2", "train.batch_size=64",
                   "train.optim.lr=8e-4", "train.optim.warmup_steps=100", "train.log_every=25",
                   "train.image_every=500", "train.ckpt_every=250", "stats_batches=20"],
        diffusion=["model.hidden=128", "model.depth=4", "model.heads=2", "train.batch_size=64",
                   "train.optim.lr=5e-4", "train.optim.warmup_steps=200", "train.log_every=25",
                   "train.image_every=1000", "train.ckpt_every=500"],
        classifier_steps=0, cache_flip=False, gmm_ks=(1, 2, 4, 8, 16, 32)),
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
    from .train.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=2, default=_jsonable).encode()))


def _jsonable(x: Any):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class Stage:
    """Run `fn` once: its result (a dict) is stored under `key` in results.json; later runs reuse it."""

    def __init__(self, results_path: Path):
        self.path = results_path
        self.results = _load_json(results_path)

    def __call__(self, key: str, fn) -> dict:
        if key not in self.results:
            t0 = time.perf_counter()
            out = fn()
            out["wall_s"] = round(time.perf_counter() - t0, 1)
            self.results[key] = out
            _save_json(self.path, self.results)
        return self.results[key]


class PilotInterrupted(RuntimeError):
    """A training stage stopped early (signal): nothing is recorded, and --resume continues from its checkpoint."""


def _train_run(run_fn, cfg, out: Path) -> dict:
    """Train into `out`, resuming an interrupted run there; a finished run (model/ exists) is not redone."""
    if (out / "model" / "config.json").is_file():
        return {"skipped": "already trained"}
    summary = run_fn(cfg, out, resume=out.exists(), force=False)
    if not summary.get("finished"):
        raise PilotInterrupted(f"training in {out} stopped at step {summary.get('step')} "
                               f"({summary.get('stopped_by') or 'unfinished'}); rerun with --resume to continue")
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
                 inception: bool = False):
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; choose one of {sorted(BUDGETS)}")
        bad = [v for v in variants if v not in ("ae", "vae", "maetok", "mae")]
        if bad or not variants:
            raise ValueError(f"unknown variants {bad}; choose from ae, vae, maetok, mae")
        self.spec, self.variants, self.budget_name, self.out = data_spec, variants, budget, out
        self.b, self.device, self.inception = BUDGETS[budget], torch.device(device), inception
        self.train_set = self.test_set = None
        self.feature_net = None

    # ----- data and the feature network ------------------------------------------------------------------------
    def open_data(self) -> None:
        from .data import open_dataset

        b = self.b
        self.train_set = open_dataset(self.spec, split="train", image_size=b.image_size, limit=b.n_train)
        for split in ("test", "val"):
            try:
                self.test_set = open_dataset(self.spec, split=split, image_size=b.image_size, limit=b.n_eval)
                break
            except Exception as e:  # noqa: BLE001 - try the next split name, report if none works
                err = e
        else:
            raise ValueError(f"{self.spec}: no held-out split (tried test, val): {err}")
        self.num_classes = int(getattr(self.train_set, "num_classes", 0) or 0)
        log.info("pilot data: %s, %d train / %d held-out images, %d classes", self.spec, len(self.train_set),
                 len(self.test_set), self.num_classes)

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

    def features(self, images) -> Any:
        from .eval.features import extract_features

        return extract_features(self.feature_net, images, batch_size=256, progress=False, device=self.device)

    def real_images(self, dataset, n: int) -> torch.Tensor:
        n = min(n, len(dataset))
        return torch.stack([dataset[i][0] for i in range(n)])

    # ----- one variant -----------------------------------------------------------------------------------------
    def tokenizer_config(self, variant: str, stage: int, init_from: str = "") -> TokenizerRunConfig:
        b = self.b
        over = [f"model.variant={variant}", f"model.image_size={b.image_size}", f"data.image_size={b.image_size}",
                f"data.spec={self.spec}", "data.split=train", f"data.limit={b.n_train}",
                f"train.steps={b.tokenizer_steps}", f"loss.kl_weight={b.vae_kl_weight}", *b.tokenizer]
        if self.is_cifar10() and variant == "maetok":
            # Small-scale semantic teacher: the CIFAR ResNet-56 stands in for DINOv2/SigLIP (cannot be had here).
            over.append("model.aux_targets=[{name: hog, weight: 1.0}, {name: resnet-cifar, weight: 1.0, "
                        "options: {arch: resnet56, layer: layer2}}]")
        if stage == 2:
            over += ["stage=2", f"decoder_ft.init_from={init_from}", f"train.steps={b.decoder_ft_steps}",
                     f"decoder_ft.anneal_steps={max(1, b.decoder_ft_steps // 2)}", "train.optim.warmup_steps=0"]
        return load_config(TokenizerRunConfig, "cpu-32", over)

    def run_variant(self, variant: str) -> dict:
        from .data.latents import cache_latents
        from .tokenizer import MAETok
        from .train.run import run_diffusion, run_tokenizer

        vdir = self.out / variant
        vdir.mkdir(parents=True, exist_ok=True)
        stage = Stage(vdir / "results.json")
        b = self.b

        cfg1 = self.tokenizer_config(variant, 1)
        stage("tokenizer_train", lambda: _summary(_train_run(run_tokenizer, cfg1, vdir / "tokenizer")))
        tok_dir = vdir / "tokenizer"
        if variant == "maetok" and b.decoder_ft_steps > 0:
            cfg2 = self.tokenizer_config(variant, 2, str(vdir / "tokenizer"))
            stage("decoder_finetune", lambda: _summary(_train_run(run_tokenizer, cfg2, vdir / "tokenizer-ft")))
            tok_dir = vdir / "tokenizer-ft"
        tok = MAETok.from_pretrained(tok_dir / "model").to(self.device)

        stage("reconstruction", lambda: self.eval_reconstruction(tok, vdir))
        stage("latents", lambda: {
            "train": str(cache_latents(tok, self.train_set, vdir / "latents-train", flip=b.cache_flip,
                                       device=self.device, batch_size=256)),
            "test": str(cache_latents(tok, self.test_set, vdir / "latents-test", flip=False, device=self.device,
                                      batch_size=256))})

        dcfg = load_config(DiffusionRunConfig, "sit-cpu", [
            f"latents={vdir / 'latents-train'}", f"tokenizer={tok_dir / 'model'}",
            f"model.num_tokens={tok.config.latent_tokens}", f"model.in_channels={tok.config.latent_dim}",
            f"model.num_classes={self.num_classes}", f"train.steps={b.diffusion_steps}",
            f"sample.sampler={b.sampler}", f"sample.steps={b.sample_steps}", *b.diffusion])
        stage("diffusion_train", lambda: _summary(_train_run(run_diffusion, dcfg, vdir / "diffusion")))
        for name, scale in (("nocfg", 1.0), ("cfg", b.cfg_scale)):
            stage(f"generation_{name}", lambda scale=scale, name=name: self.eval_generation(
                vdir, tok, dcfg, scale, vdir / f"samples-{name}"))
        stage("cost", lambda: self.measure_cost(tok, vdir, dcfg))
        return stage.results

    def eval_reconstruction(self, tok, vdir: Path) -> dict:
        from .data.images import save_image_grid
        from .eval.fid import fid
        from .eval.recon import psnr, ssim

        x = self.real_images(self.test_set, self.b.n_eval)
        with torch.no_grad():
            recon = torch.cat([tok.decode(tok.encode(c.to(self.device))).clamp(-1, 1).cpu() for c in x.split(256)])
        n = min(16, len(x))
        rows = [t for i in range(0, n, 8) for t in (x[i:i + 8], recon[i:i + 8])]
        save_image_grid(torch.cat(rows), vdir / "reconstructions.png", nrow=8)
        net = self.feature_net.name
        out = {f"rfid[{net}]@{len(x)}": fid(self.features(recon), self.ref_feats)[f"fid[{net}]@{len(x)}"],
               f"psnr@{len(x)}": psnr(recon, x).mean().item(), f"ssim@{len(x)}": ssim(recon, x).mean().item()}
        if self.inception:
            out.update(self._inception_fid(recon, x, "rfid"))
        return out

    def eval_generation(self, vdir: Path, tok, dcfg: DiffusionRunConfig, scale: float, out_dir: Path) -> dict:
        from .config import SampleConfig, from_dict
        from .diffusion.generate import generate_to_dir
        from .diffusion.sit import SiT
        from .eval.features import uint8_to_images
        from .eval.fid import generation_metrics

        b = self.b
        model = SiT.from_pretrained(vdir / "diffusion" / "model").to(self.device)
        scfg = from_dict(SampleConfig, {"sampler": b.sampler, "steps": b.sample_steps, "cfg_scale": scale,
                                        "cfg_interval": list(b.cfg_interval), "seed": 0})
        t0 = time.perf_counter()
        path = generate_to_dir(model, tok, b.n_eval, scfg, out_dir, balanced=True, batch_size=250,
                               device=self.device, progress=True)
        gen_s = time.perf_counter() - t0
        with np.load(path) as z:
            images = uint8_to_images(z["arr_0"])
        metrics = generation_metrics(self.features(images), self.ref_feats, kid_subsets=50)
        metrics = {("g" + k if k.startswith("fid") else k): v for k, v in metrics.items()}
        if self.inception:
            metrics.update(self._inception_fid(images, self.real_images(self.test_set, b.n_eval), "gfid"))
        metrics["sampling_images_per_s"] = len(images) / gen_s
        metrics["cfg_scale"] = scale
        return metrics

    def _inception_fid(self, images: torch.Tensor, real: torch.Tensor, prefix: str) -> dict:
        from .eval.features import build_feature_net, extract_features
        from .eval.fid import fid

        net = build_feature_net("inception", self.device)
        got = fid(extract_features(net, images, progress=False), extract_features(net, real, progress=False))
        return {prefix + k: v for k, v in got.items()}

    def measure_cost(self, tok, vdir: Path, dcfg: DiffusionRunConfig) -> dict:
        from .diffusion.sit import SiT
        from .eval.cost import count_flops, count_params, throughput

        sit = SiT.from_pretrained(vdir / "diffusion" / "model").to(self.device).eval()
        x = self.real_images(self.test_set, 64).to(self.device)
        z = tok.encode(x[:1]).detach()
        t, y = torch.full((1,), 0.5, device=self.device), torch.zeros(1, dtype=torch.long, device=self.device)
        xb = x[:64]
        zb = tok.encode(xb).detach()
        return {
            "tokenizer_params_M": count_params(tok) / 1e6,
            "encoder_params_M": count_params(tok.encoder) / 1e6,
            "decoder_params_M": count_params(tok.decoder) / 1e6,
            "sit_params_M": count_params(sit) / 1e6,
            "encode_gflops": count_flops(lambda: tok.encode(x[:1])) / 1e9,
            "decode_gflops": count_flops(lambda: tok.decode(z)) / 1e9,
            "sit_forward_gflops": count_flops(lambda: sit(tok.normalize(z), t, y if sit.null_label else None)) / 1e9,
            "latent_shape": list(z.shape[1:]),
            "encode_images_per_s": throughput(lambda: tok.encode(xb), len(xb)),
            "decode_images_per_s": throughput(lambda: tok.decode(zb), len(zb)),
            "tokenizer_train_images_per_s": _mean_throughput(vdir / "tokenizer"),
            "diffusion_train_images_per_s": _mean_throughput(vdir / "diffusion"),
        }

    # ----- across variants -------------------------------------------------------------------------------------
    def latent_analysis(self) -> dict:
        from .data.latents import LatentDataset
        from .eval.latent_analysis import gmm_analysis, linear_probe, plot_gmm_nll, shared_pca_dim, token_statistics

        train = {v: LatentDataset(self.out / v / "latents-train") for v in self.variants}
        test = {v: LatentDataset(self.out / v / "latents-test") for v in self.variants}
        m = self.b.analysis_max_train or None
        norm = {v: (train[v].latents[:m] - train[v].mean) / train[v].std for v in self.variants}
        norm_test = {v: (test[v].latents - train[v].mean) / train[v].std for v in self.variants}
        dim = shared_pca_dim(norm, 0.9, reduce="max")
        results, gmms = {}, {}
        for v in self.variants:
            g = gmm_analysis(norm[v], norm_test[v], ks=self.b.gmm_ks, pca_dim=dim)
            gmms[v] = g
            stats = token_statistics(train[v].latents[:m])
            results[v] = {"gmm": {"ks": g.ks, "nll": g.nll, "bic": g.bic, "pca_dim": g.pca_dim,
                                  "explained_variance": g.explained_variance, "best_k_bic": g.best_k_bic},
                          **linear_probe(norm[v], train[v].labels[:m], norm_test[v], test[v].labels),
                          "token_stats": {k: v2 for k, v2 in stats.items() if not isinstance(v2, (list, np.ndarray))}}
        plot_gmm_nll(gmms, self.out / "gmm_nll.png")
        return {"pca_dim": dim, "variants": results}

    def real_floor(self) -> dict:
        """FID of real training images against the held-out set at the same count: the best any model can do."""
        from .eval.fid import fid

        n = min(self.b.n_eval, len(self.train_set))
        real_train = self.real_images(self.train_set, n)
        return {("fid_train_vs_test" + k[3:]): v for k, v in fid(self.features(real_train), self.ref_feats).items()}

    def run(self) -> Path:
        self.open_data()
        top = Stage(self.out / "pilot_results.json")
        top("plan", lambda: {"data": self.spec, "variants": self.variants, "budget": self.budget_name,
                             "settings": to_dict(self.b), "device": str(self.device),
                             "torch": torch.__version__, "threads": torch.get_num_threads()})
        top("feature_net", self.build_feature_net)
        if self.feature_net is None:
            self.build_feature_net()
        self.ref_feats = self.features(self.real_images(self.test_set, self.b.n_eval))
        top("real_floor", self.real_floor)
        per_variant = {v: self.run_variant(v) for v in self.variants}
        analysis = top("latent_analysis", self.latent_analysis)
        plot_losses({v: self.out / v / "diffusion" for v in self.variants}, self.out / "diffusion_loss.png")
        from .report import write_report

        return write_report(self.out, top.results, per_variant, analysis)


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


def run_pilot(data_spec: str, variants: list[str], budget: str, out: Path, resume: bool = False,
              force: bool = False, device: str = "cpu", inception: bool = False) -> Path:
    from .train.loop import RunDirExists
    from .train.run import setup_logging

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        if not force:
            raise RunDirExists(f"pilot directory {out} already exists; pass --resume to continue it or --force "
                               f"to delete it and start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(None)
    return Pilot(data_spec, variants, budget, out, device, inception).run()
