"""Official MAETok checkpoints (`AEModel` of Hhhhhhao/continuous_tokenizer) -> our `MAETok`.

The official config (`ModelArgs`) sits at the top level of the hub's `config.json`, or under `official_ModelArgs`
(with explicit `encoder`/`decoder` width, depth, heads) in the parity fixtures. Widths and depths otherwise come
from the timm model names (vit_base = 768 wide, 12 deep, 12 heads), and are cross-checked against the weights.
Every official key is mapped, or is a known training-only key (reported as unused); any other key is an error,
so nothing is dropped silently.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, TokenizerConfig
from ..tokenizer.model import MAETok
from .hub import (UnreadableFileError, quiet_pickle_protocol, read_safetensors, resolve_model_folder,
                  training_run_hint, weights_only_refusal)

# timm ViT sizes by name fragment: (width, depth, heads)
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
             "huge": (1280, 32, 16), "giant": (1536, 40, 24)}

# (official regex, our template); applied in order, first match wins.
KEY_MAP: list[tuple[str, str]] = [
    (r"encoder\.latent_tokens", "encoder.latent_tokens"),
    (r"encoder\.latent_pos_embed", "encoder.latent_pos_embed"),
    (r"encoder\.mask_token", "encoder.mask_token"),
    (r"encoder\.freqs", "encoder.rope.freqs"),
    (r"encoder\.freqs_t_x", "encoder.rope.t_x"),
    (r"encoder\.freqs_t_y", "encoder.rope.t_y"),
    (r"encoder\.model\.cls_token", "encoder.cls_token"),
    (r"encoder\.model\.pos_embed", "encoder.pos_embed"),
    (r"encoder\.model\.patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"encoder\.model\.blocks\.(\d+)\.(.+)", r"encoder.blocks.\1.\2"),
    (r"encoder\.model\.norm\.(weight|bias)", r"encoder.norm.\1"),
    (r"quant_conv\.(weight|bias)", r"encoder.to_latent.\1"),
    (r"post_quant_conv\.(weight|bias)", r"decoder.from_latent.\1"),
    (r"decoder\.mask_token", "decoder.mask_token"),
    (r"decoder\.latent_pos_embed", "decoder.latent_pos_embed"),
    (r"decoder\.freqs", "decoder.rope.freqs"),
    (r"decoder\.freqs_t_x", "decoder.rope.t_x"),
    (r"decoder\.freqs_t_y", "decoder.rope.t_y"),
    (r"decoder\.model\.blocks\.(\d+)\.(attn\..+|mlp\..+|adaLN_modulation\.1\..+)", r"decoder.blocks.\1.\2"),
    (r"decoder\.model\.norm\.adaLN_modulation\.1\.(weight|bias)", r"decoder.final_norm.adaLN_modulation.1.\1"),
    (r"decoder\.to_pixel\.model\.(weight|bias)", r"decoder.head.\1"),
]
# Present in official files but never used by encode/decode (see the fixture README).
# Ours, needed only for training with masking: released files leave it out, a model without masking lacks it.
TRAINING_ONLY = {"encoder.mask_token"}
KNOWN_UNUSED = (r"decoder\.model\.pos_embed", r"decoder\.model\.patch_embed\..*", r"projection\..*",
                r"repa_model\..*", r"decoder\.model\.cls_token")


@dataclass
class ConversionReport:
    config: TokenizerConfig
    mapped: int = 0
    unused: list[str] = field(default_factory=list)          # official keys with no counterpart (expected ones)
    initialised: list[str] = field(default_factory=list)     # our keys absent from the file (set to defaults)

    def summary(self) -> str:
        lines = [f"mapped {self.mapped} tensors"]
        if self.unused:
            lines.append(f"unused official keys ({len(self.unused)}, not needed for encode/decode): "
                         + ", ".join(self.unused))
        if self.initialised:
            lines.append(f"keys not in the official file, left at their init ({len(self.initialised)}): "
                         + ", ".join(self.initialised))
        return "\n".join(lines)


def map_official_key(key: str) -> str | None:
    for pattern, template in KEY_MAP:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


def _vit_size(model_name: str) -> tuple[int, int, int]:
    for frag, size in VIT_SIZES.items():
        if f"vit_{frag}" in model_name:
            return size
    raise ConfigError(f"cannot infer width/depth/heads from official model name {model_name!r}; "
                      f"add explicit encoder/decoder sizes to the config")


def official_config(meta: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> TokenizerConfig:
    """Our TokenizerConfig from an official config dict, cross-checked against weight shapes when given."""
    args = meta.get("official_ModelArgs", meta)
    missing = [k for k in ("image_size", "codebook_embed_dim", "num_latent_tokens") if k not in args]
    if missing:
        raise ConfigError(f"official config lacks ModelArgs keys {missing} (expected at the top level or under "
                          f"'official_ModelArgs')")
    enc = meta.get("encoder") or dict(zip(("width", "depth", "heads"), _vit_size(args.get("encoder_model", ""))))
    dec = meta.get("decoder") or dict(zip(("width", "depth", "heads"), _vit_size(args.get("decoder_model", ""))))
    if args.get("dec_cls_token", False):
        raise ConfigError("official dec_cls_token=True is not supported (the released MAETok models use False)")
    if not args.get("use_rope", True) or not args.get("rope_mixed", True):
        raise ConfigError("only RoPE-Mixed official tokenizers are supported (use_rope=True, rope_mixed=True)")
    if args.get("to_pixel", "linear") != "linear":
        raise ConfigError(f"official to_pixel={args.get('to_pixel')!r} is not supported (expected 'linear')")
    patch = args.get("enc_patch_size", 16)
    cfg = TokenizerConfig(
        variant="maetok", image_size=args["image_size"], patch_size=patch, in_channels=3,
        latent_tokens=args["num_latent_tokens"], latent_dim=args["codebook_embed_dim"],
        enc_width=enc["width"], enc_depth=enc["depth"], enc_heads=enc["heads"],
        dec_width=dec["width"], dec_depth=dec["depth"], dec_heads=dec["heads"],
        rope_theta=float(args.get("rope_theta", 10.0)), aux_targets=[],
        latent_mean=float(args.get("vq_mean", 0.0)), latent_std=float(args.get("vq_std", 1.0)))
    if shapes is not None:
        _check_shapes_against(cfg, shapes)
    cfg.validate("official config")
    return cfg


def config_from_official_shapes(shapes: dict[str, tuple[int, ...]], heads: tuple[int, int] | None = None
                                ) -> TokenizerConfig:
    """Infer the whole config from a state dict's shapes alone (heads default to width/64, the ViT norm)."""
    lacking = [k for k in ("encoder.model.cls_token", "decoder.mask_token", "encoder.model.patch_embed.proj.weight",
                           "encoder.model.pos_embed", "encoder.latent_tokens", "quant_conv.weight") if k not in shapes]
    if lacking:
        raise ConfigError(f"the weights lack {lacking}: not an official MAETok tokenizer (AEModel)")
    W = shapes["encoder.model.cls_token"][-1]
    Wd = shapes["decoder.mask_token"][-1]
    patch = shapes["encoder.model.patch_embed.proj.weight"][-1]
    n = shapes["encoder.model.pos_embed"][1] - 1
    grid = int(round(n ** 0.5))
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.model\.blocks\.(\d+)\.", k))),
                    default=-1)
    ddepth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.model\.blocks\.(\d+)\.", k))),
                     default=-1)
    eh, dh = heads or (W // 64, Wd // 64)
    return TokenizerConfig(variant="maetok", image_size=grid * patch, patch_size=patch,
                           latent_tokens=shapes["encoder.latent_tokens"][1],
                           latent_dim=shapes["quant_conv.weight"][0], enc_width=W, enc_depth=depth, enc_heads=eh,
                           dec_width=Wd, dec_depth=ddepth, dec_heads=dh, aux_targets=[])


def _check_shapes_against(cfg: TokenizerConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    inferred = config_from_official_shapes(shapes, (cfg.enc_heads, cfg.dec_heads))
    for name in ("image_size", "patch_size", "latent_tokens", "latent_dim", "enc_width", "enc_depth",
                 "dec_width", "dec_depth"):
        if getattr(inferred, name) != getattr(cfg, name):
            raise ConfigError(f"official config says {name}={getattr(cfg, name)} but the weights imply "
                              f"{getattr(inferred, name)}")


def convert_state_dict(official: dict[str, torch.Tensor], cfg: TokenizerConfig):
    """Build our MAETok from an official state dict; returns (model, report). Shapes are checked key by key."""
    model = MAETok(cfg)
    own = model.state_dict()
    report = ConversionReport(config=cfg)
    new_state: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        ours = map_official_key(key)
        if any(re.fullmatch(p, key) for p in KNOWN_UNUSED) or (ours in TRAINING_ONLY and ours not in own):
            report.unused.append(key)
            continue
        if ours is None:
            raise ConfigError(f"official key {key!r} {tuple(value.shape)} has no counterpart in maetok; "
                              f"this checkpoint is not an AEModel of the supported family")
        if ours not in own:
            # e.g. blocks.0.attn.q_norm.weight: a part the model built from this config lacks. Dropping it would
            # load without error and encode / decode wrongly.
            raise ConfigError(f"official key {key!r} {tuple(value.shape)} would load into {ours!r}, which the "
                              f"model built from this config does not have; the checkpoint uses an option "
                              f"(such as qk-norm) that maetok's config does not describe")
        if tuple(own[ours].shape) != tuple(value.shape):
            raise ConfigError(f"official key {key!r} has shape {tuple(value.shape)}, but {ours!r} needs "
                              f"{tuple(own[ours].shape)}")
        new_state[ours] = value.to(own[ours].dtype)
    report.initialised = sorted(set(own) - set(new_state))
    lacking = sorted(set(report.initialised) - TRAINING_ONLY)
    if lacking:
        raise ConfigError(f"official checkpoint lacks required tensors: {lacking}")
    model.load_state_dict({**own, **new_state}, strict=True)
    report.mapped = len(new_state)
    return model.eval(), report


def read_official_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file read with weights_only=True (no code runs); unwraps {'model'|'state_dict'}."""
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            with quiet_pickle_protocol():
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise weights_only_refusal(path, e) from e
        for wrapper in ("ema", "model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableFileError(f"{path}: not a flat state dict of tensors (nor one under 'ema', 'model' or "
                                  f"'state_dict'); give the weights file of an official MAETok tokenizer")
    return state


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    """A tokenizer's folder, local or downloaded from the hub (`resolve_model_folder`), holding a config.json."""
    folder = resolve_model_folder(path_or_hub_id, "tokenizer")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a save_pretrained folder or an official "
                                f"MAETok checkpoint folder){training_run_hint(folder)}")
    return folder


def _find_weights_file(src: Path, weights: str | Path | None) -> Path:
    if weights:
        w = Path(weights)
        if not w.is_file():
            raise FileNotFoundError(f"--weights {w} does not exist")
        return w
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"{src} holds neither model.safetensors nor pytorch_model.bin; pass --weights FILE")


def load_official_tokenizer(src: str | Path, weights: str | Path | None = None, config: str | Path | None = None):
    """Read an official checkpoint folder (or explicit files) -> (our model, report)."""
    src = Path(src)
    cfg_path = Path(config) if config else src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"official config {cfg_path} not found; pass --config FILE")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from e
    weights_path = _find_weights_file(src, weights)
    state = read_official_weights(weights_path)
    try:
        cfg = official_config(meta, {k: tuple(v.shape) for k, v in state.items()})
        return convert_state_dict(state, cfg)
    except ConfigError as e:  # named here: neither knows the files
        raise ConfigError(f"{weights_path} (config {cfg_path}): {e}") from e
