"""The CIFAR-10 ResNets of He et al. (2016), "option A" shortcuts, as published by akamaster/pytorch_resnet_cifar10.

Used offline as a small-scale semantic teacher (a stand-in for DINOv2/SigLIP, which cannot be downloaded
everywhere), as a perceptual-loss network and as a feature network for FID on CIFAR-10.
Input: images in [-1, 1]; the ImageNet mean/std normalisation the weights expect happens inside.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.hub import load_safetensors_strict

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
DEPTH_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Option A: subsample and zero-pad channels, no parameters on the shortcut.
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, stages = 16, []
        for i, width in enumerate((16, 32, 64)):
            layer = []
            for b in range(blocks_per_stage):
                layer.append(BasicBlock(cin, width, 2 if (b == 0 and i > 0) else 1))
                cin = width
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage outputs for images in [-1, 1]: layer1 (16ch, HxW), layer2 (32ch, H/2), layer3 (64ch, H/4)."""
        x = ((images + 1) / 2 - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return {"layer1": f1, "layer2": f2, "layer3": f3}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """64-d globally pooled features (the FID feature space on CIFAR-10)."""
        return self.feature_maps(images)["layer3"].mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(images))


def build_resnet_cifar(arch: str = "resnet56", weights: str | Path | None = None) -> ResNetCifar:
    """Build `arch`; load `weights` (a safetensors file) strictly when given. Random init otherwise (tests)."""
    if arch not in DEPTH_BLOCKS:
        raise ValueError(f"unknown CIFAR ResNet {arch!r}; choose one of {sorted(DEPTH_BLOCKS)}")
    model = ResNetCifar(DEPTH_BLOCKS[arch])
    if weights is not None:
        load_safetensors_strict(model, weights)
    return model.eval()
