"""The HOG target: exact parity with the official MaskFeat-style generator, and its generalisation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from maetok.config import AuxTargetConfig
from maetok.tokenizer.targets import HOGTarget, build_target


def hog(image_size: int, patch_size: int, **options) -> HOGTarget:
    return build_target(AuxTargetConfig("hog", options=options), image_size, patch_size)


@pytest.fixture(scope="module")
def official(parity_dir):
    inputs = load_file(str(parity_dir / "hog" / "inputs.safetensors"))
    outputs = load_file(str(parity_dir / "hog" / "outputs.safetensors"))
    return inputs["images"], outputs


def test_matches_official_cells_and_tokens(official):
    images, expected = official
    target = hog(256, 16)
    cells = target.hog_cells(images)
    tokens = target(images, 16)
    assert cells.shape == expected["hog_cells"].shape == (4, 3, 9, 32, 32)
    assert tokens.shape == expected["hog_tokens"].shape == (4, 256, 108)
    assert (cells - expected["hog_cells"]).abs().max().item() < 1e-5
    assert (tokens - expected["hog_tokens"]).abs().max().item() < 1e-5


def test_default_geometry_is_the_official_one_at_patch_16():
    target = hog(256, 16)
    assert (target.cell_size, target.window, target.bins, target.dim) == (8, 16, 9, 108)
    explicit = hog(256, 16, cell_size=8, window=16, sigma=8.0, bins=9)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(target(images, 16), explicit(images, 16))


def _reference_cells(image: torch.Tensor, cell: int, window: int, bins: int = 9) -> torch.Tensor:
    """A plain per-pixel loop transcription of the README's description, for small images only."""
    c, h, w = image.shape
    padded = F.pad(image[None], (1, 1, 1, 1), mode="reflect")[0].double()
    sigma = window / 2
    g1 = [math.exp(-0.5 * ((i - (window - 1) / 2) / sigma) ** 2) for i in range(window)]
    total = sum(g1) ** 2
    out = torch.zeros(c, bins, h // cell, w // cell, dtype=torch.float64)
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                p = padded[ch, y:y + 3, x:x + 3]
                gx = (p[:, 0] - p[:, 2]) @ torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
                gy = (p[0, :] - p[2, :]) @ torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
                magnitude = math.hypot(gx, gy) * g1[y % window] * g1[x % window] / total
                b = math.floor(math.atan2(gx, gy) / math.pi * bins) % bins
                out[ch, b, y // cell, x // cell] += magnitude
    return (out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()


def test_generalised_geometry_matches_a_plain_loop():
    torch.manual_seed(1)
    image = torch.rand(3, 16, 16) * 2 - 1
    target = hog(16, 8)  # 4-px cells, 8-px window with sigma 4
    cells = target.hog_cells(image[None])[0]
    assert (cells - _reference_cells(image, 4, 8)).abs().max().item() < 1e-5


@pytest.mark.parametrize("image_size,patch_size", [(32, 4), (64, 8), (48, 16)])
def test_other_sizes_give_108_unit_norm_features(image_size, patch_size):
    images = torch.rand(2, 3, image_size, image_size) * 2 - 1
    target = hog(image_size, patch_size)
    tokens = target(images, patch_size)
    n = (image_size // patch_size) ** 2
    assert tokens.shape == (2, n, 108)
    assert torch.isfinite(tokens).all()
    # Each (channel, cell) histogram occupies 9 features with stride 4; random images give no empty cell.
    norms = tokens.view(2, n, 3, 9, 4).norm(dim=3)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_token_layout_follows_the_official_index_formula():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    target = hog(32, 8)
    cells, tokens = target.hog_cells(images), target(images, 8)
    for b, pr, pc, c, k, cr, cc in [(0, 0, 0, 0, 0, 0, 0), (1, 2, 3, 2, 8, 1, 0), (0, 3, 1, 1, 4, 0, 1)]:
        feature = (c * 9 + k) * 4 + cr * 2 + cc
        assert tokens[b, pr * 4 + pc, feature] == cells[b, c, k, pr * 2 + cr, pc * 2 + cc]


def test_non_square_images_and_flat_regions():
    target = hog(32, 4)
    tokens = target(torch.rand(1, 3, 32, 64) * 2 - 1, 4)
    assert tokens.shape == (1, 8 * 16, 108)
    flat = target(torch.zeros(1, 3, 32, 32), 4)
    assert torch.equal(flat, torch.zeros_like(flat))  # no gradient: all-zero histograms, not NaN


def test_bf16_autocast_does_not_change_the_target():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    target = hog(32, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = target(images, 4)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, target(images, 4))


def test_clear_errors_for_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="cell_size"):
        hog(30, 5)                       # odd patch: default cell patch/2 is not an integer
    with pytest.raises(ValueError, match="window"):
        hog(40, 8, window=16)            # a 16-px window does not tile 40 px
    with pytest.raises(ValueError, match="cell_size=3 must divide patch_size=8"):
        hog(32, 8, cell_size=3)
    target = hog(32, 4)
    with pytest.raises(ValueError, match="patch_size"):
        target(torch.zeros(1, 3, 32, 32), 8)
    with pytest.raises(ValueError, match="divisible"):
        target(torch.zeros(1, 3, 30, 32), 4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        target(torch.zeros(1, 1, 32, 32), 4)
    assert hog(30, 5, cell_size=5, window=5).dim == 27  # odd patches work with an explicit cell size
