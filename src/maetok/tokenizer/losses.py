"""Tokenizer losses: pixel MSE, perceptual (LPIPS or CIFAR-ResNet features), GAN, KL, auxiliary targets.

The GAN follows MAETok / VQGAN practice: hinge loss, a start step, an adaptive weight that balances the GAN
gradient against the reconstruction gradient at the decoder's last layer, optional DiffAugment, LeCAM and
consistency regularisation of the discriminator (the official recipe uses all three; docs/recipe.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------------------
# Perceptual
# --------------------------------------------------------------------------------------------------------------
class ResNetPerceptual(nn.Module):
    """LPIPS-style distance on a frozen CIFAR ResNet: unit-normalise each stage's channels, mean squared diff.

    A small-scale stand-in for LPIPS-VGG (whose weights cannot be downloaded everywhere); recorded as such.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.net = network.requires_grad_(False)

    def train(self, mode: bool = True):  # the feature network stays frozen in eval mode (BatchNorm statistics)
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net.feature_maps(x), self.net.feature_maps(y)
        total = 0.0
        for k in fx:
            total = total + (F.normalize(fx[k], dim=1) - F.normalize(fy[k], dim=1)).pow(2).sum(1).mean()
        return total


class MeanLPIPS(nn.Module):
    """LPIPS gives one distance per image; the loss is their mean."""

    def __init__(self, lpips: nn.Module):
        super().__init__()
        self.lpips = lpips

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y).mean()


def ramp(step: int, warmup: int) -> float:
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


# --------------------------------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------------------------------
class PatchGAN(nn.Module):
    """PatchGAN (pix2pix / taming) with spectral-norm-free BatchNorm-free GroupNorm layers; logits per patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for i in range(1, layers):
            nxt = width * min(2 ** i, 8)
            seq += [nn.Conv2d(ch, nxt, 4, 2 if i < layers - 1 else 1, 1, bias=False),
                    nn.GroupNorm(min(32, nxt // 4), nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        seq += [nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT-S/16 feature stack with light trainable heads on several blocks (as MAETok trains its GAN).

    The backbone (a timm ViT-S/16 DINO) is built by `maetok.io.teachers.build_discriminator`, which finds its
    weights.
    """

    def __init__(self, backbone: nn.Module, blocks: tuple[int, ...] = (2, 5, 8, 11)):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.blocks = blocks
        dim = self.backbone.embed_dim
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv1d(dim, 64, 1), nn.LeakyReLU(0.2), nn.Conv1d(64, 1, 1))
                                   for _ in blocks)
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) / 2 - self.mean) / self.std
        if x.shape[-1] < 224:
            x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
        feats = self.backbone.forward_intermediates(x, indices=list(self.blocks), intermediates_only=True,
                                                    output_fmt="NLC")
        return torch.cat([h(f.transpose(1, 2)).flatten(1) for h, f in zip(self.heads, feats)], dim=1)


# --------------------------------------------------------------------------------------------------------------
# GAN terms
# --------------------------------------------------------------------------------------------------------------
def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None, cutout: float = 0.5,
                 p_apply: float = 1.0) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): colour, translation, cut-out; differentiable, same policy for real/fake.

    Translation shifts each image by up to 1/8 of its side (edges clamped); the cut-out zeroes a square of side
    2 * int(cutout * H / 2) - 1 at a random centre. `p_apply`: each of the three groups is applied to the whole
    batch with this probability (one draw per group, as the official DiffAugment's `prob`); at 1 nothing is
    drawn for it, so the random stream of runs without it is unchanged.
    """
    B, _, H, W = x.shape
    dev = x.device

    def rnd(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    def applied() -> bool:
        return p_apply >= 1.0 or bool(torch.rand((), generator=generator) < p_apply)

    if applied():
        x = x + (rnd(B, 1, 1, 1) - 0.5)                                       # brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (rnd(B, 1, 1, 1) * 2) + mean                         # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (rnd(B, 1, 1, 1) + 0.5) + mean                       # contrast
    if applied():
        shift = (torch.randint(-H // 8, H // 8 + 1, (B, 2), generator=generator)).to(dev)
        gy = (torch.arange(H, device=dev)[None, :] - shift[:, :1]).clamp(0, H - 1)  # translation, edge-clamped
        gx = (torch.arange(W, device=dev)[None, :] - shift[:, 1:]).clamp(0, W - 1)
        x = x[torch.arange(B, device=dev)[:, None, None], :, gy[:, :, None], gx[:, None, :]].permute(0, 3, 1, 2)
    if applied():
        cy = torch.randint(0, H, (B, 1, 1), generator=generator).to(dev)      # cut-out
        cx = torch.randint(0, W, (B, 1, 1), generator=generator).to(dev)
        yy, xx = torch.arange(H, device=dev)[None, :, None], torch.arange(W, device=dev)[None, None, :]
        keep = ((yy - cy).abs() >= int(H * cutout / 2)) | ((xx - cx).abs() >= int(W * cutout / 2))
        x = x * keep[:, None].to(x.dtype)
    return x


def consistency_regularization(logits: torch.Tensor, logits_augmented: torch.Tensor) -> torch.Tensor:
    """bCR (Zhao et al. 2021, after CR-GAN, Zhang et al. 2020): the discriminator should not change its mind under
    augmentation, || D(x) - D(T(x)) ||^2, averaged; called on real and fake images together (concatenated), as
    the official MAETok loss does. Gradients flow through both sides."""
    return F.mse_loss(logits, logits_augmented)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021): keeps D's outputs near EMAs of its opposite-class outputs."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema_real.mul_(self.decay).add_((1 - self.decay) * logits_real.mean())
            self.ema_fake.mul_(self.decay).add_((1 - self.decay) * logits_fake.mean())
        return F.relu(logits_real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - logits_fake).pow(2).mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """||grad rec|| / ||grad gan|| at the decoder's last layer (VQGAN): keeps the GAN from swamping recon."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), summed over latent elements, averaged over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
