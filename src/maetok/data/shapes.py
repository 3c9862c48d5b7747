"""`shapes`: a built-in procedural dataset of 10 shape classes, so every command runs with no download.

Each image shows one filled shape (its class) with a random colour, size, position and rotation over a textured
background (flat, gradient, stripes, checks, smooth noise or dots). Everything is drawn from a generator seeded
by (split, index), so an item is the same on every machine, worker and epoch, and train/test never coincide.
Classes are balanced: label = index % 10. Shapes are told apart by outline, not by orientation (no square vs
diamond), so rotation never changes the class.
"""
from __future__ import annotations

import colorsys
import math
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .images import uint8_to_float

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "heart", "arrow")
SPLIT_SIZES = {"train": 50_000, "test": 10_000, "val": 10_000}
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges


def _regular_polygon(sides: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return radius * np.stack([np.sin(angles), -np.cos(angles)], axis=1)


def _outline(kind: str) -> np.ndarray | None:
    """Polygon vertices (K, 2) in a unit frame (|x|, |y| <= 1), centred at the origin; None for round shapes."""
    if kind == "square":
        return _regular_polygon(4, 0.95, math.pi / 4)
    if kind == "triangle":
        return _regular_polygon(3, 1.0)
    if kind == "hexagon":
        return _regular_polygon(6, 1.0)
    if kind == "star":
        outer, inner = _regular_polygon(5, 1.0), _regular_polygon(5, 0.42, math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if kind == "cross":
        a, b = 0.32, 0.95
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                         [-b, -a], [-a, -a]])
    if kind == "arrow":
        return np.array([[1.0, 0.0], [0.1, -0.8], [0.1, -0.3], [-1.0, -0.3], [-1.0, 0.3], [0.1, 0.3], [0.1, 0.8]])
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 16
        return np.stack([x, y - 0.375], axis=1)  # y spans [-0.69, 0.69]
    return None


def _shape_coverage(kind: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 (size, size), of one shape centred at (cx, cy) in pixels."""
    s = SUPERSAMPLE
    mask = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = cx * s, cy * s, radius * s

    def disc(x: float, y: float, rad: float, fill: int) -> None:
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    if kind == "circle":
        disc(cx, cy, r, 255)
    elif kind == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif kind == "crescent":
        disc(cx, cy, r, 255)
        disc(cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle), 0.8 * r, 0)
    else:
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        points = _outline(kind) @ rot.T * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in points], fill=255)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, size: int, base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(size, size, 3) float background: `base` colour modulated by one of six textures towards `other`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(6)
    theta = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 0:    # flat
        t = np.zeros_like(xx)
    elif kind == 1:  # linear gradient
        t = along - along.min()
        t = t / max(float(t.max()), 1e-6)
    elif kind == 2:  # stripes
        period = rng.uniform(0.15, 0.4)
        t = (np.sin(2 * math.pi * along / period) > 0).astype(np.float32)
    elif kind == 3:  # checks
        cells = int(rng.integers(3, 7))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    elif kind == 4:  # smooth noise: a coarse random grid, bilinearly enlarged
        coarse = torch.from_numpy(rng.random((1, 1, 4, 4), dtype=np.float32))
        t = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)[0, 0]
        t = t.numpy()
    else:            # dots
        cells = int(rng.integers(4, 8))
        fx, fy = (xx * cells) % 1.0 - 0.5, (yy * cells) % 1.0 - 0.5
        t = (fx * fx + fy * fy < 0.09).astype(np.float32)
    strength = rng.uniform(0.25, 0.6) if kind else 0.0
    return base + (other - base) * (strength * t)[..., None]


def render_shape(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size, 3) image of class `label` drawn with randomness from `rng`."""
    kind = SHAPE_CLASSES[label]
    radius = size * rng.uniform(0.2, 0.36)
    margin = radius * 0.95  # shapes stay (almost) inside the image
    cx, cy = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)

    # Foreground and background differ in hue and in brightness, so the shape always stands out.
    hue = rng.uniform()
    light_shape = rng.uniform() < 0.5
    fg_value, bg_value = (rng.uniform(0.75, 1.0), rng.uniform(0.1, 0.4)) if light_shape else \
        (rng.uniform(0.1, 0.35), rng.uniform(0.65, 0.95))
    fg = _hsv(hue, rng.uniform(0.5, 1.0), fg_value)
    bg = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.6), bg_value)
    bg_other = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.6),
                    np.clip(bg_value + rng.uniform(-0.2, 0.2), 0, 1))
    background = _background(rng, size, bg, bg_other)

    coverage = _shape_coverage(kind, size, cx, cy, radius, angle)[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = 1.0 + 0.15 * ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / max(radius, 1.0)
    foreground = np.clip(fg[None, None, :] * light[..., None], 0, 1)  # soft shading: a lit, not flat, object
    image = background * (1 - coverage) + foreground * coverage
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class ShapesDataset(Dataset):
    """`len` items of (float32 (3, S, S) in [-1, 1], label); see the module docstring."""
    class_names = list(SHAPE_CLASSES)
    num_classes = len(SHAPE_CLASSES)
    has_labels = True

    def __init__(self, split: str = "train", image_size: int = 32, length: int = 0, random_flip: bool = False):
        if image_size < 8:
            raise ValueError(f"shapes: image_size={image_size} is too small to draw shapes (need >= 8)")
        self.split, self.image_size, self.random_flip = split, image_size, random_flip
        self.length = length or SPLIT_SIZES.get(split, 10_000)
        self.skipped: list[tuple[str, str]] = []
        self._split_seed = zlib.crc32(split.encode())  # stable across processes, unlike hash()

    def __len__(self) -> int:
        return self.length

    def image_uint8(self, index: int) -> np.ndarray:
        """The deterministic uint8 (S, S, 3) image of item `index`."""
        rng = np.random.default_rng([self._split_seed, index, self.image_size])
        return render_shape(index % self.num_classes, self.image_size, rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes: index {index} out of range for {self.length} items")
        image = uint8_to_float(self.image_uint8(index))
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, index % self.num_classes

    def describe(self) -> str:
        return (f"shapes [{self.split}]: {self.length} procedural images {self.image_size}x{self.image_size}, "
                f"{self.num_classes} balanced classes ({', '.join(self.class_names)})")
