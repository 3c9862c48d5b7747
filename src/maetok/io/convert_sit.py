"""Convert an official SiT checkpoint (Hhhhhhao/continuous_tokenizer, modelling/sit.py, 1D latents) to maetok.

Our parameter names equal the official ones, so conversion is: unwrap the checkpoint, strip DDP / compile prefixes,
work out the SiTConfig, check every key and shape against a model built from it, and save with save_pretrained.

    report = convert_official_sit("path/to/official_dir_or_file", "weights/sit_xl")
    print(report)
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, SiTConfig, from_dict
from ..diffusion.sit import SiT
from ..diffusion.transport import PATHS
from ..layers import sincos_1d
from .hub import quiet_pickle_protocol, read_safetensors, weights_only_refusal
from .pretrained import save_pretrained

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Heads are invisible in the weights (qkv is hidden x 3*hidden for any head count): the SiT sizes' values.
DEFAULT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
_PREFIXES = ("module.", "_orig_mod.")


class ConversionError(ValueError):
    """An official checkpoint that does not fit the SiT it is supposed to be; the message names keys and shapes."""


@dataclass
class ConversionReport:
    source: str
    weights_file: str
    out_dir: str
    config: SiTConfig
    config_source: str
    used_ema: bool = False
    converted_keys: int = 0
    num_elements: int = 0
    unused_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        c = self.config
        lines = [f"converted {self.weights_file} -> {self.out_dir}",
                 f"  config ({self.config_source}): variant={c.variant} depth={c.depth} hidden={c.hidden} "
                 f"heads={c.heads} tokens={c.num_tokens} channels={c.in_channels} classes={c.num_classes}",
                 f"  {self.converted_keys} tensors, {self.num_elements:,} elements"
                 f"{' (EMA weights)' if self.used_ema else ''}",
                 f"  unused keys ({len(self.unused_keys)}): {self.unused_keys[:10]}"
                 f"{' ...' if len(self.unused_keys) > 10 else ''}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------------------
def load_official_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """(state dict, notes, used_ema) from a .safetensors file, or a .pt/.pth/.bin read with weights_only=True."""
    path = Path(path)
    notes: list[str] = []
    if path.suffix == ".safetensors":
        raw: Any = read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        # weights_only refuses arbitrary objects; official training checkpoints also carry `args`
        # (an argparse.Namespace), which is plain data and safe to allow.
        try:
            with torch.serialization.safe_globals([argparse.Namespace]), quiet_pickle_protocol():
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise weights_only_refusal(path, e) from e
    else:
        raise ConversionError(f"{path}: unsupported weights file type {path.suffix!r}; expected .safetensors or "
                              f"one of {list(PICKLE_SUFFIXES)}")
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a state dict (a mapping), got {type(raw).__name__}")
    used_ema = False
    if isinstance(raw.get("ema"), dict):
        also = " (the checkpoint also holds 'model'; EMA weights are the ones to sample with)" \
            if "model" in raw else ""
        raw, used_ema = raw["ema"], True
        notes.append(f"converted the 'ema' weights{also}")
    elif isinstance(raw.get("model"), dict):
        raw = raw["model"]
        notes.append("checkpoint wraps the weights in 'model' (no 'ema' entry): converted 'model'")
    elif isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
        notes.append("checkpoint wraps the weights in 'state_dict'")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a "
                                  f"state dict, or a dict with 'ema' / 'model' state dicts")
        stripped = key
        for prefix in _PREFIXES:
            stripped = stripped.removeprefix(prefix)
        state[stripped] = value
    if any(k != s for k, s in zip(raw, state)):
        notes.append(f"stripped DDP / torch.compile prefixes {list(_PREFIXES)} from the keys")
    return state, notes, used_ema


def _find_weights(src: Path, weights: str | Path | None) -> Path:
    if weights is not None:
        p = Path(weights)
        p = p if p.is_absolute() or p.exists() else src / p
        if not p.is_file():
            raise FileNotFoundError(f"weights file {p} does not exist")
        return p
    if (src / "model.safetensors").is_file():
        return src / "model.safetensors"
    for pattern in ("*.safetensors", *(f"*{s}" for s in PICKLE_SUFFIXES)):
        found = sorted(src.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ConversionError(f"{src}: several weight files {[f.name for f in found]}; pass weights=...")
    raise FileNotFoundError(f"{src}: no weights file (model.safetensors, *.safetensors or "
                            f"{', '.join('*' + s for s in PICKLE_SUFFIXES)})")


# --------------------------------------------------------------------------------------------------------------
# Working out the SiTConfig
# --------------------------------------------------------------------------------------------------------------
def config_from_official_kwargs(kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """SiTConfig fields from the official SiT constructor kwargs (`constructor_kwargs` of a fixture config.json)."""
    extra = extra or {}

    def get(name: str, default: Any = None) -> Any:
        return kwargs.get(name, extra.get(name, default))

    if get("patch_size", 1) != 1 or not get("vae_1d", True):
        raise ConversionError(f"official SiT with patch_size={get('patch_size')} vae_1d={get('vae_1d')}: only the "
                              f"1D-token SiT (patch_size 1, vae_1d true) is supported")
    hidden = get("hidden_size")
    if get("decoder_hidden_size", hidden) != hidden:
        raise ConversionError(f"official decoder_hidden_size={get('decoder_hidden_size')} differs from "
                              f"hidden_size={hidden}; this SiT has a single width")
    if get("qk_norm", False):
        raise ConversionError("official SiT built with qk_norm=True is not supported by variant 'sit'")
    out = {"variant": "sit", "depth": get("depth"), "hidden": hidden, "heads": get("num_heads"),
           "in_channels": get("in_channels"), "num_tokens": get("input_size"), "num_classes": get("num_classes"),
           "mlp_ratio": get("mlp_ratio", 4.0), "class_dropout": get("class_dropout_prob", 0.1)}
    return {k: v for k, v in out.items() if v is not None}


def _read_config(config: Any) -> tuple[dict[str, Any], str]:
    """Partial SiTConfig fields from a SiTConfig, a dict or a config.json path (ours or fixture-style)."""
    if config is None:
        return {}, "inferred from shapes"
    if isinstance(config, SiTConfig):
        return dict(vars(config)), "given SiTConfig"
    where = "given dict"
    if isinstance(config, (str, Path)):
        where = str(config)
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConversionError(f"{where}: cannot read config JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{where}: config must be a JSON object, got {type(config).__name__}")
    if config.get("kind") == "sit":  # transport_path is not a SiTConfig field: the converted model keeps it
        return {k: v for k, v in config.items() if k not in ("kind", "maetok_version")}, where
    if "constructor_kwargs" in config:
        return config_from_official_kwargs(config["constructor_kwargs"], config), f"{where} constructor_kwargs"
    if "hidden_size" in config:
        return config_from_official_kwargs(config), f"{where} (official kwargs)"
    raise ConversionError(f"{where}: not a recognised SiT config (expected maetok's 'kind': 'sit', official "
                          f"'constructor_kwargs', or official kwargs such as 'hidden_size')")


def infer_config_from_shapes(shapes: dict[str, tuple[int, ...]], heads: int | None = None,
                             class_dropout: float = 0.1) -> dict[str, Any]:
    """SiTConfig fields read off official tensor shapes. Heads cannot be seen: `heads` or DEFAULT_HEADS[hidden]."""
    for required in ("x_embedder.weight", "pos_embed", "final_layer.linear.weight"):
        if required not in shapes:
            hint = " (a LightningDiT or 2D-patch checkpoint?)" if required == "pos_embed" else ""
            raise ConversionError(f"cannot infer the SiT sizes: key {required!r} is missing{hint}; "
                                  f"keys start with {sorted(shapes)[:6]}")
    if any(k.startswith("x_embedder.proj.") for k in shapes) or len(shapes["x_embedder.weight"]) != 2:
        raise ConversionError(f"x_embedder.weight has shape {list(shapes['x_embedder.weight'])}: only the 1D "
                              f"token SiT (a Linear x_embedder, vae_1d=True) is supported")
    hidden, in_channels = shapes["x_embedder.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ConversionError("no blocks.<i>.* keys: not a SiT state dict")
    if heads is None:
        if hidden not in DEFAULT_HEADS:
            raise ConversionError(f"hidden={hidden}: the number of heads cannot be read from the weights and has no "
                                  f"default for this width; give a config with num_heads / heads")
        heads = DEFAULT_HEADS[hidden]
    table = shapes.get("y_embedder.embedding_table.weight")
    fc1 = shapes.get("blocks.0.mlp.fc1.weight", (4 * hidden, hidden))
    return {"variant": "sit", "depth": max(blocks) + 1, "hidden": hidden, "heads": heads,
            "in_channels": in_channels, "num_tokens": shapes["pos_embed"][1],
            "num_classes": table[0] - 1 if table else 0, "mlp_ratio": fc1[0] / hidden,
            "class_dropout": class_dropout}


def _resolve_config(shapes: dict[str, tuple[int, ...]], config: Any) -> tuple[SiTConfig, str, list[str], str]:
    """The SiTConfig, where it came from, notes on what was assumed rather than read, and the transport path."""
    given, source = _read_config(config)
    transport_path = given.pop("transport_path", "linear")  # official SiT checkpoints: the linear path
    inferred = infer_config_from_shapes(shapes, heads=given.get("heads"),
                                        class_dropout=given.get("class_dropout", 0.1))
    fields = {**inferred, **given} if given else inferred
    try:
        cfg = from_dict(SiTConfig, fields)
    except ConfigError as e:
        raise ConversionError(f"config ({source}) is not a valid SiTConfig: {e}") from e
    notes = []
    if "num_classes" not in given and cfg.num_classes:
        # A table without a null row (trained without label dropout) has the same shape as one of a model with
        # one class fewer: only the config can tell them apart, and guidance would use a real class as "null".
        notes.append(f"num_classes={cfg.num_classes} read off the label table's {cfg.num_classes + 1} rows, taking "
                     f"the last as the null (guidance) label; if the checkpoint was trained without label dropout, "
                     f"it has no null row: give num_classes in the config")
    if transport_path not in PATHS:
        raise ConversionError(f"config ({source}): transport_path={transport_path!r} is not one of {list(PATHS)}")
    return cfg, source, notes, transport_path


# --------------------------------------------------------------------------------------------------------------
# Checking and converting
# --------------------------------------------------------------------------------------------------------------
def build_meta(cfg: SiTConfig) -> SiT:
    """The model with shapes but no storage: free to build even at SiT-XL size."""
    with torch.device("meta"):
        return SiT(cfg)


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str,
                 cfg: SiTConfig, allow_unused: bool = True) -> list[str]:
    """Raise ConversionError naming every missing key and wrong shape; return the unused keys."""
    missing = [k for k in expected if k not in found]
    unused = [k for k in found if k not in expected]
    wrong = [f"{k}: expected {list(expected[k])}, found {list(found[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or wrong or (unused and not allow_unused):
        if cfg.num_classes and "y_embedder.embedding_table.weight" in found and \
                found["y_embedder.embedding_table.weight"][0] == cfg.num_classes:
            wrong.append(f"(the label table has {cfg.num_classes} rows, no null row: a checkpoint trained without "
                         f"label dropout cannot do classifier-free guidance and is not supported)")
        raise ConversionError(
            f"{source} does not match SiT(depth={cfg.depth}, hidden={cfg.hidden}, heads={cfg.heads}, "
            f"tokens={cfg.num_tokens}, channels={cfg.in_channels}, classes={cfg.num_classes}, "
            f"mlp_ratio={cfg.mlp_ratio}):\n  missing keys ({len(missing)}): {missing[:12]}\n"
            f"  wrong shapes ({len(wrong)}): {wrong[:12]}\n  unused keys ({len(unused)}): {unused[:12]}")
    return unused


def convert_official_sit(src_dir_or_file: str | Path, out_dir: str | Path, weights: str | Path | None = None,
                         config: Any = None) -> ConversionReport:
    """Convert an official SiT checkpoint into a maetok weights directory (config.json + model.safetensors).

    src_dir_or_file: a directory (weights found inside; its config.json is read when `config` is None) or a
    weights file. config: None, a SiTConfig, a dict, or a JSON path (maetok's or fixture-style with
    `constructor_kwargs`). Sizes missing from the config are read off the tensor shapes.
    """
    src = Path(src_dir_or_file)
    if src.is_dir():
        weights_path = _find_weights(src, weights)
        if config is None and (src / "config.json").is_file():
            config = src / "config.json"
    elif src.is_file():
        weights_path = src
    else:
        raise FileNotFoundError(f"{src} does not exist")
    state, notes, used_ema = load_official_state_dict(weights_path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cfg, config_source, assumed, transport_path = _resolve_config(shapes, config)
    notes += assumed
    expected = {k: tuple(v.shape) for k, v in build_meta(cfg).state_dict().items()}
    unused = check_shapes(expected, shapes, str(weights_path), cfg)

    dtypes = sorted({str(state[k].dtype) for k in expected})
    if dtypes != ["torch.float32"]:
        notes.append(f"source tensors are {dtypes}; saved as float32")
    if "pos_embed" in expected:
        formula = sincos_1d(cfg.num_tokens, cfg.hidden)[None]
        diff = (state["pos_embed"].float() - formula).abs().max().item()
        if diff > 0:
            notes.append(f"pos_embed differs from the sin-cos formula by up to {diff:.3g}; kept the stored table")

    model = SiT(cfg)
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    model.transport_path = transport_path
    save_pretrained(model, out_dir)
    return ConversionReport(source=str(src), weights_file=str(weights_path), out_dir=str(out_dir), config=cfg,
                            config_source=config_source, used_ema=used_ema, converted_keys=len(expected),
                            num_elements=sum(state[k].numel() for k in expected), unused_keys=unused, notes=notes)


def read_key_list(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parse a reference key list: 'key<TAB>[d0, d1, ...]<TAB>dtype' per line, '#' comments."""
    shapes: dict[str, tuple[int, ...]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            shapes[parts[0]] = tuple(json.loads(parts[1]))
        except (IndexError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}:{n}: expected 'key<TAB>[shape]<TAB>dtype', got {line!r}") from e
    return shapes


def build_from_key_list(path: str | Path, heads: int | None = None) -> SiT:
    """A meta-device SiT inferred from an official key list, checked to have exactly those keys and shapes."""
    shapes = read_key_list(path)
    cfg = from_dict(SiTConfig, infer_config_from_shapes(shapes, heads=heads))
    model = build_meta(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(expected, shapes, str(path), cfg, allow_unused=False)
    return model
