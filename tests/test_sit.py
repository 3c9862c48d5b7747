"""SiT / LightningDiT model: construction, zero-init, input checks, files, variants, checkpointing."""
from __future__ import annotations

import json

import pytest
import torch

from maetok.config import ConfigError, DiffusionRunConfig, SampleConfig
from maetok.diffusion import SIT_SIZES, SiT, SiT_tiny, sit_config
from maetok.diffusion.samplers import sample
from maetok.io.convert_sit import build_meta
from maetok.io.pretrained import load_sit, save_pretrained
from maetok.train.diffusion_task import DiffusionTask


def _model(**overrides) -> SiT:
    cfg = dict(in_channels=4, num_tokens=8, num_classes=3)
    return SiT(sit_config("tiny", **{**cfg, **overrides}))


def _randomize(model: SiT, seed: int = 0) -> SiT:
    """Perturb every parameter, so that zero-initialised paths matter (as the official fixtures do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _inputs(b: int = 2, labels=(0, 3)):
    return torch.randn(b, 8, 4), torch.rand(b), torch.tensor(labels[:b])


def test_fresh_model_outputs_zero_and_shape_of_x():
    model = _model()
    x, t, y = _inputs()
    v = model(x, t, y)
    assert isinstance(v, torch.Tensor) and v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(x))  # adaLN-Zero: final linear and every modulation start at 0
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()


@pytest.mark.parametrize("size,depth,hidden,heads,params_m", [
    ("S", 12, 384, 6, 33.0), ("B", 12, 768, 12, 130.5), ("L", 24, 1024, 16, 458.0), ("XL", 28, 1152, 16, 675.0)])
def test_size_registry(size, depth, hidden, heads, params_m):
    cfg = sit_config(size, in_channels=32, num_tokens=128, num_classes=1000)
    assert (cfg.depth, cfg.hidden, cfg.heads) == (depth, hidden, heads)
    model = build_meta(cfg)
    n = sum(v.numel() for v in model.state_dict().values())
    assert abs(n / 1e6 - params_m) < 0.5, n


def test_size_errors():
    with pytest.raises(ConfigError, match="unknown SiT size"):
        sit_config("XXL")
    with pytest.raises(ConfigError, match="heads"):
        sit_config("tiny", heads=5)
    with pytest.raises(ConfigError, match="even head width"):
        sit_config("tiny", hidden=60, heads=4, variant="lightningdit")  # head width 15
    assert set(SIT_SIZES) >= {"S", "B", "L", "XL", "tiny", "mini"}


def test_input_errors_are_clear():
    model = _model()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match=r"\(B, 8, 4\).*got \(2, 4, 8\)"):
        model(x.transpose(1, 2), t, y)
    with pytest.raises(ValueError, match=r"t as a float tensor of shape \(2,\).*\(2, 1\)"):
        model(x, t[:, None], y)
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\); got \(2,\) torch.float32"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, t, None)
    with pytest.raises(ValueError, match="unconditional"):
        _model(num_classes=0)(x, t, y)


def test_samplers_check_label_values_once_before_the_model_sees_them():
    """SiT checks shapes only (a value check would sync a GPU at every call): the samplers check the labels,
    null label allowed, before the first model call."""
    model = _model().eval()
    noise = torch.randn(2, 8, 4)
    for sampler in ("euler", "heun", "sde"):
        cfg = SampleConfig(sampler=sampler, steps=2)
        assert sample(model, noise, torch.tensor([0, 3]), cfg).shape == noise.shape
        with pytest.raises(ValueError, match=r"\[0, 3\].*\[4\]"):
            sample(model, noise, torch.tensor([0, 4]), cfg)
        with pytest.raises(ValueError, match=r"\[0, 3\].*\[-1\]"):
            sample(model, noise, torch.tensor([-1, 0]), cfg)


def test_diffusion_training_checks_labels_on_the_host_not_in_every_forward():
    """The training task checks each batch on the host before it moves; the model itself checks shapes only."""
    cfg = DiffusionRunConfig(model=sit_config("tiny", in_channels=4, num_tokens=8, num_classes=3), latents="cache")
    task = DiffusionTask(cfg, torch.device("cpu"), 0.0, 1.0)
    z = torch.randn(2, 8, 4)
    task.check_batch((z, z, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match=r"training labels must lie in \[0, 3\).*\[3\]"):
        task.check_batch((z, z, torch.tensor([3, 0])))  # 3 is the null label: data must not use it
    x, t, _ = _inputs()
    for model in (task.model, _model()):  # unchecked: the embedding lookup itself fails, not a check in SiT
        with pytest.raises(IndexError):
            model(x, t, torch.tensor([0, 4]))


def test_null_label_and_label_dropout():
    model = _randomize(_model(class_dropout=0.5))
    assert model.null_label == 3 and _model(num_classes=0).null_label is None
    x, t, _ = _inputs(b=1)
    x, t = x.expand(400, -1, -1), t.expand(400)
    y = torch.zeros(400, dtype=torch.long)
    with torch.no_grad():
        v_cond = model.eval()(x[:1], t[:1], y[:1])
        v_null = model(x[:1], t[:1], torch.full((1,), 3))
        v_train = model.train()(x, t, y)
    dropped = (v_train - v_null).flatten(1).abs().amax(1) < 1e-5
    kept = (v_train - v_cond).flatten(1).abs().amax(1) < 1e-5
    assert (dropped ^ kept).all()  # every sample used either its label or the null label
    assert 0.4 < dropped.float().mean() < 0.6


@pytest.mark.parametrize("variant", ["sit", "lightningdit"])
def test_save_and_load_round_trip(variant, tmp_path):
    model = _randomize(_model(variant=variant)).eval()
    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["kind"] == "sit" and "maetok_version" in meta and meta["variant"] == variant
    loaded = load_sit(tmp_path)
    # Loaded for inference, as MAETok.from_pretrained: no random label dropout in the forward.
    assert not loaded.training
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
        assert torch.equal(loaded(x, t, y), loaded(x, t, y))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sit(tmp_path)
    save_pretrained(_model(), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "hiden": 3}))
    with pytest.raises(ConfigError, match=r"config.json.*hiden"):
        load_sit(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**meta, "kind": "tokenizer"}))
    with pytest.raises(ConfigError, match="not a maetok SiT config"):
        load_sit(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**meta, "depth": 3}))
    with pytest.raises(ValueError, match=r"model.safetensors.*missing.*blocks\.2"):
        load_sit(tmp_path)


def test_lightningdit_variant_modules():
    model = _model(variant="lightningdit")
    keys = set(model.state_dict())
    assert "pos_embed" not in keys and model.rope is not None
    assert {"blocks.0.mlp.w12.weight", "blocks.0.attn.q_norm.weight", "blocks.0.norm1.weight"} <= keys
    assert "blocks.0.mlp.fc1.weight" not in keys
    sit_keys = set(_model().state_dict())
    assert {"pos_embed", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight"} <= sit_keys
    assert not any("norm" in k for k in sit_keys)  # official SiT LayerNorms carry no parameters


@pytest.mark.parametrize("variant", ["sit", "lightningdit"])
def test_token_order_matters(variant):
    """Position information (absolute table or RoPE) makes the model not permutation-equivariant."""
    model = _randomize(_model(variant=variant)).eval()
    x, t, y = _inputs()
    perm = torch.randperm(8)
    with torch.no_grad():
        assert not torch.allclose(model(x[:, perm], t, y), model(x, t, y)[:, perm], atol=1e-4)


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    plain = _randomize(_model())
    ckpt = _randomize(_model(grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = _inputs()
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.y_embedder.dropout = 0.0  # same labels in both runs
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_named_constructor_and_float64():
    model = _randomize(SiT_tiny(in_channels=4, num_tokens=8, num_classes=3)).double().eval()
    x, t, y = _inputs()
    v = model(x.double(), t.double(), y)
    assert v.dtype == torch.float64 and torch.isfinite(v).all()
