"""Nested ("tail") token dropout: one tokenizer decodes from any trained prefix of its latent tokens; with the
option off the model, its parameters and its random draws are those of a model built without it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maetok.cli import main
from maetok.config import ConfigError, TokenizerRunConfig, load_config
from maetok.io.pretrained import load_tokenizer
from maetok.tokenizer.model import MAETok
from maetok.train.run import run_tokenizer

TINY = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
        "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1",
        "model.dec_width=32", "model.dec_heads=2", "model.dec_depth=1", "model.aux_width=16",
        "model.aux_heads=1", "model.aux_depth=1", "data.limit=16", "train.batch_size=8", "train.log_every=1",
        "train.image_every=100", "train.ckpt_every=100", "stats_batches=1"]


def tiny_model(*overrides: str) -> MAETok:
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + list(overrides)).model
    torch.manual_seed(0)
    return MAETok(cfg, aux_dims={t.name: 7 for t in cfg.aux_targets})


def open_latent_rows(model: MAETok) -> None:
    """The official zero init of the adaLN layers makes the decoder ignore z at first; open it as training would,
    so that outputs and gradients depend on the latent tokens."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in model.decoder.blocks:
            w = block.adaLN_modulation[-1].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "nested"
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + ["train.steps=3", "model.token_dropout=nested"])
    assert run_tokenizer(cfg, out, device="cpu")["finished"]
    return out


def test_trained_nested_tokenizer_decodes_every_prefix(nested_run: Path):
    model = load_tokenizer(nested_run / "model").eval()
    assert model.config.token_dropout == "nested" and model.config.allowed_token_counts == [1, 2, 3, 4]
    assert model.absent_latent is not None
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(images)
        for k in (1, 2, 3, 4):
            prefix = model.encode(images, tokens=k)
            assert prefix.shape == (2, k, 4) and torch.equal(prefix, z[:, :k])
            out = model.decode(prefix)
            assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
            assert torch.equal(out, model.decode(z, tokens=k))  # a full z with tokens=k keeps its prefix
        assert torch.equal(model.decode(z), model.decode(z, tokens=4))


