"""LPIPS (Zhang et al. 2018), VGG16 variant: unit-normalised VGG activations at 5 depths, squared differences,
learned 1x1 channel weights, spatial mean, summed over depths.

Weights come only from local safetensors files, because neither torchvision's VGG16 nor the LPIPS linear heads can
be downloaded everywhere this runs:
  vgg_weights: torchvision's `vgg16` state dict (only the `features.*` keys are used; `classifier.*` are ignored);
  lin_weights: the official LPIPS `vgg.pth` v0.1 heads, keys `lin{0..4}.model.1.weight`, shape (1, C, 1, 1).
Both are converted once with `safetensors.torch.save_file(torch.load(...), ...)` on a machine that has them.
Input: images in [-1, 1] (the official convention), NCHW.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..io.hub import find_weights

# Ends (exclusive) of the VGG16 `features` slices at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)
VGG_FILE = "vgg16-torchvision.safetensors"
LIN_FILE = "lpips-vgg-v0.1.safetensors"
_HINT = ("Convert torchvision's vgg16 weights (vgg16-397923af.pth) and LPIPS's weights/v0.1/vgg.pth to safetensors "
         f"on a machine that has them, then pass their paths or put them in $MAETOK_SHARED_DATA as {VGG_FILE} and "
         f"{LIN_FILE}.")


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
        vgg = {k[len("features."):]: v for k, v in load_file(str(vgg_weights)).items() if k.startswith("features.")}
        self.features.load_state_dict({k: v for k, v in vgg.items() if int(k.split(".")[0]) < _SLICE_ENDS[-1]},
                                      strict=True)
        lins = load_file(str(lin_weights))
        self.load_state_dict({**lins, **{f"features.{k}": v for k, v in self.features.state_dict().items()}},
                             strict=True)


def build_lpips(vgg_weights: str | Path | None = None, lin_weights: str | Path | None = None,
                pretrained: bool = True) -> LPIPS:
    """LPIPS-VGG in eval mode, frozen. `pretrained=False` gives random weights (shape tests only, not a metric).
    Raises MissingWeightsError when pretrained weights are asked for and not found locally."""
    if pretrained:  # find both files before building anything, so a missing one fails fast
        vgg = find_weights("LPIPS VGG16 backbone", vgg_weights, VGG_FILE, _HINT)
        lin = find_weights("LPIPS linear heads", lin_weights, LIN_FILE, _HINT)
    model = LPIPS()
    if pretrained:
        model.load_weights(vgg, lin)
    return model.eval().requires_grad_(False)
