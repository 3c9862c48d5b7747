"""Finding pretrained weights: a local file first, then the hub, and a clear message when neither works; reading
them, with a one-line message naming a file that is there but cannot be read.

Nothing here unpickles arbitrary objects: weights are safetensors, plain state dicts read with
`torch.load(weights_only=True)` (the form torchvision's and the `lpips` package's files come in), or TorchScript for
the FID Inception network. Which pretrained networks exist and where they are downloaded to: `maetok.io.weights`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that are needed but cannot be found locally nor downloaded."""


class UnreadableFileError(ValueError):
    """A file that is there but cannot be read or verified as what it should be: corrupt or truncated, not the
    format its name says (a pickle renamed .safetensors), a pickle where only tensors are accepted, or weights that
    do not fit their model. The message is one line naming the file and what to do (`maetok` exits with 3)."""


def shared_data_dir() -> Path | None:
    """The read-only data folder: $MAETOK_SHARED_DATA, else data/ in $MAETOK_SHARED (the folder the tests read
    too), else ../shared/data beside the checkout. None when absent."""
    candidates = []
    if os.environ.get("MAETOK_SHARED_DATA"):
        candidates.append(Path(os.environ["MAETOK_SHARED_DATA"]))
    if os.environ.get("MAETOK_SHARED"):
        candidates.append(Path(os.environ["MAETOK_SHARED"]) / "data")
    candidates.append(Path(__file__).resolve().parents[3] / ".." / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def local_path_reason(text: str) -> str | None:
    """Why `text` must be a local path rather than a hub id `org/name`, or None when it may be a hub id. Used
    so that a mistyped local folder gets "no such folder", not a confusing download failure."""
    first = text.split("/")[0]
    if text.startswith((".", "/", "~")):
        return "it starts with '.', '/' or '~'"
    if any(sep in text for sep in (os.sep, os.altsep) if sep and sep != "/"):
        return "it contains a path separator"
    if text.count("/") != 1:
        return "a hub id has the form org/name"
    if first and Path(first).exists():
        return f"{first!r} exists here"
    return None


def find_weights(what: str, local: str | Path | None, filename: str | None = None,
                 hint: str = "") -> Path:
    """Resolve a weights file: an explicit path, else `filename` in $MAETOK_SHARED_DATA / ../shared/data."""
    if local:
        p = Path(local).expanduser()
        if p.is_file():
            return p
        raise MissingWeightsError(f"{what}: weights file {p} does not exist. {hint}".strip())
    if filename:
        d = shared_data_dir()
        if d is not None and (d / filename).is_file():
            return d / filename
    raise MissingWeightsError(
        f"{what}: no weights found (looked for {filename or 'an explicit path'} in $MAETOK_SHARED_DATA, "
        f"$MAETOK_SHARED/data and ../shared/data). {hint}".strip())


def hub_download(repo_id: str, filename: str, what: str) -> Path:
    """Download one file from the Hugging Face hub, turning offline failures into a message a person can act on."""
    try:
        from huggingface_hub import hf_hub_download  # optional dependency (maetok[teachers])
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingWeightsError(f"{what}: huggingface_hub is not installed (pip install 'maetok[teachers]'), "
                                  f"or download {repo_id}/{filename} yourself and pass its local path.") from e
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # network errors come in many types; all mean the same thing to the user
        # The library's messages run over several lines (a request id, a link): the first says what happened.
        first = (str(e).strip().splitlines() or [""])[0]
        offline = (" HF_HUB_OFFLINE is set, so only files already in the hub cache are found."
                   if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else "")
        raise MissingWeightsError(
            f"{what}: could not download {filename} from the hub repository {repo_id} ({type(e).__name__}: "
            f"{first}).{offline} On an offline machine, download it elsewhere and pass the local path instead."
        ) from e


# The weights of a model folder, in the order tried: ours (and official MAETok releases), then official releases
# that ship only a torch file.
HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_model_folder(path_or_hub_id: str | Path, what: str) -> Path:
    """The folder of a model: a local folder as it is (its loader checks the files in it), or, for a hub id
    `org/name`, the hub cache's snapshot holding its config.json and weights. A path that cannot be a hub id
    (`local_path_reason`) and does not exist is a missing folder, never a download. `what`: the model's role in
    messages ("SiT", "tokenizer")."""
    text = str(path_or_hub_id)
    p = Path(text).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"{text}: a file, not a model folder (config.json + model.safetensors)")
    why = local_path_reason(text)
    if why is not None:
        raise FileNotFoundError(f"{text}: no such folder (read as a local path: {why}; a hub id looks "
                                f"like MAETok/maetok-b-128)")
    config = hub_download(text, "config.json", f"{text}: no such folder here, and as a hub id")
    first_error = None
    for name in HUB_WEIGHTS_FILES:
        try:
            weights = hub_download(text, name, f"{what} {text}")
        except MissingWeightsError as e:  # absent from the repository (or unreachable): try the next name
            first_error = first_error or e
            continue
        if weights.parent != config.parent:  # a commit landed between the two downloads: take both from it
            return hub_download(text, "config.json", f"{what} {text}").parent
        return config.parent
    raise first_error


