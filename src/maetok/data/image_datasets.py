"""The dataset classes `open_dataset` returns: images held as one uint8 array, or image files decoded per item.

Each item is `(float32 (3, S, S) in [-1, 1], int label)`; unreadable files are skipped, listed in `skipped` and
named in the log (the first LOGGED_SKIPS of them one by one).
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageDecodeError, decode_image, uint8_to_float
from .layout import DatasetError, MemberReader, printable

log = logging.getLogger("maetok.data")

LOGGED_SKIPS = 100              # unreadable files named one by one before only their count is logged


class ImageDataset(Dataset):
    """What every dataset here offers: `num_classes`, `class_names`, `has_labels`, `skipped`, `describe()`, and
    `files`: for a folder or zip, the member each item was decoded from (a key of its reader: relative to the
    folder, as os.fsdecode gives names that are not UTF-8), else None."""

    def __init__(self, where: str, split: str, image_size: int, class_names: list[str], random_flip: bool,
                 has_labels: bool = True):
        self.where, self.split, self.image_size = where, split, image_size
        self.class_names, self.has_labels, self.random_flip = list(class_names), has_labels, random_flip
        self.num_classes = len(self.class_names)
        self.skipped: list[tuple[str, str]] = []
        self.cache_path: Path | None = None
        self.files: list[str] | None = None

    def _finish(self, image: torch.Tensor) -> torch.Tensor:
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image

    def describe(self) -> str:
        names = ", ".join(self.class_names[:10]) + (", ..." if self.num_classes > 10 else "")
        labels = f"{self.num_classes} classes ({names})" if self.has_labels else "no labels"
        text = (f"{self.where} [{self.split}]: {len(self)} images {self.image_size}x{self.image_size}, {labels}, "
                f"{len(self.skipped)} unreadable skipped")
        if self.cache_path is not None:
            text += f"; decoded once, cached at {self.cache_path}"
        return text


def class_count(dataset) -> int:
    """How many classes a dataset's labels name: 0 for unlabelled data, whose one placeholder class means
    nothing (a class-conditional model must not be trained on it)."""
    if not getattr(dataset, "has_labels", True):
        return 0
    return int(getattr(dataset, "num_classes", 0) or 0)


class ArrayDataset(ImageDataset):
    """Images held as one uint8 (N, S, S, 3) array (in memory or memory-mapped) with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, where: str, split: str, class_names: list[str],
                 random_flip: bool = False, has_labels: bool = True):
        super().__init__(where, split, int(images.shape[1]), class_names, random_flip, has_labels)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise DatasetError(f"{where}: need uint8 (N, S, S, 3) images and N labels, got images "
                               f"{images.dtype} {images.shape} and {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = uint8_to_float(np.array(self.images[index]))  # copy: memory-mapped rows are read-only
        return self._finish(image), int(self.labels[index])


class LazyImageDataset(ImageDataset):
    """Image files decoded per item (sources too large to decode up front). A file that fails to decode is
    recorded in `skipped` when first met and the next readable item is returned in its place."""

    def __init__(self, reader: MemberReader, items: list[tuple[str, int]], where: str, split: str,
                 image_size: int, class_names: list[str], random_flip: bool = False, strict: bool = False,
                 has_labels: bool = True):
        super().__init__(where, split, image_size, class_names, random_flip, has_labels)
        self.reader, self.items, self.strict = reader, items, strict
        self.files = [key for key, _ in items]
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            if i in self._bad:
                continue
            key, label = self.items[i]
            try:
                array = decode_image(self.reader.read(key), self.image_size, self.reader.display(key))
            except (ImageDecodeError, OSError, KeyError, zipfile.BadZipFile) as e:
                reason = str(e) if isinstance(e, ImageDecodeError) else read_failure(self.reader.display(key), e)
                if self.strict:
                    raise ImageDecodeError(reason) from None
                self._bad.add(i)
                self.skipped.append((self.reader.display(key), reason))
                log_skip(self.where, len(self.skipped), reason)
                continue
            return self._finish(uint8_to_float(array)), label
        raise DatasetError(f"{self.where}: no readable image at all ({len(self.skipped)} files skipped)")


def read_failure(name: str, error: Exception) -> str:
    """The reason a member could not be read, on one line naming it once (an OSError's own text repeats the
    path, in repr's quoting)."""
    detail = error.strerror if isinstance(error, OSError) and error.strerror else f"{type(error).__name__}: {error}"
    return f"{name}: cannot read ({printable(detail)})"


def log_skip(where: str, count: int, reason: str) -> None:
    """Name the `count`-th unreadable file of `where`; `reason` starts with its name."""
    if count <= LOGGED_SKIPS:
        log.warning("skipping unreadable image %s", reason)
    elif count == LOGGED_SKIPS + 1:
        log.warning("%s: more unreadable images; see dataset.skipped for the full list", where)


def log_summary(dataset: ImageDataset) -> None:
    if dataset.skipped:
        log.warning("%s [%s]: skipped %d unreadable image files (listed in dataset.skipped)", dataset.where,
                    dataset.split, len(dataset.skipped))
