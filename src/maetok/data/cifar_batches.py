"""Reading the official CIFAR-10/100 "python version" batch files without trusting pickle.

The batches are pickles of a dict holding lists, strings, ints and a uint8 numpy array. They are read with an
unpickler whose `find_class` admits only builtins dict/list/bytes/str/int/bytearray, `_codecs.encode` with the
latin-1 codec (how Python 3 protocol-2 pickles spell bytes) and the numpy array/dtype reconstructors, which are
answered by inert stand-ins here: no numpy (or any other) code named in the file ever runs, and the array comes
from `np.frombuffer` over the raw bytes, for numeric dtypes only. Anything else is refused.
"""
from __future__ import annotations

import builtins
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_FILES = {"train": ["train"], "test": ["test"]}
_SAFE_BUILTINS = {"dict", "list", "bytes", "str", "int", "bytearray"}
_NUMERIC_KINDS = set("biuf")


def _text(value) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


class _DtypeStub:
    """Stands in for numpy.dtype(descr, align, copy) + its __setstate__; yields a numeric np.dtype."""
    def __init__(self, descr, align=False, copy=True):
        self.descr, self.byteorder = _text(descr), "|"

    def __setstate__(self, state):
        self.byteorder = _text(state[1]) if isinstance(state, tuple) and len(state) > 1 else "|"

    def to_numpy(self) -> np.dtype:
        dtype = np.dtype(self.descr)
        if dtype.kind not in _NUMERIC_KINDS:
            raise pickle.UnpicklingError(f"refusing a non-numeric array dtype {self.descr!r}")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


class _ArrayStub:
    """Stands in for numpy's _reconstruct(ndarray, ...) + ndarray.__setstate__: keeps the array data only."""
    def __init__(self, *args):
        self.array: np.ndarray | None = None

    def __setstate__(self, state):
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, (bytes, bytearray, str)):
            raise pickle.UnpicklingError("refusing an array whose state is not raw numeric data")
        raw = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
        flat = np.frombuffer(raw, dtype=dtype.to_numpy())
        self.array = flat.reshape(tuple(shape), order="F" if fortran else "C")


class _NdarrayMarker:
    """The `numpy.ndarray` argument of _reconstruct; never instantiated into anything."""


def _frombuffer(buffer, dtype, shape, order="C"):
    if not isinstance(dtype, _DtypeStub):
        raise pickle.UnpicklingError("refusing an array without a plain numeric dtype")
    return np.frombuffer(bytes(buffer), dtype=dtype.to_numpy()).reshape(tuple(shape), order=_text(order))


def _latin1_encode(text, encoding="latin-1"):
    if _text(encoding).lower().replace("_", "-") not in ("latin-1", "latin1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin-1")


_ALLOWED = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _DtypeStub,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches hold only dicts, lists, "
                                     f"strings, numbers and numeric arrays")


def _unwrap(value):
    if isinstance(value, _ArrayStub):
        return value.array
    if isinstance(value, dict):
        return {_text(k): _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def load_batch(data: bytes, name: str) -> dict:
    """One batch file's bytes -> dict with str keys; numpy arrays for the stored arrays."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{name}: {e}") from None
    except Exception as e:
        raise ValueError(f"{name}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a dict in a CIFAR batch, got {type(obj).__name__}")
    return _unwrap(obj)


class _BatchSource:
    """The batch files of a directory (possibly one level down) or of a .tar/.tar.gz archive, by base name."""
    def __init__(self, path: Path):
        self.path, self.files = path, {}
        if path.is_dir():
            for p in [*path.iterdir(), *(q for d in path.iterdir() if d.is_dir() for q in d.iterdir())]:
                if p.is_file():
                    self.files.setdefault(p.name, p)
            self._tar = None
        elif path.is_file() and tarfile.is_tarfile(path):
            self._tar = tarfile.open(path)
            for member in self._tar.getmembers():
                if member.isfile():
                    self.files.setdefault(Path(member.name).name, member)
        else:
            raise FileNotFoundError(f"cifar:{path}: no such directory or tar archive of CIFAR python batches")

    def read(self, name: str) -> bytes:
        entry = self.files[name]
        if self._tar is None:
            return entry.read_bytes()
        return self._tar.extractfile(entry).read()


def read_cifar(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 or CIFAR-100 python batches -> (uint8 (N, 32, 32, 3) RGB, int64 labels (N,), class names)."""
    source = _BatchSource(Path(path))
    if any(f in source.files for f in CIFAR10_FILES["train"] + CIFAR10_FILES["test"]):
        files, label_key, meta_file, names_key = CIFAR10_FILES, "labels", "batches.meta", "label_names"
    elif "train" in source.files or "test" in source.files:
        files, label_key, meta_file, names_key = CIFAR100_FILES, "fine_labels", "meta", "fine_label_names"
    else:
        raise FileNotFoundError(f"cifar:{path}: found neither CIFAR-10 (data_batch_1..5, test_batch) nor "
                                f"CIFAR-100 (train, test) batch files")
    if split not in files:
        raise ValueError(f"cifar:{path}: split {split!r} does not exist; choose one of {sorted(files)}")
    missing = [f for f in files[split] if f not in source.files]
    if missing:
        raise FileNotFoundError(f"cifar:{path}: missing batch files {missing}")
    images, labels = [], []
    for f in files[split]:
        batch = load_batch(source.read(f), f"cifar:{path}/{f}")
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"cifar:{path}/{f}: 'data' is not a uint8 (N, 3072) array")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planar R, G, B -> NHWC
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    names = list(CIFAR10_CLASSES) if files is CIFAR10_FILES else [str(i) for i in range(100)]
    if meta_file in source.files:
        meta = load_batch(source.read(meta_file), f"cifar:{path}/{meta_file}")
        names = [_text(n) for n in meta.get(names_key, names)]
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names
