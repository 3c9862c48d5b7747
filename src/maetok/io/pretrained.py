"""Model folders: `config.json` + `model.safetensors`, one implementation for both model kinds.

    save_pretrained(model, "runs/tok/model")          # a MAETok or a SiT
    tokenizer = load_tokenizer("runs/tok/model")      # ours, an official MAETok folder, or a hub id
    sit = load_sit("runs/sit/model")                  # or a hub id: load_sit("org/sit")
    model = from_pretrained("runs/sit/model")         # whichever kind the folder (or hub id) holds

The tokenizer's config.json nests its TokenizerConfig under "config"; the SiT's holds the SiTConfig at the top
level beside its transport path. Both carry "kind" and "maetok_version". Weights are read from safetensors only,
so nothing is unpickled; a loaded model is in eval mode (in train mode SiT drops labels at random and the
tokenizer masks), and the training code calls .train() itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, SiTConfig, TokenizerConfig, from_dict, to_dict
from ..diffusion.sit import SiT
from ..diffusion.transport import PATHS
from ..tokenizer.model import MAETok
from ..version import __version__
from .convert_tokenizer import ConversionReport, load_official_tokenizer, resolve_checkpoint_dir
from .files import atomic_write_bytes, save_safetensors
from .hub import load_safetensors_strict, resolve_model_folder, training_run_hint

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_KIND = "maetok-tokenizer"
SIT_KIND = "sit"


def save_pretrained(model: MAETok | SiT, out_dir: str | Path) -> Path:
    """Write config.json and model.safetensors (atomically) into `out_dir`; a tokenizer keeps its encoder and
    pixel decoder only (the auxiliary decoders are training scaffolding)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MAETok):
        kind, state = TOKENIZER_KIND, model.inference_state_dict()
        meta = {"kind": kind, "maetok_version": __version__, "config": to_dict(model.config)}
    elif isinstance(model, SiT):
        kind, state = SIT_KIND, model.state_dict()
        meta = {"kind": kind, "maetok_version": __version__, "transport_path": model.transport_path,
                **to_dict(model.config)}
    else:
        raise TypeError(f"save_pretrained takes a MAETok or a SiT, not {type(model).__name__}")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(out / CONFIG_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    save_safetensors(state, out / WEIGHTS_FILE, metadata={"format": "pt", "kind": kind})  # atomic, umask modes
    return out


def convert_official_tokenizer(src: str | Path, out: str | Path, weights: str | Path | None = None,
                               config: str | Path | None = None) -> ConversionReport:
    """The `maetok convert official-tokenizer` command: convert and save in our format."""
    model, report = load_official_tokenizer(src, weights, config)
    save_pretrained(model, out)
    return report


def from_pretrained(path_or_hub_id: str | Path, map_location: str | torch.device = "cpu") -> MAETok | SiT:
    """The model a folder or hub id holds, of whichever kind its config.json names (downloaded once)."""
    folder = resolve_checkpoint_dir(path_or_hub_id)
    if _read_meta(folder / CONFIG_FILE).get("kind") == SIT_KIND:
        return load_sit(folder, map_location)
    return load_tokenizer(folder, map_location)


def load_tokenizer(path_or_hub_id: str | Path, map_location: str | torch.device = "cpu") -> MAETok:
    """Our format, or an official MAETok checkpoint (converted on the fly), from a folder or a hub id."""
    src = resolve_checkpoint_dir(path_or_hub_id)
    meta = _read_meta(src / CONFIG_FILE)
    if meta.get("kind") == SIT_KIND:
        raise ConfigError(f"{src} holds a SiT diffusion model (kind: sit), not a tokenizer; give the folder "
                          f"of a tokenizer run's model (e.g. runs/tok/model)")
    if meta.get("kind") != TOKENIZER_KIND:
        model, _ = load_official_tokenizer(src)
        return model.to(map_location).eval()
    model = MAETok(from_dict(TokenizerConfig, meta["config"], "config.json:config"))
    load_safetensors_strict(model, src / WEIGHTS_FILE)
    return model.to(map_location).eval()


def load_sit(path_or_hub_id: str | Path, map_location: str | torch.device = "cpu") -> SiT:
    """A folder written by save_pretrained (or `maetok convert official-sit`), or a hub id of one."""
    path = resolve_model_folder(path_or_hub_id, "SiT")
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: loading a SiT needs a directory with {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} (as written by save_pretrained){training_run_hint(path)}")
    data = _read_meta(cfg_path)
    kind = data.pop("kind", None)
    if kind == TOKENIZER_KIND:
        raise ConfigError(f"{path} holds a tokenizer, not a SiT diffusion model; give the folder of a diffusion "
                          f"run's model (e.g. runs/sit/model)")
    if kind != SIT_KIND:
        raise ConfigError(f"{cfg_path}: not a maetok SiT config (expected \"kind\": \"sit\"); convert an "
                          f"official checkpoint first: maetok convert official-sit --src ... --out ...")
    data.pop("maetok_version", None)
    transport_path = data.pop("transport_path", "linear")  # folders saved before it was recorded: the default
    if transport_path not in PATHS:
        raise ConfigError(f"{cfg_path}: transport_path={transport_path!r} is not one of {list(PATHS)}")
    try:
        cfg = from_dict(SiTConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from e
    model = SiT(cfg)
    model.transport_path = transport_path
    load_safetensors_strict(model, weights_path)
    return model.to(map_location).eval()


def _read_meta(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data

