"""A maetok plugin: an edge-orientation histogram target. Copy it, rename the target, change `forward`.

    maetok --plugin examples/domain_targets_plugin.py tokenizer train --out runs/tok \
        "model.aux_targets=[{name: hog}, {name: edge-orientation, options: {bins: 8}}]"
"""
import math

import torch
import torch.nn.functional as F

from maetok.tokenizer.targets import Target, check_images, register_target, take_options


class EdgeOrientationTarget(Target):
    """Per patch: the grey image's gradient magnitude in `bins` orientation bins (0-180 degrees), as fractions."""
    loss = "mse"

    def __init__(self, bins: int):
        super().__init__()
        self.name, self.dim, self.bins = "edge-orientation", bins, bins
        kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8
        self.register_buffer("kernels", torch.stack([kx, kx.t()]).unsqueeze(1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, patch_size: int) -> torch.Tensor:
        check_images(images, patch_size, self.name)
        grey = F.pad(images.float().mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        gx, gy = F.conv2d(grey, self.kernels).unbind(1)                      # (B, H, W) each
        angle = torch.atan2(gy, gx) % math.pi                                # unsigned orientation
        index = (angle / math.pi * self.bins).long().clamp_max(self.bins - 1)
        votes = F.one_hot(index, self.bins).permute(0, 3, 1, 2) * torch.hypot(gx, gy).unsqueeze(1)
        hist = F.avg_pool2d(votes, patch_size).flatten(2).transpose(1, 2)   # (B, N, bins)
        return hist / hist.sum(-1, keepdim=True).clamp_min(1e-6)             # a flat patch gives zeros


@register_target("edge-orientation")
def build_edge_orientation(options: dict, image_size: int, patch_size: int) -> Target:
    return EdgeOrientationTarget(**take_options("edge-orientation", options, {"bins": 8}))
