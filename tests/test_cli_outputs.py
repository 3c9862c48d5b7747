"""Commands that write into --out (latents cache, sample, tokenizer reconstruct, analyze) refuse one that already
holds their finished output, with one `error:` line naming it, and replace it with --force; an unfinished latent
cache is resumed without --force. Sampling options an unconditional model cannot honour are refused cleanly."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from maetok.cli import main
from maetok.config import SiTConfig, TokenizerConfig
from maetok.io.pretrained import save_pretrained


def run(*argv) -> tuple[int, str, str]:
    """`maetok ARGV` in this process: (exit code, stdout, stderr); argparse's own refusals included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def ok(*argv) -> tuple[str, str]:
    code, out, err = run(*argv)
    assert code == 0, (out, err)
    return out, err


def refused(*argv) -> str:
    """The error line of a command that must fail with exit code 2 and no traceback."""
    code, out, err = run(*argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "maetok: error: " in err, err
    return err.strip().splitlines()[-1]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny weights: a tokenizer making 4x4 latents of 16px images, class-conditional and unconditional
    SiTs on them, and a finished latent cache of 10 shapes images (enough for a 2-component GMM)."""
    from maetok.diffusion.sit import SiT
    from maetok.tokenizer import MAETok

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_pretrained(MAETok(TokenizerConfig(variant="ae", image_size=16, patch_size=4, latent_tokens=4, latent_dim=4,
                                           enc_width=32, enc_heads=2, enc_depth=1, dec_width=32, dec_heads=2,
                                           dec_depth=1, aux_targets=[])), root / "tok")
    for name, classes in (("sit", 10), ("sit-uncond", 0)):
        save_pretrained(SiT(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=1, heads=2,
                                      num_classes=classes)), root / name)
    p = {name: root / name for name in ("tok", "sit", "sit-uncond", "cache")}
    ok("latents", "cache", "--tokenizer", p["tok"], "--data", "shapes", "--limit", 10, "--out", p["cache"],
       "--device", "cpu")
    return p


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _cache(models, out, *extra):
    return run("latents", "cache", "--tokenizer", models["tok"], "--data", "shapes", "--out", out, "--device", "cpu",
               *extra)


def _sample(models, out, *extra, model="sit"):
    return run("sample", "--model", models[model], "--tokenizer", models["tok"], "--num-samples", 2, "--steps", 1,
               "--sampler", "euler", "--batch-size", 2, "--out", out, "--device", "cpu", *extra)


# ==============================================================================================================
# latents cache
# ==============================================================================================================
def test_latents_cache_refuses_a_finished_cache_and_force_replaces_it(models):
    from maetok.data.latents import LatentDataset

    assert _cache(models, "c", "--limit", 4)[0] == 0
    before = _mtimes(Path("c"))
    line = refused("latents", "cache", "--tokenizer", models["tok"], "--data", "shapes", "--limit", 6, "--out", "c",
                   "--device", "cpu")
    assert "--out c already holds a finished latent cache (4 latents, meta.json + 1 shard(s))" in line
    assert "--force" in line and "another --out" in line
    assert _mtimes(Path("c")) == before  # nothing touched
    # --force re-encodes: a shard of the old cache that the new one would not write is deleted too, rather than
    # left beside the new cache; files that are not the cache's are left alone.
    Path("c/shard-00001.safetensors").write_bytes(b"old")
    Path("c/notes.txt").write_text("mine")
    code, out, err = _cache(models, "c", "--limit", 6, "--force")
    assert code == 0, err
    assert "cached 6 latents" in out
    assert len(LatentDataset("c")) == 6 and json.loads(Path("c/meta.json").read_text())["count"] == 6
    assert sorted(p.name for p in Path("c").iterdir()) == ["meta.json", "notes.txt", "request.json",
                                                          "shard-00000.safetensors"]


def test_latents_cache_resumes_an_unfinished_cache_without_force(models, tmp_path):
    from maetok.data.latents import LatentDataset

    # An interrupted cache: its shard on disk, no meta.json (written last, once every shard is there).
    partial = tmp_path / "partial"
    partial.mkdir()
    shard = partial / "shard-00000.safetensors"
    shutil.copyfile(models["cache"] / "shard-00000.safetensors", shard)
    kept = shard.stat().st_mtime_ns
    code, out, err = _cache(models, partial, "--limit", 10)
    assert code == 0, err
    assert "unfinished latent cache" in err and "resuming" in err
    assert shard.stat().st_mtime_ns == kept  # resumed: the shard on disk is not encoded again
    assert len(LatentDataset(partial)) == 10
    # An existing empty folder is no finished output either.
    Path("empty").mkdir()
    assert _cache(models, "empty", "--limit", 2)[0] == 0


def test_latents_cache_refuses_a_file_as_out(models):
    Path("c").write_text("not a folder")
    line = refused("latents", "cache", "--tokenizer", models["tok"], "--data", "shapes", "--out", "c")
    assert "--out c is a file" in line


# ==============================================================================================================
# sample
# ==============================================================================================================
def test_sample_refuses_existing_samples_and_force_replaces_them(models):
    Path("s").mkdir()
    Path("s/notes.txt").write_text("mine")  # a folder holding something else is fine
    assert _sample(models, "s")[0] == 0
    before = _mtimes(Path("s"))
    line = refused("sample", "--model", models["sit"], "--tokenizer", models["tok"], "--out", "s", "--seed", 1)
    assert "--out s already holds samples (samples.npz, samples.png, sampling.json)" in line
    assert "--force" in line and "another --out" in line
    assert _mtimes(Path("s")) == before
    code, _, err = _sample(models, "s", "--seed", 1, "--force")
    assert code == 0, err
    assert json.loads(Path("s/sampling.json").read_text())["seed"] == 1
    # Any one of the three files is a previous run's output.
    Path("t").mkdir()
    Path("t/sampling.json").write_text("{}")
    assert "holds samples (sampling.json)" in refused("sample", "--model", models["sit"], "--tokenizer",
                                                       models["tok"], "--out", "t")


@pytest.mark.parametrize("option, words", [(["--cfg", "1.5"], ["--cfg 1.5", "class-conditional", "use --cfg 1"]),
                                           (["--balanced"], ["--balanced", "no classes to balance"])])
def test_sample_refuses_guidance_and_balance_without_classes(models, monkeypatch, option, words):
    import maetok.eval.generate as G

    monkeypatch.setattr(G, "sample", lambda *a, **k: pytest.fail("sampling started"))
    line = refused("sample", "--model", models["sit-uncond"], "--tokenizer", models["tok"], *option, "--out", "s",
                   "--device", "cpu")
    assert all(w in line for w in words) and "num_classes=0" in line, line
    assert not Path("s").exists()


def test_sample_unconditional_without_guidance_works(models):
    code, _, err = _sample(models, "s", "--cfg", 1, model="sit-uncond")
    assert code == 0, err


# ==============================================================================================================
# tokenizer reconstruct, analyze
# ==============================================================================================================
def test_reconstruct_refuses_existing_results_and_force_replaces_them(models):
    argv = ["tokenizer", "reconstruct", "--model", models["tok"], "--images", "shapes", "--out", "r"]
    ok(*argv, "--num-samples", 2)
    before = _mtimes(Path("r"))
    line = refused(*argv, "--num-samples", 3)
    assert "--out r already holds reconstructions (reconstructions.png, metrics.json)" in line and "--force" in line
    assert _mtimes(Path("r")) == before
    ok(*argv, "--num-samples", 3, "--force")
    assert json.loads(Path("r/metrics.json").read_text())["num_images"] == 3


def test_a_tilde_in_out_is_the_home_folder_for_the_check_and_the_writing_alike(models, monkeypatch, tmp_path):
    """`--out=~/r` reaches maetok unexpanded (the shell expands ~ only at a word's start): the refusal and the
    writer must look at the same folder, or a second run overwrites the first (and --force deletes elsewhere)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    argv = ["tokenizer", "reconstruct", "--model", models["tok"], "--images", "shapes", "--out=~/r"]
    ok(*argv, "--num-samples", 2)
    assert (home / "r" / "metrics.json").is_file() and not Path("~").exists()
    assert "already holds reconstructions" in refused(*argv, "--num-samples", 3)


def test_a_collective_timeout_must_be_a_finite_number_of_seconds():
    for bad in ("inf", "nan", "-5", "soon", str(8 * 24 * 3600)):
        code, _, err = run("pilot", "--collective-timeout", bad)
        assert code == 2 and "argument --collective-timeout: must be a number of seconds" in err and "Traceback" not in err


def test_analyze_refuses_existing_results_and_force_replaces_them(models):
    argv = ["analyze", "--latents", f"tok={models['cache']}", "--out", "a"]
    ok(*argv, "--ks", "1")
    before = _mtimes(Path("a"))
    line = refused(*argv, "--ks", "1,2")
    assert "--out a already holds analysis results (analysis.json, gmm_nll.png)" in line and "--force" in line
    assert _mtimes(Path("a")) == before
    ok(*argv, "--ks", "1,2", "--force")
    assert json.loads(Path("a/analysis.json").read_text())["ks"] == [1, 2]
