"""The pretrained networks the tokenizer's training uses, built with their weights found on disk or the hub.

Auxiliary targets (registered here into the target registry of `maetok.tokenizer.targets`): `resnet-cifar`, a
small offline semantic teacher, and the timm teachers `dinov2`, `siglip` and the generic `timm`. Losses: the
perceptual network (LPIPS-VGG or a CIFAR ResNet) and the discriminator (PatchGAN or a frozen DINO ViT-S/16 with
trainable heads). The modules themselves are the core's; what this file adds is finding their weights through the
registry of `maetok.io.weights` (an explicit file, the local cache, then the owning library's download), with one
clear MissingWeightsError when they cannot be had.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError

from ..config import ConfigError, GanConfig, TokenizerLossConfig
from ..layers import PatchConv2d
from ..nets.lpips import build_lpips
from ..nets.resnet_cifar import build_resnet_cifar
from ..tokenizer.losses import DinoDiscriminator, MeanLPIPS, PatchGAN, ResNetPerceptual
from ..tokenizer.targets import ResNetCifarTarget, Target, TimmTarget, register_target, take_options
from .hub import UnreadableFileError, find_weights
from .weights import DINO_DISCRIMINATOR, TEACHER_MODELS, WEIGHTS, lpips_weight_files, optional_import, timm_weights


# --------------------------------------------------------------------------------------------------------------
# Auxiliary targets
# --------------------------------------------------------------------------------------------------------------
@register_target("resnet-cifar")
def _build_resnet_cifar(options: dict, image_size: int, patch_size: int) -> Target:
    opts = take_options("resnet-cifar", options, {"arch": "resnet56", "layer": "layer3", "weights": "",
                                                  "pretrained": True, "resample": "auto", "input_size": 0})
    weights = None
    if opts["pretrained"]:
        weights = find_weights(f"resnet-cifar target ({opts['arch']})", opts["weights"] or None,
                               f"cifar10-{opts['arch']}.safetensors",
                               hint=f"Put cifar10-{opts['arch']}.safetensors in $MAETOK_SHARED_DATA, or give "
                                    f"the target options.weights=/path/to/file.safetensors "
                                    f"({_options_how_to('resnet-cifar')}), or options.pretrained=false for "
                                    f"random weights (tests only).")
    network = build_resnet_cifar(opts["arch"], weights)
    return ResNetCifarTarget(network, opts["layer"], opts["resample"], int(opts["input_size"]))


def _options_how_to(target: str) -> str:
    """How a user sets a target's options: aux_targets is a list, so a dotted override replaces all of it."""
    return (f"in the run's YAML under model.aux_targets, or on the command line as the whole list, e.g. "
            f"'model.aux_targets=[{{name: hog}}, {{name: {target}, options: "
            f"{{weights: /path/to/model.safetensors}}}}]'")


def build_timm_target(target: str, options: dict, image_size: int, patch_size: int,
                      default_model: str | None) -> TimmTarget:
    opts = take_options(target, options, {"model": default_model, "layer": None, "norm": False, "weights": "",
                                          "pretrained": True, "model_kwargs": {}})
    name = opts["model"]
    if not name:
        raise ConfigError(f"auxiliary target {target!r} needs options.model = a timm model name")
    timm = optional_import("timm", f"auxiliary target {target!r}")
    kwargs = {"img_size": image_size, "patch_size": patch_size, "num_classes": 0, **opts["model_kwargs"]}
    what = f"auxiliary target {target!r} ({name})"
    weights = timm_weights(name)
    where = (f"On a machine with internet access, `maetok weights fetch --name {weights.name}` puts them in the "
             f"Hugging Face cache; or download model.safetensors from the Hugging Face repository timm/{name}, copy "
             f"it here and give the target options.weights=/path/to/model.safetensors ({_options_how_to(target)}); "
             f"or set options.pretrained=false for random weights (tests only).")
    if not opts["pretrained"]:
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        if opts["weights"]:
            path = find_weights(what, opts["weights"], hint=where)
            if path.suffix != ".safetensors":
                raise ValueError(f"{what}: {path} is not a .safetensors file; weights are read from safetensors "
                                 f"only (pickled checkpoints can execute code). Convert it with "
                                 f"safetensors.torch.save_file.")
        else:
            path = weights.resolve(hint=where)
        model = create_timm_from_file(timm, name, path, kwargs)
    _patch_embed_as_matmul(model)
    return TimmTarget(target, model, None if opts["layer"] is None else int(opts["layer"]), bool(opts["norm"]))


