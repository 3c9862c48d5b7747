"""Folder and zip layouts: reading members in place, finding the split folder, and indexing the images by class.

The class is the first folder below the split folder (deeper folders are fine, as in Tiny-ImageNet's
`train/<wnid>/images/`); a `wnids.txt` beside the split folders fixes the label order (line i is label i),
otherwise classes are sorted by name. The official Tiny-ImageNet `val/images/` + `val_annotations.txt` works too.
Items are ordered round-robin over classes, so the first N of them are a class-balanced subset.
"""
from __future__ import annotations

import logging
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

log = logging.getLogger("maetok.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".tga"}
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # folder names read as splits, not classes
HELD_OUT_SPLITS = ("test", "val")  # what a held-out default looks for, in order (ImageNet ships only val/)
LOGGED_NOTES = 100              # odd entries of a folder named one by one before only their count is logged


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
    """Reads the members (files) of a folder or zip by key; `location` and `display(key)` are printable names."""

    location: str

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def display(self, key: str) -> str:
        raise NotImplementedError


class FolderReader(MemberReader):
    def __init__(self, root: Path):
        self.root, self.location = root, printable(str(root))

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def display(self, key: str) -> str:
        return printable(str(self.root / key))


class ZipReader(MemberReader):
    """Reads zip members in place; one open handle per process, so DataLoader workers never share one."""

    def __init__(self, path: Path):
        self.path, self.location = path, printable(f"zip:{path}")
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
        return printable(f"{self.path}:{key}")

    def __getstate__(self):  # the handle does not pickle (spawned workers); each process reopens it
        return {**self.__dict__, "_handle": None, "_pid": -1}


def visible(parts: tuple[str, ...]) -> bool:
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def printable(text: str) -> str:
    """`text` as one line any log file or terminal takes: the bytes of a file name that are not UTF-8 (which
    Python keeps as lone surrogates) become `\\xNN` and control characters their escapes, as `repr` writes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else repr(c)[1:-1] for c in text)


def list_folder(root: Path) -> list[str]:
    """Relative posix paths of the files below `root` (hidden entries left out), following links.

    Every folder is entered once, known by its (st_dev, st_ino): a link to a folder already listed (a loop, or a
    second way into the same folder) is skipped and named. Real folders are listed before any link is followed,
    and a link to an image already listed is dropped and named: an image reached twice is used once, under its
    real path (and so its real class) when it has one. A broken link with an image name is kept, to be skipped and
    named with the other unreadable files."""
    return _FolderWalk(root).run()


class _FolderWalk:
    """One listing for `list_folder`: the real folders first, then the links met on the way, in the order met.

    Images reached twice are found by real paths (that of each folder entered, and os.path.realpath of each link
    to an image), so listing stats folders and links, never every file."""

    def __init__(self, root: Path):
        self.root, self.where = root, printable(str(root))
        self.folders: dict[tuple[int, int], str] = {}   # (st_dev, st_ino) of each folder entered -> its path
        self.real_folders: dict[str, str] = {}          # real path of each folder entered -> its path
        self.link_targets: dict[str, str] = {}          # real path of each image listed through a link -> its path
        self.listed: set[str] | None = None             # the files listed, built once a link to an image needs it
        self.links: list[str] = []
        self.files: list[str] = []
        self.notes: list[str] = []

    def run(self) -> list[str]:
        st, real = os.stat(self.root), os.path.realpath(self.root)
        self._enter((st.st_dev, st.st_ino), "", real)
        self._walk("", real)
        for rel in self.links:  # grows while the links inside linked folders are met
            self._follow(rel)
        for note in self.notes[:LOGGED_NOTES]:
            log.warning("%s: %s", self.where, note)
        if len(self.notes) > LOGGED_NOTES:
            log.warning("%s: %d more such entries left out", self.where, len(self.notes) - LOGGED_NOTES)
        return self.files

    def _walk(self, top: str, real_top: str) -> None:
        """List the folder `top` ("" for the root; entered already) and the real folders below it; links wait."""
        stack = [(top, real_top)]
        while stack:
            rel_dir, real_dir = stack.pop()
            subdirs = []
            for entry in self._entries(rel_dir):
                rel, real = _join(rel_dir, entry.name), os.path.join(real_dir, entry.name)
                if entry.is_symlink():
                    self.links.append(rel)
                elif entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if self._enter((st.st_dev, st.st_ino), rel, real):
                        subdirs.append((rel, real))
                elif entry.is_file(follow_symlinks=False):
                    seen = self.link_targets.get(real) if self.link_targets else None
                    if seen is None:
                        self._list(rel)
                    else:
                        self.notes.append(f"{printable(rel)} was listed already as {printable(seen)} (through a "
                                          f"link): used once")
                elif _is_image_name(rel):  # a FIFO or device named like an image: reading it could block forever
                    self.notes.append(f"{printable(rel)} is not a regular file; left out")
            stack.extend(reversed(subdirs))

    def _entries(self, rel_dir: str) -> list[os.DirEntry]:
        try:
            with os.scandir(self.root / rel_dir) as it:
                return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            self.notes.append(f"cannot list the folder {printable(rel_dir)} ({e.strerror or e}); left out")
            return []

    def _follow(self, rel: str) -> None:
        path = self.root / rel
        try:
            st = os.stat(path)
        except OSError as e:  # dangling, or a loop of links
            if _is_image_name(rel):
                self._list(rel)  # read, skipped and named with the other unreadable images
            else:
                self.notes.append(f"the link {printable(rel)} leads nowhere ({e.strerror or e}); left out")
            return
        if stat.S_ISDIR(st.st_mode):
            real = os.path.realpath(path)
            if self._enter((st.st_dev, st.st_ino), rel, real):
                self._walk(rel, real)
        elif not stat.S_ISREG(st.st_mode):
            if _is_image_name(rel):
                self.notes.append(f"the link {printable(rel)} leads to something not a regular file; left out")
        elif not _is_image_name(rel):
            self._list(rel)
        else:
            real = os.path.realpath(path)
            seen = self._listed_at(real)
            if seen is None:
                self.link_targets[real] = rel
                self._list(rel)
            else:
                self.notes.append(f"the link {printable(rel)} leads to {printable(seen)}, listed already: used once")

    def _enter(self, folder: tuple[int, int], rel: str, real: str) -> bool:
        seen = self.folders.get(folder)
        if seen is not None:
            self.notes.append(f"skipping the folder {printable(rel)}: it leads to {printable(seen or '.')}, listed "
                              f"already (a link loop, or a second way into the same folder)")
            return False
        self.folders[folder] = rel
        self.real_folders[real] = rel
        return True

    def _listed_at(self, real: str) -> str | None:
        """The path under which the file at real path `real` is listed, if it is."""
        seen = self.link_targets.get(real)
        folder = self.real_folders.get(os.path.dirname(real))
        if seen is None and folder is not None:
            if self.listed is None:
                self.listed = set(self.files)
            candidate = _join(folder, os.path.basename(real))
            seen = candidate if candidate in self.listed else None
        return seen

    def _list(self, rel: str) -> None:
        self.files.append(rel)
        if self.listed is not None:
            self.listed.add(rel)


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _is_image_name(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES


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
    return items, [printable(name) for name in class_names]  # names to show; labels come from the folders


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
    entered: set[tuple[int, int]] = set()  # a wrapping folder that links back up would be followed forever
    while root.is_dir():
        st = root.stat()
        if (st.st_dev, st.st_ino) in entered:
            return []
        entered.add((st.st_dev, st.st_ino))
        subdirs = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and _is_folder(e))
        present = [name for name in SPLIT_NAMES if name in subdirs]
        if present or len(subdirs) != 1:
            return present
        root = root / subdirs[0]
    return []


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a loop of links
        return False
