"""One config system for every run: dataclasses, YAML presets and dotted command-line overrides.

    cfg = load_config(TokenizerRunConfig, "cpu-32", ["model.latent_tokens=64", "train.steps=100"])

Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the dotted key and what is
allowed, before any work starts. The resolved config is saved (YAML) in every run directory and checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the dotted key."""


# ==============================================================================================================
# Tokenizer
# ==============================================================================================================
@dataclass
class MaskConfig:
    """Training-time patch masking: one ratio per batch from a truncated normal, ceil(r*N) patches per sample."""
    ratio_mean: float = 0.6
    ratio_std: float = 0.25
    ratio_min: float = 0.4
    ratio_max: float = 0.6

    def validate(self, key: str) -> None:
        for name in ("ratio_mean", "ratio_min", "ratio_max"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key}.{name}={v} must lie in [0, 1]")
        if self.ratio_min > self.ratio_max:
            raise ConfigError(f"{key}: ratio_min={self.ratio_min} > ratio_max={self.ratio_max}")
        if self.ratio_std < 0:
            raise ConfigError(f"{key}.ratio_std={self.ratio_std} must be >= 0")


@dataclass
class AuxTargetConfig:
    """One auxiliary target predicted by a shallow decoder at masked patches (see tokenizer/targets.py)."""
    name: str = "hog"
    weight: float = 1.0
    # Target-specific options, e.g. {"weights": "path.safetensors", "layer": "layer2"} for resnet-cifar.
    options: dict[str, Any] = field(default_factory=dict)
    # True: when the teacher's weights cannot be found, train without this target (said at start-up)
    # instead of stopping with an error.
    optional: bool = False

    def validate(self, key: str) -> None:
        if not self.name:
            raise ConfigError(f"{key}.name must name a registered auxiliary target (hog, dinov2, ...)")
        if self.weight < 0:
            raise ConfigError(f"{key}.weight={self.weight} must be >= 0")


