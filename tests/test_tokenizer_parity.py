"""Our converter + model reproduce the official MAETok `AEModel` (tiny, random weights) to 1e-5.

This is the evidence that the released checkpoints load correctly: same keys, same shapes, same function.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maetok.tokenizer import MAETok
from maetok.io.convert_tokenizer import config_from_official_shapes, load_official_tokenizer, map_official_key
from maetok.io.pretrained import convert_official_tokenizer, load_tokenizer

ATOL = 1e-5


@pytest.fixture(scope="module")
def converted(parity_dir: Path, tmp_path_factory) -> tuple[MAETok, str]:
    out = tmp_path_factory.mktemp("tok")
    report = convert_official_tokenizer(parity_dir / "tokenizer_tiny", out)
    return load_tokenizer(out), report.summary()


def _capture(model: MAETok, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run encode + decode with hooks that record the intermediates named in the fixture README."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    enc, dec = model.encoder, model.decoder

    def save(name, fn=lambda o: o):
        return lambda mod, inp, out: got.__setitem__(name, fn(out))

    hooks.append(enc.patch_embed.register_forward_hook(save("enc.patch_embed_out", lambda o: o.flatten(2).transpose(1, 2))))
    hooks.append(enc.blocks[0].register_forward_pre_hook(lambda m, a: got.__setitem__("enc.tokens_in", a[0])))
    for i, b in enumerate(enc.blocks):
        hooks.append(b.register_forward_hook(save(f"enc.block{i}_out")))
    hooks.append(enc.norm.register_forward_hook(save("enc.norm_out")))
    hooks.append(dec.from_latent.register_forward_hook(save("dec.post_quant_out")))
    hooks.append(dec.blocks[0].register_forward_pre_hook(lambda m, a: got.__setitem__("dec.tokens_in", a[0])))
    for i, b in enumerate(dec.blocks):
        hooks.append(b.register_forward_hook(save(f"dec.block{i}_out")))
    hooks.append(dec.final_norm.register_forward_hook(save("dec.norm_out")))
    hooks.append(dec.head.register_forward_pre_hook(lambda m, a: got.__setitem__("dec.image_tokens", a[0])))
    try:
        with torch.no_grad():
            got["z"] = model.encode(images)
            got["recon"] = model.decode(got["z"])
    finally:
        for h in hooks:
            h.remove()
    got["enc.h"] = got["enc.norm_out"][:, -model.config.latent_tokens:]
    got["enc.rope_cos"], got["enc.rope_sin"] = enc.rope()
    got["dec.rope_cos"], got["dec.rope_sin"] = dec.rope()
    return got


def test_conversion_report_names_unused_keys(converted):
    _, summary = converted
    assert "decoder.model.pos_embed" in summary and "decoder.model.patch_embed.proj.weight" in summary


def test_tokenizer_matches_official_float32(converted, parity_dir: Path):
    model, _ = converted
    inputs = load_file(str(parity_dir / "tokenizer_tiny" / "inputs.safetensors"))
    ref = load_file(str(parity_dir / "tokenizer_tiny" / "outputs.safetensors"))
    got = _capture(model, inputs["images"])
    with torch.no_grad():
        got["recon_from_z_rand"] = model.decode(inputs["z_rand"])
        got["recon_via_forward"] = model(inputs["images"]).recon
    checked = []
    for key, want in ref.items():
        assert key in got, f"fixture key {key} not reproduced"
        err = (got[key].double() - want.double()).abs().max().item()
        assert err < ATOL, f"{key}: max abs error {err:.3g} >= {ATOL}"
        checked.append(key)
    assert {"z", "recon", "recon_from_z_rand", "enc.h", "dec.norm_out"} <= set(checked)


def test_tokenizer_matches_official_float64(converted, parity_dir: Path):
    model, _ = converted
    model = MAETok(model.config).double()
    model.load_state_dict({k: v.double() for k, v in converted[0].state_dict().items()})
    inputs = load_file(str(parity_dir / "tokenizer_tiny" / "inputs.safetensors"))
    ref = load_file(str(parity_dir / "tokenizer_tiny" / "outputs_f64.safetensors"))
    with torch.no_grad():
        z = model.encode(inputs["images"].double())
        recon = model.decode(z)
    # The official float64 run rounds q, k to float32 for RoPE; 5e-7 is the fixture README's threshold.
    assert (z - ref["z"]).abs().max() < 5e-7
    assert (recon - ref["recon"]).abs().max() < 5e-7


def test_parameters_without_effect_on_recon_are_still_loaded(converted, parity_dir: Path):
    """The final adaLN only reaches latent rows of dec.norm_out: check it there (README, 'no effect' note)."""
    model, _ = converted
    inputs = load_file(str(parity_dir / "tokenizer_tiny" / "inputs.safetensors"))
    ref = load_file(str(parity_dir / "tokenizer_tiny" / "outputs.safetensors"))
    got = _capture(model, inputs["images"])
    latent_rows = slice(model.decoder.num_image_tokens, None)
    assert torch.allclose(got["dec.norm_out"][:, latent_rows], ref["dec.norm_out"][:, latent_rows], atol=ATOL)


def test_full_size_key_list_builds_maetok_b_128(parity_dir: Path):
    lines = (parity_dir / "reference_keys" / "maetok_b_128_AEModel_keys.txt").read_text().splitlines()
    shapes = {}
    for line in lines:
        m = re.match(r"^\s*(\S+)\s+\[?([\d, x]+)\]?", line)
        if m and "." in m.group(1):
            shapes[m.group(1)] = tuple(int(s) for s in re.findall(r"\d+", m.group(2)))
    assert len(shapes) == 315
    cfg = config_from_official_shapes(shapes)
    assert (cfg.image_size, cfg.patch_size, cfg.latent_tokens, cfg.latent_dim) == (256, 16, 128, 32)
    assert (cfg.enc_width, cfg.enc_depth, cfg.enc_heads, cfg.dec_depth) == (768, 12, 12, 12)
    with torch.device("meta"):
        model = MAETok(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in shapes.items():
        ours = map_official_key(key)
        if ours is None:
            assert key.startswith(("decoder.model.pos_embed", "decoder.model.patch_embed")), key
            continue
        assert own[ours] == shape, f"{key} -> {ours}: official {shape}, ours {own[ours]}"
    n_params = sum(v.numel() for k, v in model.state_dict().items()
                   if k.startswith(("encoder.", "decoder.")) and not k.endswith(("rope.t_x", "rope.t_y")))
    assert abs(n_params - 176e6) / 176e6 < 0.02, f"maetok-b-128 has {n_params / 1e6:.1f}M parameters"


def test_official_config_from_model_names_and_bad_weights(parity_dir: Path, tmp_path: Path):
    """Top-level ModelArgs (as on the hub) with sizes from model names; a shape clash names the key."""
    import json
    import shutil

    meta = json.loads((parity_dir / "tokenizer_tiny" / "config.json").read_text())
    hub_style = dict(meta["official_ModelArgs"])  # no explicit sizes: names say vit_base (768 wide)
    (tmp_path / "config.json").write_text(json.dumps(hub_style))
    shutil.copy(parity_dir / "tokenizer_tiny" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="enc_width=768 but the weights imply 64"):
        load_official_tokenizer(tmp_path)


def test_a_key_for_a_part_the_model_lacks_is_an_error_not_an_unused_key(parity_dir: Path, tmp_path: Path):
    """A checkpoint with qk-norm maps its norm weights to names our model (no qk-norm) does not have: loading
    without them would encode and decode wrongly, so the conversion refuses it and names the key."""
    import shutil

    from safetensors.torch import save_file

    state = load_file(str(parity_dir / "tokenizer_tiny" / "model.safetensors"))
    state["encoder.model.blocks.0.attn.q_norm.weight"] = torch.ones(16)
    shutil.copy(parity_dir / "tokenizer_tiny" / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'encoder.model.blocks.0.attn.q_norm.weight' \(16,\) would load into "
                                         r"'encoder.blocks.0.attn.q_norm.weight', which the model built"):
        load_official_tokenizer(tmp_path)
