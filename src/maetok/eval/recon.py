"""Reconstruction metrics: PSNR, SSIM, LPIPS; per image, then averaged over images.

Value ranges are explicit: `value_range=(lo, hi)` is the range the images are expressed in, and the data range
used by PSNR and SSIM is hi - lo. Left as None it follows the dtype: float images are the library's [-1, 1]
(data range 2), uint8 images are [0, 255]; pass (0, 1) for [0, 1] floats. The target (real images) must lie inside
the range, which catches the common mistake of a wrong range; predictions may overshoot (clamp them if wanted).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.distributed import all_gather_list
from ..io.hub import MissingWeightsError
from ..nets.lpips import build_lpips
from .fid import metric_name


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Clamp [-1, 1] images and round them to the 256 levels an image file holds. Reconstructions are measured
    as they would be saved, like generated samples (which are uint8), so rFID and gFID see the same kind of
    input; `maetok eval recon` and the pilot both measure them so."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _resolve_range(target: torch.Tensor, value_range: tuple[float, float] | None) -> tuple[float, float]:
    lo, hi = value_range if value_range is not None else ((0.0, 255.0) if target.dtype == torch.uint8 else (-1.0, 1.0))
    tol = 1e-3 * (hi - lo)
    t_min, t_max = float(target.min()), float(target.max())
    if t_min < lo - tol or t_max > hi + tol:
        raise ValueError(f"target values span [{t_min:.3g}, {t_max:.3g}], outside value_range ({lo}, {hi}): pass the "
                         f"range the images are in, e.g. (0, 1) or (0, 255)")
    return float(lo), float(hi)


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected two NCHW batches of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return pred.double(), target.double()


def psnr(pred: torch.Tensor, target: torch.Tensor,
         value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Per-image PSNR in dB (B,), 10 log10(data_range^2 / MSE); +inf for identical images."""
    lo, hi = _resolve_range(target, value_range)
    x, y = _pair(pred, target)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10((hi - lo) ** 2 / mse)


def _gaussian(window: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(window, dtype=like.dtype, device=like.device) - (window - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float] | None = None,
         window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (B,) (Wang et al. 2004): Gaussian window 11 / sigma 1.5, K1=0.01, K2=0.03, C = (K L)^2 with L
    the data range, on intensities in [0, L]; per channel over valid (unpadded) windows, then averaged over
    channels and pixels."""
    lo, hi = _resolve_range(target, value_range)
    # SSIM's luminance term depends on absolute levels: measure from the range's bottom, so [-1, 1] images score
    # exactly as the [0, 1] or uint8 images they encode.
    x, y = (t - lo for t in _pair(pred, target))
    b, c, h, w = x.shape
    if min(h, w) < window:
        raise ValueError(f"images of {h}x{w} are smaller than the {window}x{window} SSIM window")
    g = _gaussian(window, sigma, x)
    # All five local moments in one depthwise, separable pass.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    stacked = F.conv2d(stacked, g.view(1, 1, -1, 1).expand(5 * c, 1, -1, 1), groups=5 * c)
    stacked = F.conv2d(stacked, g.view(1, 1, 1, -1).expand(5 * c, 1, 1, -1), groups=5 * c)
    mu_x, mu_y, exx, eyy, exy = stacked.split(c, dim=1)
    var_x, var_y, cov = exx - mu_x ** 2, eyy - mu_y ** 2, exy - mu_x * mu_y
    c1, c2 = (0.01 * (hi - lo)) ** 2, (0.03 * (hi - lo)) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


class ReconstructionMetrics:
    """Accumulates per-image PSNR, SSIM and LPIPS over batches; `compute()` gives
    {"psnr@n", "ssim@n", "lpips[vgg]@n"} or, without LPIPS weights, "lpips_skipped" with the reason.

    lpips: "auto" loads LPIPS-VGG when its weights are found, an LPIPS module uses that one, None leaves it out.
    """

    def __init__(self, value_range: tuple[float, float] | None = None,
                 lpips: Literal["auto"] | nn.Module | None = "auto", device: str | torch.device | None = None):
        self.value_range, self.lpips_skipped = value_range, None
        self.lpips = None
        if lpips == "auto":
            try:
                self.lpips = build_lpips()
            except MissingWeightsError as e:
                self.lpips_skipped = f"LPIPS skipped: {e}"
        elif lpips is not None:
            self.lpips = lpips.eval()
        if self.lpips is not None and device is not None:
            self.lpips = self.lpips.to(device)
        self._values: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips[vgg]": []}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        lo, hi = _resolve_range(target, self.value_range)
        self._values["psnr"].append(psnr(pred, target, (lo, hi)).cpu())
        self._values["ssim"].append(ssim(pred, target, (lo, hi)).cpu())
        if self.lpips is not None:
            dev = next(self.lpips.parameters()).device
            to_unit = lambda t: (t.to(dev).float() - lo) / (hi - lo) * 2 - 1  # LPIPS expects [-1, 1]
            self._values["lpips[vgg]"].append(self.lpips(to_unit(pred), to_unit(target)).double().cpu())

    def all_gather(self, info) -> None:
        """Sharded evaluation under torchrun: every rank's per-image values, in rank order, on every rank."""
        mine = [{k: torch.cat(v) if v else torch.empty(0, dtype=torch.float64) for k, v in self._values.items()}]
        parts = all_gather_list(mine, info)
        self._values = {k: [p[k] for p in parts if len(p[k])] for k in self._values}

    def compute(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {}
        for key, values in self._values.items():
            if values:
                v = torch.cat(values)
                metric, _, net = key.partition("[")
                out[metric_name(metric, net.rstrip("]") or None, len(v))] = float(v.mean())
        if self.lpips_skipped:
            out["lpips_skipped"] = self.lpips_skipped
        return out


def reconstruction_metrics(pred: torch.Tensor, target: torch.Tensor,
                           value_range: tuple[float, float] | None = None,
                           lpips: Literal["auto"] | nn.Module | None = "auto") -> dict[str, float | str]:
    """One-shot `ReconstructionMetrics` on a single pair of batches."""
    m = ReconstructionMetrics(value_range, lpips)
    m.update(pred, target)
    return m.compute()
