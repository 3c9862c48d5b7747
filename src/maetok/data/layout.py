"""Folder and zip layouts: reading members in place, finding the split folder, and indexing the images by class.

The class is the first folder below the split folder (deeper folders are fine, as in Tiny-ImageNet's
`train/<wnid>/images/`); a `wnids.txt` beside the split folders fixes the label order (line i is label i),
otherwise classes are sorted by name. The official Tiny-ImageNet `val/images/` + `val_annotations.txt` works too.
Items are ordered round-robin over classes, so the first N of them are a class-balanced subset.
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

log = logging.getLogger("maetok.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".tga"}
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # folder names read as splits, not classes
HELD_OUT_SPLITS = ("test", "val")  # what a held-out default looks for, in order (ImageNet ships only val/)


class DatasetError(ValueError):
    """A dataset spec or layout that cannot be read; the message says what was expected."""


class SplitNotFoundError(DatasetError):
    """The asked split folder is absent; `available` lists the split folders that are there."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


# ==============================================================================================================
# Reading members of a folder or a zip
# ==============================================================================================================
class MemberReader:
    location: str

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def display(self, key: str) -> str:
        raise NotImplementedError


class FolderReader(MemberReader):
    def __init__(self, root: Path):
        self.root, self.location = root, str(root)

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def display(self, key: str) -> str:
        return str(self.root / key)


class ZipReader(MemberReader):
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


def visible(parts: tuple[str, ...]) -> bool:
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def list_folder(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root).as_posix()
        out += [f if rel == "." else f"{rel}/{f}" for f in filenames]
    return out


# ==============================================================================================================
# Indexing one tree: split folder, class folders, labels
# ==============================================================================================================
def index_members(paths: list[str], split: str, where: str, read_text: Callable[[str], str]
                  ) -> tuple[list[tuple[str, int]], list[str]]:
    """Relative posix paths of one tree -> (items [(path, label)] round-robin over classes, class names)."""
    paths = [p for p in paths if visible(PurePosixPath(p).parts)]
    images = sorted(p for p in paths if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES)
    texts = set(paths)
    if not images:  # before any split advice: there is nothing to split
        raise DatasetError(f"{where}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    base, images = _split_base(images, split, where)
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

    class_names, labelled = _class_names(labelled, loose, base, prefix, texts, read_text, where)
    label_of = {name: i for i, name in enumerate(class_names)}
    per_class = [[(p, label_of[name]) for p in sorted(labelled[name])] for name in class_names if name in labelled]
    items = [group[i] for i in range(max(map(len, per_class))) for group in per_class if i < len(group)]
    return items, class_names


def _split_base(images: list[str], split: str, where: str) -> tuple[str, list[str]]:
    """(the split folder `<prefix><split>/` at the shallowest depth where it occurs, the image paths). A tree
    without one is read whole as the train split; any other split must exist."""
    bases = set()
    for p in images:
        parts = p.split("/")[:-1]
        if split in parts:
            bases.add("/".join(parts[: parts.index(split) + 1]) + "/")
    if bases:
        return min(bases, key=lambda b: (b.count("/"), b)), images
    if split != "train":
        raise _missing_split(images, split, where)
    tops = {p.split("/")[0] for p in images if "/" in p}
    present = [name for name in SPLIT_NAMES if name in tops]
    if present:
        raise SplitNotFoundError(f"{where}: no 'train/' folder; its split folders are {present}. Choose one "
                                 f"with --split {present[0]} (split={present[0]!r} in Python)", present)
    base = ""  # the spec points at the split folder itself
    while images and all(p.startswith(images[0].split("/")[0] + "/") and p.count("/") >= 2 for p in images):
        base += images[0].split("/")[0] + "/"  # unwrap a single top-level folder
        images = [p[p.index("/") + 1:] for p in images]
    return base, [base + p for p in images]


def _missing_split(images: list[str], split: str, where: str) -> SplitNotFoundError:
    """The error for a held-out split that is not there, naming the split folders that are."""
    present = split_folders(images)
    if present:
        # Suggest a held-out split before train: the caller asked for a non-training split.
        pick = next((s for s in (*HELD_OUT_SPLITS, "valid", "validation") if s in present), present[0])
        return SplitNotFoundError(f"{where}: no '{split}/' folder; its split folders are {present}. Choose one "
                                  f"with --split {pick} (split={pick!r} in Python)", present)
    tops = sorted({p.split("/")[0] for p in images if "/" in p})[:10]
    return SplitNotFoundError(f"{where}: no '{split}/' folder and no split folders at all (top-level folders: "
                              f"{tops}); to read the whole folder as one set use --split train "
                              f"(split='train' in Python)", [])


def _class_names(labelled: dict[str, list[str]], loose: list[str], base: str, prefix: str, texts: set[str],
                 read_text: Callable[[str], str], where: str) -> tuple[list[str], dict[str, list[str]]]:
    """(class names in label order, paths per class): class folders, or the split folder as one class."""
    if labelled:
        if loose:
            log.info("%s: ignoring %d images directly in the split folder (not in a class folder)", where, len(loose))
        wnids_file = next((f for f in (f"{prefix}wnids.txt", f"{base}wnids.txt") if f in texts), None)
        if not wnids_file:
            return sorted(labelled), labelled
        class_names = [w.strip() for w in read_text(wnids_file).splitlines() if w.strip()]
        unknown = sorted(set(labelled) - set(class_names))
        if unknown:
            raise DatasetError(f"{where}: class folders {unknown[:5]} are not listed in {wnids_file}")
        return class_names, labelled
    if loose:
        return [PurePosixPath(base).name or "images"], {PurePosixPath(base).name or "images": loose}
    inside = f" in its '{base.rstrip('/')}/' folder" if base else ""
    raise DatasetError(f"{where}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}){inside}")


def split_folders(paths: list[str]) -> list[str]:
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


def top_split_dirs(root: Path) -> list[str]:
    """Split folders at the top of `root`, or below a chain of single wrapping folders. Listing directories only
    (never a whole ImageNet tree) keeps choosing the default split cheap."""
    while root.is_dir():
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        present = [name for name in SPLIT_NAMES if name in subdirs]
        if present or len(subdirs) != 1:
            return present
        root = root / subdirs[0]
    return []
