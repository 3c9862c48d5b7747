"""`maetok eval` and `maetok analyze` as Python functions: the CLI and the pilot call the same code.

    evaluate_generation("runs/samples/samples.npz", "shapes", "resnet20-cifar10", num_ref=10_000, split="test")
    evaluate_reconstruction(tokenizer, open_dataset("shapes", "test", 32, limit=1000), "resnet20-cifar10")
    analyze_latents({"maetok": "runs/cache", "ae": ae_cache}, {"maetok": "runs/cache-test"}, ks=(1, 2, 4),
                    out_dir="runs/analysis")

Every metric key names its feature network and sample count (`fid[resnet20-cifar10]@1000`, see `metric_name`);
a metric that cannot be computed is listed under "skipped" with the reason instead of being silently absent.

Reference statistics caches (`stats_cache`) are FeatureStats files (readable by `FeatureStats.load`) that also
hold the reference features, when they fit in 1 GiB, so KID and precision/recall survive a cache hit, and a
description of what they were computed from: a cache computed from another reference is refused, not reused.
"""
from __future__ import annotations

import argparse
import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import ConfigError
from ..io.distributed import DistInfo, all_gather_list, barrier, resolve_device, shard_range
from .features import (FeatureNet, FeatureSet, available_feature_nets, build_feature_net,
                       extract_features, features_of, gather_features)
from .fid import (FeatureStats, fid, inception_score, kid, load_adm_images, metric_name, precision_recall)
from .latent_analysis import (gmm_analysis, linear_probe, pca_dim_for_variance, plot_gmm_nll, token_statistics)
from .recon import ReconstructionMetrics, to_uint8_levels
from ..io.pretrained import load_tokenizer

log = logging.getLogger("maetok.eval")

CACHED_FEATURES_MAX_BYTES = 1 << 30  # above this a stats cache keeps mu/sigma only (KID/PR then need a recompute)


class EvalInputError(ConfigError):
    """An evaluation input that cannot work (missing file, mismatched cache, bad NAME=DIR pair). A ConfigError,
    so the CLI reports it as one line instead of a traceback."""


# ==============================================================================================================
# Inputs: feature networks, samples, references
# ==============================================================================================================
def resolve_feature_net(net: FeatureNet | str, device: str | torch.device = "cpu") -> FeatureNet:
    """A FeatureNet as is, or one built by registered name. `NAME-random` (e.g. resnet20-cifar10-random) builds
    the registered network with random weights, for smoke tests without the pretrained files; its metrics carry
    the `-random` name so they can never pass for real ones. The weights come from a fixed seed: one name must
    mean one network, or numbers (and statistics caches) from two runs would silently not compare."""
    if isinstance(net, FeatureNet):
        return net.to(device).eval()
    names = available_feature_nets()
    if net not in names and net.endswith("-random") and net[: -len("-random")] in names:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return build_feature_net(net[: -len("-random")], device, pretrained=False)
        except TypeError:
            raise EvalInputError(f"feature net {net!r}: {net[:-len('-random')]!r} has no random-weights "
                                 f"variant") from None
    if net not in names:
        raise EvalInputError(f"unknown feature net {net!r}; registered: {names} (or NAME-random)")
    return build_feature_net(net, device)


def load_samples(path: str | Path) -> np.ndarray:
    """Generated images as uint8 NHWC: an ADM-style .npz (arr_0) or a folder of image files (all one size)."""
    from ..data.images import ImageDecodeError, decode_image

    path = Path(path)
    if path.is_file():
        try:
            return load_adm_images(path, lazy=True)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise EvalInputError(f"samples {path}: {e}") from None
    if not path.is_dir():
        raise FileNotFoundError(f"samples {path}: no such .npz file or image folder")
    from ..data.datasets import IMAGE_SUFFIXES

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise EvalInputError(f"samples {path}: no image files in the folder")
    try:
        images = [decode_image(p, None) for p in files]
    except ImageDecodeError as e:
        raise EvalInputError(f"samples: {e}") from None
    shapes = {im.shape for im in images}
    if len(shapes) != 1:  # resizing generated images would change what is being measured
        raise EvalInputError(f"samples {path}: images of different sizes {sorted(shapes)[:4]}; they must all match")
    return np.stack(images)


