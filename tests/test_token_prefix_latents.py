"""Prefix latents: a tokenizer trained with nested token dropout cached at its first K tokens (`latents cache
--tokens K`), a diffusion model trained on that cache (it takes num_tokens=K from it), sampled with the full
tokenizer decoding from K; a cache made without --tokens stays byte for byte what it was."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import close_run_logs
from maetok.cli import main
from maetok.commands.common import ExitCode
from maetok.config import ConfigError, SiTConfig, TokenizerConfig
from maetok.data import open_dataset
from maetok.data.latents import LatentDataset, cache_latents
from maetok.diffusion.sit import SiT
from maetok.eval.cost import generation_gflops
from maetok.eval.evaluate import evaluate_reconstruction
from maetok.eval.generate import IncompatibleModelsError, check_compatible
from maetok.io.pretrained import load_sit, load_tokenizer, save_pretrained
from maetok.tokenizer import MAETok

# L = 4 tokens of dim 4, trained to decode from the first 2 or all 4. Layer scale 0.1 and a large lr without warmup,
# as in test_cli_pipeline: after 3 steps the decoder already depends on the latents, so K tokens decode differently.
TOK = ["model.layerscale_init=0.1", "train.optim.warmup_steps=0", "train.optim.lr=0.01", "model.image_size=16",
       "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4", "model.latent_dim=4",
       "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1", "model.dec_width=32", "model.dec_heads=2",
       "model.dec_depth=1", "model.aux_width=16", "model.aux_heads=1", "model.aux_depth=1", "data.limit=16",
       "train.batch_size=8", "train.log_every=1", "train.image_every=1000", "train.ckpt_every=1000",
       "stats_batches=1", "train.steps=3", "model.token_dropout=nested", "model.token_counts=[2,4]"]
# No model.num_tokens / in_channels: the run must take them from the cache.
SIT = ["model.hidden=32", "model.depth=1", "model.heads=2", "train.steps=2", "train.batch_size=8",
       "train.log_every=1", "train.image_every=1000", "train.ckpt_every=1000", "sample.steps=2"]
K, L, IMAGES = 2, 4, 16
CACHE = ["--data", "shapes", "--split", "train", "--limit", IMAGES, "--batch-size", 8, "--device", "cpu"]


def run(*argv) -> tuple[int, str, str]:
    """`maetok ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_line(*argv) -> str:
    """The one `maetok: error:` line of a refused request (exit code 2), without a traceback."""
    code, out, err = run(*argv)
    assert code == ExitCode.BAD_REQUEST, (code, out, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("maetok: error: "), err
    return lines[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A nested-dropout tokenizer trained through the CLI, its full cache and its K-token cache, a diffusion run on
    the K-token cache, and a tokenizer without nested dropout (random weights, same latent shape)."""
    root = tmp_path_factory.mktemp("prefix")
    p = {name: root / name for name in ("tok", "plain", "full", "prefix", "sit")}
    try:
        code, out, err = run("tokenizer", "train", "--config", "cpu-32", "--out", p["tok"], "--device", "cpu", *TOK)
        assert code == 0, err
        code, out, err = run("latents", "cache", "--tokenizer", p["tok"] / "model", "--out", p["full"], *CACHE)
        assert code == 0, err
        code, out, err = run("latents", "cache", "--tokenizer", p["tok"] / "model", "--out", p["prefix"],
                             "--tokens", K, *CACHE)
        assert code == 0, err
        code, out, err = run("diffusion", "train", "--config", "sit-cpu", "--out", p["sit"], "--device", "cpu",
                             f"latents={p['prefix']}", f"tokenizer={p['tok'] / 'model'}", *SIT)
        assert code == 0, err
        torch.manual_seed(0)
        save_pretrained(MAETok(TokenizerConfig(variant="ae", image_size=16, patch_size=4, latent_tokens=L,
                                               latent_dim=4, enc_width=32, enc_heads=2, enc_depth=1, dec_width=32,
                                               dec_heads=2, dec_depth=1, aux_targets=[])), p["plain"])
        yield p
    finally:
        close_run_logs()  # the runs' train.log handlers


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


# ==============================================================================================================
# The cache
# ==============================================================================================================
def test_prefix_cache_holds_the_first_k_tokens_and_records_k_and_l(runs):
    full, prefix = LatentDataset(runs["full"]), LatentDataset(runs["prefix"])
    assert len(prefix) == IMAGES and prefix.latents.shape == (IMAGES, K, 4)
    assert prefix.latents_flip.shape == (IMAGES, K, 4)
    # The same encoder pass, cut after K tokens: exactly the full cache's first K.
    assert torch.equal(prefix.latents, full.latents[:, :K])
    assert torch.equal(prefix.latents_flip, full.latents_flip[:, :K])
    assert torch.equal(prefix.labels, full.labels)
    meta = prefix.meta
    assert meta["latent_shape"] == [K, 4] and meta["tokens"] == K and meta["tokenizer_latent_tokens"] == L
    # Normalised as the sampler un-normalises: with the tokenizer's statistics.
    tok = load_tokenizer(runs["tok"] / "model")
    assert (prefix.mean, prefix.std) == (tok.config.latent_mean, tok.config.latent_std)
    assert _read(runs["prefix"], "request.json")["tokens"] == K


def test_cache_without_tokens_is_byte_for_byte_the_cache_without_the_option(runs, tmp_path):
    tok = load_tokenizer(runs["tok"] / "model")
    ds = open_dataset("shapes", split="train", image_size=16, limit=IMAGES)
    made = cache_latents(tok, ds, tmp_path / "api", batch_size=8, progress=False, tokens=None)
    names = sorted(p.name for p in runs["full"].iterdir())
    assert names == sorted(p.name for p in made.iterdir())
    for name in names:
        assert (runs["full"] / name).read_bytes() == (made / name).read_bytes(), name
    # Nothing of the prefix option in a full cache's records.
    assert set(_read(made, "meta.json")) == {"kind", "count", "shards", "flip", "latent_shape", "latent_mean",
                                             "latent_std", "num_classes", "tokenizer_config"}
    assert set(_read(made, "request.json")) == {"count", "shard_size", "flip", "tokenizer_config", "data"}
    # K = L keeps every token: the same shards, and meta.json says K.
    all_tokens = cache_latents(tok, ds, tmp_path / "all", batch_size=8, progress=False, tokens=L)
    shard = "shard-00000.safetensors"
    assert (all_tokens / shard).read_bytes() == (made / shard).read_bytes()
    assert _read(all_tokens, "meta.json")["tokens"] == L


@pytest.mark.parametrize("tokenizer, tokens, needle", [
    ("tok", 3, r"tokens=3 is not allowed: this tokenizer (4 latent tokens, trained with nested token dropout) "
               r"decodes from k in [2, 4]"),
    ("tok", 5, "tokens=5 is not allowed: this tokenizer (4 latent tokens"),
    ("plain", 2, "tokens=2 is not allowed: this tokenizer (4 latent tokens, trained without token dropout "
                 "(model.token_dropout=none)) decodes from k in [4]"),
])
def test_untrained_prefix_is_refused_in_one_line_before_any_work(runs, tmp_path, tokenizer, tokens, needle):
    folder = runs["tok"] / "model" if tokenizer == "tok" else runs["plain"]
    out = tmp_path / "cache"
    line = error_line("latents", "cache", "--tokenizer", folder, "--out", out, "--tokens", tokens, *CACHE)
    assert f"--tokens {tokens}" in line and needle in line, line
    assert not out.exists()  # refused before the folder was made
    tok = load_tokenizer(folder)
    ds = open_dataset("shapes", split="train", image_size=16, limit=2)
    with pytest.raises(ConfigError, match=rf"tokens={tokens} is not allowed"):
        cache_latents(tok, ds, out, progress=False, tokens=tokens)
    assert not out.exists()


# ==============================================================================================================
# Diffusion on the prefix cache, and sampling with the full tokenizer
# ==============================================================================================================
def test_diffusion_takes_k_from_the_cache_and_samples_decode_from_k(runs, tmp_path):
    sit = load_sit(runs["sit"] / "model")
    assert (sit.config.num_tokens, sit.config.in_channels) == (K, 4)
    out = tmp_path / "samples"
    code, stdout, err = run("sample", "--model", runs["sit"] / "model", "--tokenizer", runs["tok"] / "model",
                            "--num-samples", 4, "--steps", 2, "--sampler", "euler", "--batch-size", 4, "--out", out,
                            "--device", "cpu")
    assert code == 0, err
    with np.load(out / "samples.npz") as z:
        images = z["arr_0"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert (out / "samples.png").is_file()


def test_sampling_a_prefix_with_a_tokenizer_that_cannot_decode_it_is_refused(runs, tmp_path):
    line = error_line("sample", "--model", runs["sit"] / "model", "--tokenizer", runs["plain"], "--num-samples", 2,
                      "--out", tmp_path / "samples", "--device", "cpu")
    assert f"generates the first {K} latent tokens" in line and "model.token_dropout=none" in line, line
    assert "decodes from K in [4] only" in line and not (tmp_path / "samples" / "samples.npz").exists()
    nested = load_tokenizer(runs["tok"] / "model")
    check_compatible(load_sit(runs["sit"] / "model"), nested)  # K = 2 is a trained prefix
    for tokens in (3, 5):  # not trained; more than L
        sit = SiT(SiTConfig(in_channels=4, num_tokens=tokens, hidden=32, depth=1, heads=2, num_classes=10))
        with pytest.raises(IncompatibleModelsError, match=f"{tokens} (latent )?tokens"):
            check_compatible(sit, nested)


# ==============================================================================================================
# Reconstruction metrics and cost at K tokens
# ==============================================================================================================
def test_reconstruction_metrics_from_the_first_k_tokens(runs):
    tok = load_tokenizer(runs["tok"] / "model")
    ds = open_dataset("shapes", split="test", image_size=16, limit=8)
    result = evaluate_reconstruction(tok, ds, None, batch_size=4, lpips=None, progress=False, tokens=K)
    assert result["tokens"] == K and result["num_images"] == 8 and np.isfinite(result["metrics"]["psnr@8"])
    full = evaluate_reconstruction(tok, ds, None, batch_size=4, lpips=None, progress=False)
    assert "tokens" not in full and full["metrics"]["psnr@8"] != result["metrics"]["psnr@8"]
    with pytest.raises(ConfigError, match=r"tokens=3 is not allowed.*\[2, 4\]"):
        evaluate_reconstruction(tok, ds, None, lpips=None, progress=False, tokens=3)


def test_generation_gflops_count_the_sit_at_k_tokens(runs):
    tok = load_tokenizer(runs["tok"] / "model")
    image = torch.zeros(1, 3, 16, 16)
    sit = load_sit(runs["sit"] / "model")
    prefix = generation_gflops(tok, sit, image)
    full = generation_gflops(tok, SiT(dataclasses.replace(sit.config, num_tokens=L)).eval(), image)
    assert prefix["tokens"] == K and full["tokens"] == L
    assert 0 < prefix["sit_forward_gflops"] < full["sit_forward_gflops"]
    # The decoder starts from K tokens but fills the tail with the absent token: the same sequence, the same cost.
    assert prefix["decode_gflops"] == full["decode_gflops"] > 0


def test_eval_recon_from_the_first_k_tokens_writes_its_own_result(runs):
    common = ["eval", "recon", "--tokenizer", runs["tok"] / "model", "--ref", "shapes", "--num-samples", 8,
              "--features", "resnet20-cifar10-random", "--device", "cpu", "--out", "eval"]
    code, out, err = run(*common, "--tokens", K)
    assert code == 0, err
    prefix = json.loads(out)
    assert prefix["tokens"] == K and prefix["num_images"] == 8
    code, out, err = run(*common)  # the full length: another file, not refused as already there
    assert code == 0, err
    full = json.loads(out)
    assert prefix["metrics"]["psnr@8"] != full["metrics"]["psnr@8"] and sorted(p.name for p in Path("eval").iterdir()) == \
        sorted(["tok-model.recon-resnet20-cifar10-random.json", f"tok-model.recon-k{K}-resnet20-cifar10-random.json"])
    assert "--tokens 3" not in error_line(*common, "--tokens", 3, "--force") and \
        "decodes from k in" in error_line(*common, "--tokens", 3, "--force")
    assert "--tokens is for maetok eval recon" in error_line("eval", "gen", "--samples", "x.npz", "--ref", "shapes",
                                                             "--tokens", K)
