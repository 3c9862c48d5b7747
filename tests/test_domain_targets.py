"""The domain targets `texture` (Gabor energy) and `frequency` (DCT log-magnitude): shapes for any size, float32,
and that they measure what their names say: a stripe pattern's orientation and period move the right features,
and brightness moves none."""
from __future__ import annotations

import math

import pytest
import torch

from maetok.config import AuxTargetConfig, ConfigError
from maetok.tokenizer.domain_targets import dct_matrix
from maetok.tokenizer.targets import TARGETS, Target, build_target


def build(name: str, image_size: int = 32, patch_size: int = 8, **options) -> Target:
    return build_target(AuxTargetConfig(name, options=options), image_size, patch_size)


def stripes(period: float, vertical: bool = True, size: int = 32, amplitude: float = 0.8) -> torch.Tensor:
    """(1, 3, size, size) grey stripes: vertical ones vary along x (the width), horizontal ones along y."""
    wave = amplitude * torch.cos(2 * math.pi * torch.arange(size, dtype=torch.float32) / period)
    image = wave.expand(size, size) if vertical else wave[:, None].expand(size, size)
    return image.expand(1, 3, size, size).clone()


def test_both_are_registered_with_the_built_in_targets():
    assert {"hog", "sobel", "texture", "frequency"} <= set(TARGETS)


@pytest.mark.parametrize("name,options,dim", [
    ("texture", {}, 8), ("texture", {"orientations": 6, "wavelengths": [3, 6, 12]}, 18),
    ("frequency", {}, 16), ("frequency", {"size": 2}, 4),
])
@pytest.mark.parametrize("height,width,patch", [(32, 32, 8), (16, 24, 4), (12, 12, 3)])
def test_one_finite_float32_feature_per_patch_at_any_size(name, options, dim, height, width, patch):
    if name == "frequency" and not options:
        dim = min(4, patch) ** 2  # the default band grid never exceeds the patch's frequencies
    target = build(name, height, patch, **options)
    images = torch.rand(2, 3, height, width) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 all the same
        out = target(images, patch)
    assert out.shape == (2, (height // patch) * (width // patch), dim) and target.dim == dim
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and target.loss == "mse"
    assert torch.allclose(out, target(images, patch))
    # Patches are row-major: the features of the top-left patch depend on the top-left pixels only (frequency).
    if name == "frequency":
        moved = images.clone()
        moved[..., -patch:, -patch:] = 0
        assert torch.equal(target(moved, patch)[:, 0], out[:, 0])


def test_texture_energy_follows_the_stripes_orientation_and_period():
    target = build("texture", orientations=4, wavelengths=[4, 8])  # feature = scale * 4 + orientation
    vertical = target(stripes(4), 8).mean(1)[0]
    horizontal = target(stripes(4, vertical=False), 8).mean(1)[0]
    assert vertical.argmax() == 0 and horizontal.argmax() == 2  # 0 and 90 degrees across the stripes
    assert vertical[0] == pytest.approx(0.8, rel=0.15)          # about the stripes' amplitude
    assert vertical[2] < 0.01 * vertical[0]
    coarse = target(stripes(8), 8).mean(1)[0]
    assert coarse.argmax() == 4 and coarse[4] > 3 * coarse[0]   # the 8-pixel filter, same orientation
    diagonal = torch.cos(2 * math.pi * (torch.arange(32.0)[:, None] + torch.arange(32.0)[None, :]) / (4 * 2 ** 0.5))
    assert target(diagonal.expand(1, 3, 32, 32), 8).mean(1)[0][:4].argmax() == 1  # 45 degrees


def test_texture_ignores_brightness_and_sees_nothing_in_a_flat_image():
    target = build("texture")
    images = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    assert torch.allclose(target(images + 0.2, 8), target(images, 8), atol=1e-5)
    assert target(torch.full((1, 3, 32, 32), 0.3), 8).abs().max() < 1e-5
    # Contrast is what it measures: twice the contrast, twice the energy.
    assert torch.allclose(target(images * 0.5, 8) * 2, target(images, 8), atol=1e-5)


def test_frequency_bands_follow_the_stripes_orientation_and_frequency():
    target = build("frequency", 32, 16, size=4)  # feature = vertical band * 4 + horizontal band
    vertical = target(stripes(8, size=32), 16).mean(1)[0].view(4, 4)
    horizontal = target(stripes(8, vertical=False, size=32), 16).mean(1)[0].view(4, 4)
    assert vertical[0].sum() > 100 * vertical[1:].sum()        # all energy in the first row of bands
    assert torch.allclose(horizontal, vertical.t(), atol=1e-5)  # the transposed image, the transposed bands

    def centroid(period: float) -> float:
        bands = target(stripes(period, size=32), 16).mean(1)[0].view(4, 4)[0]
        return float((bands * torch.arange(4.0)).sum() / bands.sum())
    assert centroid(16) < centroid(8) < centroid(4) < centroid(2.5)  # finer stripes, higher bands


def test_frequency_ignores_brightness_and_uses_an_orthonormal_dct():
    basis = dct_matrix(8)
    assert torch.allclose(basis @ basis.t(), torch.eye(8), atol=1e-6)
    target = build("frequency", 16, 8)
    images = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    assert torch.allclose(target(images + 0.2, 8), target(images, 8), atol=1e-5)
    assert target(torch.full((1, 3, 16, 16), -0.4), 8).abs().max() < 1e-6


@pytest.mark.parametrize("name,options,match", [
    ("texture", {"wavelength": [4]}, "unknown option 'wavelength'"),
    ("texture", {"wavelengths": [1.5]}, "wavelengths=.* pixel periods >= 2"),
    ("texture", {"orientations": 0}, "orientations=0 must be a positive integer"),
    ("frequency", {"size": 9}, "size=9 must be an integer from 1 to patch_size=8"),
])
def test_bad_options_are_one_config_error(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build(name, **options)


def test_frequency_refuses_another_patch_size_than_it_was_built_for():
    with pytest.raises(ValueError, match="built for patch_size=8"):
        build("frequency")(torch.zeros(1, 3, 32, 32), 4)
