"""Evaluating generated images against a reference, and a tokenizer by its reconstructions.

    evaluate_generation("runs/samples/samples.npz", "shapes", "resnet20-cifar10", num_ref=10_000, split="test")
    evaluate_reconstruction(tokenizer, open_dataset("shapes", "test", 32, limit=1000), "resnet20-cifar10")

Every metric key names its feature network and sample count (`fid[resnet20-cifar10]@1000`, see `metric_name`);
a metric that cannot be computed is listed under "skipped" with the reason instead of being silently absent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.latents import check_prefix_tokens
from ..io.distributed import DistInfo, shard_range
from ..progress import progress_bar
from .features import FeatureNet, FeatureSet, extract_features, features_of, gather_features
from .fid import FeatureStats, fid, inception_score, kid, metric_name, precision_recall
from .inputs import (load_samples, load_stats_cache, reference_features, resolve_feature_net,
                     save_stats_cache_once, stats_cache_exists)
from .recon import ReconstructionMetrics, to_uint8_levels


# ==============================================================================================================
# Generation
# ==============================================================================================================
def _try(skipped: dict[str, str], name: str, fn, *args, **kwargs) -> dict[str, float]:
    """A metric that cannot be computed on these inputs (too few samples) becomes a reason, not a crash."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        skipped[name] = str(e)
        return {}


