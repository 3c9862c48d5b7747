"""The auxiliary-target registry: shapes, freezing, custom targets, weights errors and the masked loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maetok.config import AuxTargetConfig, ConfigError
from maetok.io.hub import MissingWeightsError
from maetok.tokenizer import targets as T
from maetok.tokenizer.targets import TARGETS, Target, build_target, register_target, target_loss

TINY_VIT = {"depth": 1, "embed_dim": 64, "num_heads": 2}  # keeps the timm teachers fast on CPU


def build(name: str, image_size: int = 32, patch_size: int = 4, **options) -> Target:
    return build_target(AuxTargetConfig(name, options=options), image_size, patch_size)


def test_registry_lists_the_built_in_targets():
    assert {"hog", "sobel", "resnet-cifar", "dinov2", "siglip", "timm"} <= set(TARGETS)


@pytest.mark.parametrize("name,options,dim,loss", [
    ("hog", {}, 108, "mse"),
    ("sobel", {}, 3, "mse"),
    ("resnet-cifar", {"pretrained": False, "arch": "resnet20"}, 64, "cosine"),
    ("resnet-cifar", {"pretrained": False, "arch": "resnet20", "layer": "layer1"}, 16, "cosine"),
    ("resnet-cifar", {"pretrained": False, "arch": "resnet20", "layer": "layer2", "resample": "bilinear"}, 32,
     "cosine"),
    ("dinov2", {"pretrained": False, "model": "vit_small_patch14_dinov2", "model_kwargs": {"depth": 1}}, 384,
     "cosine"),
    ("dinov2", {"pretrained": False, "model": "vit_small_patch14_dinov2", "layer": 0, "model_kwargs": TINY_VIT},
     64, "cosine"),
    ("siglip", {"pretrained": False, "model_kwargs": TINY_VIT}, 64, "cosine"),
    ("timm", {"pretrained": False, "model": "vit_tiny_patch16_224", "layer": -1, "norm": True,
              "model_kwargs": {"depth": 2}}, 192, "cosine"),
])
def test_each_target_gives_one_frozen_feature_per_patch(name, options, dim, loss):
    target = build(name, **options)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = target(images, 4)
    assert out.shape == (2, 64, dim) and target.dim == dim and target.loss == loss
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in target.parameters())
    target.train()
    assert not target.training and not any(m.training for m in target.modules())


def test_timm_teacher_has_one_token_per_tokenizer_patch_and_drops_prefix_tokens():
    target = build("dinov2", 64, 8, pretrained=False, model="vit_small_patch14_dinov2", model_kwargs=TINY_VIT)
    assert target.model.num_prefix_tokens == 1
    assert target.model.patch_embed.proj.kernel_size == (8, 8)
    assert target(torch.zeros(1, 3, 64, 64), 8).shape == (1, 64, 64)


def test_timm_teacher_patch_embedding_runs_as_a_matmul_with_the_same_features():
    from maetok.layers import PatchConv2d

    target = build("dinov2", 32, 8, pretrained=False, model="vit_small_patch14_dinov2", model_kwargs=TINY_VIT)
    proj = target.model.patch_embed.proj
    assert isinstance(proj, PatchConv2d)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    proj.forward = proj.as_matmul  # what CUDA runs
    fast = target(images, 8)
    target.model.patch_embed.proj = torch.nn.Conv2d(3, 64, 8, 8)  # the convolution timm built, same weights
    target.model.patch_embed.proj.load_state_dict(proj.state_dict())
    torch.testing.assert_close(fast, target(images, 8), rtol=1e-4, atol=1e-5)


def test_timm_teacher_loads_a_local_safetensors_file_and_resamples_the_patch_embedding(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    source = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **TINY_VIT)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    target = build("dinov2", pretrained=True, model="vit_small_patch14_dinov2",
                   weights=str(tmp_path / "model.safetensors"), model_kwargs=TINY_VIT)
    assert target.model.patch_embed.proj.weight.shape[-2:] == (4, 4)
    # Weights that do not depend on the patch geometry arrive unchanged.
    assert torch.equal(target.model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert target(torch.rand(1, 3, 32, 32) * 2 - 1, 4).shape == (1, 64, 64)


def test_resnet_cifar_resamples_any_stage_to_the_patch_grid():
    fine = build("resnet-cifar", 32, 2, pretrained=False, arch="resnet20")   # 8x8 layer3 map -> 16x16 grid
    coarse = build("resnet-cifar", 64, 16, pretrained=False, arch="resnet20", layer="layer1")  # 64x64 -> 4x4
    assert fine(torch.rand(1, 3, 32, 32) * 2 - 1, 2).shape == (1, 256, 64)
    assert coarse(torch.rand(1, 3, 64, 64) * 2 - 1, 16).shape == (1, 16, 16)


def test_resnet_cifar_loads_the_shared_pretrained_network(shared_dir):
    if not (shared_dir / "data" / "cifar10-resnet20.safetensors").is_file():
        pytest.skip("shared ResNet-20 weights absent")
    target = build("resnet-cifar", arch="resnet20", weights=str(shared_dir / "data" / "cifar10-resnet20.safetensors"))
    out = target(torch.rand(2, 3, 32, 32) * 2 - 1, 4)
    assert out.shape == (2, 64, 64) and torch.isfinite(out).all()


def test_feature_maps_become_row_major_tokens():
    fmap = torch.arange(12.0).view(1, 1, 3, 4)
    tokens = T.feature_map_to_tokens(fmap, (3, 4))
    assert tokens[0, :, 0].tolist() == list(range(12))
    pooled = T.feature_map_to_tokens(torch.arange(16.0).view(1, 1, 4, 4), (2, 2))
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_a_user_registered_target_works_end_to_end():
    @register_target("test-patch-colour")
    def _patch_colour(options, image_size, patch_size):
        class PatchColour(Target):
            name, dim, loss = "test-patch-colour", 3, "mse"

            def forward(self, images, patch_size):
                return F.avg_pool2d(images, patch_size).flatten(2).transpose(1, 2)
        return PatchColour()

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_target("test-patch-colour")(_patch_colour)
        target = build_target(AuxTargetConfig("test-patch-colour"), 32, 8)
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        feats = target(images, 8)
        assert feats.shape == (2, 16, 3)
        assert torch.allclose(feats[1, 5], images[1, :, 8:16, 8:16].mean(dim=(1, 2)))
        pred = torch.zeros(2, 16, 3, requires_grad=True)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[:, :4] = True
        target_loss(pred, feats, target.loss, mask).backward()
        assert pred.grad[:, 4:].abs().sum() == 0 and pred.grad[:, :4].abs().sum() > 0
    finally:
        TARGETS.pop("test-patch-colour")


def test_factories_must_return_a_target():
    register_target("test-not-a-target")(lambda options, image_size, patch_size: torch.nn.Identity())
    try:
        with pytest.raises(TypeError, match="not a maetok"):
            build_target(AuxTargetConfig("test-not-a-target"), 32, 4)
    finally:
        TARGETS.pop("test-not-a-target")


def test_unknown_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="registered targets"):
        build("dino-v9")
    with pytest.raises(ConfigError, match="allowed options"):
        build("hog", cells=4)
    with pytest.raises(ConfigError, match="options.model"):
        build("timm", pretrained=False)
    with pytest.raises(ConfigError, match="layer"):
        build("resnet-cifar", pretrained=False, layer="layer9")
    with pytest.raises(ConfigError, match="out of range"):
        build("dinov2", pretrained=False, model="vit_small_patch14_dinov2", layer=5, model_kwargs=TINY_VIT)


def test_missing_resnet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="does not exist") as info:
        build("resnet-cifar", weights=str(tmp_path / "absent.safetensors"))
    assert "absent.safetensors" in str(info.value)
    monkeypatch.setenv("MAETOK_SHARED_DATA", str(tmp_path))  # an empty shared folder
    with pytest.raises(MissingWeightsError) as info:
        build("resnet-cifar", arch="resnet20")
    message = str(info.value)
    assert "cifar10-resnet20.safetensors" in message and "MAETOK_SHARED_DATA" in message
    assert "pretrained=false" in message


def test_missing_timm_weights_say_what_to_download(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build("dinov2", weights=str(tmp_path / "dinov2.safetensors"))
    (tmp_path / "dinov2.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        build("dinov2", weights=str(tmp_path / "dinov2.pth"))

    huggingface_hub = pytest.importorskip("huggingface_hub")
    constants = pytest.importorskip("huggingface_hub.constants")

    def offline(*args, **kwargs):  # what an offline hub looks like, without waiting out its retries
        raise OSError("we cannot find the requested files in the local cache")

    # The weights registry downloads into the Hugging Face cache (an empty one here); timm is never asked to.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built without weights"))
    with pytest.raises(MissingWeightsError) as info:
        build("siglip")
    message = str(info.value)
    assert "vit_so400m_patch14_siglip_gap_224" in message and "maetok weights fetch --name siglip-so400m" in message
    assert "model.safetensors" in message and "options.weights" in message and "pretrained=false" in message
    # The command-line form the message suggests is one the config system accepts.
    import re

    from maetok.config import TokenizerRunConfig, load_config

    suggested = re.search(r"'(model\.aux_targets=.*?)'", message).group(1)
    cfg = load_config(TokenizerRunConfig, "cpu-32", [suggested])
    assert cfg.model.aux_targets[1].name == "siglip"
    assert cfg.model.aux_targets[1].options == {"weights": "/path/to/model.safetensors"}


def test_shared_folder_variable_serves_the_library_too(tmp_path, monkeypatch):
    # $MAETOK_SHARED (the folder the tests read) also locates pretrained files, in its data/ folder.
    from maetok.io.hub import shared_data_dir

    (tmp_path / "data").mkdir()
    monkeypatch.delenv("MAETOK_SHARED_DATA", raising=False)
    monkeypatch.setenv("MAETOK_SHARED", str(tmp_path))
    assert shared_data_dir() == (tmp_path / "data").resolve()


def test_target_loss_counts_masked_patches_only():
    target = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    pred = target.clone()
    pred[~mask] += 10.0                           # wrong only where the loss must not look
    assert target_loss(pred, target, "mse", mask).item() == 0.0
    assert target_loss(pred, target, "mse").item() > 0

    pred = target.clone()
    pred[mask] += 1.0                             # off by one in every feature of each masked patch
    assert target_loss(pred, target, "mse", mask).item() == pytest.approx(1.0)
    per_patch = ((pred - target) ** 2).mean(-1)
    assert target_loss(pred, target, "mse", mask).item() == pytest.approx(per_patch[mask].mean().item())


def test_cosine_loss_and_edge_cases():
    target = torch.randn(2, 4, 8)
    assert target_loss(2.5 * target, target, "cosine").item() == pytest.approx(-1.0, abs=1e-6)
    assert target_loss(-target, target, "cosine").item() == pytest.approx(1.0, abs=1e-6)
    pred = torch.randn(2, 4, 8, requires_grad=True)
    empty = target_loss(pred, target, "cosine", torch.zeros(2, 4, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and pred.grad.abs().sum() == 0
    assert target_loss(target.bfloat16(), target, "mse").dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        target_loss(torch.zeros(2, 4, 7), target, "mse")
    with pytest.raises(ValueError, match="mask"):
        target_loss(target, target, "mse", torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="choose one of"):
        target_loss(target, target, "l1")
