"""Image files <-> tensors: robust decoding, ADM-style resize and centre crop, and PNG grids.

Inside the library images are float32 in [-1, 1], (3, H, W) RGB; uint8 exists only at the file boundary.

Decoding converts whatever Pillow can open to 8-bit RGB:
- grayscale, 1-bit, palette, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB (CMYK without a colour profile);
- anything with alpha (RGBA, LA, PA, palette or RGB with a transparent colour) is composited on a WHITE
  background, so transparent regions look like the page they were drawn for, not like arbitrary hidden colours;
- 16-bit and 32-bit integer images (I;16, I) are read as 16-bit intensities (0..65535) and scaled to 8 bits;
  float images (F) as [0, 1] when their maximum is at most 1, else as [0, 255]; NaN or infinite values make the
  file unreadable (no pixel value stands for them);
- the EXIF orientation tag is applied.
Empty, truncated, corrupt or non-image files raise `ImageDecodeError`, whose message names the file.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from .layout import printable

WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """A file that cannot be decoded as an image; the message names the file and why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB (see the module docstring for the conventions); ImageDecodeError for float
    pixels that are NaN or infinite."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageDecodeError(f"non-finite pixel values ({np.isnan(values).sum()} NaN, "
                                   f"{np.isinf(values).sum()} infinite, of {values.size})")
        if img.mode == "F":
            scale = 1.0 if values.size and values.max() <= 1.0 else 255.0
        else:
            scale = 65535.0
        grey = np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then a centred `size` x `size` crop (the ADM/guided-diffusion recipe).

    Large downscales first halve the image with a box filter while it stays at least twice the target, so the
    final bicubic step never aliases; small images are enlarged with bicubic interpolation.
    """
    if img.size == (size, size):
        return img
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    new_w, new_h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if new_w * new_h > 256 * size * size:
        # A long thin image (1 x 100,000) enlarged whole would take gigabytes: resample only the part the crop
        # keeps, on the same grid (Pillow's box: the crop's corners in source pixels). Close to, not bit-equal
        # to, the whole resize; images up to 256 times longer than wide take the exact path below.
        sx, sy = img.width / new_w, img.height / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return img.crop((left, top, left + size, top + size))


def decode_image(source: bytes | str | Path | BinaryIO, image_size: int | None, name: str = "") -> np.ndarray:
    """Decode one image file (bytes, path or file object) to uint8 (S, S, 3) RGB, or its own size when
    `image_size` is None. Raises `ImageDecodeError` naming `name` (or the path) for anything unreadable, and
    FileNotFoundError for a path that does not exist."""
    name = name or (printable(str(source)) if isinstance(source, (str, Path)) else "<image bytes>")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError(f"{name}: empty file")
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            img.load()  # decode now: truncation and corrupt data surface here, not at first use
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # a broken EXIF block does not make the pixels unusable
                pass
            rgb = to_rgb(img)
            if image_size:
                rgb = resize_center_crop(rgb, image_size)
            out = np.array(rgb, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
    except FileNotFoundError:
        raise
    except ImageDecodeError as e:  # to_rgb's, which does not know the name
        raise ImageDecodeError(f"{name}: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image file Pillow can identify") from None
    except Exception as e:  # Pillow signals broken files with OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageDecodeError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None
    if out.ndim != 3 or out.shape[2] != 3 or 0 in out.shape:
        raise ImageDecodeError(f"{name}: decoded to an unusable array of shape {out.shape}")
    return np.ascontiguousarray(out)


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 (3, H, W) or (N, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    t = t.movedim(-1, -3)
    return t.float().div_(127.5).sub_(1.0).contiguous()


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] (clamped) -> uint8 (..., H, W, 3), rounded to nearest."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).movedim(-3, -1).cpu()


def load_image_file(path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """One image file -> float32 (3, S, S) in [-1, 1] (resized and centre-cropped to `image_size` when given)."""
    return uint8_to_float(decode_image(Path(path), image_size))


def make_image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
                    pad_value: float = 1.0) -> Image.Image:
    """(N, 3, H, W) float in [-1, 1] -> a PIL image with `nrow` images per row, separated by `padding` px."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    ncol = max(1, min(nrow, n))
    nrows = max(1, -(-n // ncol))
    fill = int(round((max(-1.0, min(1.0, pad_value)) + 1) * 127.5))
    canvas = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), fill, np.uint8)
    tiles = float_to_uint8(images).numpy()
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        canvas[y:y + h, x:x + w] = tile
    return Image.fromarray(canvas, "RGB")


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Write `make_image_grid(images, nrow)` to `path` (format from the suffix, PNG recommended)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, nrow, padding).save(path)
    return path
