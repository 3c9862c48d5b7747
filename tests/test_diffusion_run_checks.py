"""Diffusion training refuses, before any work, what would otherwise fail or mislead hundreds of steps in."""
from __future__ import annotations

from pathlib import Path

import pytest

from maetok.config import ConfigError, DiffusionRunConfig, TokenizerConfig, load_config
from maetok.data import open_dataset
from maetok.data.latents import cache_latents
from maetok.tokenizer import MAETok
from maetok.train.run import run_diffusion

SIT = ["model.hidden=32", "model.depth=2", "model.heads=2", "train.batch_size=8", "train.steps=2", "sample.steps=2"]


def _tokenizer(root: Path, latent_tokens: int) -> Path:
    cfg = TokenizerConfig(image_size=16, patch_size=4, latent_tokens=latent_tokens, latent_dim=4, enc_width=32,
                          enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, aux_targets=[])
    MAETok(cfg).save_pretrained(root)
    return root


def test_guidance_on_an_unconditional_model_is_refused_with_the_fix():
    """sit-cpu samples its preview grids with CFG 1.5: an unconditional model (unlabelled data) cannot."""
    with pytest.raises(ConfigError, match=r"needs a class-conditional model(.|\n)*add sample.cfg_scale=1"):
        load_config(DiffusionRunConfig, "sit-cpu", ["latents=x", "model.num_classes=0"])
    cfg = load_config(DiffusionRunConfig, "sit-cpu", ["latents=x", "model.num_classes=0", "sample.cfg_scale=1"])
    assert cfg.sample.cfg_scale == 1.0


def test_a_tokenizer_that_did_not_make_the_cache_is_refused_before_the_run_starts(tmp_path: Path):
    tok_a = _tokenizer(tmp_path / "tok-a", latent_tokens=8)
    tok_b = _tokenizer(tmp_path / "tok-b", latent_tokens=4)
    cache = cache_latents(MAETok.from_pretrained(tok_a), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    over = [f"latents={cache}", "model.num_tokens=8", "model.in_channels=4", *SIT]
    with pytest.raises(ConfigError, match=r"did not make the latent cache(.|\n)*latent_tokens: cache 8, tokenizer 4"):
        run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", [*over, f"tokenizer={tok_b}"]), tmp_path / "run",
                      device="cpu")
    assert not (tmp_path / "run").exists()
    summary = run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", [*over, f"tokenizer={tok_a}"]),
                            tmp_path / "run", device="cpu")
    assert summary["finished"]


def test_a_model_folder_of_the_other_kind_or_a_run_folder_is_named_as_such(tmp_path: Path):
    from maetok.config import SiTConfig
    from maetok.diffusion.sit import SiT

    tok = _tokenizer(tmp_path / "tok" / "model", latent_tokens=4)
    SiT.from_config(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=1, heads=2)).save_pretrained(
        tmp_path / "sit" / "model")
    with pytest.raises(ConfigError, match="holds a SiT diffusion model .kind: sit., not a tokenizer"):
        MAETok.from_pretrained(tmp_path / "sit" / "model")
    with pytest.raises(ConfigError, match="holds a tokenizer, not a SiT diffusion model"):
        SiT.from_pretrained(tok)
    with pytest.raises(FileNotFoundError, match="a training run keeps its weights in .*tok/model"):
        MAETok.from_pretrained(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="a training run keeps its weights in .*sit/model"):
        SiT.from_pretrained(tmp_path / "sit")