def _npz_keys(path: Path) -> set[str]:
    with np.load(path, allow_pickle=False) as z:
        return set(z.files)


def _reference_key(ref: str, split: str, num: int, image_size: int | None, net: str) -> dict[str, Any]:
    """What a reference statistics cache was computed from; a different key means the cache is for another set."""
    from ..data.datasets import parse_spec

    kind, location = parse_spec(ref)
    if kind != "shapes":
        p = Path(location).expanduser()
        location = str(p.resolve()) if p.exists() else location
    return {"ref": f"{kind}:{location}" if kind != "shapes" else "shapes", "split": split, "num": int(num),
            "image_size": image_size, "net": net}


def _load_cache(path: Path, net: str, key: dict | None) -> FeatureSet | FeatureStats:
    """Our cache file (FeatureStats + optional features + source key) or any FeatureStats/ADM stats file."""
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        cached_net = bytes(z["net_utf8"]).decode() if "net_utf8" in files else "inception"
        source = json.loads(bytes(z["source_utf8"]).decode()) if "source_utf8" in files else None
        features = z["features"] if "features" in files else None
        logits = z["logits"] if "logits" in files else None
        given = bool(z["fid_stats_given"]) if "fid_stats_given" in files else False
    if cached_net != net:
        raise EvalInputError(f"statistics cache {path} was computed with feature net {cached_net!r}, not {net!r}; "
                             f"use another --stats-cache path per feature network")
    if key is not None and source is not None and source != key:
        diff = {k: (source.get(k), v) for k, v in key.items() if source.get(k) != v}
        raise EvalInputError(f"statistics cache {path} was computed from another reference ({diff}, as "
                             f"(cached, asked)); delete it or choose another --stats-cache path")
    if features is not None:
        # mu/sigma are the file's own statistics (an ADM reference batch's), not the features': keep using them.
        stats = FeatureStats.load(path, net=net) if given else None
        return FeatureSet(features.astype(np.float64), None if logits is None else logits.astype(np.float64), net,
                          stats)
    return FeatureStats.load(path, net=net)


