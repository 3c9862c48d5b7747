"""Feature networks for FID/KID/IS/precision-recall, each known by a name that goes into every metric it produces.

    net = build_feature_net("resnet56-cifar10")          # or "inception" (the number papers report)
    feats = extract_features(net, images, batch_size=256) # FeatureSet: features (N, D), logits (N, K) or None
    feats = features_of(net, dataset, dist=info)          # the same, split across torchrun ranks
    register_feature_net("pilot-classifier", lambda: wrap_feature_net(my_classifier, "pilot-classifier", 32))

A network registers a factory; `FeatureNet` adapts any module with `.features(images)` (images in [-1, 1]),
resizing inputs to the size the network expects.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..io.distributed import DistInfo, all_gather_list, shard_range
from ..io.hub import find_weights
from ..nets.inception import INPUT_SIZE, build_fid_inception
from ..nets.resnet_cifar import ResNetCifar, build_resnet_cifar
from ..progress import progress_bar


@dataclass
class FeatureSet:
    """Features of N images under one named network; `logits` only when the network has a classifier.
    `fid_stats`: a mean/covariance that FID uses instead of these features' own: an ADM reference batch's stored
    mu/sigma, which its evaluator measures FID against (KID and precision/recall still use the features)."""
    features: np.ndarray
    logits: np.ndarray | None
    net: str
    fid_stats: object | None = None  # FeatureStats (eval/fid.py imports this module)

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def concat_features(parts: list[FeatureSet]) -> FeatureSet:
    """Batches of features (one network) as one set."""
    logits = [p.logits for p in parts]
    return FeatureSet(np.concatenate([p.features for p in parts]),
                      None if any(lg is None for lg in logits) else np.concatenate(logits), parts[0].net)


@contextlib.contextmanager
def _full_float32():
    """No TF32: cuDNN's default TF32 convolutions moved resnet56 features by 5e-4 (relative) on an H200, against
    6e-7 without; reference statistics must not depend on the GPU they were computed on."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class FeatureNet(nn.Module):
    """A named feature network. `input_size` None: any size; `resizes_itself`: the module does its own resize
    (the FID Inception follows TF's resize, not F.interpolate)."""

    def __init__(self, module: nn.Module, name: str, input_size: int | None = None, has_logits: bool = True,
                 resizes_itself: bool = False):
        super().__init__()
        if not callable(getattr(module, "features", None)):
            raise TypeError(f"feature net {name!r}: {type(module).__name__} has no .features(images) method")
        self.module, self.name, self.input_size = module, name, input_size
        self.has_logits, self.resizes_itself = has_logits, resizes_itself

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if self.resizes_itself or size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        down = images.shape[-1] > size or images.shape[-2] > size
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=down)

    @torch.no_grad()
    @_full_float32()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, logits or None) for images in [-1, 1], in full float32."""
        x = self.prepare(images.float())
        feats = self.module.features(x)
        if not self.has_logits:
            return feats, None
        if isinstance(self.module, ResNetCifar):  # its classifier is one linear layer on these features: reuse them
            return feats, self.module.linear(feats)
        logits_fn = getattr(self.module, "logits", None)
        return feats, (logits_fn(x) if callable(logits_fn) else self.module(x))


_REGISTRY: dict[str, Callable[..., FeatureNet]] = {}


def register_feature_net(name: str, factory: Callable[..., FeatureNet], overwrite: bool = False) -> None:
    """Make `build_feature_net(name, **kwargs)` call `factory(**kwargs)`; e.g. the pilot's own classifier."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"feature net {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def available_feature_nets() -> list[str]:
    return sorted(_REGISTRY)


def build_feature_net(name: str, device: str | torch.device = "cpu", **kwargs) -> FeatureNet:
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature net {name!r}; registered: {available_feature_nets()}")
    return _REGISTRY[name](**kwargs).to(device).eval()


def wrap_feature_net(module: nn.Module, name: str, input_size: int | None = None,
                     has_logits: bool = True) -> FeatureNet:
    """Any module with `.features(images in [-1, 1]) -> (B, D)`; logits from `.logits(x)` or `forward(x)`."""
    return FeatureNet(module.eval(), name, input_size, has_logits)


def _inception(path: str | Path | None = None, allow_download: bool = True) -> FeatureNet:
    return FeatureNet(build_fid_inception(path, allow_download), "inception", INPUT_SIZE, has_logits=False,
                      resizes_itself=True)


def _resnet_cifar(arch: str) -> Callable[..., FeatureNet]:
    def factory(weights: str | Path | None = None, pretrained: bool = True) -> FeatureNet:
        path = None
        if pretrained:
            path = find_weights(f"{arch}-cifar10 feature net", weights, f"cifar10-{arch}.safetensors",
                                "Pass weights=... or set $MAETOK_SHARED_DATA to the folder holding it.")
        # The random-init network keeps a distinct name so its numbers are never mistaken for the real ones.
        name = f"{arch}-cifar10" if pretrained else f"{arch}-cifar10-random"
        return FeatureNet(build_resnet_cifar(arch, path), name, input_size=32)

    return factory


