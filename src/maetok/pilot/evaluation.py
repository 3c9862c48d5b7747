"""The pilot's evaluation stages: the feature network, reconstruction and generation metrics, costs and the
latent analysis across variants.

Under torchrun every rank reconstructs, generates and embeds its contiguous share (every FID's feature
extraction included); rank 0 alone computes the metrics from the gathered features and fits the latent analysis.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data.images import save_image_grid
from ..data.latents import LatentDataset
from ..diffusion.samplers import forward_passes_per_sample
from ..diffusion.sit import SiT
from ..eval.classifier import SmallCNN, train_classifier
from ..eval.cost import count_flops, count_params, throughput
from ..eval.features import build_feature_net, extract_features, features_of, gather_features, wrap_feature_net
from ..eval.fid import FeatureStats, fid, fid_bootstrap_se, generation_metrics, load_adm_images
from ..eval.generate import generate_to_dir
from ..eval.inputs import reference_features
from ..eval.latent_analysis import gmm_analysis, linear_probe, pca_dim_for_variance, plot_gmm_nll, token_statistics
from ..eval.recon import ReconstructionMetrics, to_uint8_levels
from ..io.distributed import DistInfo, barrier, shard_range
from ..io.pretrained import load_sit
from ..progress import progress_bar
from ..tokenizer import MAETok
from ..train.diffusion_task import snapshots
from .plan import PilotPlan
from .stages import PilotData, ResultsFile, first, real_images, training_log

log = logging.getLogger("maetok.pilot")
# Mean and covariance of a variant's held-out reconstructions under the feature network, in its folder.
RECON_STATS = "recon-features.npz"


class FeatureSpace:
    """The networks the pilot's metrics embed images with, and the held-out set's features under them: the
    pilot's feature network (FID, KID, IS, precision-recall), and with `plan.inception` the FID Inception too,
    built and its reference computed at first use. Every rank calls each method at the same point: the ranks
    share the work."""

    def __init__(self, feature_net, plan: PilotPlan, data: PilotData, dist: DistInfo):
        self.feature_net, self.plan, self.dist = feature_net, plan, dist
        self.held_out = first(data.test_set, plan.n_eval)
        # On a GPU, worker processes decode images while it computes; on a CPU they would compete with it.
        self.loader_workers = 4 if dist.device.type == "cuda" else 0
        self._inception_net = self._inception_reference = None
        self.reference = self.features(self.held_out)  # every FID's reference

    def features(self, images, net=None) -> Any:
        """Features under the pilot's feature net (or `net`) of a Dataset, uint8 NHWC array or float tensor. Under
        torchrun every rank embeds a share and receives them all, in order. The Inception network (~5 images/s
        on a CPU) shows a progress bar; the small networks finish at once."""
        slow = net is not None and net.name == "inception"
        return features_of(net or self.feature_net, images, batch_size=256, progress=slow, dist=self.dist,
                           num_workers=self.loader_workers)

    def inception_net(self):
        if self._inception_net is None:
            self._inception_net = build_feature_net("inception", self.dist.device)
        return self._inception_net

    def inception_reference(self):
        """Inception features of the held-out set, computed once per pilot (and cached on disk: ~5 images/s on a
        CPU), shared by every variant's rFID and gFID."""
        if self._inception_reference is None:
            self._inception_reference, _ = reference_features(
                self.held_out, self.inception_net(), batch_size=64,
                stats_cache=self.plan.out / "reference-inception.npz", progress=True, dist=self.dist)
        return self._inception_reference


def pilot_feature_net(plan: PilotPlan, data: PilotData, device: torch.device) -> tuple[Any, dict]:
    """The network every FID of the pilot embeds with, and the record of how it was made: the pretrained ResNet-56
    on CIFAR-10; otherwise a small CNN trained on the training split (once: it is saved in the pilot's folder)."""
    if plan.cifar10:
        try:
            net = build_feature_net("resnet56-cifar10", device)
            return net, {"feature_net": net.name, "why": "pretrained CIFAR-10 ResNet-56"}
        except FileNotFoundError as e:
            log.warning("resnet56-cifar10 unavailable (%s); training a small classifier instead", e)
    tag = "cnn-" + Path(plan.data.split(":")[-1]).stem.replace("_", "-")
    ckpt = plan.out / "feature_net"
    if (ckpt / "config.json").is_file():
        model, meta = SmallCNN.load(ckpt)
    else:
        steps = plan.settings.classifier_steps or 1000
        model, acc = train_classifier(data.train_set, data.test_set, max(plan.facts.num_classes, 1), steps=steps)
        meta = {"name": tag, "test_top1": acc, "steps": steps}
        model.save(ckpt, meta)
    net = wrap_feature_net(model.to(device), meta["name"], input_size=plan.settings.image_size)
    return net, {"feature_net": meta["name"], "classifier_test_top1": meta["test_top1"],
                 "why": "no pretrained feature network for this data: a small CNN trained on its training split"}