def _save_cache(path: Path, feats: FeatureSet, key: dict | None) -> FeatureStats:
    """FeatureStats.save's format (mu, sigma, n, net), plus the float32 features (exact: the networks run in
    float32) and the source key. Written to a temporary name and renamed, so a reader never sees half a file."""
    stats = feats.fid_stats if feats.fid_stats is not None else FeatureStats.from_features(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    stats.save(tmp)
    with np.load(tmp, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if feats.features.size * 4 <= CACHED_FEATURES_MAX_BYTES:
        arrays["features"] = feats.features.astype(np.float32)
        if feats.logits is not None:
            arrays["logits"] = feats.logits.astype(np.float32)
    arrays["fid_stats_given"] = np.int64(feats.fid_stats is not None)
    if key is not None:
        arrays["source_utf8"] = np.frombuffer(json.dumps(key, sort_keys=True).encode(), dtype=np.uint8)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
    return stats


def _cache_exists(cache: Path | None, dist: DistInfo | None) -> bool:
    """Whether to read the cache: rank 0's answer on every rank. Ranks that decided alone could disagree (a file
    rank 0 is writing, a stale network-filesystem view) and then pair up different collectives."""
    exists = cache is not None and cache.is_file()
    return all_gather_list([exists], dist)[0] if dist is not None and dist.enabled else exists


def _save_cache_once(cache: Path, feats: FeatureSet, key: dict | None, dist: DistInfo | None) -> None:
    """Rank 0 writes; no rank goes on before the file is complete (a later read must find it whole)."""
    if dist is None or dist.is_main:
        _save_cache(cache, feats, key)
    if dist is not None:
        barrier(dist)


def reference_features(ref, net: FeatureNet, *, split: str = "test", num: int = 0, image_size: int | None = None,
                       stats_cache: str | Path | None = None, batch_size: int = 64, progress: bool = True,
                       dist: DistInfo | None = None) -> tuple[FeatureSet | FeatureStats, dict[str, Any]]:
    """The reference side of a metric: (FeatureSet, or FeatureStats when only statistics exist; a description).

    `ref`: a FeatureSet/FeatureStats; a Dataset, uint8 NHWC array or float NCHW tensor of images; or a string:
    a data spec for `open_dataset` (opened at `image_size`, `split`, first `num` items), an ADM .npz batch
    (arr_0 images, first `num`), or a statistics .npz (ours: FeatureStats or a stats cache; ADM's mu/sigma are
    Inception statistics). `stats_cache`: read when it exists, else written with what was computed.
    `dist`: torchrun ranks share the feature extraction (see `features_of`); rank 0 alone writes the cache.
    """
    if isinstance(ref, (FeatureSet, FeatureStats)):
        if ref.net != net.name:
            raise EvalInputError(f"reference features come from {ref.net!r}, the samples from {net.name!r}")
        return ref, {"source": "given features" if isinstance(ref, FeatureSet) else "given statistics",
                     "n": ref.n, "from": "features" if isinstance(ref, FeatureSet) else "stats"}
    named = isinstance(ref, (str, Path))
    is_npz = named and Path(ref).suffix == ".npz" and Path(ref).is_file()
    key = _reference_key(str(ref), split, num, image_size, net.name) if named else None
    info: dict[str, Any] = {"source": str(ref) if named else "given images",
                            "split": split if named and not is_npz else None}
    cache = Path(stats_cache) if stats_cache else None
    if _cache_exists(cache, dist):
        got = _load_cache(cache, net.name, key)
        log.info("reference statistics read from %s", cache)
        return got, {**info, "n": got.n, "from": f"cache:{cache}"}

    if is_npz:
        path = Path(ref)
        keys = _npz_keys(path)
        if "net_utf8" in keys or ("arr_0" not in keys and {"mu", "sigma"} <= keys):
            if "arr_0" not in keys and "net_utf8" not in keys and net.name != "inception":
                raise EvalInputError(f"reference {path}: ADM statistics (mu/sigma) are Inception statistics; use "
                                     f"--features inception, or give the reference images")
            got = _load_cache(path, net.name, None)
            return got, {**info, "n": got.n, "from": "stats" if isinstance(got, FeatureStats) else "features"}
        if "arr_0" not in keys:
            raise EvalInputError(f"reference {path}: neither images (arr_0) nor statistics (mu/sigma) "
                                 f"(keys {sorted(keys)})")
        images = load_adm_images(path, lazy=True)
        images = images[:num] if num else images
        feats = features_of(net, images, batch_size, progress, dist)
        if {"mu", "sigma"} <= keys and net.name == "inception":
            # As the ADM evaluator: FID against the batch's stored statistics, which may come from more images
            # than arr_0 holds; arr_0's features serve KID, precision/recall.
            feats.fid_stats = FeatureStats.load(path, net="inception")
            info["fid_against"] = "the file's mu/sigma (as the ADM evaluator)"
    elif named:
        from ..data import DatasetError, open_dataset

        if image_size is None:
            raise EvalInputError(f"reference {ref!r}: a data spec needs an image size to open it at")
        try:
            dataset = open_dataset(str(ref), split=split, image_size=image_size, limit=num)
        except DatasetError as e:
            raise EvalInputError(f"reference {ref!r}: {e}") from None
        feats = features_of(net, dataset, batch_size, progress, dist)
    else:
        feats = features_of(net, ref, batch_size, progress, dist)
    info["n"], info["from"] = feats.n, "images"
    if cache is not None:
        _save_cache_once(cache, feats, key, dist)
        info["cached_to"] = str(cache)
    return feats, info


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
                            progress: bool = True, dist: DistInfo | None = None) -> dict[str, Any]:
    """Encode + decode every image of `dataset` ((image in [-1, 1], label) items): PSNR, SSIM, LPIPS (skipped
    with the reason when its weights are missing) and, with a feature network, rFID of the reconstructions
    against the originals (reference statistics from `stats_cache` when it exists and matches `cache_key`).
    `dist`: under torchrun each rank reconstructs a contiguous share, and every rank returns the same result."""
    from ..progress import progress_bar

    tokenizer = tokenizer.to(device).eval()
    net = resolve_feature_net(feature_net, device) if feature_net is not None else None
    cache = Path(stats_cache) if stats_cache else None
    ref = _load_cache(cache, net.name, cache_key) if net is not None and _cache_exists(cache, dist) else None
    meter = ReconstructionMetrics(lpips=lpips, device=device)
    rec_feats, ref_feats = [], []
    sharded = dist is not None and dist.enabled
    share = Subset(dataset, shard_range(len(dataset), dist)) if sharded else dataset
    loader = DataLoader(share, batch_size=batch_size, shuffle=False)
    main = dist is None or dist.is_main
    for images, _ in progress_bar(loader, desc="reconstruct", disable=not (progress and main)):
        x = images.to(device)
        recon = to_uint8_levels(tokenizer.decode(tokenizer.encode(x)).float())
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
    if net is not None:
        evaluated = gather_features(rec_feats, dist)  # every rank's, in rank order
        if ref is None:
            ref = gather_features(ref_feats, dist)
            if cache is not None:
                _save_cache_once(cache, ref, cache_key, dist)
                out["reference_cached_to"] = str(cache)
        value = next(iter(fid(evaluated, ref).values()))
        metrics[metric_name("rfid", net.name, evaluated.n)] = value
        out["feature_net"] = net.name
    else:
        skipped["rfid"] = "no feature network given"
    return {**out, "metrics": metrics, "skipped": skipped}


# ==============================================================================================================
# Latent analysis
# ==============================================================================================================
def _latents_and_labels(source) -> tuple[np.ndarray, np.ndarray | None]:
    """(latents (N, L, C), labels or None) from a cache dir, a LatentDataset, (latents, labels) or latents."""
    from ..data.latents import LatentDataset

    if isinstance(source, (str, Path)):
        source = LatentDataset(source)
    if isinstance(source, LatentDataset):
        # Unflipped latents only: the flipped copies are augmentation, not more images of the distribution.
        latents, labels = source.first()
        return latents.numpy(), labels.numpy()
    if isinstance(source, (tuple, list)) and len(source) == 2:
        latents, labels = source
        latents = latents.detach().cpu().numpy() if hasattr(latents, "detach") else np.asarray(latents)
        labels = None if labels is None else np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
        return latents, labels
    latents = source.detach().cpu().numpy() if hasattr(source, "detach") else np.asarray(source)
    return latents, None


def analyze_latents(train_caches: Mapping[str, Any], test_caches: Mapping[str, Any] | None = None,
                    ks: Sequence[int] = (1, 2, 4, 8, 16, 32), out_dir: str | Path | None = None,
                    variance: float = 0.9, holdout: float = 0.2, seed: int = 0,
                    covariance: str = "full") -> dict[str, Any]:
    """GMM NLL per K (one PCA dimension shared by every tokenizer, so the likelihoods are comparable), BIC,
    linear-probe accuracy and per-token statistics, per tokenizer.

    train_caches / test_caches: name -> latent cache dir, LatentDataset, (latents, labels) or latents. A name
    without a test set is scored on a held-out `holdout` fraction of its training latents (fixed by `seed`),
    and everything is fitted on the rest. With `out_dir`, writes analysis.json and gmm_nll.png there.
    """
    test_caches = dict(test_caches or {})
    unknown = sorted(set(test_caches) - set(train_caches))
    if unknown:
        raise EvalInputError(f"test latents for {unknown} have no training latents (names: {sorted(train_caches)})")
    if not train_caches:
        raise EvalInputError("no latents to analyse")
    data: dict[str, dict[str, Any]] = {}
    for name, source in train_caches.items():
        z, y = _latents_and_labels(source)
        entry = {"train_source": str(source) if isinstance(source, (str, Path)) else "given"}
        if name in test_caches:
            zt, yt = _latents_and_labels(test_caches[name])
            entry["test_source"] = (str(test_caches[name]) if isinstance(test_caches[name], (str, Path))
                                    else "given")
        else:
            n_test = max(1, int(round(holdout * len(z))))
            if len(z) - n_test < 2:
                raise EvalInputError(f"{name}: {len(z)} latents are too few to hold out a test set")
            perm = np.random.default_rng(seed).permutation(len(z))
            test_idx, train_idx = perm[:n_test], perm[n_test:]
            zt, yt = z[test_idx], (None if y is None else y[test_idx])
            z, y = z[train_idx], (None if y is None else y[train_idx])
            entry["test_source"] = f"held out: {n_test} of the training latents (seed {seed})"
        entry.update(train=z, train_labels=y, test=zt, test_labels=yt)
        data[name] = entry

    # One PCA dimension for all: the largest needed by any tokenizer to keep `variance`, capped by what every
    # tokenizer can give (PCA dim <= min(n_train, dims)).
    own_dims = {name: pca_dim_for_variance(d["train"], variance) for name, d in data.items()}
    cap = min(min(len(d["train"]), int(np.prod(d["train"].shape[1:]))) for d in data.values())
    pca_dim = min(max(own_dims.values()), cap)
    n_min = min(len(d["train"]) for d in data.values())
    ks_used = sorted({int(k) for k in ks if 1 <= int(k) <= n_min})
    dropped = sorted({int(k) for k in ks} - set(ks_used))
    if not ks_used:
        raise EvalInputError(f"no K in {list(ks)} is usable with {n_min} training latents")

    results, report = {}, {}
    for name, d in data.items():
        gmm = gmm_analysis(d["train"], d["test"], ks_used, pca_dim=pca_dim, variance=variance,
                           covariance=covariance, seed=seed)
        results[name] = gmm
        entry: dict[str, Any] = {
            "train": d["train_source"], "test": d["test_source"], "n_train": len(d["train"]),
            "n_test": len(d["test"]), "latent_shape": list(d["train"].shape[1:]), "own_pca_dim": own_dims[name],
            "gmm": {"ks": gmm.ks, "nll": gmm.nll, "nll_per_dim": gmm.nll_per_dim, "train_nll": gmm.train_nll,
                    "bic": gmm.bic, "best_k_bic": gmm.best_k_bic, "pca_dim": gmm.pca_dim,
                    "explained_variance": gmm.explained_variance, "covariance": gmm.covariance},
            "metrics": gmm.metrics(), "skipped": {},
        }
        y, yt = d["train_labels"], d["test_labels"]
        if y is None or yt is None:
            entry["skipped"]["probe"] = "no labels"
        elif len(np.unique(y)) < 2:
            entry["skipped"]["probe"] = "the training latents hold a single class"
        else:
            entry["metrics"] |= linear_probe(d["train"], y, d["test"], yt, seed=seed)
        stats = token_statistics(d["train"])
        entry["token_stats"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}
        report[name] = entry

    out: dict[str, Any] = {"pca_dim": pca_dim, "pca_variance": variance, "ks": ks_used, "tokenizers": report}
    if dropped:
        out["ks_dropped"] = {"ks": dropped, "reason": f"more components than the {n_min} training latents"}
    if pca_dim < max(own_dims.values()):
        out["pca_note"] = (f"capped at {pca_dim} (fewest training latents or dims); a tokenizer needed "
                           f"{max(own_dims.values())} for {variance:.0%} of its variance")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out["plot"] = str(plot_gmm_nll(results, out_dir / "gmm_nll.png"))
        out["json"] = str(out_dir / "analysis.json")
        Path(out["json"]).write_text(json.dumps(out, indent=2))
    return out


# ==============================================================================================================
# The commands
# ==============================================================================================================
DEFAULT_EVAL_DIR = Path("runs") / "eval"  # like `pilot`'s runs/pilot: never beside the inputs (maybe read-only)


def _write_json(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the result; a location that cannot be written only loses the file (the CLI prints the result)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        return {**result, "json": str(path)}
    except OSError as e:
        log.warning("could not write %s (%s); results are printed only", path, e)
        return {**result, "json": None}


def result_path(out: str | Path | None, source: str | Path, kind: str, net: str) -> Path:
    """Where `maetok eval` writes its JSON: `out` when it names a .json file, else a file in the folder `out`
    (default runs/eval/) named after the input's last two path components (run folders are often all called
    `model` or `samples`), e.g. runs/eval/tok-ae-model.recon-inception.json."""
    out = Path(out) if out else DEFAULT_EVAL_DIR
    if out.suffix.lower() == ".json":
        return out
    src = Path(source).expanduser()
    full = src.resolve() if src.exists() else Path(str(source))  # not there: a hub id, org/name
    parts = [p for p in full.parts if p != full.anchor][-2:]
    if src.is_file():
        parts[-1] = Path(parts[-1]).stem
    label = "-".join(parts) or "eval"
    return out / f"{label}.{kind}-{net}.json"


def evaluate_command(args: argparse.Namespace) -> dict[str, Any] | None:
    """`maetok eval gen|recon`; returns the result and writes it as JSON to `result_path(args.out, ...)`.
    Under torchrun the ranks share the work; rank 0 returns and writes the result, the others return None."""
    from ..io.distributed import cleanup, init_distributed

    info = init_distributed(args.device)  # a cuda:N given to one process is used as is below
    try:
        result = _evaluate(args, info, info.device if info.enabled else resolve_device(args.device))
    finally:
        cleanup(info)
    return result if info.is_main else None


def _evaluate(args: argparse.Namespace, info: DistInfo, device) -> dict[str, Any]:
    from ..data.datasets import held_out_split

    write = _write_json if info.is_main else (lambda result, path: result)
    # No --split: the data's test/ folder, else its val/ folder (ImageNet has only train/ and val/).
    split = args.split or held_out_split(args.ref)
    out = getattr(args, "out", None)
    if args.what == "gen" and not args.samples:
        raise EvalInputError("maetok eval gen needs --samples (.npz with arr_0, or an image folder)")
    if args.what == "recon" and not args.tokenizer:
        raise EvalInputError("maetok eval recon needs --tokenizer (a tokenizer weights folder)")
    net = resolve_feature_net(args.features, device)
    # Before any work, and alike on every rank: an earlier result (hours of Inception on a CPU) is kept.
    path = result_path(out, args.samples, "eval", net.name) if args.what == "gen" else \
        result_path(out, args.tokenizer, "recon", net.name)
    if path.exists() and not getattr(args, "force", False):
        raise EvalInputError(f"{path} already holds an evaluation result; give --force to replace it, or --out "
                             f"another .json file or folder")
    if args.what == "gen":
        result = evaluate_generation(args.samples, args.ref, net, split=split,
                                     num_ref=args.num_samples, stats_cache=args.stats_cache, device=device,
                                     progress=info.is_main, dist=info)
        return write(result, path)

    from ..data import DatasetError, open_dataset

    tokenizer = load_tokenizer(args.tokenizer)
    size = tokenizer.config.image_size
    try:
        dataset = open_dataset(args.ref, split=split, image_size=size, limit=args.num_samples)
    except DatasetError as e:
        raise EvalInputError(f"--ref {args.ref!r}: {e}") from None
    # The same key as `eval gen` uses: one cache of these reference images serves rFID and gFID alike.
    key = _reference_key(args.ref, split, args.num_samples, size, net.name)
    result = evaluate_reconstruction(tokenizer, dataset, net, device=device, stats_cache=args.stats_cache,
                                     cache_key=key, progress=info.is_main, dist=info)
    result = {"tokenizer": str(args.tokenizer), "reference": {"source": args.ref, "split": split}, **result}
    return write(result, path)


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalInputError(f"{option}: {item!r} must look like NAME=CACHE_DIR")
        if name in out:
            raise EvalInputError(f"{option}: name {name!r} given twice")
        out[name] = path
    return out


def analyze_command(args: argparse.Namespace) -> dict[str, Any]:
    """`maetok analyze`: analysis.json and gmm_nll.png in --out; returns the analysis."""
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise EvalInputError(f"--ks {args.ks!r} must be comma-separated integers, e.g. 1,2,4,8") from None
    if not ks or min(ks) < 1:
        raise EvalInputError(f"--ks {args.ks!r} must list positive integers")
    return analyze_latents(_pairs(args.latents, "--latents"), _pairs(args.test_latents, "--test-latents"), ks,
                           args.out)
