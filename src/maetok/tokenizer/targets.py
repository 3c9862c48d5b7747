"""Auxiliary targets: what the shallow decoders of MAETok predict at masked patches.

A target is a frozen module that turns images into one feature vector per patch:

    target = build_target(AuxTargetConfig("hog"), image_size=256, patch_size=16)
    feats = target(images, patch_size=16)        # images (B, 3, H, W) in [-1, 1] -> (B, N, target.dim)
    loss = target_loss(pred, feats, target.loss, mask)   # mean over the masked patches only

Patches are numbered row-major (index = row * grid_w + col), like the tokenizer's patch embedding.
Registered here: `hog` (the paper's low-level target, official MaskFeat-style HOG) and `sobel` (a few-line
example of a custom target). The pretrained teachers, `resnet-cifar` (a small offline semantic teacher) and the
timm teachers `dinov2`, `siglip` and the generic `timm`, are modules defined here and registered by
`maetok.io.teachers`, which finds their weights. Add your own with `@register_target("name")`; see `sobel`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AuxTargetConfig, ConfigError

LOSSES = ("mse", "cosine")
TargetFactory = Callable[[dict, int, int], "Target"]
TARGETS: dict[str, TargetFactory] = {}


class Target(nn.Module):
    """A frozen per-patch feature extractor. Subclasses set `name`, `dim`, `loss` and implement `forward`."""
    name: str = ""
    dim: int = 0
    loss: str = "mse"
    # A frozen network whose features are as good from bf16 weights (the task casts it when training runs in
    # bf16); hand-computed targets such as HOG keep False and are always computed in float32.
    half_precision_ok: bool = False

    def to_half_precision(self) -> "Target":
        """Hold the weights in bf16 (called only when `half_precision_ok`). Targets with constants that must
        stay exact (normalisation statistics) override this to cast their network alone."""
        return self.to(torch.bfloat16)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the weights, which the input is cast to; float32 for targets without weights."""
        first = next(self.parameters(), None)
        return first.dtype if first is not None else torch.float32

    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> "Target":
        # A teacher's BatchNorm/dropout must never switch to training behaviour when the tokenizer does.
        return super().train(False)


def register_target(name: str, *, overwrite: bool = False) -> Callable[[TargetFactory], TargetFactory]:
    """Decorator: register `factory(options, image_size, patch_size) -> Target` under `name`."""
    def decorator(factory: TargetFactory) -> TargetFactory:
        if name in TARGETS and not overwrite:
            raise ValueError(f"auxiliary target {name!r} is already registered (pass overwrite=True to replace it)")
        TARGETS[name] = factory
        return factory
    return decorator


def build_target(cfg: AuxTargetConfig, image_size: int, patch_size: int) -> Target:
    """Build the registered target `cfg.name`, frozen and in eval mode."""
    if cfg.name not in TARGETS:
        raise ConfigError(f"unknown auxiliary target {cfg.name!r}; registered targets: {sorted(TARGETS)}")
    if image_size % patch_size:
        raise ConfigError(f"auxiliary target {cfg.name!r}: patch_size={patch_size} does not divide "
                          f"image_size={image_size}")
    target = TARGETS[cfg.name](dict(cfg.options), image_size, patch_size)
    if not isinstance(target, Target):
        raise TypeError(f"the factory of auxiliary target {cfg.name!r} returned {type(target).__name__}, "
                        f"not a maetok.tokenizer.targets.Target")
    if target.loss not in LOSSES:
        raise ValueError(f"auxiliary target {cfg.name!r} has loss {target.loss!r}; choose one of {list(LOSSES)}")
    if not (isinstance(target.dim, int) and target.dim > 0):
        raise ValueError(f"auxiliary target {cfg.name!r} has dim={target.dim!r}; it must be a positive integer")
    target.name = target.name or cfg.name
    return target.requires_grad_(False).eval()