def prepare_feature_space(plan: PilotPlan, data: PilotData, top: ResultsFile, dist: DistInfo) -> FeatureSpace:
    """The "feature_net" stage, then every rank's copy of that network and the held-out reference under it."""
    net = None
    if top.pending("feature_net"):  # rank 0 trains it when there is no pretrained one
        net, made = pilot_feature_net(plan, data, dist.device) if dist.is_main else (None, None)
        top.record("feature_net", made)
    if dist.is_main and net is None:  # a resumed pilot (trains it if it went missing)
        net, _ = pilot_feature_net(plan, data, dist.device)
    barrier(dist)
    if net is None:  # the other ranks load what rank 0 has: no two ranks train and save it
        net, _ = pilot_feature_net(plan, data, dist.device)
    return FeatureSpace(net, plan, data, dist)


def real_floor(plan: PilotPlan, data: PilotData, space: FeatureSpace) -> dict:
    """FID of real training images against the held-out set at the same count: the best any model can do."""
    real_train = space.features(first(data.train_set, plan.n_eval))
    return {("fid_train_vs_test" + k[3:]): v for k, v in fid(real_train, space.reference).items()}


@torch.no_grad()
def evaluate_reconstruction(plan: PilotPlan, variant: str, tokenizer, data: PilotData, space: FeatureSpace,
                            dist: DistInfo, tokens: int | None = None) -> dict:
    """rFID (+ Inception rFID), PSNR and SSIM of the held-out set, one batch at a time; under torchrun each
    rank reconstructs a contiguous share, and every rank returns the same result. Reconstructions are
    rounded to uint8 levels first, as `maetok eval recon` does (and as generated samples are).
    `tokens`: from the first k latent tokens only (`evaluate_prefixes`); the grid and statistics files are the
    full length's."""
    full = tokens is None
    nets = [space.feature_net] + ([space.inception_net()] if plan.inception and full else [])
    feats: list[list] = [[] for _ in nets]
    meter, grid = ReconstructionMetrics(lpips=None), []
    share = Subset(data.test_set, shard_range(plan.n_eval, dist))
    loader = DataLoader(share, batch_size=256, shuffle=False, num_workers=space.loader_workers)
    for x, _ in progress_bar(loader, desc="reconstruct", disable=not dist.is_main):
        x = x.to(dist.device)
        recon = to_uint8_levels(tokenizer.decode(tokenizer.encode(x, tokens=tokens)).float())
        meter.update(recon, x)
        for net, net_feats in zip(nets, feats):
            net_feats.append(extract_features(net, recon, batch_size=256, progress=False))
        if not grid:  # rank 0's share starts at the first image
            n = min(16, len(x))
            grid = [t.cpu() for i in range(0, n, 8) for t in (x[i:i + 8], recon[i:i + 8])]
    if dist.enabled:
        meter.all_gather(dist)
    recon_feats = [gather_features(f, dist) for f in feats]
    if dist.is_main and full:
        save_image_grid(torch.cat(grid), plan.variant_dir(variant) / "reconstructions.png", nrow=8)
    out = {("r" + k): v for k, v in fid(recon_feats[0], space.reference).items()}
    out |= {("r" + k): v for k, v in fid_bootstrap_se(recon_feats[0], space.reference).items()}
    if dist.is_main and full:  # what this variant's samples are also measured against (`evaluate_generation`)
        FeatureStats.from_features(recon_feats[0]).save(plan.variant_dir(variant) / RECON_STATS)
    out |= meter.compute()  # psnr@N, ssim@N
    if plan.inception:
        out |= {("r" + k): v for k, v in fid(recon_feats[1], space.inception_reference()).items()}
    return out


def evaluate_prefixes(plan: PilotPlan, variant: str, tokenizer, data: PilotData, space: FeatureSpace,
                      dist: DistInfo) -> dict:
    """rFID (with its bootstrap standard error), PSNR and SSIM from the first k latent tokens, for every k shorter
    than L that a nested-dropout tokenizer was trained to decode from (empty lists for any other tokenizer): what
    each prefix keeps. The full length's numbers are the reconstruction stage's."""
    curve: dict[str, list] = {"tokens": [], "rfid": [], "rfid_se": [], "psnr": [], "ssim": []}
    counts, length = tokenizer.config.allowed_token_counts[:-1], tokenizer.config.latent_tokens
    if len(counts) > 7:  # trained on every k (no token_counts given): seven spread evenly make the curve
        counts = sorted({min(counts, key=lambda k: abs(k - length * i / 8)) for i in range(1, 8)})
    for tokens in counts:
        metrics = evaluate_reconstruction(plan, variant, tokenizer, data, space, dist, tokens=tokens)
        curve["tokens"].append(tokens)
        for name in ("rfid", "rfid_se", "psnr", "ssim"):
            curve[name].append(next(v for k, v in metrics.items() if k.startswith((f"{name}[", f"{name}@"))))
    return curve


