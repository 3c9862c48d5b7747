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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import ImageDecodeError, decode_image, resize_center_crop, uint8_to_float
from .shapes import ShapesDataset

log = logging.getLogger("maetok.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".tga"}
EAGER_MAX_BYTES = 2 << 30       # decode everything up front when the uint8 array stays under this
CACHE_MIN_IMAGES = 1000         # below this, decoding is quick: do not litter the cache
CACHE_FORMAT = 1                # bump when the decoded content would change for the same key
LOGGED_SKIPS = 10               # individual warnings before only the summary is logged


class DatasetError(ValueError):
    """A dataset spec or layout that cannot be read; the message says what was expected."""


class SplitNotFoundError(DatasetError):
    """The asked split folder is absent; `available` lists the split folders that are there."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # folder names read as splits, not classes
HELD_OUT_SPLITS = ("test", "val")  # what a held-out default looks for, in order (ImageNet ships only val/)


# ==============================================================================================================
# Datasets
# ==============================================================================================================
class ImageDataset(Dataset):
    """What every dataset here offers: `num_classes`, `class_names`, `has_labels`, `skipped`, `describe()`."""

    def __init__(self, where: str, split: str, image_size: int, class_names: list[str], random_flip: bool,
                 has_labels: bool = True):
        self.where, self.split, self.image_size = where, split, image_size
        self.class_names, self.has_labels, self.random_flip = list(class_names), has_labels, random_flip
        self.num_classes = len(self.class_names)
        self.skipped: list[tuple[str, str]] = []
        self.cache_path: Path | None = None

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

    def __init__(self, reader: "_MemberReader", items: list[tuple[str, int]], where: str, split: str,
                 image_size: int, class_names: list[str], random_flip: bool = False, strict: bool = False,
                 has_labels: bool = True):
        super().__init__(where, split, image_size, class_names, random_flip, has_labels)
        self.reader, self.items, self.strict = reader, items, strict
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
                reason = str(e)
                if self.strict:
                    raise ImageDecodeError(reason if isinstance(e, ImageDecodeError) else
                                           f"{self.reader.display(key)}: {e}") from None
                self._bad.add(i)
                self.skipped.append((self.reader.display(key), reason))
                _log_skip(self.where, len(self.skipped), self.reader.display(key), reason)
                continue
            return self._finish(uint8_to_float(array)), label
        raise DatasetError(f"{self.where}: no readable image at all ({len(self.skipped)} files skipped)")


# ==============================================================================================================
# Reading members of a folder or a zip
# ==============================================================================================================
class _MemberReader:
    location: str

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def display(self, key: str) -> str:
        raise NotImplementedError


class _FolderReader(_MemberReader):
    def __init__(self, root: Path):
        self.root, self.location = root, str(root)

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def display(self, key: str) -> str:
        return str(self.root / key)


class _ZipReader(_MemberReader):
    """Reads zip members in place; one open handle per process, so DataLoader workers never share one."""

    def __init__(self, path: Path):
        self.path, self.location = path, f"zip:{path}"
        self._handle: zipfile.ZipFile | None = None
        self._pid = -1

    @property
    def zip(self) -> zipfile.ZipFile:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._handle

    def read(self, key: str) -> bytes:
        return self.zip.read(key)

    def display(self, key: str) -> str:
        return f"{self.path}:{key}"

    def __getstate__(self):  # the handle does not pickle (spawned workers); each process reopens it
        return {**self.__dict__, "_handle": None, "_pid": -1}


def _log_skip(where: str, count: int, path: str, reason: str) -> None:
    if count <= LOGGED_SKIPS:
        log.warning("skipping unreadable image %s (%s)", path, reason)
    elif count == LOGGED_SKIPS + 1:
        log.warning("%s: more unreadable images; see dataset.skipped for the full list", where)


def _visible(parts: tuple[str, ...]) -> bool:
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _index_members(paths: list[str], split: str, where: str, read_text) -> tuple[list[tuple[str, int]], list[str]]:
    """Relative posix paths of one tree -> (items [(path, label)] round-robin over classes, class names)."""
    paths = [p for p in paths if _visible(PurePosixPath(p).parts)]
    images = sorted(p for p in paths if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES)
    texts = set(paths)

    # The split folder: `<prefix><split>/` at the shallowest depth where it occurs.
    bases = set()
    for p in images:
        parts = p.split("/")[:-1]
        if split in parts:
            bases.add("/".join(parts[: parts.index(split) + 1]) + "/")
    if not images:  # before any split advice: there is nothing to split
        raise DatasetError(f"{where}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if bases:
        base = min(bases, key=lambda b: (b.count("/"), b))
    elif split == "train":
        tops = {p.split("/")[0] for p in images if "/" in p}
        present = [name for name in SPLIT_NAMES if name in tops]
        if present:
            raise SplitNotFoundError(f"{where}: no 'train/' folder; its split folders are {present}. Choose one "
                                     f"with --split {present[0]} (split={present[0]!r} in Python)", present)
        base = ""  # the spec points at the split folder itself
        while images and all(p.startswith(images[0].split("/")[0] + "/") and p.count("/") >= 2 for p in images):
            base += images[0].split("/")[0] + "/"  # unwrap a single top-level folder
            images = [p[p.index("/") + 1:] for p in images]
        images = [base + p for p in images]
    else:
        present = _split_folders(images)
        if present:
            # Suggest a held-out split before train: the caller asked for a non-training split.
            pick = next((s for s in (*HELD_OUT_SPLITS, "valid", "validation") if s in present), present[0])
            raise SplitNotFoundError(f"{where}: no '{split}/' folder; its split folders are {present}. Choose one "
                                     f"with --split {pick} (split={pick!r} in Python)", present)
        tops = sorted({p.split("/")[0] for p in images if "/" in p})[:10]
        raise SplitNotFoundError(f"{where}: no '{split}/' folder and no split folders at all (top-level folders: "
                                 f"{tops}); to read the whole folder as one set use --split train "
                                 f"(split='train' in Python)", [])
    members = [p for p in images if p.startswith(base)]
    prefix = base[: -len(split) - 1] if base.endswith(f"{split}/") else base

    labelled: dict[str, list[str]] = {}
    loose: list[str] = []
    for p in members:
        rel = p[len(base):]
        (labelled.setdefault(rel.split("/")[0], []) if "/" in rel else loose).append(p)

    # Official Tiny-ImageNet validation layout: val/images/*.JPEG + val/val_annotations.txt.
    annotations = f"{base}{split}_annotations.txt"
    if set(labelled) <= {"images"} and annotations in texts:
        table = dict(line.split("\t")[:2] for line in read_text(annotations).splitlines() if "\t" in line)
        labelled = {}
        for p in members:
            wnid = table.get(PurePosixPath(p).name)
            if wnid:
                labelled.setdefault(wnid, []).append(p)

    if labelled:
        if loose:
            log.info("%s: ignoring %d images directly in the split folder (not in a class folder)", where, len(loose))
        wnids_file = next((f for f in (f"{prefix}wnids.txt", f"{base}wnids.txt") if f in texts), None)
        if wnids_file:
            class_names = [w.strip() for w in read_text(wnids_file).splitlines() if w.strip()]
            unknown = sorted(set(labelled) - set(class_names))
            if unknown:
                raise DatasetError(f"{where}: class folders {unknown[:5]} are not listed in {wnids_file}")
        else:
            class_names = sorted(labelled)
    elif loose:
        class_names, labelled = [PurePosixPath(base).name or "images"], {PurePosixPath(base).name or "images": loose}
    else:
        inside = f" in its '{base.rstrip('/')}/' folder" if base else ""
        raise DatasetError(f"{where}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}){inside}")

    label_of = {name: i for i, name in enumerate(class_names)}
    per_class = [[(p, label_of[name]) for p in sorted(labelled[name])] for name in class_names if name in labelled]
    items = [group[i] for i in range(max(map(len, per_class))) for group in per_class if i < len(group)]
    return items, class_names


def _split_folders(paths: list[str]) -> list[str]:
    """The split folders (SPLIT_NAMES) among the folders holding `paths`, at the shallowest depth they occur."""
    found: dict[str, int] = {}
    for p in paths:
        for depth, part in enumerate(p.split("/")[:-1]):
            if part in SPLIT_NAMES:
                found[part] = min(depth, found.get(part, depth))
    if not found:
        return []
    top = min(found.values())
    return [name for name in SPLIT_NAMES if found.get(name) == top]


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
            present = _split_folders([n for n in zf.namelist() if _visible(PurePosixPath(n).parts)])
    else:
        present = _top_split_dirs(path)
    return next((s for s in HELD_OUT_SPLITS if s in present), HELD_OUT_SPLITS[0])


def _top_split_dirs(root: Path) -> list[str]:
    """Split folders at the top of `root`, or below a chain of single wrapping folders. Listing directories only
    (never a whole ImageNet tree) keeps choosing the default split cheap."""
    while root.is_dir():
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        present = [name for name in SPLIT_NAMES if name in subdirs]
        if present or len(subdirs) != 1:
            return present
        root = root / subdirs[0]
    return []


def _list_folder(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root).as_posix()
        out += [f if rel == "." else f"{rel}/{f}" for f in filenames]
    return out


# ==============================================================================================================
# Decoding up front, and the .npy cache
# ==============================================================================================================
def default_cache_dir() -> Path:
    return Path(os.environ.get("MAETOK_CACHE", Path.home() / ".cache" / "maetok")).expanduser()


def _cache_paths(cache_dir: Path, stem: str, key: dict) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{stem}-{key['split']}-{key['image_size']}px-{digest}"
    return cache_dir / f"{name}.npy", cache_dir / f"{name}.json"


def _load_cache(npy: Path, meta: Path) -> tuple[np.ndarray, dict] | None:
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


def _save_cache(npy: Path, meta: Path, images: np.ndarray, info: dict) -> bool:
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


def _decode_all(reader: _MemberReader, items: list[tuple[str, int]], image_size: int, strict: bool, where: str
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode every item with a thread pool (Pillow releases the GIL); bytes are read in the calling thread."""
    images = np.empty((len(items), image_size, image_size, 3), np.uint8)
    ok = np.zeros(len(items), bool)
    skipped: list[tuple[str, str]] = []

    def decode(job: tuple[int, bytes | Exception]) -> tuple[int, str | None]:
        i, data = job
        if isinstance(data, Exception):
            return i, f"{reader.display(items[i][0])}: cannot read ({data})"
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
                _log_skip(where, len(skipped), reader.display(items[i][0]), error)
    labels = np.array([label for _, label in items], np.int64)
    if not ok.all():
        images, labels = images[ok], labels[ok]
    return images, labels, skipped


def _resize_array(images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(resize_center_crop(Image.fromarray(im, "RGB"), image_size))
    return out


# ==============================================================================================================
# open_dataset
# ==============================================================================================================
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
        from ..io.hub import shared_data_dir

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
        from .shapes import SPLIT_SIZES

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

    if kind == "zip":
        if not zipfile.is_zipfile(path):
            raise DatasetError(f"dataset {spec!r}: {path} is not a zip file")
        reader: _MemberReader = _ZipReader(path)
        key = dict(common, source=_stat_key(path), kind="zip")
        npy, meta = _cache_paths(cache_root, path.stem, key)
        if decode != "lazy":
            hit = _load_cache(npy, meta)
            if hit is not None:  # the zip is unchanged: skip even listing its members
                return _from_cache(hit, npy, reader.location, split, random_flip, strict)
        names = [n for n in reader.zip.namelist() if not n.endswith("/")]
        items, class_names = _index_members(names, split, reader.location,
                                            lambda n: reader.read(n).decode("utf-8", "replace"))
    elif path.is_dir():
        reader = _FolderReader(path)
        files = _list_folder(path)
        items, class_names = _index_members(files, split, str(path), lambda n: (path / n).read_text("utf-8", "replace"))
        key = None  # computed below from the selected files' sizes and times
    else:
        raise DatasetError(f"dataset {spec!r}: {path} is not a folder; prefix zip:, cifar: or npz: for archives")

    items = items[:limit] if limit else items
    eager = decode == "eager" or (decode == "auto" and len(items) * image_size * image_size * 3 <= EAGER_MAX_BYTES)
    if not eager:
        return LazyImageDataset(reader, items, reader.location, split, image_size, class_names, random_flip,
                                strict)
    use_cache = explicit_cache or len(items) >= CACHE_MIN_IMAGES
    if key is None and use_cache:
        digest = hashlib.sha256()
        for rel, _ in items:
            st = (path / rel).stat()
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        key = dict(common, source=[str(path), digest.hexdigest()], kind="folder")
        npy, meta = _cache_paths(cache_root, path.name, key)
        hit = _load_cache(npy, meta) if use_cache else None
        if hit is not None:
            return _from_cache(hit, npy, reader.location, split, random_flip, strict)

    if len(items) >= CACHE_MIN_IMAGES:
        log.info("%s [%s]: decoding %d images once into a %dx%d uint8 array", reader.location, split, len(items),
                 image_size, image_size)
    images, labels, skipped = _decode_all(reader, items, image_size, strict, reader.location)
    if not len(images):
        raise DatasetError(f"{reader.location} [{split}]: none of the {len(items)} image files could be read "
                           f"(first: {skipped[0] if skipped else None})")
    dataset = ArrayDataset(images, labels, reader.location, split, class_names, random_flip)
    dataset.skipped = skipped
    if use_cache:
        info = {"labels": labels.tolist(), "class_names": class_names, "skipped": skipped, "key": key}
        if _save_cache(npy, meta, images, info):
            dataset.cache_path = npy
    _log_summary(dataset)
    return dataset


def _from_cache(hit: tuple[np.ndarray, dict], npy: Path, where: str, split: str, random_flip: bool,
                strict: bool) -> ArrayDataset:
    images, info = hit
    skipped = [tuple(s) for s in info.get("skipped", [])]
    if strict and skipped:
        raise ImageDecodeError(skipped[0][1])
    dataset = ArrayDataset(images, np.asarray(info["labels"], np.int64), where, split, info["class_names"],
                           random_flip, has_labels=info.get("has_labels", True))
    dataset.skipped, dataset.cache_path = skipped, npy
    _log_summary(dataset)
    return dataset


def _log_summary(dataset: ImageDataset) -> None:
    if dataset.skipped:
        log.warning("%s [%s]: skipped %d unreadable image files (listed in dataset.skipped)", dataset.where,
                    dataset.split, len(dataset.skipped))


def _open_arrays(kind: str, path: Path, where: str, key: dict, cache_root: Path, explicit_cache: bool, split: str,
                 image_size: int, limit: int, random_flip: bool) -> ArrayDataset:
    npy, meta = _cache_paths(cache_root, path.stem or path.name, key)
    hit = _load_cache(npy, meta)
    if hit is not None:
        return _from_cache(hit, npy, where, split, random_flip, strict=False)
    has_labels = True
    if kind == "cifar":
        try:
            images, labels, class_names = _read_cifar(path, split)
        except (FileNotFoundError, ValueError) as e:
            raise DatasetError(str(e)) from None
    else:
        images, labels, class_names, has_labels = _read_npz(path, where)
    if limit:
        images, labels = images[:limit], labels[:limit]
    native = images.shape[1:3] == (image_size, image_size)
    images = _resize_array(images, image_size)
    dataset = ArrayDataset(np.ascontiguousarray(images), labels, where, split, class_names, random_flip,
                           has_labels)
    if not native and (explicit_cache or len(images) >= CACHE_MIN_IMAGES):
        # Only resized arrays are worth caching; native ones are as fast to read from the source.
        info = {"labels": labels.tolist(), "class_names": class_names, "skipped": [], "key": key,
                "has_labels": has_labels}
        if _save_cache(npy, meta, images, info):
            dataset.cache_path = npy
    return dataset


def _read_cifar(path: Path, split: str):
    from .cifar_batches import read_cifar

    return read_cifar(path, split)


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