def create_timm_from_file(timm, name: str, path: Path, kwargs: dict) -> nn.Module:
    """`timm.create_model(name, pretrained=True)` with the weights read from `path` (timm applies its own key
    conversion and resamples the patch embedding and position table to `kwargs`' sizes, as from the hub)."""
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except (RuntimeError, KeyError, SafetensorError) as e:  # TypeError (a bad model_kwargs entry) stays the user's
        first = (str(e).strip().splitlines() or [""])[0]
        raise UnreadableFileError(f"{path}: does not load into timm's {name} ({type(e).__name__}: {first}); the "
                                  f"file holds another model's weights, or is damaged") from e


def _patch_embed_as_matmul(model: nn.Module) -> None:
    """Swap a timm ViT's patch-embedding convolution for the same layer computed as a matmul (`PatchConv2d`:
    same weights, same output; faster on a GPU). Models whose embedding is something else keep it."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d) and not isinstance(proj, PatchConv2d):
        try:
            model.patch_embed.proj = PatchConv2d.from_conv(proj)
        except ValueError:  # overlapping or padded patches, or a convolution that does more: keep it
            pass


@register_target("dinov2")
def _build_dinov2(options: dict, image_size: int, patch_size: int) -> Target:
    return build_timm_target("dinov2", options, image_size, patch_size, TEACHER_MODELS["dinov2"])


@register_target("siglip")
def _build_siglip(options: dict, image_size: int, patch_size: int) -> Target:
    return build_timm_target("siglip", options, image_size, patch_size, TEACHER_MODELS["siglip"])


@register_target("timm")
def _build_timm(options: dict, image_size: int, patch_size: int) -> Target:
    return build_timm_target("timm", options, image_size, patch_size, None)


# --------------------------------------------------------------------------------------------------------------
# Losses: perceptual network and discriminator
# --------------------------------------------------------------------------------------------------------------
def build_perceptual(cfg: TokenizerLossConfig) -> nn.Module | None:
    """The perceptual distance of `loss.perceptual`, or None when the term is off."""
    if cfg.perceptual == "none" or cfg.perceptual_weight == 0:
        return None
    if cfg.perceptual == "resnet-cifar":
        return ResNetPerceptual(resnet_perceptual_network(cfg.perceptual_weights))
    vgg, heads = lpips_weight_files(cfg.perceptual_weights)  # "" each: the downloaded / packaged files
    return MeanLPIPS(build_lpips(vgg or None, heads or None))


def resnet_perceptual_network(weights: str = "", arch: str = "resnet20", pretrained: bool = True) -> nn.Module:
    """The CIFAR ResNet behind the `resnet-cifar` perceptual loss (random weights when not `pretrained`)."""
    path = find_weights(f"perceptual loss ({arch}-cifar10)", weights or None, f"cifar10-{arch}.safetensors",
                        "Set loss.perceptual_weights to the file, or loss.perceptual=none.") if pretrained else None
    return build_resnet_cifar(arch, path)


def build_discriminator(cfg: GanConfig, in_channels: int = 3) -> nn.Module:
    if cfg.discriminator == "dino":
        return DinoDiscriminator(dino_backbone(cfg.disc_weights))
    return PatchGAN(in_channels)


def dino_backbone(weights: str = "", pretrained: bool = True, image_size: int = 224) -> nn.Module:
    """timm's vit_small_patch16_224.dino, its weights from `loss.gan.disc_weights`, the Hugging Face cache, or the
    hub; absent and offline, the error says how to get them."""
    timm = optional_import("timm", "the DINO discriminator")
    kwargs = dict(num_classes=0, img_size=image_size, dynamic_img_size=True)
    if not pretrained:
        return timm.create_model(DINO_DISCRIMINATOR, pretrained=False, **kwargs)
    path = WEIGHTS["dino-vits16"].resolve(weights or None, hint=(
        "On a machine with internet access `maetok weights fetch --name dino-vits16` puts them in the Hugging Face "
        "cache; or set loss.gan.disc_weights to a local file, or use loss.gan.discriminator=patchgan."))
    return create_timm_from_file(timm, DINO_DISCRIMINATOR, path, kwargs)