def evaluate_generation(plan: PilotPlan, run_dir: Path, sampling: str, tokenizer, space: FeatureSpace,
                        dist: DistInfo, model_dir: Path | None = None, samples_dir: Path | None = None) -> dict:
    """Samples of the diffusion model in `run_dir` (or `model_dir`, e.g. a snapshot) with the plan's `sampling`
    ("nocfg" or "cfg"), into run_dir/samples-<sampling> (or `samples_dir`), and their metrics (rank 0's; the
    other ranks return {}): against the held-out images, with the bootstrap standard error of that gFID, and
    against this tokenizer's own reconstructions of them (how well the diffusion model learned the latent space,
    apart from what the decoder loses)."""
    model = load_sit(model_dir or run_dir / "diffusion" / "model").to(dist.device)
    config = plan.sampling[sampling]
    started = time.perf_counter()
    path = generate_to_dir(model, tokenizer, plan.n_eval, config, samples_dir or run_dir / f"samples-{sampling}",
                           balanced=True, batch_size=250, device=dist.device, progress=True)  # sharded under torchrun
    gen_s = time.perf_counter() - started
    # uint8 NHWC, memory-mapped: each rank reads only the share it embeds (50k images at 256 px are 10 GB)
    images = load_adm_images(path, lazy=True)
    feats = space.features(images)
    inception = (space.features(images, space.inception_net()), space.inception_reference()) if plan.inception \
        else None
    if not dist.is_main:  # the metrics below are cheap next to the features: rank 0 computes them
        return {}
    # KID subsets of at most half the samples: subsets as large as the sets would all be the same draw, and
    # the reported spread a meaningless 0.
    metrics = generation_metrics(feats, space.reference, kid_subsets=50,
                                 kid_subset_size=min(1000, max(2, len(images) // 2)))
    metrics = {("g" + k if k.startswith("fid") else k): v for k, v in metrics.items()}
    metrics |= {("g" + k): v for k, v in fid_bootstrap_se(feats, space.reference).items()}
    if (run_dir / RECON_STATS).is_file():
        own = FeatureStats.load(run_dir / RECON_STATS, feats.net)
        metrics |= {k.replace("fid", "gfid_vs_recon", 1): v for k, v in fid(feats, own).items()}
        metrics |= {k.replace("fid", "gfid_vs_recon", 1): v for k, v in fid_bootstrap_se(feats, own).items()}
    if inception:
        metrics |= {("g" + k): v for k, v in fid(*inception).items()}
    metrics["sampling_images_per_s"] = len(images) / gen_s
    metrics["cfg_scale"] = config.cfg_scale
    return metrics


def evaluate_learning_curve(plan: PilotPlan, run_dir: Path, tokenizer, space: FeatureSpace, dist: DistInfo
                            ) -> dict:
    """gFID without CFG of each snapshot the diffusion run kept before its last step (train.snapshot_every): how
    fast the diffusion model learns this tokenizer's latent space. The last step's gFID is the generation stage's.
    Samples go to run_dir/learning-curve/step-N."""
    curve: dict[str, list] = {"steps": [], "gfid": [], "gfid_se": []}
    for step, model_dir in snapshots(run_dir / "diffusion").items():
        metrics = evaluate_generation(plan, run_dir, "nocfg", tokenizer, space, dist, model_dir,
                                      run_dir / "learning-curve" / f"step-{step:08d}")
        if dist.is_main:
            curve["steps"].append(step)
            curve["gfid"].append(next(v for k, v in metrics.items() if k.startswith("gfid[")))
            curve["gfid_se"].append(next(v for k, v in metrics.items() if k.startswith("gfid_se[")))
    return curve


def _mean_throughput(run_dir: Path) -> float:
    _, ips = training_log(run_dir, "images_per_s")
    ips = ips[1:] if len(ips) > 1 else ips  # the first window includes start-up
    return float(np.median(ips)) if ips else float("nan")


def model_cost(plan: PilotPlan, tokenizer, sit, image: torch.Tensor) -> dict:
    """Parameters and GFLOPs of a tokenizer and diffusion model, from one (1, 3, H, W) `image`: properties of
    the architectures, the same for trained and untrained weights."""
    z = tokenizer.encode(image).detach()
    t = torch.full((1,), 0.5, device=image.device)
    y = torch.zeros(1, dtype=torch.long, device=image.device)
    decode_gflops = count_flops(lambda: tokenizer.decode(z)) / 1e9
    sit_gflops = count_flops(lambda: sit(tokenizer.normalize(z), t, y if sit.null_label else None)) / 1e9
    # What one image costs to generate with the pilot's sampler: every forward pass (two where guided) and
    # the decode.
    generation = {f"generation_gflops_per_image_{name}": forward_passes_per_sample(config) * sit_gflops + decode_gflops
                  for name, config in plan.sampling.items()}
    return {
        "tokenizer_params_M": count_params(tokenizer) / 1e6,
        "encoder_params_M": count_params(tokenizer.encoder) / 1e6,
        "decoder_params_M": count_params(tokenizer.decoder) / 1e6,
        "sit_params_M": count_params(sit) / 1e6,
        "encode_gflops": count_flops(lambda: tokenizer.encode(image)) / 1e9,
        "decode_gflops": decode_gflops,
        "sit_forward_gflops": sit_gflops,
        **generation,
        "latent_shape": list(z.shape[1:]),
    }


@torch.no_grad()
def architecture_cost(plan: PilotPlan, variant: str) -> dict:
    """`model_cost` of the variant's models as its plan configures them, untrained and on the CPU: known before
    any training (a search skips a trial whose cost breaks a constraint without training it)."""
    settings = plan.settings
    tokenizer = MAETok(plan.tokenizer_runs[variant][-1].config.model).eval()
    sit = SiT(plan.diffusion_runs[variant].model).eval()
    return model_cost(plan, tokenizer, sit, torch.zeros(1, 3, settings.image_size, settings.image_size))


def measure_cost(plan: PilotPlan, variant: str, tokenizer, data: PilotData, device: torch.device) -> dict:
    """Parameters, GFLOPs and throughput of the variant's tokenizer and diffusion model."""
    folder = plan.variant_dir(variant)
    sit = load_sit(folder / "diffusion" / "model").to(device).eval()
    x = real_images(data.test_set, 64).to(device)
    xb = x[:64]
    zb = tokenizer.encode(xb).detach()
    return {
        **model_cost(plan, tokenizer, sit, x[:1]),
        "encode_images_per_s": throughput(lambda: tokenizer.encode(xb), len(xb), device=device),
        "decode_images_per_s": throughput(lambda: tokenizer.decode(zb), len(zb), device=device),
        "tokenizer_train_images_per_s": _mean_throughput(folder / "tokenizer"),
        "diffusion_train_images_per_s": _mean_throughput(folder / "diffusion"),
    }


def analyse_latents(plan: PilotPlan) -> dict:
    """GMM NLL per K in one PCA dimension for all variants, linear-probe accuracy and token statistics of each
    variant's cached latents; draws gmm_nll.png."""
    limit, variants = plan.settings.analysis_max_train or None, plan.variants
    caches = {v: LatentDataset(plan.variant_dir(v) / "latents-train") for v in variants}
    train = {v: caches[v].first(limit) for v in variants}  # (latents, labels)
    test = {v: LatentDataset(plan.variant_dir(v) / "latents-test").first() for v in variants}
    norm = {v: (train[v][0] - caches[v].mean) / caches[v].std for v in variants}
    norm_test = {v: (test[v][0] - caches[v].mean) / caches[v].std for v in variants}
    own_dims = {v: pca_dim_for_variance(norm[v], 0.9) for v in variants}
    # One dimension for all, so that per-sample NLLs compare: the largest of the variants' 90%-variance
    # dimensions. A variant that needs fewer keeps extra low-variance directions, which count as much in a
    # likelihood as any other, so the report shows each variant's own dimension and the variance kept.
    dim = max(own_dims.values())
    results, gmms = {}, {}
    for v in variants:
        gmm = gmms[v] = gmm_analysis(norm[v], norm_test[v], ks=plan.settings.gmm_ks, pca_dim=dim)
        stats = token_statistics(train[v][0])
        results[v] = {"gmm": {"ks": gmm.ks, "nll": gmm.nll, "nll_se": gmm.nll_se, "bic": gmm.bic,
                              "pca_dim": gmm.pca_dim, "explained_variance": gmm.explained_variance,
                              "best_k_bic": gmm.best_k_bic, "own_pca_dim": own_dims[v]},
                      **linear_probe(norm[v], train[v][1], norm_test[v], test[v][1]),
                      "token_stats": {k: value for k, value in stats.items()
                                      if not isinstance(value, (list, np.ndarray))}}
    plot_gmm_nll(gmms, plan.out / "gmm_nll.png")
    return {"pca_dim": dim, "variants": results}
