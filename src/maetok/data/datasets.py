"""`open_dataset(spec)`: one entry point for every image source, each item `(float32 (3, S, S) in [-1, 1], label)`.

Specs:
    shapes                      built-in procedural shapes (no download; the default)
    /path/to/dir                image folder, one subfolder per class; `dir/<split>/<class>/...` when present
    zip:/path/file.zip          the same layout inside a zip, read in place (e.g. `train/<class>/*.jpg`)
    cifar:/path                 CIFAR-10/100 python batches (a directory or the official .tar.gz)
    npz:/path/file.npz          ADM-style arrays: arr_0 uint8 (N, H, W, 3), optional arr_1 labels

Folder and zip layouts: the class is the first folder below the split folder (deeper folders are fine, as in
Tiny-ImageNet's `train/<wnid>/images/`); a `wnids.txt` beside the split folders fixes the label order (line i is
label i), otherwise classes are sorted by name (the torchvision ImageFolder order, which is also the CIFAR-10
order for the CIFAR JPEG zip). The official Tiny-ImageNet `val/images/` + `val_annotations.txt` works too.
Items are ordered round-robin over classes, so `limit=N` keeps a class-balanced subset.

Decoding: small enough sources (decoded size <= 2 GiB) are decoded once into a uint8 array; with 1,000+ images
(or an explicit `cache_dir`) that array is saved as `.npy` in `cache_dir` (default $MAETOK_CACHE or
~/.cache/maetok), keyed by the source's size and modification time, the spec, split, size and limit, and memory-
mapped on the next open. Larger folders decode per item. Unreadable files are skipped, listed in
`dataset.skipped` as (path, reason) and logged; `strict=True` turns the first one into an error naming it.
Folders are listed following links, each folder entered once (a link loop is skipped and named); an image
reached again through a link is used once (`layout.list_folder`); `dataset.files` says which file each item is.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from torch.utils.data import Dataset

from ..io.hub import shared_data_dir
from .cifar_batches import read_cifar
from .decoded_cache import (CACHE_FORMAT, CACHE_MIN_IMAGES, EAGER_MAX_BYTES, cache_paths, decode_to_array,
                            default_cache_dir, from_cache, load_cache, resize_array, save_cache)
from .image_datasets import ArrayDataset, LazyImageDataset
from .layout import (HELD_OUT_SPLITS, DatasetError, FolderReader, SplitNotFoundError, ZipReader, index_members,
                     list_folder, split_folders, top_split_dirs, visible)
from .shapes import SPLIT_SIZES, ShapesDataset


def parse_spec(spec: str) -> tuple[str, str]:
    """'zip:/a/b.zip' -> ('zip', '/a/b.zip'); a bare path -> ('folder', path) (or zip/npz by its suffix)."""
    spec = spec.strip()
    if spec == "shapes":
        return "shapes", ""
    for kind in ("zip", "cifar", "npz", "folder"):
        if spec.startswith(f"{kind}:"):
            return kind, spec[len(kind) + 1:]
    suffix = Path(spec).suffix.lower()
    return {".zip": "zip", ".npz": "npz"}.get(suffix, "folder"), spec


def _resolve(location: str, spec: str) -> Path:
    """A path as given, else the same name in the shared data folder (`zip:cifar10-jpeg.zip` works anywhere)."""
    path = Path(location).expanduser()
    if path.exists():
        return path.resolve()
    where = ""
    if not path.is_absolute():
        shared = shared_data_dir()
        if shared is not None and (shared / path).exists():
            return (shared / path).resolve()
        if shared is not None and "shared" in path.parts and (shared / path.name).exists():
            return (shared / path.name).resolve()  # ../shared/data/X, given from another folder
        where = f" (relative to the current folder {Path.cwd()}" + (
            f", nor in the shared data folder {shared})" if shared is not None else ")")
    raise DatasetError(f"dataset {spec!r}: {path} does not exist{where}. Specs: shapes | /path/to/image_folder | "
                       f"zip:/path/file.zip | cifar:/path/to/cifar-10-batches-py | npz:/path/file.npz")


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def open_dataset(spec: str, split: str = "train", image_size: int = 32, random_flip: bool = False,
                 strict: bool = False, limit: int = 0, cache_dir: str | Path | None = None,
                 decode: str = "auto") -> Dataset:
    """Open `spec` (see the module docstring) as a dataset of (float32 (3, S, S) in [-1, 1], int label).

    limit: keep only the first `limit` items (0 = all; class-balanced for folders and zips).
    decode: "auto" (up front when the array fits EAGER_MAX_BYTES), "eager" or "lazy" (per item), for folders
    and zips; CIFAR and npz arrays are always held whole.
    """
    if image_size <= 0 or limit < 0:
        raise DatasetError(f"image_size={image_size} must be > 0 and limit={limit} >= 0")
    if decode not in ("auto", "eager", "lazy"):
        raise DatasetError(f"decode={decode!r}: choose auto, eager or lazy")
    kind, location = parse_spec(spec)
    if kind == "shapes":
        if split not in SPLIT_SIZES:  # any other name would silently give yet another random set
            raise SplitNotFoundError(f"shapes: no split {split!r}; choose one of {sorted(SPLIT_SIZES)}",
                                     sorted(SPLIT_SIZES))
        return ShapesDataset(split, image_size, limit, random_flip)
    path = _resolve(location, spec)
    explicit_cache = cache_dir is not None
    cache_root = Path(cache_dir).expanduser() if explicit_cache else default_cache_dir()
    common = dict(split=split, image_size=image_size, limit=limit, format=CACHE_FORMAT)

    if kind in ("cifar", "npz"):
        where = f"{kind}:{path}"
        key = dict(common, source=_stat_key(path) if path.is_file() else [str(path)] + [
            _stat_key(p) for p in sorted(path.rglob("*")) if p.is_file()], kind=kind)
        return _open_arrays(kind, path, where, key, cache_root, explicit_cache, split, image_size, limit,
                            random_flip)

    cache = None  # (npy, meta, key) of the decoded array
    if kind == "zip":
        if not zipfile.is_zipfile(path):
            raise DatasetError(f"dataset {spec!r}: {path} is not a zip file")
        reader = ZipReader(path)
        key = dict(common, source=_stat_key(path), kind="zip")
        npy, meta = cache_paths(cache_root, path.stem, key)
        cache = (npy, meta, key)
        if decode != "lazy":
            hit = load_cache(npy, meta)
            if hit is not None:  # the zip is unchanged: skip even listing its members
                return from_cache(hit, npy, reader.location, split, random_flip, strict)
        names = [n for n in reader.zip.namelist() if not n.endswith("/")]
        items, class_names = index_members(names, split, reader.location,
                                           lambda n: reader.read(n).decode("utf-8", "replace"))
    elif path.is_dir():
        reader = FolderReader(path)
        files = list_folder(path)
        items, class_names = index_members(files, split, reader.location,
                                           lambda n: (path / n).read_text("utf-8", "replace"))
    else:
        raise DatasetError(f"dataset {spec!r}: {path} is not a folder; prefix zip:, cifar: or npz: for archives")

    items = items[:limit] if limit else items
    eager = decode == "eager" or (decode == "auto" and len(items) * image_size * image_size * 3 <= EAGER_MAX_BYTES)
    if not eager:
        return LazyImageDataset(reader, items, reader.location, split, image_size, class_names, random_flip,
                                strict)
    use_cache = explicit_cache or len(items) >= CACHE_MIN_IMAGES
    if cache is None and use_cache:
        key = dict(common, source=[str(path), _folder_digest(path, items)], kind="folder")
        npy, meta = cache_paths(cache_root, path.name, key)
        cache = (npy, meta, key)
        hit = load_cache(npy, meta)
        if hit is not None:
            return from_cache(hit, npy, reader.location, split, random_flip, strict)
    return decode_to_array(reader, items, split, image_size, class_names, random_flip, strict,
                           cache if use_cache else None)


def _folder_digest(root: Path, items: list[tuple[str, int]]) -> str:
    """A folder's cache key: the selected files' names (their bytes: os.fsencode takes names that are not UTF-8),
    sizes and modification times. A file that cannot be stat'ed (a broken link) enters by its error, to be skipped
    and named when decoded."""
    digest = hashlib.sha256()
    for rel, _ in items:
        try:
            st = os.stat(root / rel)
            state = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError as e:
            state = f"unreadable {e.errno}"
        digest.update(os.fsencode(rel) + f"\0{state}\n".encode())
    return digest.hexdigest()


def _open_arrays(kind: str, path: Path, where: str, key: dict, cache_root: Path, explicit_cache: bool, split: str,
                 image_size: int, limit: int, random_flip: bool) -> ArrayDataset:
    npy, meta = cache_paths(cache_root, path.stem or path.name, key)
    hit = load_cache(npy, meta)
    if hit is not None:
        return from_cache(hit, npy, where, split, random_flip, strict=False)
    has_labels = True
    if kind == "cifar":
        try:
            images, labels, class_names = read_cifar(path, split)
        except (FileNotFoundError, ValueError) as e:
            raise DatasetError(str(e)) from None
    else:
        images, labels, class_names, has_labels = _read_npz(path, where)
    if limit:
        images, labels = images[:limit], labels[:limit]
    native = images.shape[1:3] == (image_size, image_size)
    images = resize_array(images, image_size)
    dataset = ArrayDataset(np.ascontiguousarray(images), labels, where, split, class_names, random_flip,
                           has_labels)
    if not native and (explicit_cache or len(images) >= CACHE_MIN_IMAGES):
        # Only resized arrays are worth caching; native ones are as fast to read from the source.
        info = {"labels": labels.tolist(), "class_names": class_names, "skipped": [], "key": key,
                "has_labels": has_labels}
        if save_cache(npy, meta, images, info):
            dataset.cache_path = npy
    return dataset


def _read_npz(path: Path, where: str) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """ADM sample / reference batches: arr_0 uint8 NHWC (NCHW and grayscale accepted), optional arr_1 labels."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "arr_0" not in npz.files:
                raise DatasetError(f"{where}: no arr_0 array (found {npz.files}); expected uint8 (N, H, W, 3)")
            images = npz["arr_0"]
            labels = npz["arr_1"] if "arr_1" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{where}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8:
        raise DatasetError(f"{where}: arr_0 has dtype {images.dtype}; expected uint8 images in [0, 255]")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(f"{where}: arr_0 has shape {images.shape}; expected (N, H, W, 3)")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if labels is None:
        return images, np.zeros(len(images), np.int64), ["unlabeled"], False
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(images) or (len(labels) and labels.min() < 0):
        raise DatasetError(f"{where}: arr_1 must hold one non-negative label per image "
                           f"({len(labels)} labels for {len(images)} images)")
    n_classes = int(labels.max()) + 1 if len(labels) else 1
    return images, labels, [str(i) for i in range(n_classes)], True


def held_out_split(spec: str) -> str:
    """The held-out split to read from `spec` when none is named: 'test', or 'val' for a folder or zip with a
    val/ folder and no test/ one (ImageNet's layout). 'test' whenever that cannot be decided cheaply (other
    spec kinds, a missing path); opening it then fails with a message listing the splits that exist."""
    kind, location = parse_spec(spec)
    if kind not in ("folder", "zip"):
        return HELD_OUT_SPLITS[0]
    try:
        path = _resolve(location, spec)
    except DatasetError:
        return HELD_OUT_SPLITS[0]  # open_dataset reports the missing path
    if kind == "zip":
        if not zipfile.is_zipfile(path):
            return HELD_OUT_SPLITS[0]
        with zipfile.ZipFile(path) as zf:
            present = split_folders([n for n in zf.namelist() if visible(PurePosixPath(n).parts)])
    else:
        present = top_split_dirs(path)
    return next((s for s in HELD_OUT_SPLITS if s in present), HELD_OUT_SPLITS[0])
