"""Domain auxiliary targets computed in torch: `texture` (a Gabor filter bank's energy) and `frequency` (the
patch's DCT log-magnitude spectrum).

Both are hand-computed like `hog` and `sobel` (no weights, float32, vectorised over the batch, any image and
patch size), for data where low-level structure matters more than semantics, e.g. surfaces in manufacturing
inspection. Choose them per run: `model.aux_targets=[{name: hog}, {name: texture}, {name: frequency}]`.
They live beside `targets.py` (which holds the registry) to keep that file small; `maetok.tokenizer` imports this
module, so they are registered whenever the registry is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .targets import Target, check_images, register_target, take_options


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) float32 luminance as the channels' mean (the grey image `sobel` uses)."""
    return images.float().mean(1, keepdim=True)


# ==============================================================================================================
# texture: the local energy of a small Gabor filter bank, averaged per patch
# ==============================================================================================================
class TextureTarget(Target):
    """Per patch: the mean local amplitude of `orientations` x `len(wavelengths)` Gabor filters on the grey image.

    Each filter is a complex Gabor (an even and an odd kernel) with an isotropic Gaussian envelope of sigma =
    0.56 * wavelength (a one-octave bandwidth). The even kernel is made zero-mean, so that a brightness offset
    leaves the features unchanged and a flat region gives 0. Each pair is scaled so that a sinusoid of the
    filter's wavelength and orientation with amplitude a gives a local amplitude of about a. Orientation k is
    the direction across the stripes the filter matches, k * 180 / orientations degrees from the image's x axis
    (0: vertical stripes, whose intensity varies along x). Replicate padding, as `sobel`, so any size works.
    Feature index = wavelength_index * orientations + orientation_index.
    """
    name, loss = "texture", "mse"

    def __init__(self, orientations: int = 4, wavelengths: tuple[float, ...] = (4.0, 8.0)):
        super().__init__()
        if not (isinstance(orientations, int) and orientations >= 1):
            raise ConfigError(f"texture: orientations={orientations!r} must be a positive integer")
        if (not isinstance(wavelengths, (list, tuple)) or not wavelengths
                or not all(isinstance(w, (int, float)) and w >= 2 for w in wavelengths)):
            # Below 2 pixels a sinusoid aliases: such a filter would measure nothing real.
            raise ConfigError(f"texture: wavelengths={wavelengths!r} must be a list of pixel periods >= 2")
        self.orientations, self.wavelengths = orientations, tuple(float(w) for w in wavelengths)
        self.dim = orientations * len(self.wavelengths)
        kernels = self._gabor_bank()
        self.radius = (kernels.shape[-1] - 1) // 2
        self.register_buffer("kernels", kernels, persistent=False)

    def _gabor_bank(self) -> torch.Tensor:
        """(2 * dim, 1, K, K) float32: the even kernels of every filter, then the odd ones, in feature order."""
        radius = math.ceil(2.5 * 0.56 * max(self.wavelengths))  # the widest envelope, to 2.5 sigma
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        y, x = torch.meshgrid(offsets, offsets, indexing="ij")
        even, odd = [], []
        for wavelength in self.wavelengths:
            sigma = 0.56 * wavelength
            envelope = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
            for k in range(self.orientations):
                theta = math.pi * k / self.orientations
                phase = 2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / wavelength
                cos = envelope * torch.cos(phase)
                cos = cos - envelope * cos.sum() / envelope.sum()   # zero mean: blind to brightness
                scale = envelope.sum() / 2                           # a matched sinusoid's response is ~ this
                even.append(cos / scale)
                odd.append(envelope * torch.sin(phase) / scale)
        return torch.stack(even + odd).unsqueeze(1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        check_images(images, patch_size, "texture")
        # Exact float32 arithmetic, as for hog: bf16 would round small responses of flat regions away.
        with torch.autocast(images.device.type, enabled=False):
            r = self.radius
            grey = F.pad(_grey(images), (r, r, r, r), mode="replicate")
            response = F.conv2d(grey, self.kernels.float())              # (B, 2 * dim, H, W)
            even, odd = response.chunk(2, dim=1)
            amplitude = torch.sqrt(even * even + odd * odd)              # (B, dim, H, W)
            return F.avg_pool2d(amplitude, patch_size).flatten(2).transpose(1, 2)  # (B, N, dim), row-major


@register_target("texture")
def _build_texture(options: dict, image_size: int, patch_size: int) -> Target:
    opts = take_options("texture", options, {"orientations": 4, "wavelengths": [4.0, 8.0]})
    return TextureTarget(opts["orientations"], opts["wavelengths"])


# ==============================================================================================================
# frequency: the patch's 2D DCT log-magnitude, pooled onto a fixed grid of frequency bands
# ==============================================================================================================
def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n), float32: row u is the basis function of frequency u."""
    i = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    return basis.float()


class FrequencyTarget(Target):
    """Per patch: log(1 + mean |DCT coefficient|) of the grey patch's orthonormal 2D DCT-II, in `size` x `size`
    bands of frequency (the patch_size x patch_size spectrum average-pooled, so every frequency is counted
    whatever the patch size). The DC coefficient is left out (set to 0): the patch's brightness is the pixel
    loss's business, and so the features do not change with it. Feature index = vertical_band * size +
    horizontal_band; band 0 holds the lowest frequencies, so vertical stripes (intensity varying along x) put
    their energy in the first row of bands (index < size), horizontal ones in the first column.
    """
    name, loss = "frequency", "mse"

    def __init__(self, patch_size: int, size: int | None = None):
        super().__init__()
        size = min(4, patch_size) if size is None else size
        if not (isinstance(size, int) and 1 <= size <= patch_size):
            raise ConfigError(f"frequency: size={size!r} must be an integer from 1 to patch_size={patch_size} "
                              f"(bands of the patch's {patch_size}x{patch_size} frequencies per side)")
        self.patch_size, self.size, self.dim = patch_size, size, size * size
        self.register_buffer("dct", dct_matrix(patch_size), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        if patch_size != self.patch_size:
            raise ValueError(f"frequency: built for patch_size={self.patch_size}, called with {patch_size}")
        rows, cols = check_images(images, patch_size, "frequency")
        p, b = patch_size, images.shape[0]
        with torch.autocast(images.device.type, enabled=False):
            grey = _grey(images).view(b, rows, p, cols, p).permute(0, 1, 3, 2, 4)   # (B, rows, cols, p, p)
            basis = self.dct.float()
            spectrum = (basis @ grey @ basis.t()).abs().reshape(b * rows * cols, 1, p, p)
            spectrum[:, :, 0, 0] = 0.0                                      # no DC: blind to brightness
            bands = F.adaptive_avg_pool2d(spectrum, self.size)              # (B*N, 1, size, size)
            return torch.log1p(bands).view(b, rows * cols, self.dim)


@register_target("frequency")
def _build_frequency(options: dict, image_size: int, patch_size: int) -> Target:
    opts = take_options("frequency", options, {"size": None})
    return FrequencyTarget(patch_size, opts["size"])


__all__ = ["TextureTarget", "FrequencyTarget", "dct_matrix"]
