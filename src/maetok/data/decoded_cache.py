"""Decoding a source up front into one uint8 array, and the `.npy` cache of that array.

The cache lives in `cache_dir` (default $MAETOK_CACHE or ~/.cache/maetok), keyed by the source's size and
modification time, the spec, split, size and limit; a hit is memory-mapped instead of decoded again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .image_datasets import ArrayDataset, log_skip, log_summary, read_failure
from .images import ImageDecodeError, decode_image, resize_center_crop
from .layout import DatasetError, MemberReader

log = logging.getLogger("maetok.data")

EAGER_MAX_BYTES = 2 << 30       # decode everything up front when the uint8 array stays under this
CACHE_MIN_IMAGES = 1000         # below this, decoding is quick: do not litter the cache
CACHE_FORMAT = 2                # bump when the decoded content would change for the same key (2: NaN refused)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MAETOK_CACHE", Path.home() / ".cache" / "maetok")).expanduser()


def cache_paths(cache_dir: Path, stem: str, key: dict) -> tuple[Path, Path]:
    """The cache files for `key`: named after the source (its odd characters, bytes that are not UTF-8 among
    them, as `_`) and the key's digest (json.dumps escapes them, so any name has one)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    name = f"{stem}-{key['split']}-{key['image_size']}px-{digest}"
    return cache_dir / f"{name}.npy", cache_dir / f"{name}.json"


def load_cache(npy: Path, meta: Path) -> tuple[np.ndarray, dict] | None:
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        images = np.load(npy, mmap_mode="r")
        if images.shape[0] != len(info["labels"]):
            return None
        return images, info
    except (OSError, ValueError, KeyError):
        log.warning("ignoring an unreadable dataset cache %s", npy)
        return None


def save_cache(npy: Path, meta: Path, images: np.ndarray, info: dict) -> bool:
    """Atomic writes (temp file + rename), the JSON last: a reader never sees half a cache."""
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f"{npy.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, npy)
        tmp_meta = meta.with_name(f"{meta.stem}.{os.getpid()}.tmp.json")
        tmp_meta.write_text(json.dumps(info))
        os.replace(tmp_meta, meta)
        return True
    except OSError as e:
        log.warning("could not write the dataset cache %s (%s); continuing without it", npy, e)
        return False


def from_cache(hit: tuple[np.ndarray, dict], npy: Path, where: str, split: str, random_flip: bool,
               strict: bool) -> ArrayDataset:
    images, info = hit
    skipped = [tuple(s) for s in info.get("skipped", [])]
    if strict and skipped:
        raise ImageDecodeError(skipped[0][1])
    dataset = ArrayDataset(images, np.asarray(info["labels"], np.int64), where, split, info["class_names"],
                           random_flip, has_labels=info.get("has_labels", True))
    dataset.skipped, dataset.cache_path, dataset.files = skipped, npy, info.get("files")
    for count, (_, reason) in enumerate(skipped, 1):  # each run names what it leaves out, cached or not
        log_skip(where, count, reason)
    log_summary(dataset)
    return dataset


def decode_to_array(reader: MemberReader, items: list[tuple[str, int]], split: str, image_size: int,
                    class_names: list[str], random_flip: bool, strict: bool,
                    cache: tuple[Path, Path, dict] | None) -> ArrayDataset:
    """Decode every item into an ArrayDataset; with `cache` (npy, meta, key), save the array there."""
    if len(items) >= CACHE_MIN_IMAGES:
        log.info("%s [%s]: decoding %d images once into a %dx%d uint8 array", reader.location, split, len(items),
                 image_size, image_size)
    images, labels, files, skipped = decode_all(reader, items, image_size, strict, reader.location)
    if not len(images):
        raise DatasetError(f"{reader.location} [{split}]: none of the {len(items)} image files could be read "
                           f"(first: {skipped[0][1] if skipped else None})")
    dataset = ArrayDataset(images, labels, reader.location, split, class_names, random_flip)
    dataset.skipped, dataset.files = skipped, files
    if cache is not None:
        npy, meta, key = cache
        # json.dumps writes names that are not UTF-8 (lone surrogates) as \udcXX escapes, read back the same.
        info = {"labels": labels.tolist(), "class_names": class_names, "skipped": skipped, "key": key,
                "files": files}
        if save_cache(npy, meta, images, info):
            dataset.cache_path = npy
    log_summary(dataset)
    return dataset


def decode_all(reader: MemberReader, items: list[tuple[str, int]], image_size: int, strict: bool, where: str
               ) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]]]:
    """Decode every item with a thread pool (Pillow releases the GIL); bytes are read in the calling thread.
    (images, labels, the files they come from, [(name, reason)] of the files skipped)."""
    images = np.empty((len(items), image_size, image_size, 3), np.uint8)
    ok = np.zeros(len(items), bool)
    skipped: list[tuple[str, str]] = []

    def decode(job: tuple[int, bytes | Exception]) -> tuple[int, str | None]:
        i, data = job
        if isinstance(data, Exception):
            return i, read_failure(reader.display(items[i][0]), data)
        try:
            images[i] = decode_image(data, image_size, reader.display(items[i][0]))
            return i, None
        except ImageDecodeError as e:
            return i, str(e)

    def read(i: int) -> bytes | Exception:
        try:
            return reader.read(items[i][0])
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            return e

    chunk = 512
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(items), chunk):
            jobs = [(i, read(i)) for i in range(start, min(start + chunk, len(items)))]
            for i, error in pool.map(decode, jobs):
                if error is None:
                    ok[i] = True
                    continue
                if strict:
                    raise ImageDecodeError(error)
                skipped.append((reader.display(items[i][0]), error))
                log_skip(where, len(skipped), error)
    labels = np.array([label for _, label in items], np.int64)
    files = [key for (key, _), kept in zip(items, ok) if kept]
    if not ok.all():
        images, labels = images[ok], labels[ok]
    return images, labels, files, skipped


def resize_array(images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(resize_center_crop(Image.fromarray(im, "RGB"), image_size))
    return out