@dataclass
class TokenizerConfig:
    """The MAETok tokenizer and its AE / VAE / masked-AE baselines (same backbone, chosen by `variant`)."""
    variant: Literal["maetok", "ae", "vae", "mae"] = "maetok"
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    latent_tokens: int = 32
    latent_dim: int = 12
    enc_width: int = 192
    enc_depth: int = 4
    enc_heads: int = 3
    dec_width: int = 192
    dec_depth: int = 4
    dec_heads: int = 3
    mlp_ratio: float = 4.0
    rope_theta: float = 10.0
    layerscale_init: float = 1e-5
    mask: MaskConfig = field(default_factory=MaskConfig)
    aux_targets: list[AuxTargetConfig] = field(default_factory=lambda: [AuxTargetConfig("hog", 1.0)])
    aux_width: int = 192
    aux_depth: int = 3
    aux_heads: int = 3
    aux_loss_on: Literal["masked", "all"] = "masked"
    grad_checkpointing: bool = False    # recompute block activations in backward: less memory, ~30% more compute
    # Global latent statistics, measured after training; normalize(z) = (z - mean) / std.
    latent_mean: float = 0.0
    latent_std: float = 1.0

    @property
    def uses_mask(self) -> bool:
        return self.variant in ("maetok", "mae")

    @property
    def uses_aux(self) -> bool:
        return self.variant == "maetok" and len(self.aux_targets) > 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def validate(self, key: str) -> None:
        for name in ("image_size", "patch_size", "in_channels", "latent_tokens", "latent_dim", "enc_width",
                     "enc_depth", "enc_heads", "dec_width", "dec_depth", "dec_heads", "aux_width", "aux_depth",
                     "aux_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be a positive integer")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{key}.patch_size={self.patch_size} does not divide "
                              f"{key}.image_size={self.image_size}")
        for part in ("enc", "dec", "aux"):
            w, h = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if w % h or (w // h) % 4:
                raise ConfigError(f"{key}.{part}_width={w} / {part}_heads={h} must give an integer head width "
                                  f"divisible by 4 (RoPE-Mixed rotates pairs on a 2D grid)")
        if self.latent_std <= 0:
            raise ConfigError(f"{key}.latent_std={self.latent_std} must be > 0")
        names = [t.name for t in self.aux_targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.aux_targets has duplicate names {names}")


@dataclass
class GanConfig:
    weight: float = 0.0                 # 0 disables the GAN entirely
    start_step: int = 0
    discriminator: Literal["patchgan", "dino"] = "patchgan"
    disc_weights: str = ""              # DINO ViT-S/16 weights (local file) for discriminator="dino"
    adaptive_weight: bool = True
    diffaug: bool = False
    lecam_weight: float = 0.0
    disc_lr: float = 1e-4


@dataclass
class TokenizerLossConfig:
    pixel_weight: float = 1.0
    perceptual: Literal["none", "lpips", "resnet-cifar"] = "none"
    perceptual_weight: float = 1.0
    # Local weights: resnet-cifar: one safetensors file; lpips: "VGG16_FILE,LPIPS_LIN_FILE". "" = look in
    # $MAETOK_SHARED_DATA (LPIPS weights cannot be downloaded on every machine).
    perceptual_weights: str = ""
    perceptual_warmup_steps: int = 0    # linear ramp-in of the perceptual term
    kl_weight: float = 1e-6             # VAE variant only
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass
class DecoderFinetuneConfig:
    """Stage 2: encoder frozen, auxiliary decoders dropped, mask ratio annealed linearly from `start` to 0."""
    init_from: str = ""                 # stage-1 run directory or weights directory
    mask_ratio_start: float = 0.6
    anneal_steps: int = 1000            # 0: no masking at all

    def validate(self, key: str) -> None:
        if not 0.0 <= self.mask_ratio_start <= 1.0:
            raise ConfigError(f"{key}.mask_ratio_start={self.mask_ratio_start} must lie in [0, 1]")
        if self.anneal_steps < 0:
            raise ConfigError(f"{key}.anneal_steps={self.anneal_steps} must be >= 0")


# ==============================================================================================================
# Diffusion
# ==============================================================================================================
@dataclass
class SiTConfig:
    """SiT on (B, L, C) latent tokens; `variant: lightningdit` swaps in RoPE, SwiGLU, RMSNorm and qk-norm."""
    variant: Literal["sit", "lightningdit"] = "sit"
    in_channels: int = 12               # latent dim C
    num_tokens: int = 32                # latent tokens L
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10               # label `num_classes` is the null label used by CFG
    class_dropout: float = 0.1
    grad_checkpointing: bool = False

    def validate(self, key: str) -> None:
        for name in ("in_channels", "num_tokens", "hidden", "depth", "heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be a positive integer")
        if self.hidden % self.heads:
            raise ConfigError(f"{key}.hidden={self.hidden} is not divisible by {key}.heads={self.heads}")
        if self.num_classes < 0:
            raise ConfigError(f"{key}.num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"{key}.class_dropout={self.class_dropout} must lie in [0, 1)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"{key}.mlp_ratio={self.mlp_ratio} must be > 0")
        if self.variant == "lightningdit" and (self.hidden // self.heads) % 2:
            raise ConfigError(f"{key}.hidden={self.hidden} / heads={self.heads} must give an even head width "
                              f"(variant lightningdit rotates channel pairs with RoPE)")


@dataclass
class TransportConfig:
    """Flow matching with one time convention: t = 0 is data, t = 1 is noise."""
    path: Literal["linear", "cosine"] = "linear"
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    cos_loss_weight: float = 0.0        # LightningDiT velocity-direction term

    def validate(self, key: str) -> None:
        if self.lognormal_std <= 0:
            raise ConfigError(f"{key}.lognormal_std={self.lognormal_std} must be > 0")
        if self.cos_loss_weight < 0:
            raise ConfigError(f"{key}.cos_loss_weight={self.cos_loss_weight} must be >= 0")


@dataclass
class SampleConfig:
    sampler: Literal["euler", "heun", "sde"] = "heun"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    sde_t_min: float = 0.04
    seed: int = 0

    def validate(self, key: str) -> None:
        low, high = self.cfg_interval
        if not (0.0 <= low <= high <= 1.0):
            raise ConfigError(f"{key}.cfg_interval={list(self.cfg_interval)} must satisfy 0 <= low <= high <= 1")
        if self.steps < 1:
            raise ConfigError(f"{key}.steps={self.steps} must be >= 1")
        if self.sampler == "sde" and self.steps < 2:
            # One SDE step is only the deterministic last step, taken at t = 1: it returns minus the noise.
            raise ConfigError(f"{key}.steps={self.steps}: the sde sampler needs at least 2 steps")
        if self.cfg_scale < 1:
            # As the official samplers, guidance applies only above 1: a smaller scale would silently mean none.
            raise ConfigError(f"{key}.cfg_scale={self.cfg_scale} must be >= 1 (1 = no guidance; the samplers "
                              f"guide only above 1, as the official ones)")
        if not 0.0 < self.sde_t_min < 1.0:
            raise ConfigError(f"{key}.sde_t_min={self.sde_t_min} must lie in (0, 1)")
        check_seed(self.seed, f"{key}.seed")


def check_seed(seed: int, key: str) -> None:
    """Seeds are mixed with steps and ranks into generator seeds; [0, 2^32) keeps every mix in range."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key}={seed} must lie in [0, 2^32)")


# ==============================================================================================================
# Shared: data, optimisation, the training loop
# ==============================================================================================================
@dataclass
class DataConfig:
    spec: str = "shapes"                # see maetok.data.open_dataset: folder, zip:..., cifar:..., npz:..., shapes
    split: str = "train"
    image_size: int = 32
    random_flip: bool = True
    num_workers: int = 0
    strict: bool = False                # first unreadable image is an error instead of a skip
    limit: int = 0                      # use only the first N items (0 = all)
    cache_dir: str = ""                 # decoded-array cache ("" = $MAETOK_CACHE or ~/.cache/maetok)

    def validate(self, key: str) -> None:
        if not self.spec:
            raise ConfigError(f"{key}.spec must name a dataset: shapes, a folder, zip:..., cifar:... or npz:...")
        if self.image_size <= 0:
            raise ConfigError(f"{key}.image_size={self.image_size} must be a positive integer")
        if self.num_workers < 0 or self.limit < 0:
            raise ConfigError(f"{key}.num_workers and {key}.limit must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0              # 0 disables clipping

    def validate(self, key: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr={self.lr} must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{key}.betas={list(self.betas)} must lie in [0, 1)")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError(f"{key}.warmup_steps and {key}.grad_clip must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{key}.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64                # global batch, split across ranks
    seed: int = 0
    ema_decay: float = 0.999
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    log_every: int = 50
    image_every: int = 500              # PNG grids of reconstructions / samples
    ckpt_every: int = 500
    keep_last: int = 2
    max_bad_steps: int = 10             # consecutive non-finite steps before the run stops
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, key: str) -> None:
        if self.steps < 0:
            raise ConfigError(f"{key}.steps={self.steps} must be >= 0")
        if self.batch_size <= 0:
            raise ConfigError(f"{key}.batch_size={self.batch_size} must be > 0")
        check_seed(self.seed, f"{key}.seed")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{key}.ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.keep_last < 1 or self.ckpt_every < 1 or self.log_every < 1 or self.image_every < 1:
            raise ConfigError(f"{key}.keep_last, ckpt_every, log_every and image_every must be >= 1")


@dataclass
class TokenizerRunConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: Literal[1, 2] = 1
    decoder_ft: DecoderFinetuneConfig = field(default_factory=DecoderFinetuneConfig)
    stats_batches: int = 20             # batches used to measure the latent mean/std after training
    # auto: when training runs in bf16, frozen network teachers (DINOv2, SigLIP, ...) hold bf16 weights and run
    # without autocast (half the memory traffic of fp32 activations); fp32: full precision. HOG is always fp32.
    teacher_precision: Literal["auto", "fp32"] = "auto"

    def validate(self, key: str) -> None:
        if self.data.image_size != self.model.image_size:
            raise ConfigError(f"data.image_size={self.data.image_size} differs from "
                              f"model.image_size={self.model.image_size}")
        if self.stage == 2 and not self.decoder_ft.init_from:
            raise ConfigError("stage=2 (decoder fine-tuning) needs decoder_ft.init_from = a stage-1 run")


@dataclass
class DiffusionRunConfig:
    model: SiTConfig = field(default_factory=SiTConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    tokenizer: str = ""                 # tokenizer weights directory (for online encoding and sample grids)
    latents: str = ""                   # latent cache directory (from `maetok latents cache`); "" = encode online
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(ema_decay=0.9999, optim=OptimConfig(
        lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, schedule="constant")))

    def validate(self, key: str) -> None:
        if not self.latents and not self.tokenizer:
            raise ConfigError("diffusion training needs `latents` (a latent cache) or `tokenizer` (to encode online)")
        if self.model.num_classes == 0 and self.sample.cfg_scale != 1.0:
            # Found here, not when the first preview grid is sampled hundreds of steps in.
            raise ConfigError(f"sample.cfg_scale={self.sample.cfg_scale}: guidance needs a class-conditional model "
                              f"and model.num_classes=0; add sample.cfg_scale=1")


# ==============================================================================================================
# Machinery: dict <-> dataclass with type checks, YAML, dotted overrides
# ==============================================================================================================
def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_validating = True


@contextlib.contextmanager
def without_validation():
    """`from_dict` checks keys and types but skips the `validate` rules inside: for reading a config saved by an
    older version whose rules were looser (a resumed run); what is built from it is validated as usual."""
    global _validating
    before, _validating = _validating, False
    try:
        yield
    finally:
        _validating = before


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and type; validates bottom-up."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; allowed keys here: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], value, f"{key}.{name}" if key else name) for name, value in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate") and _validating:
        obj.validate(key or "config")
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}: {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}: {list(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}: {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {type(value).__name__}: {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf: no setting here means anything with them
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; people write it anyway
            try:
                parsed = float(value)
            except ValueError:
                parsed = None
            if parsed is not None and math.isfinite(parsed):
                return parsed
        raise ConfigError(f"{key} must be a number, got {type(value).__name__}: {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {type(value).__name__}: {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in a dataclass above


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.latent_tokens=64' -> (['model', 'latent_tokens'], 64). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a config section")
            node = nxt
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: cannot set a key inside a non-section")
        node[parts[-1]] = value
    return data


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or a preset name looked up under ./configs and the repository's configs/ (recursively)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for root in (Path.cwd() / "configs", CONFIG_DIR):
        for cand in (root / f"{name}.yaml", *root.glob(f"**/{name}.yaml")):
            if cand.is_file():
                return cand
    raise ConfigError(f"config {name!r} not found: give a YAML path or a preset name from {CONFIG_DIR}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)  # presets may extend another preset
    if base:
        data = _deep_merge(load_yaml(resolve_config_path(base)), data)
    return data


@dataclass(frozen=True)
class ConfigSource:
    """What `load_config` built a config from. A resumed run needs it to tell the values the user asked for
    (the overrides) from the preset's defaults, which the run's saved config replaces."""
    preset: str | None                  # the preset name or YAML path; None: defaults only
    preset_path: str | None             # the file it resolved to
    overrides: tuple[str, ...] = ()
    preset_given: bool = True           # False: the preset is a command's default, not the user's choice

    def override_keys(self) -> list[str]:
        """The dotted keys the overrides set, e.g. ["model.latent_tokens", "train.steps"]."""
        return [".".join(parse_override(o)[0]) for o in self.overrides]


_SOURCE_ATTR = "_maetok_source"


def config_source(cfg: Any) -> ConfigSource | None:
    """The `ConfigSource` of a config made by `load_config` from a preset and overrides; None otherwise."""
    return getattr(cfg, _SOURCE_ATTR, None)


def set_config_source(cfg: Any, source: ConfigSource | None) -> Any:
    if source is not None:
        object.__setattr__(cfg, _SOURCE_ATTR, source)
    return cfg


def load_config(cls: type, config: str | Path | dict | None = None, overrides: list[str] | None = None,
                default: str | None = None):
    """Defaults <- YAML preset (or dict) <- dotted overrides, then typed and validated. `default`: the preset
    used when `config` is None -- recorded as not chosen, so a resumed run keeps its own preset's values."""
    given = config is not None or default is None
    config = default if config is None else config
    data = to_dict(cls())
    path = None
    if isinstance(config, dict):
        data = _deep_merge(data, config)
    elif config:
        path = resolve_config_path(config)
        data = _deep_merge(data, load_yaml(path))
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(cls, data)
    if not isinstance(config, dict):  # a dict's keys are all "requested": no source, compared as a whole
        set_config_source(cfg, ConfigSource(str(config) if config else None, str(path.resolve()) if path else None,
                                            tuple(overrides or ()), given))
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