def generation_report(evaluated: FeatureSet, reference: FeatureSet | FeatureStats, kid_subsets: int = 100,
                      kid_subset_size: int = 1000, is_splits: int = 10, device: str | torch.device = "cpu"
                      ) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, skipped): FID always; KID and precision/recall when reference features exist; IS when the
    network has logits."""
    skipped: dict[str, str] = {}
    metrics = fid(evaluated, reference)
    if isinstance(reference, FeatureSet):
        if max(evaluated.n, reference.n) <= kid_subset_size:
            kid_subsets = 1  # every "subset" is then the whole of both sets: one is the same number, 100x faster
        metrics |= _try(skipped, "kid", kid, evaluated, reference, num_subsets=kid_subsets,
                        subset_size=kid_subset_size, device=device)
        metrics |= _try(skipped, "precision_recall", precision_recall, evaluated, reference, device=device)
    else:
        why = "the reference is statistics only (mu/sigma); this metric needs reference features"
        skipped["kid"] = skipped["precision_recall"] = why
    if evaluated.logits is not None:
        # At least two samples per split (FID above needs two in all): one image alone scores exactly 1.
        metrics |= _try(skipped, "is", inception_score, evaluated, splits=min(is_splits, evaluated.n // 2))
    else:
        skipped["is"] = f"feature net {evaluated.net!r} has no classifier logits"
    return metrics, skipped


def evaluate_generation(samples, reference, feature_net: FeatureNet | str = "inception", *, split: str = "test",
                        num_ref: int = 0, stats_cache: str | Path | None = None, batch_size: int = 64,
                        device: str | torch.device = "cpu", kid_subsets: int = 100, is_splits: int = 10,
                        progress: bool = True, dist: DistInfo | None = None) -> dict[str, Any]:
    """FID (+ KID, precision/recall, IS where possible) of generated images against a reference.

    samples: an .npz (arr_0 uint8 NHWC) or image folder path, a uint8 NHWC array, a float NCHW tensor in
    [-1, 1], or a FeatureSet. reference: see `reference_features`; a data spec is opened at the samples'
    resolution. Returns {"metrics", "skipped", "feature_net", "num_samples", "reference", ...}.
    `dist`: under torchrun the ranks share the feature extraction, and every rank returns the same result.
    """
    net = resolve_feature_net(feature_net, device)
    source = str(samples) if isinstance(samples, (str, Path)) else "given images"
    gen = samples if isinstance(samples, FeatureSet) else None
    size = None
    if gen is None:
        images = load_samples(samples) if isinstance(samples, (str, Path)) else samples
        size = int(images.shape[1] if isinstance(images, np.ndarray) or images.dtype == torch.uint8
                   else images.shape[-1])
    # The reference first: a mismatched statistics cache fails before any sample features are computed.
    ref, ref_info = reference_features(reference, net, split=split, num=num_ref, image_size=size,
                                       stats_cache=stats_cache, batch_size=batch_size, progress=progress, dist=dist)
    if gen is None:
        gen = features_of(net, images, batch_size, progress, dist)
    metrics, skipped = generation_report(gen, ref, kid_subsets, is_splits=is_splits, device=device)
    return {"kind": "generation", "samples": source, "num_samples": gen.n, "image_size": size,
            "feature_net": net.name, "reference": ref_info, "metrics": metrics, "skipped": skipped}


# ==============================================================================================================
# Reconstruction
# ==============================================================================================================
@torch.no_grad()
def evaluate_reconstruction(tokenizer, dataset: Dataset, feature_net: FeatureNet | str | None = None, *,
                            batch_size: int = 64, device: str | torch.device = "cpu", lpips="auto",
                            stats_cache: str | Path | None = None, cache_key: dict | None = None,
                            progress: bool = True, dist: DistInfo | None = None,
                            tokens: int | None = None) -> dict[str, Any]:
    """Encode + decode every image of `dataset` ((image in [-1, 1], label) items): PSNR, SSIM, LPIPS (skipped
    with the reason when its weights are missing) and, with a feature network, rFID of the reconstructions
    against the originals (reference statistics from `stats_cache` when it exists and matches `cache_key`).
    `dist`: under torchrun each rank reconstructs a contiguous share, and every rank returns the same result.
    `tokens`: reconstruct from the first K latent tokens (a prefix a nested-dropout tokenizer decodes from)."""
    tokens = check_prefix_tokens(tokenizer, tokens)  # before any feature network loads or image is encoded
    tokenizer = tokenizer.to(device).eval()
    net = resolve_feature_net(feature_net, device) if feature_net is not None else None
    cache = Path(stats_cache) if stats_cache else None
    ref = load_stats_cache(cache, net.name, cache_key) if net is not None and stats_cache_exists(cache, dist) else None
    meter = ReconstructionMetrics(lpips=lpips, device=device)
    rec_feats, ref_feats = [], []
    sharded = dist is not None and dist.enabled
    share = Subset(dataset, shard_range(len(dataset), dist)) if sharded else dataset
    loader = DataLoader(share, batch_size=batch_size, shuffle=False)
    main = dist is None or dist.is_main
    for images, _ in progress_bar(loader, desc="reconstruct", disable=not (progress and main)):
        x = images.to(device)
        recon = to_uint8_levels(tokenizer.decode(tokenizer.encode(x, tokens=tokens)).float())
        meter.update(recon, x)
        if net is not None:
            rec_feats.append(extract_features(net, recon, batch_size, progress=False))
            if ref is None:
                ref_feats.append(extract_features(net, x, batch_size, progress=False))
    if sharded:
        meter.all_gather(dist)
    metrics: dict[str, Any] = dict(meter.compute())
    skipped = {"lpips": metrics.pop("lpips_skipped")} if "lpips_skipped" in metrics else {}
    out: dict[str, Any] = {"kind": "reconstruction", "num_images": len(dataset),
                           "image_size": int(tokenizer.config.image_size)}
    if tokens is not None:
        out["tokens"] = tokens
    if net is not None:
        evaluated = gather_features(rec_feats, dist)  # every rank's, in rank order
        if ref is None:
            ref = gather_features(ref_feats, dist)
            if cache is not None:
                save_stats_cache_once(cache, ref, cache_key, dist)
                out["reference_cached_to"] = str(cache)
        value = next(iter(fid(evaluated, ref).values()))
        metrics[metric_name("rfid", net.name, evaluated.n)] = value
        out["feature_net"] = net.name
    else:
        skipped["rfid"] = "no feature network given"
    return {**out, "metrics": metrics, "skipped": skipped}
