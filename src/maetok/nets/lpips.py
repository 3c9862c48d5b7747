"""LPIPS (Zhang et al. 2018), VGG16 variant: unit-normalised VGG activations at 5 depths, squared differences,
learned 1x1 channel weights, spatial mean, summed over depths.

Weights, found through the registry of `maetok.io.weights` (an explicit file, the local copy, then the download):
  the backbone: torchvision's VGG16 (VGG16_Weights.IMAGENET1K_V1, the network the official LPIPS loads), downloaded
    as torchvision does into torch.hub's checkpoints folder; only its `features.*` keys are used;
  the heads: the official LPIPS v0.1 `vgg.pth`, which the `lpips` package ships (lpips/weights/v0.1/vgg.pth), keys
    `lin{0..4}.model.1.weight`, shape (1, C, 1, 1); read from the installed package, without importing it.
Both are plain state dicts, read with torch.load(weights_only=True); explicit files may also be safetensors.
Input: images in [-1, 1] (the official convention), NCHW.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..io.hub import UnreadableFileError, read_state_dict
from ..io.weights import WEIGHTS, Needed, ensure_weights

# Ends (exclusive) of the VGG16 `features` slices at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


class _LinearHead(nn.Module):
    """Named like the official `NetLinLayer` so its state dict keys load unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        # Optional dependency: torchvision comes with the `teachers` extra, and only LPIPS needs it here.
        from torchvision.models.vgg import cfgs, make_layers

        # vgg16().features without building the (large, unused) classifier; same module indices.
        self.features = make_layers(cfgs["D"])[:_SLICE_ENDS[-1]]
        for i, c in enumerate(_CHANNELS):
            setattr(self, f"lin{i}", _LinearHead(c))
        # The official ScalingLayer: [-1, 1] input -> roughly ImageNet-normalised.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, outs, start = (x - self.shift) / self.scale, [], 0
        for end in _SLICE_ENDS:
            x = self.features[start:end](x)
            outs.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            start = end
        return outs

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between images in [-1, 1]."""
        total = 0.0
        for i, (a, b) in enumerate(zip(self._activations(pred), self._activations(target))):
            total = total + getattr(self, f"lin{i}").model((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total

    def load_weights(self, vgg_weights: str | Path, lin_weights: str | Path) -> None:
        vgg = {k[len("features."):]: v for k, v in read_state_dict(vgg_weights).items() if k.startswith("features.")}
        features = {k: v for k, v in vgg.items() if int(k.split(".")[0]) < _SLICE_ENDS[-1]}
        _load_part(self.features, features, vgg_weights, "VGG16 features")
        heads = nn.ModuleDict({f"lin{i}": getattr(self, f"lin{i}") for i in range(len(_CHANNELS))})
        _load_part(heads, read_state_dict(lin_weights), lin_weights, "linear heads")


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, part: str) -> None:
    """A strict load whose failure is one line naming the file (torch's message lists every key)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UnreadableFileError(f"{path}: does not hold the LPIPS {part} ({first}); give torchvision's vgg16 "
                                  f"state dict and LPIPS's weights/v0.1/vgg.pth") from None


def build_lpips(vgg_weights: str | Path | None = None, lin_weights: str | Path | None = None,
                pretrained: bool = True, allow_download: bool = True) -> LPIPS:
    """LPIPS-VGG in eval mode, frozen. `pretrained=False` gives random weights (shape tests only, not a metric).
    Raises one MissingWeightsError naming both files when they cannot be found nor downloaded."""
    if pretrained:  # find both files before building anything, so a missing one fails fast
        paths = ensure_weights([Needed(WEIGHTS["vgg16"], str(vgg_weights or ""), "LPIPS"),
                                Needed(WEIGHTS["lpips-vgg-heads"], str(lin_weights or ""), "LPIPS")],
                               allow_download=allow_download)
    model = LPIPS()
    if pretrained:
        model.load_weights(paths["vgg16"], paths["lpips-vgg-heads"])
    return model.eval().requires_grad_(False)