register_feature_net("inception", _inception)
register_feature_net("resnet56-cifar10", _resnet_cifar("resnet56"))
register_feature_net("resnet20-cifar10", _resnet_cifar("resnet20"))


def uint8_to_images(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (the file format, e.g. ADM's arr_0) -> float NCHW in [-1, 1]."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        # A read-only memory map (samples read lazily): torch wants its own, writable copy of this batch.
        x = torch.from_numpy(x if x.flags.writeable else np.array(x))
    t = x
    if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 NHWC images, got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1


def _as_images(batch) -> torch.Tensor:
    if isinstance(batch, np.ndarray) or (isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8):
        return uint8_to_images(batch)
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.dim() != 4:
        raise TypeError("expected float NCHW image tensors in [-1, 1] (or uint8 NHWC arrays), got "
                        f"{type(batch).__name__} {getattr(batch, 'dtype', '')} {tuple(getattr(batch, 'shape', ()))}")
    low, high = (v.item() for v in batch.aminmax())
    # Float images in [0, 255] (or far outside [-1, 1]) would give a confident, meaningless FID. Images in [0, 1]
    # cannot be told from bright [-1, 1] images batch by batch, so the range is checked, not the convention.
    if low < -1.01 or high > 1.01:
        raise ValueError(f"float images must lie in [-1, 1]; this batch spans [{low:.3g}, {high:.3g}] "
                         f"(for [0, 1] images pass x * 2 - 1; for 0..255 values pass uint8 NHWC arrays)")
    return batch


def extract_features(net: FeatureNet, images_or_iterable, batch_size: int = 64, progress: bool = True,
                     device: str | torch.device | None = None, total: int | None = None) -> FeatureSet:
    """Stream images through `net` in chunks of at most `batch_size`.

    `images_or_iterable`: a float (N, C, H, W) tensor in [-1, 1], a uint8 NHWC array, or an iterable of such
    batches (or of (images, labels) tuples). `total` (images) sizes the progress bar for iterables.
    """
    if device is None:
        device = next(iter(net.parameters()), torch.empty(0)).device
    single = isinstance(images_or_iterable, (torch.Tensor, np.ndarray))
    batches = [images_or_iterable] if single else images_or_iterable
    if single:
        total = len(images_or_iterable)
    feats, logits = [], []
    with progress_bar(total=total, disable=not progress, unit="img", desc=f"features[{net.name}]") as bar:
        for batch in batches:
            if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
                batch = batch[0]
            for start in range(0, len(batch), batch_size):
                x = _as_images(batch[start:start + batch_size]).to(device)
                f, lg = net.embed(x)
                feats.append(f.double().cpu().numpy())
                if lg is not None:
                    logits.append(lg.double().cpu().numpy())
                bar.update(len(x))
    if not feats:
        raise ValueError("extract_features: no images were given")
    return FeatureSet(np.concatenate(feats), np.concatenate(logits) if logits else None, net.name)


def features_of(net: FeatureNet, source, batch_size: int = 64, progress: bool = True,
                dist: DistInfo | None = None, num_workers: int = 0) -> FeatureSet:
    """Features of every image of `source`: a Dataset of (image, label) items, a uint8 NHWC array, a float NCHW
    tensor, or (not shardable) an iterable of batches. With `dist` of several torchrun ranks, each rank embeds a
    contiguous share and every rank receives the whole set in order, so what follows runs the same everywhere.
    `num_workers`: DataLoader processes decoding a Dataset's images (worth it for JPEGs feeding a GPU)."""
    shardable = isinstance(source, (Dataset, np.ndarray, torch.Tensor))
    if dist is None or not dist.enabled or not shardable:
        return _features(net, source, batch_size, progress, num_workers)
    share = shard_range(len(source), dist)
    part = Subset(source, share) if isinstance(source, Dataset) else source[share.start:share.stop]
    mine = [_features(net, part, batch_size, progress and dist.is_main, num_workers)] if len(share) else []
    return gather_features(mine, dist)


def gather_features(parts: list[FeatureSet], dist: DistInfo | None) -> FeatureSet:
    """Every rank's feature sets (one network; a rank may have none), concatenated in rank order, on every rank.
    Sent as float32, which is what the networks compute in (extract_features widens to float64): lossless, and
    half the bytes of 50k x 2048 Inception features going to every rank."""
    if dist is None or not dist.enabled:
        return concat_features(parts)
    narrow = [FeatureSet(f.features.astype(np.float32), None if f.logits is None else f.logits.astype(np.float32),
                         f.net) for f in parts]
    full = concat_features(all_gather_list(narrow, dist))
    return FeatureSet(full.features.astype(np.float64),
                      None if full.logits is None else full.logits.astype(np.float64), full.net)


def _features(net: FeatureNet, source, batch_size: int, progress: bool, num_workers: int = 0) -> FeatureSet:
    if isinstance(source, Dataset):
        loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        return extract_features(net, loader, batch_size, progress, total=len(source))
    return extract_features(net, source, batch_size, progress)
