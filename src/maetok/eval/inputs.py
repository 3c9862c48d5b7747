"""The inputs of an evaluation: feature networks by name, generated samples, and reference features or statistics.

Reference statistics caches (`stats_cache`) are FeatureStats files (readable by `FeatureStats.load`) that also
hold the reference features, when they fit in 1 GiB, so KID and precision/recall survive a cache hit, and a
description of what they were computed from: a cache computed from another reference is refused, not reused.
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..data import DatasetError, open_dataset
from ..data.datasets import parse_spec
from ..data.images import ImageDecodeError, decode_image
from ..data.layout import IMAGE_SUFFIXES
from ..io.distributed import DistInfo, all_gather_list, barrier
from .features import FeatureNet, FeatureSet, available_feature_nets, build_feature_net, features_of
from .fid import FeatureStats, load_adm_images

log = logging.getLogger("maetok.eval")

CACHED_FEATURES_MAX_BYTES = 1 << 30  # above this a stats cache keeps mu/sigma only (KID/PR then need a recompute)


class EvalInputError(ConfigError):
    """An evaluation input that cannot work (missing file, mismatched cache, bad NAME=DIR pair). A ConfigError,
    so the CLI reports it as one line instead of a traceback."""


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
    path = Path(path)
    if path.is_file():
        try:
            return load_adm_images(path, lazy=True)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise EvalInputError(f"samples {path}: {e}") from None
    if not path.is_dir():
        raise FileNotFoundError(f"samples {path}: no such .npz file or image folder")
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


def reference_key(ref: str, split: str, num: int, image_size: int | None, net: str) -> dict[str, Any]:
    """What a reference statistics cache was computed from; a different key means the cache is for another set."""
    kind, location = parse_spec(ref)
    if kind != "shapes":
        p = Path(location).expanduser()
        location = str(p.resolve()) if p.exists() else location
    return {"ref": f"{kind}:{location}" if kind != "shapes" else "shapes", "split": split, "num": int(num),
            "image_size": image_size, "net": net}


def load_stats_cache(path: Path, net: str, key: dict | None) -> FeatureSet | FeatureStats:
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


def _save_stats_cache(path: Path, feats: FeatureSet, key: dict | None) -> FeatureStats:
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


def stats_cache_exists(cache: Path | None, dist: DistInfo | None) -> bool:
    """Whether to read the cache: rank 0's answer on every rank. Ranks that decided alone could disagree (a file
    rank 0 is writing, a stale network-filesystem view) and then pair up different collectives."""
    exists = cache is not None and cache.is_file()
    return all_gather_list([exists], dist)[0] if dist is not None and dist.enabled else exists


def save_stats_cache_once(cache: Path, feats: FeatureSet, key: dict | None, dist: DistInfo | None) -> None:
    """Rank 0 writes; no rank goes on before the file is complete (a later read must find it whole)."""
    if dist is None or dist.is_main:
        _save_stats_cache(cache, feats, key)
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
    key = reference_key(str(ref), split, num, image_size, net.name) if named else None
    info: dict[str, Any] = {"source": str(ref) if named else "given images",
                            "split": split if named and not is_npz else None}
    cache = Path(stats_cache) if stats_cache else None
    if stats_cache_exists(cache, dist):
        got = load_stats_cache(cache, net.name, key)
        log.info("reference statistics read from %s", cache)
        return got, {**info, "n": got.n, "from": f"cache:{cache}"}

    if is_npz:
        path = Path(ref)
        keys = _npz_keys(path)
        if "net_utf8" in keys or ("arr_0" not in keys and {"mu", "sigma"} <= keys):
            if "arr_0" not in keys and "net_utf8" not in keys and net.name != "inception":
                raise EvalInputError(f"reference {path}: ADM statistics (mu/sigma) are Inception statistics; use "
                                     f"--features inception, or give the reference images")
            got = load_stats_cache(path, net.name, None)
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
        save_stats_cache_once(cache, feats, key, dist)
        info["cached_to"] = str(cache)
    return feats, info