def training_run_hint(folder: Path) -> str:
    """"; a training run keeps its weights in FOLDER/model" when `folder` is a run folder given where its model
    folder was meant (the commonest wrong path), else ""."""
    return f"; a training run keeps its weights in {folder / 'model'}" if (folder / "model" / "config.json").is_file() \
        else ""


def file_kind(path: Path) -> str:
    """What a file's first bytes say it is, for messages about a file that failed to load as something else."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, as torch.save writes"
    # A safetensors file: the header's length in 8 bytes, then its JSON. A pickle of protocol 2 and later: the
    # PROTO opcode and the protocol.
    if head[8:9] != b"{" and head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    return "corrupt or truncated" if head else "empty"


def sha1_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def check_weights_file(path: Path, what: str, redo: str) -> None:
    """A weights file is what its name says, reading only its header (cheap): a truncated or foreign file is then
    named at start-up, with `redo` (what to do), rather than deep inside a library's loader. `what`: its role."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
            return
        except (SafetensorError, OSError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise UnreadableFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {first}; it is "
                                      f"{file_kind(path)}), {what}; {redo}") from None
    kind = file_kind(path)
    # A torch file is a zip archive (torch.save since 1.6, TorchScript) or a pickle (the format before).
    if kind not in ("a zip archive, as torch.save writes", "a Python pickle"):
        raise UnreadableFileError(f"{path}: {kind}, not a torch file, {what}; {redo}")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, raising UnreadableFileError naming the file when it is not one."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise safetensors_refusal(path, e) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a torch file holding only tensors and plain containers
    (`torch.load(weights_only=True)`, which refuses anything else); UnreadableFileError naming the file otherwise."""
    if Path(path).suffix == ".safetensors":
        return read_safetensors(path)
    try:
        with quiet_pickle_protocol():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or holding objects: each is "this file cannot be used"
        raise weights_only_refusal(path, e) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableFileError(f"{path}: not a state dict (a mapping of names to tensors) but "
                                  f"{type(state).__name__}; save just the model's state_dict()")
    return state


def safetensors_refusal(path: str | Path, error: Exception) -> UnreadableFileError:
    """The error for a .safetensors file that safetensors could not read, saying what the file is instead."""
    kind = file_kind(Path(path))
    if kind in ("corrupt or truncated", "empty"):
        return UnreadableFileError(f"{path}: not a safetensors file ({error}): it is {kind}; download or copy it "
                                   f"again")
    return UnreadableFileError(f"{path}: not a safetensors file ({error}) but {kind}, renamed without being "
                               f"converted; convert it with safetensors.torch.save_file where you trust it (maetok "
                               f"never unpickles)")


@contextlib.contextmanager
def quiet_pickle_protocol():
    """Around torch.load(weights_only=True): its warning about a pickle protocol it may not support would stand
    before the one line that says whether the file was read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def weights_only_refusal(path: str | Path, error: Exception) -> UnreadableFileError:
    """The error for a file that `torch.load(weights_only=True)` refused: one line, whatever torch's message."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, pickle.UnpicklingError):  # torch's own message is a page advising weights_only=False
        why = "it holds Python objects besides tensors and plain containers"
    else:
        why = type(error).__name__ + (f": {first_line}" if first_line else "")
    return UnreadableFileError(f"{path}: could not be read as a weights-only torch file ({why}); refusing to unpickle "
                               f"arbitrary objects: re-save just the state dict, or as safetensors")


def load_safetensors_strict(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict, naming missing/unexpected keys and shape mismatches in the error."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UnreadableFileError(f"{path}: weights are read from .safetensors files only (pickles can execute "
                                  f"code); convert it with safetensors.torch.save_file")
    state = read_safetensors(path)
    own = model.state_dict()
    # BatchNorm's step counter is bookkeeping, not weights; published files often leave it out.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UnreadableFileError(f"{path} does not match {type(model).__name__}: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}; the weights and "
                                  f"the config they are loaded with come from different models")
    model.load_state_dict({**{k: v for k, v in own.items() if k not in state}, **state}, strict=True)
