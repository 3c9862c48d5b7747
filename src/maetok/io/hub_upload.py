"""Publishing a model folder on the Hugging Face hub, with a model card that says what it is and how to load it.

    from maetok import push_to_hub, load_tokenizer, load_sit
    push_to_hub("runs/tok/model", "org/maetok-cifar", metrics="runs/pilot/report.json")   # a folder, or
    push_to_hub(sit_model, "org/sit-cifar", private=True)                                 # a MAETok / SiT
    tokenizer = load_tokenizer("org/maetok-cifar")         # anyone, afterwards
    sit = load_sit("org/sit-cifar")

    maetok push --model runs/tok/model --repo org/maetok-cifar [--private] [--metrics report.json]

The repository gets the save_pretrained files (config.json, model.safetensors) and a README.md model card: YAML
front matter (library_name: maetok, tags, license), the config, the metrics given and the lines that load it.
A folder is loaded before anything is sent, so that only a folder maetok can read back is published. The token:
`token`, else the one huggingface_hub finds ($HF_TOKEN, `hf auth login`). Every failure is one HubUploadError line.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open

from ..config import ConfigError
from ..diffusion.sit import SiT
from ..tokenizer.model import MAETok
from ..version import __version__
from .pretrained import CONFIG_FILE, SIT_KIND, TOKENIZER_KIND, WEIGHTS_FILE, from_pretrained, save_pretrained

MODEL_CARD_FILE = "README.md"
HUB_URL = "https://huggingface.co"


class HubUploadError(RuntimeError):
    """A push to the Hugging Face hub that cannot be done: no token, offline, refused by the hub, or
    huggingface_hub missing. The message is one line saying what to do (`maetok` exits with 2)."""


def push_to_hub(model_or_folder: MAETok | SiT | str | Path, repo_id: str, *, private: bool = False,
                token: str | None = None, commit_message: str = "Upload maetok model",
                metrics: Mapping | str | Path | None = None, license: str = "other") -> str:
    """Upload a MAETok or SiT (or the folder save_pretrained wrote) to the hub repository `repo_id` (org/name,
    made if missing; `private` applies only to a repository made here), with a model card. `metrics`: a mapping
    or a JSON file of numbers (e.g. a pilot's report.json) for the card. Returns the repository's URL."""
    check_repo_id(repo_id)
    metrics = read_metrics(metrics)
    api, token = _hub_client(token, repo_id)
    with tempfile.TemporaryDirectory(prefix="maetok-push-") as tmp:
        staged = Path(tmp)
        stage_model_folder(model_or_folder, staged)
        meta = json.loads((staged / CONFIG_FILE).read_text())
        card = model_card(meta, repo_id, weights_parameters(staged / WEIGHTS_FILE), metrics, license)
        (staged / MODEL_CARD_FILE).write_text(card)
        try:
            url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=staged, commit_message=commit_message, token=token)
        except Exception as e:  # the hub's errors come in many types (HTTP, offline, validation); one line each
            raise hub_refusal(e, repo_id) from e
    return str(url or f"{HUB_URL}/{repo_id}")


def check_repo_id(repo_id: str) -> None:
    """org/name, the form `load_tokenizer` / `load_sit` read as a hub id (a bare name would be a local path)."""
    org, _, name = str(repo_id).partition("/")
    if not org or not name or "/" in name or repo_id.startswith((".", "~")):
        raise HubUploadError(f"repository {repo_id!r}: give it as org/name (your user name or an organisation, "
                             f"then the model's name), e.g. MAETok/maetok-b-128")


def _hub_client(token: str | None, repo_id: str):
    """(HfApi, token), refused before any model is saved when there is no token to write with."""
    try:
        from huggingface_hub import HfApi, get_token  # optional dependency (maetok[teachers])
    except ImportError:  # depends on the install
        raise HubUploadError("pushing to the hub needs huggingface_hub: pip install 'maetok[teachers]'") from None
    token = token or get_token()
    if not token:
        raise HubUploadError(f"no Hugging Face token to push {repo_id} with: run `hf auth login`, set HF_TOKEN, "
                             f"or pass --token (a token with write access)")
    return HfApi(token=token), token


def hub_refusal(error: Exception, repo_id: str) -> HubUploadError:
    """The one line for a failed create_repo / upload_folder, with what to do about its kind of failure."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, ConnectionError) or type(error).__name__ == "OfflineModeIsEnabled":
        todo = "the hub cannot be reached from here (offline, or HF_HUB_OFFLINE is set); push from a machine online"
    elif status in (401, 403):
        todo = f"the token may not write to {repo_id}: use a token with write access to that user or organisation"
    else:
        todo = "check the repository name and your connection, then push again"
    return HubUploadError(f"pushing to the hub repository {repo_id} failed ({type(error).__name__}: {first}); "
                          f"{todo}")


def stage_model_folder(model_or_folder: MAETok | SiT | str | Path, staged: Path) -> None:
    """config.json and model.safetensors in `staged`: a model saved there, or a folder's files once it loads."""
    if isinstance(model_or_folder, (MAETok, SiT)):
        save_pretrained(model_or_folder, staged)
        return
    if not isinstance(model_or_folder, (str, Path)):
        raise TypeError(f"push_to_hub takes a MAETok, a SiT or a model folder, not {type(model_or_folder).__name__}")
    folder = Path(model_or_folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder (push takes a local folder written by "
                                f"save_pretrained, e.g. runs/tok/model)")
    from_pretrained(folder)  # what is published must load back: a corrupt or mismatched file stops here
    kind = json.loads((folder / CONFIG_FILE).read_text()).get("kind")  # valid JSON: it just loaded
    if kind not in (TOKENIZER_KIND, SIT_KIND) or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{folder}: an official checkpoint, not a maetok model folder; convert it first "
                          f"(maetok convert official-tokenizer --src {folder} --out DIR) and push DIR")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        _link_or_copy(folder / name, staged / name)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (weights can be gigabytes), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def weights_parameters(path: Path) -> int:
    """The number of values in a safetensors file, read from its header (no tensor is loaded)."""
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def read_metrics(metrics: Mapping | str | Path | None) -> dict | None:
    """Metrics for the card: a mapping, or a JSON file holding an object (a pilot's report.json)."""
    if metrics is None or isinstance(metrics, Mapping):
        return None if metrics is None else dict(metrics)
    path = Path(metrics).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist (give a JSON file, e.g. a pilot's report.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"metrics file {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"metrics file {path}: expected a JSON object of metric names and values, got "
                          f"{type(data).__name__}")
    return data


# ==============================================================================================================
# The model card
# ==============================================================================================================
def model_card(meta: dict, repo_id: str, parameters: int, metrics: dict | None, license: str = "other") -> str:
    """README.md for the hub: front matter, what the model is, its config, the metrics given, how to load it."""
    sit = meta.get("kind") == SIT_KIND
    tags = ["maetok", "diffusion", "sit", "latent-diffusion"] if sit else \
        ["maetok", "maetok/image-tokenizer", "image-tokenizer", "autoencoder"]
    front = ["---", "library_name: maetok", f"license: {json.dumps(license)}", "tags:",
             *(f"- {json.dumps(tag)}" for tag in tags), "---", ""]
    name = repo_id.split("/", 1)[1]
    facts = sit_facts(meta) if sit else tokenizer_facts(meta)
    lines = [*front, f"# {name}", "", what_it_is(meta), "",
             "## Config", "", "| setting | value |", "|---|---|",
             *(f"| {_cell(k)} | {_cell(v)} |" for k, v in [*facts, ("parameters", f"{parameters:,}")]), "",
             f"The full `{CONFIG_FILE}`:", "", "```json", json.dumps(meta, indent=2), "```", ""]
    if metrics:
        lines += ["## Metrics", "", *metrics_tables(metrics)]
    lines += usage(repo_id, sit, meta)
    return "\n".join(lines) + "\n"


def what_it_is(meta: dict) -> str:
    version = meta.get("maetok_version", __version__)
    if meta.get("kind") == SIT_KIND:
        cond = (f"class-conditional ({meta.get('num_classes')} classes, classifier-free guidance)"
                if meta.get("num_classes") else "unconditional")
        return (f"A {meta.get('variant', 'sit')} latent diffusion model (flow matching, "
                f"{meta.get('transport_path', 'linear')} path), {cond}, made with maetok {version}. It generates "
                f"{meta.get('num_tokens')} latent tokens of {meta.get('in_channels')} channels; a maetok tokenizer "
                f"with that latent shape decodes them into images.")
    cfg = meta.get("config", {})
    return (f"A {cfg.get('variant', 'maetok')} image tokenizer (a ViT encoder and pixel decoder) made with maetok "
            f"{version}: it encodes a {cfg.get('image_size')}x{cfg.get('image_size')} image into "
            f"{cfg.get('latent_tokens')} latent tokens of {cfg.get('latent_dim')} channels, for latent diffusion "
            f"models such as SiT.")


def tokenizer_facts(meta: dict) -> list[tuple[str, object]]:
    cfg = meta.get("config", {})
    return [("kind", "image tokenizer"), ("variant", cfg.get("variant")),
            ("image size", f"{cfg.get('image_size')} (patch {cfg.get('patch_size')})"),
            ("latent tokens", cfg.get("latent_tokens")), ("latent channels", cfg.get("latent_dim")),
            ("encoder width / depth / heads", f"{cfg.get('enc_width')} / {cfg.get('enc_depth')} / "
                                              f"{cfg.get('enc_heads')}"),
            ("decoder width / depth / heads", f"{cfg.get('dec_width')} / {cfg.get('dec_depth')} / "
                                              f"{cfg.get('dec_heads')}")]


def sit_facts(meta: dict) -> list[tuple[str, object]]:
    return [("kind", "diffusion model"), ("variant", meta.get("variant")),
            ("latent tokens", meta.get("num_tokens")), ("latent channels", meta.get("in_channels")),
            ("width / depth / heads", f"{meta.get('hidden')} / {meta.get('depth')} / {meta.get('heads')}"),
            ("classes", meta.get("num_classes") or "none (unconditional)"),
            ("transport path", meta.get("transport_path", "linear"))]


def metrics_tables(metrics: dict) -> list[str]:
    """One table of the top-level values, then one per nested object (a pilot report's variants, settings)."""
    flat = [(k, v) for k, v in metrics.items() if not isinstance(v, Mapping)]
    lines = _table(flat) if flat else []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            lines += [f"### {_cell(key)}", "", *_table(_flatten(value))]
    return lines


def _flatten(values: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| metric | value |", "|---|---|", *(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows), ""]


def _cell(value: object) -> str:
    """A table cell: numbers to 4 significant digits, and no character that would end the cell or the row."""
    if isinstance(value, float):  # 4 significant digits, without an exponent for large values (wall seconds)
        text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def usage(repo_id: str, sit: bool, meta: dict) -> list[str]:
    """How to load it, in Python and on the command line (`pip install maetok[teachers]` brings the hub client)."""
    load, variable = ("load_sit", "sit") if sit else ("load_tokenizer", "tokenizer")
    if sit:
        sample = f"maetok sample --model {repo_id} --tokenizer ORG/TOKENIZER --num-samples 64 --out samples"
        pairing = (f"`ORG/TOKENIZER`: a maetok tokenizer with {meta.get('num_tokens')} latent tokens of "
                   f"{meta.get('in_channels')} channels, the one whose latents this model was trained on.")
    else:
        sample = f"maetok sample --model ORG/SIT --tokenizer {repo_id} --num-samples 64 --out samples"
        pairing = "`ORG/SIT`: a maetok SiT trained on this tokenizer's latents."
    lines = ["## Usage", "", "```bash", "pip install 'maetok[teachers]'   # maetok and the hub client", "```", "",
             "```python", "import maetok", "", f"{variable} = maetok.{load}({json.dumps(repo_id)})",
             f"model = maetok.from_pretrained({json.dumps(repo_id)})   # the same, whichever kind", "```", "",
             "Sampling images on the command line:", "", "```bash", sample, "```", "", pairing, ""]
    if not sit:
        lines += ["Reconstructing images:", "", "```bash",
                  f"maetok tokenizer reconstruct --model {repo_id} --images DATA --out recon", "```", ""]
    return lines