def test_training_decodes_from_random_prefixes_and_aux_sees_full_z():
    model = tiny_model("model.token_dropout=nested", "model.token_counts=[1,2,4]").train()
    open_latent_rows(model)
    out = model(torch.rand(16, 3, 16, 16) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert out.tokens is not None and set(out.tokens.tolist()) <= {1, 2, 4} and len(set(out.tokens.tolist())) > 1
    (out.recon - torch.rand_like(out.recon)).square().mean().backward()
    assert model.absent_latent.grad is not None and model.absent_latent.grad.abs().sum() > 0
    assert model.eval()(torch.rand(2, 3, 16, 16)).tokens is None  # eval decodes the full length


def test_full_length_probability_sets_how_often_all_tokens_are_kept():
    """token_full_prob=p: a sample keeps all L tokens with probability p, the shorter lengths share the rest."""
    model = tiny_model("model.token_dropout=nested", "model.token_counts=[1,2,4]", "model.token_full_prob=0.75")
    _, tokens = model.drop_tail_tokens(torch.zeros(20000, 4, 4), torch.Generator().manual_seed(0))
    share = {k: (tokens == k).float().mean().item() for k in (1, 2, 4)}
    assert set(tokens.tolist()) == {1, 2, 4}
    assert abs(share[4] - 0.75) < 0.015 and abs(share[1] - 0.125) < 0.01 and abs(share[2] - 0.125) < 0.01
    uniform = tiny_model("model.token_dropout=nested", "model.token_counts=[1,2,4]")
    _, tokens = uniform.drop_tail_tokens(torch.zeros(20000, 4, 4), torch.Generator().manual_seed(0))
    assert all(abs((tokens == k).float().mean().item() - 1 / 3) < 0.015 for k in (1, 2, 4))


@pytest.mark.parametrize("variant", ["maetok", "vae", "ae"])
def test_option_off_is_the_model_without_the_option(variant: str):
    plain, off = tiny_model(f"model.variant={variant}"), tiny_model(f"model.variant={variant}",
                                                                      "model.token_dropout=none")
    assert off.absent_latent is None and list(plain.state_dict()) == list(off.state_dict())
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in plain.state_dict().items())
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    results = []
    for model in (plain, off):
        open_latent_rows(model)
        g = torch.Generator().manual_seed(1)
        torch.manual_seed(2)  # the VAE samples its posterior from the global stream
        out = model.train()(images, generator=g)
        out.recon.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            recon = model.eval().decode(model.encode(images, tokens=4))
        results.append((out.recon.detach(), grads, recon, torch.rand(3, generator=g), torch.rand(3)))
    (r0, g0, d0, n0, m0), (r1, g1, d1, n1, m1) = results
    assert torch.equal(r0, r1) and torch.equal(d0, d1)
    assert torch.equal(n0, n1) and torch.equal(m0, m1)  # both random streams after the step: no extra draw
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_bad_prefix_lengths_get_one_clear_line():
    nested = tiny_model("model.token_dropout=nested", "model.token_counts=[2,4]").eval()
    z = torch.randn(1, 4, 4)
    for k in (1, 3, 5, 0):
        with pytest.raises(ValueError, match=r"tokens=\d+ is not allowed.*\[2, 4\]"):
            nested.decode(z, tokens=k)
    with pytest.raises(ValueError, match="tokens=3 is not allowed"):
        nested.encode(torch.zeros(1, 3, 16, 16), tokens=3)
    with pytest.raises(ValueError, match=r"decode expects latents of shape \(B, 2, 4\) or \(B, 4, 4\)"):
        nested.decode(torch.randn(1, 3, 4), tokens=2)
    plain = tiny_model().eval()
    with pytest.raises(ValueError, match=r"tokens=2 is not allowed.*without token dropout.*\[4\]"):
        plain.decode(z, tokens=2)
    with pytest.raises(ValueError, match=r"decode expects latents of shape \(B, 4, 4\)"):
        plain.decode(torch.randn(1, 2, 4))


@pytest.mark.parametrize("override, needle", [
    (["model.token_counts=[2,4]"], "needs model.token_dropout=nested"),
    (["model.token_dropout=nested", "model.token_counts=[1,2]"], "end with 4"),
    (["model.token_dropout=nested", "model.token_counts=[4,2]"], "must be increasing"),
    (["model.token_dropout=nested", "model.token_counts=[0,4]"], r"in \[1, model.latent_tokens=4\]"),
    (["model.token_dropout=nested", "model.token_counts=[2,6]"], "must be increasing"),
    (["model.token_dropout=tail"], "not allowed"),
    (["model.token_full_prob=0.5"], "needs model.token_dropout=nested"),
    (["model.token_dropout=nested", "model.token_full_prob=1.5"], r"must lie in \[0, 1\]"),
    (["model.token_dropout=nested", "model.token_counts=[4]", "model.token_full_prob=0.5"], "a length below 4"),
])
def test_config_rejects_bad_token_counts(override: list[str], needle: str):
    with pytest.raises(ConfigError, match=needle):
        load_config(TokenizerRunConfig, "cpu-32", TINY + override)


def test_reconstruct_command_takes_tokens(nested_run: Path, tmp_path: Path, capsys):
    base = ["tokenizer", "reconstruct", "--model", str(nested_run / "model"), "--images", "shapes",
            "--num-samples", "4"]
    assert main(base + ["--tokens", "2", "--out", str(tmp_path / "k2")]) == 0
    assert json.loads((tmp_path / "k2" / "metrics.json").read_text())["tokens"] == 2
    assert main(base + ["--tokens", "9", "--out", str(tmp_path / "k9")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokens 9" in err[0] and "decodes from k in 1..4" in err[0]