def target_loss(pred: torch.Tensor, target: torch.Tensor, kind: str,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-patch `mse` (mean over features) or `cosine` (negative cosine similarity), averaged over the patches
    where `mask` (B, N) is true, or over all patches when `mask` is None. A mask with no true entry gives 0."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.float(), target.float()  # bf16 sums over hundreds of features lose too much
    if kind == "mse":
        per_patch = (pred - target).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_patch = -F.cosine_similarity(pred, target, dim=-1)
    else:
        raise ValueError(f"unknown target loss {kind!r}; choose one of {list(LOSSES)}")
    if mask is None:
        return per_patch.mean()
    if mask.shape != per_patch.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the (B, N) patches {tuple(per_patch.shape)}")
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class TargetLosses(nn.Module):
    """Every auxiliary target's `target_loss`, as one module so that train.compile can fuse them. Eager, each is
    a chain of casts, norms and reductions over (B, N, dim) float32 features (dim 1024+ for the teachers), a few
    milliseconds of small kernels per step on a GPU; compiled, one or two kernels each, backward included."""

    def __init__(self, kinds: dict[str, str]):
        super().__init__()
        self.kinds = dict(kinds)  # target name -> "mse" | "cosine"

    def forward(self, preds: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {name: target_loss(preds[name], targets[name], kind, mask) for name, kind in self.kinds.items()}


# ==============================================================================================================
# Helpers shared by the targets
# ==============================================================================================================
def take_options(target: str, options: dict, defaults: dict[str, Any]) -> dict[str, Any]:
    """`defaults` updated with `options`; an unknown option is a ConfigError listing the allowed ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for auxiliary target {target!r}; "
                          f"allowed options: {sorted(defaults)}")
    return {**defaults, **options}


def check_images(images: torch.Tensor, patch_size: int, what: str) -> tuple[int, int]:
    """The patch grid (rows, cols) of `images`, after checking they are (B, 3, H, W) with H, W divisible by p."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: expected images (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"{what}: image size {h}x{w} is not divisible by patch_size={patch_size}")
    return h // patch_size, w // patch_size


def feature_map_to_tokens(fmap: torch.Tensor, grid: tuple[int, int], resample: str = "auto") -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, rows*cols, C) tokens on the patch grid, row-major.

    resample: "avgpool" (adaptive average pooling), "bilinear", or "auto" (pooling when the map is at least as
    fine as the grid, bilinear when it must be enlarged, where pooling would just repeat values).
    """
    if tuple(fmap.shape[-2:]) != tuple(grid):
        if resample == "auto":
            resample = "avgpool" if fmap.shape[-2] >= grid[0] and fmap.shape[-1] >= grid[1] else "bilinear"
        if resample == "avgpool":
            fmap = F.adaptive_avg_pool2d(fmap, grid)
        elif resample == "bilinear":
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False, antialias=True)
        else:
            raise ValueError(f"unknown resample mode {resample!r}; choose auto, avgpool or bilinear")
    return fmap.flatten(2).transpose(1, 2)


# ==============================================================================================================
# HOG: the official MaskFeat-style histogram of oriented gradients, generalised to any patch size
# ==============================================================================================================
class HOGTarget(Target):
    """Per-channel HOG of cells, grouped into patch tokens.

    Reproduces the official MAETok `HOGGenerator` (9 bins, 8-px cells, 16-px Gaussian window with sigma 8) at
    patch size 16: reflect padding, Sobel cross-correlation, magnitude weighted by a tiled Gaussian window,
    orientation atan2(gx, gy) in [-pi, pi] mapped to `bins` unsigned bins, per-cell sums, L2 normalisation per
    cell and channel. The official code hard-wires 16x16 patches of 2x2 cells; here cells are `patch/2` pixels
    and the window spans one patch by default, so every patch size yields 2x2 cells and 3*9*4 = 108 features.
    Token feature index = (channel*bins + bin) * cells_per_patch + cell_row * cells_side + cell_col.
    """
    name, loss = "hog", "mse"

    def __init__(self, image_size: int, patch_size: int, cell_size: int | None = None, window: int | None = None,
                 sigma: float | None = None, bins: int = 9):
        super().__init__()
        cell_size = cell_size or patch_size // 2
        window = window or patch_size
        sigma = float(sigma or window / 2)
        if cell_size <= 0 or patch_size % cell_size:
            raise ValueError(f"hog: cell_size={cell_size} must divide patch_size={patch_size} "
                             f"(the default cell is patch_size/2, so an odd patch size needs an explicit cell_size)")
        if window <= 0 or image_size % window:
            raise ValueError(f"hog: the Gaussian window ({window} px) must tile image_size={image_size}")
        if bins < 1 or sigma <= 0:
            raise ValueError(f"hog: bins={bins} and sigma={sigma} must be positive")
        self.patch_size, self.cell_size, self.window, self.bins = patch_size, cell_size, window, bins
        self.cells_side = patch_size // cell_size
        self.dim = 3 * bins * self.cells_side ** 2

        sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("sobel", torch.stack([sobel_x, sobel_x.t()]).unsqueeze(1), persistent=False)
        offsets = (torch.arange(window, dtype=torch.float32) - (window - 1) / 2) / sigma
        profile = torch.exp(-0.5 * offsets ** 2)
        gauss = profile[:, None] * profile[None, :]
        self.register_buffer("gauss", gauss / gauss.sum(), persistent=False)

    def hog_cells(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, bins, H/cell, W/cell) histograms, unit L2 norm over the bins."""
        b, c, h, w = images.shape
        cell, window = self.cell_size, self.window
        if h % cell or w % cell or h % window or w % window:
            raise ValueError(f"hog: image size {h}x{w} must be divisible by cell_size={cell} and window={window}")
        # Exact float32 arithmetic: under bf16 autocast the bins of near-boundary gradients would flip.
        with torch.autocast(images.device.type, enabled=False):
            x = F.pad(images.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
            grad = F.conv2d(x, self.sobel.float())             # (B*C, 2, H, W): gx, gy
            gx, gy = grad[:, 0], grad[:, 1]
            magnitude = torch.sqrt(gx * gx + gy * gy) * self.gauss.float().repeat(h // window, w // window)
            # Same expression as the official code so floor() agrees at bin boundaries.
            phase = torch.atan2(gx, gy) / math.pi * self.bins
            bin_index = torch.floor(phase).long() % self.bins

            hc, wc = h // cell, w // cell
            rows = torch.arange(h, device=images.device) // cell
            cols = torch.arange(w, device=images.device) // cell
            cell_index = (rows[:, None] * wc + cols[None, :]).view(1, h * w)
            # One scatter for all histograms: slot = bin * n_cells + cell, per (image, channel) row.
            slot = bin_index.view(b * c, h * w) * (hc * wc) + cell_index
            hist = magnitude.new_zeros(b * c, self.bins * hc * wc)
            hist.scatter_add_(1, slot, magnitude.view(b * c, h * w))
            hist = hist.view(b, c, self.bins, hc, wc)
            return F.normalize(hist, p=2, dim=2, eps=1e-12)

    def cells_to_tokens(self, cells: torch.Tensor) -> torch.Tensor:
        """(B, C, bins, Hc, Wc) -> (B, N, C*bins*s*s) with the official feature order (s = cells per side)."""
        b, c, nb, hc, wc = cells.shape
        s = self.cells_side
        grid = cells.view(b, c, nb, hc // s, s, wc // s, s)
        return grid.permute(0, 3, 5, 1, 2, 4, 6).reshape(b, (hc // s) * (wc // s), c * nb * s * s)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        if patch_size != self.patch_size:
            raise ValueError(f"hog: built for patch_size={self.patch_size}, called with {patch_size}")
        check_images(images, patch_size, "hog")
        return self.cells_to_tokens(self.hog_cells(images))


@register_target("hog")
def _build_hog(options: dict, image_size: int, patch_size: int) -> Target:
    opts = take_options("hog", options, {"cell_size": None, "window": None, "sigma": None, "bins": 9})
    return HOGTarget(image_size, patch_size, **opts)


# ==============================================================================================================
# Sobel: the smallest useful target, a template for your own
# ==============================================================================================================
class SobelTarget(Target):
    """Per patch: mean gradient magnitude and mean signed gradient (gx, gy: its direction) of the grey image."""
    name, dim, loss = "sobel", 3, "mse"

    def __init__(self):
        super().__init__()
        kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8
        self.register_buffer("kernels", torch.stack([kx, kx.t()]).unsqueeze(1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        check_images(images, patch_size, "sobel")
        grey = F.pad(images.float().mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        grad = F.conv2d(grey, self.kernels)                                   # (B, 2, H, W)
        feats = torch.cat([grad.norm(dim=1, keepdim=True), grad], dim=1)     # (B, 3, H, W)
        return F.avg_pool2d(feats, patch_size).flatten(2).transpose(1, 2)    # (B, N, 3), row-major


@register_target("sobel")
def _build_sobel(options: dict, image_size: int, patch_size: int) -> Target:
    take_options("sobel", options, {})
    return SobelTarget()


# ==============================================================================================================
# resnet-cifar: a small offline semantic teacher
# ==============================================================================================================
class ResNetCifarTarget(Target):
    """A stage of a CIFAR-10 ResNet, resampled to the patch grid; cosine loss.

    A deliberate small-scale substitution for the paper's DINOv2 / SigLIP targets, which cannot be downloaded
    on every machine and are far too large for 32x32 CPU experiments. Results with it are not the paper's
    setting and must be reported as such. Channels: layer1 16, layer2 32, layer3 64 (at H, H/2, H/4).
    """
    loss = "cosine"
    half_precision_ok = True
    CHANNELS = {"layer1": 16, "layer2": 32, "layer3": 64}

    def __init__(self, network: nn.Module, layer: str, resample: str, input_size: int):
        super().__init__()
        if layer not in self.CHANNELS:
            raise ConfigError(f"resnet-cifar: layer={layer!r}; choose one of {sorted(self.CHANNELS)}")
        if resample not in ("auto", "avgpool", "bilinear"):
            raise ConfigError(f"resnet-cifar: resample={resample!r}; choose auto, avgpool or bilinear")
        self.network, self.layer, self.resample, self.input_size = network, layer, resample, input_size
        self.name, self.dim = "resnet-cifar", self.CHANNELS[layer]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        grid = check_images(images, patch_size, "resnet-cifar")
        if self.input_size and images.shape[-1] != self.input_size:
            # The network was trained at 32x32: optionally show it images at the scale it knows.
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic",
                                   align_corners=False, antialias=True).clamp(-1, 1)
        fmap = self.network.feature_maps(images.to(self.compute_dtype))[self.layer]
        return feature_map_to_tokens(fmap.float(), grid, self.resample)


# ==============================================================================================================
# timm teachers: DINOv2, SigLIP, or any timm ViT
# ==============================================================================================================
class TimmTarget(Target):
    """Patch-token features of a frozen timm ViT built at the tokenizer's image and patch size.

    timm resamples the pretrained patch embedding (and position table) to the new patch size and grid when it
    loads the weights, so the teacher yields exactly one token per tokenizer patch. Features come from the final
    norm (layer=None) or the output of block `layer`; prefix tokens (class, registers) are dropped.
    """
    loss = "cosine"
    half_precision_ok = True

    def __init__(self, name: str, model: nn.Module, layer: int | None, norm: bool):
        super().__init__()
        self.name, self.model, self.norm = name, model, norm
        depth = len(model.blocks)
        if layer is not None and not -depth <= layer < depth:
            raise ConfigError(f"{name}: layer={layer} is out of range for a {depth}-block model")
        self.layer = None if layer is None else layer % depth
        self.dim = int(model.num_features)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def to_half_precision(self) -> "TimmTarget":
        self.model.to(torch.bfloat16)  # the mean/std buffers stay float32: bf16 would round 0.229 to 0.2295
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        grid = check_images(images, patch_size, self.name)
        x = (((images + 1) / 2 - self.mean) / self.std).to(self.compute_dtype)
        if self.layer is None:
            tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]
        else:
            tokens = self.model.forward_intermediates(x, indices=[self.layer], norm=self.norm, stop_early=True,
                                                      output_fmt="NLC", intermediates_only=True)[0]
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{self.name}: the model gives {tokens.shape[1]} patch tokens for a "
                             f"{grid[0]}x{grid[1]} patch grid; build it with the same image and patch size")
        return tokens.float()


__all__ = ["Target", "TARGETS", "LOSSES", "register_target", "build_target", "target_loss", "take_options",
           "check_images", "feature_map_to_tokens", "HOGTarget", "SobelTarget", "ResNetCifarTarget", "TimmTarget"]
