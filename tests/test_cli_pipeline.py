"""The whole command-line workflow on tiny settings and the built-in shapes data, in process:

    tokenizer train -> latents cache -> diffusion train -> sample -> eval gen -> eval recon -> analyze

One module fixture runs the training half once (seconds); each test checks one command's outputs. Metrics with
the real CIFAR-10 ResNet-20 feature network need ../shared/data; the same code paths run without it on the
random-weights network (`resnet20-cifar10-random`), whose numbers are named so they cannot pass for real ones.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import close_run_logs
from maetok.cli import main
from maetok.io.pretrained import load_sit, load_tokenizer

# Encoder layer scale 0.1 (not 1e-5) and a large lr without warmup: after 3 steps the latents must already depend
# on the image, and the decoder (whose latent modulation starts at zero) on the latents.
TOK = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
       "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1",
       "model.dec_width=32", "model.dec_heads=2", "model.dec_depth=1", "model.aux_width=16",
       "model.aux_heads=1", "model.aux_depth=1", "model.layerscale_init=0.1", "data.limit=48", "train.batch_size=8", "train.log_every=1",
       "train.image_every=1000", "train.ckpt_every=1000", "stats_batches=1", "train.steps=3",
       "train.optim.warmup_steps=0", "train.optim.lr=0.01"]
SIT = ["model.in_channels=4", "model.num_tokens=4", "model.hidden=32", "model.depth=1", "model.heads=2",
       "train.steps=3", "train.batch_size=8", "train.log_every=1", "train.image_every=1000",
       "train.ckpt_every=1000", "train.optim.warmup_steps=0", "sample.steps=2"]
NUM_SAMPLES = 20  # --balanced over the 10 shape classes: 2 each


def cli(*argv: str) -> tuple[int, str]:
    """Run `maetok ARGV` in this process; (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def cli_json(*argv: str) -> dict:
    code, out = cli(*argv)
    assert code == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    p = {name: root / name for name in ("tok", "cache", "cache_test", "sit", "samples")}
    try:
        code, out = cli("tokenizer", "train", "--config", "cpu-32", "--out", p["tok"], "--device", "cpu", *TOK)
        assert code == 0, out
        p["tok_summary"] = json.loads(out)
        for split, limit, key in (("train", 48, "cache"), ("test", 30, "cache_test")):
            code, out = cli("latents", "cache", "--tokenizer", p["tok"] / "model", "--data", "shapes", "--split",
                            split, "--limit", limit, "--batch-size", 16, "--out", p[key], "--device", "cpu")
            assert code == 0, out
        code, out = cli("diffusion", "train", "--config", "sit-cpu", "--out", p["sit"], "--device", "cpu",
                        f"latents={p['cache']}", f"tokenizer={p['tok'] / 'model'}", *SIT)
        assert code == 0, out
        p["sit_summary"] = json.loads(out)
        code, out = cli("sample", "--model", p["sit"] / "model", "--tokenizer", p["tok"] / "model",
                        "--num-samples", NUM_SAMPLES, "--balanced", "--steps", 2, "--sampler", "heun", "--cfg", 1.5, "--batch-size",
                        8, "--out", p["samples"], "--device", "cpu")
        assert code == 0, out
        yield p
    finally:
        close_run_logs()  # the runs' train.log handlers


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Run every command from a scratch folder: defaults such as `eval`'s runs/eval/ land there, not in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def real_features(shared_dir: Path, monkeypatch) -> str:
    weights = shared_dir / "data" / "cifar10-resnet20.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} is not present")
    monkeypatch.setenv("MAETOK_SHARED_DATA", str(weights.parent))
    return "resnet20-cifar10"


# ==============================================================================================================
# Training and caching
# ==============================================================================================================
def test_tokenizer_train_writes_model_and_latent_stats(runs):
    s = runs["tok_summary"]
    assert s["finished"] and s["step"] == 3 and s["latent_std"] > 0 and math.isfinite(s["latent_mean"])

    tok = load_tokenizer(runs["tok"] / "model")
    assert tok.config.latent_std == pytest.approx(s["latent_std"])  # stored with the weights for diffusion
    assert len((runs["tok"] / "log.jsonl").read_text().splitlines()) == 3


def test_latent_cache_round_trip(runs):
    from maetok.data import open_dataset
    from maetok.data.latents import LatentDataset

    ds = LatentDataset(runs["cache"])
    assert len(ds) == 48 and ds.latents.shape == (48, 4, 4) and ds.num_classes == 10
    tok = load_tokenizer(runs["tok"] / "model")
    assert (ds.mean, ds.std) == (tok.config.latent_mean, tok.config.latent_std)
    images = open_dataset("shapes", "train", 16, limit=48)
    x = torch.stack([images[i][0] for i in range(48)])
    with torch.no_grad():
        torch.testing.assert_close(ds.latents, tok.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ds.latents_flip, tok.encode(x.flip(-1)), rtol=1e-5, atol=1e-5)
    # Flipped copies are other latents (shapes are not mirror-symmetric in general), not aliases of the originals.
    assert (ds.latents_flip - ds.latents).abs().amax(dim=(1, 2)).gt(1e-4).float().mean() > 0.9
    assert ds.labels.tolist() == [images[i][1] for i in range(48)]
    z, z_flip, y = ds[5]
    assert torch.equal(z, ds.latents[5]) and torch.equal(z_flip, ds.latents_flip[5]) and int(y) == 5 % 10


def test_latent_cache_with_labels_out_of_range_is_refused(runs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from maetok.data.latents import LatentDataset

    cache = tmp_path / "cache"
    shutil.copytree(runs["cache"], cache)
    shard = cache / LatentDataset(cache).meta["shards"][0]
    tensors = load_file(str(shard))
    tensors["labels"][1] = 12
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"cache/shard-00000.safetensors: labels must lie in \[0, 10\).*\[12\]"):
        LatentDataset(cache)


def test_a_damaged_latent_cache_shard_is_named_with_what_is_wrong(runs, tmp_path):
    """Shards are memory-mapped and checked one by one: labels that no longer line up with the latents, a
    missing tensor or a cut-off file name the shard instead of loading shifted labels or failing deep inside."""
    import shutil

    from safetensors.torch import load_file, save_file

    from maetok.data.datasets import DatasetError
    from maetok.data.latents import LatentDataset

    def damaged(edit) -> Path:
        cache = tmp_path / f"cache-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(runs["cache"], cache)
        shard = cache / LatentDataset(cache).meta["shards"][0]
        edit(shard)
        return cache

    def shorter_labels(shard):
        tensors = load_file(str(shard))
        save_file({**tensors, "labels": tensors["labels"][:10]}, str(shard))

    def no_flips(shard):
        tensors = load_file(str(shard))
        del tensors["latents_flip"]
        save_file(tensors, str(shard))

    def cut(shard):
        shard.write_bytes(shard.read_bytes()[:-100])

    with pytest.raises(DatasetError, match=r"shard-00000.safetensors: 'latents' has shape \(48, 4, 4\), the "
                                           r"cache's layout says \(10, 4, 4\)"):
        LatentDataset(damaged(shorter_labels))
    with pytest.raises(DatasetError, match=r"shard-00000.safetensors: cannot be read(.|\n)*no 'latents_flip'"):
        LatentDataset(damaged(no_flips))
    with pytest.raises(DatasetError, match=r"shard-00000.safetensors: cannot be read(.|\n)*truncated"):
        LatentDataset(damaged(cut))


def test_unlabelled_latents_train_an_unconditional_model_only(runs, tmp_path, capsys):
    """A cache of unlabelled images records no classes, so a class-conditional model cannot silently learn one
    placeholder class."""
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images)  # no arr_1: no labels
    code, out = cli("latents", "cache", "--tokenizer", runs["tok"] / "model", "--data",
                    f"npz:{tmp_path / 'plain.npz'}", "--out", tmp_path / "cache", "--device", "cpu")
    assert code == 0, out
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["num_classes"] == 0
    def train(name: str, *overrides: str):
        return cli("diffusion", "train", "--config", "sit-cpu", "--device", "cpu", "--out", tmp_path / name,
                   f"latents={tmp_path / 'cache'}", *SIT, "train.batch_size=4", *overrides)

    capsys.readouterr()
    assert train("conditional")[0] == 2 and not (tmp_path / "conditional").exists()
    assert "no class labels; set model.num_classes=0" in capsys.readouterr().err
    # sit-cpu's preview grids use guidance, which needs classes: refused before the run, with the fix named.
    assert train("guided", "model.num_classes=0")[0] == 2 and not (tmp_path / "guided").exists()
    assert "add sample.cfg_scale=1" in capsys.readouterr().err
    code, out = train("unconditional", "model.num_classes=0", "sample.cfg_scale=1")
    assert code == 0 and json.loads(out)["finished"], out


def test_diffusion_train_on_the_cache(runs):

    assert runs["sit_summary"]["finished"] and runs["sit_summary"]["step"] == 3
    model = load_sit(runs["sit"] / "model")
    assert (model.config.num_tokens, model.config.in_channels, model.config.num_classes) == (4, 4, 10)
    assert (runs["sit"] / "images" / "samples_00000003.png").is_file()  # preview decoded by the tokenizer


def test_resume_needs_only_the_run_folder(runs, tmp_path):
    # `--out DIR --resume` alone continues with the run's saved config (latents, tokenizer, model size), though
    # the command's default preset would not validate by itself; an allowed change extends the run.
    import shutil

    run = tmp_path / "sit"
    shutil.copytree(runs["sit"], run)
    code, out = cli("diffusion", "train", "--out", run, "--resume", "--device", "cpu", "train.steps=4")
    assert code == 0, out
    assert json.loads(out)["step"] == 4


# ==============================================================================================================
# Sampling
# ==============================================================================================================
def test_sample_writes_adm_npz_and_png(runs):
    with np.load(runs["samples"] / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, 16, 16, 3)
    assert np.bincount(labels, minlength=10).tolist() == [NUM_SAMPLES // 10] * 10
    assert len({im.tobytes() for im in images}) == NUM_SAMPLES  # each sample its own noise (and label)
    with Image.open(runs["samples"] / "samples.png") as im:
        assert im.mode == "RGB" and im.width > 16 * 7 and im.height > 16  # an 8-wide grid
    # The settings that drew them, beside them.
    settings = json.loads((runs["samples"] / "sampling.json").read_text())
    assert settings == {"num_samples": NUM_SAMPLES, "sampler": "heun", "steps": 2, "cfg_scale": 1.5,
                        "cfg_interval": [0.0, 1.0], "sde_t_min": settings["sde_t_min"], "seed": 0, "balanced": True,
                        "num_classes": 10, "model": str((runs["sit"] / "model").resolve()),
                        "tokenizer": str((runs["tok"] / "model").resolve()), "batch_size": 8, "processes": 1,
                        "compile": False}

    # Same seed -> the same samples; another seed -> other samples.
    again = runs["samples"].parent / "samples_again"
    for seed, target in ((0, again), (1, again.with_name("samples_seed1"))):
        code, out = cli("sample", "--model", runs["sit"] / "model", "--tokenizer", runs["tok"] / "model", "--num",
                        NUM_SAMPLES, "--balanced", "--steps", 2, "--sampler", "heun", "--cfg", 1.5, "--batch-size",
                        5, "--seed", seed, "--out", target, "--device", "cpu")
        assert code == 0, out
    with np.load(again / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], images)  # batch size 5 instead of 8: same images
    with np.load(again.with_name("samples_seed1") / "samples.npz") as z:
        assert not np.array_equal(z["arr_0"], images)


# ==============================================================================================================
# eval gen
# ==============================================================================================================
def _gen(runs, features: str, *extra) -> dict:
    """One evaluation of the samples; --force: these tests evaluate the same samples again and again."""
    return cli_json("eval", "gen", "--samples", runs["samples"] / "samples.npz", "--features", features,
                    "--device", "cpu", "--force", *extra)


def test_eval_gen_with_real_features_and_stats_cache(runs, real_features, tmp_path):
    net, n = real_features, NUM_SAMPLES
    cache = tmp_path / "ref-stats.npz"
    first = _gen(runs, net, "--ref", "shapes", "--split", "test", "--num", 40, "--stats-cache", cache)
    expected = {f"{m}[{net}]@{n}" for m in ("fid", "kid", "kid_std", "precision", "recall", "is", "is_std")}
    assert set(first["metrics"]) == expected and first["skipped"] == {}
    assert all(math.isfinite(v) for v in first["metrics"].values())
    assert first["metrics"][f"fid[{net}]@{n}"] > 0 and 1 <= first["metrics"][f"is[{net}]@{n}"] <= 10
    assert first["feature_net"] == net and first["num_samples"] == n
    assert first["reference"]["n"] == 40 and first["reference"]["from"] == "images" and cache.is_file()
    # Written under ./runs/eval (this test's folder), named after the samples' folder and file; never beside the
    # samples, whose folder may be read-only.
    written = Path("runs") / "eval" / f"samples-samples.eval-{net}.json"
    assert first["json"] == str(written) and json.loads(written.read_text())["metrics"] == first["metrics"]
    assert {p.name for p in runs["samples"].glob("*.json")} == {"sampling.json"}

    # The cache holds features too: every metric again, without recomputing the reference.
    second = _gen(runs, net, "--ref", "shapes", "--split", "test", "--num", 40, "--stats-cache", cache)
    assert second["reference"]["from"] == f"cache:{cache}"
    assert second["metrics"] == pytest.approx(first["metrics"], rel=1e-9, abs=1e-12)
    from maetok.eval import FeatureStats

    assert FeatureStats.load(cache, net=net).n == 40  # a plain FeatureStats file as well

    # The cache as the reference itself; and a cache made for other reference images is refused.
    direct = _gen(runs, net, "--ref", cache)
    assert direct["metrics"][f"fid[{net}]@{n}"] == pytest.approx(first["metrics"][f"fid[{net}]@{n}"], rel=1e-9)
    code, _ = cli("eval", "gen", "--samples", runs["samples"] / "samples.npz", "--features", net, "--ref", "shapes",
                  "--num", 30, "--stats-cache", cache, "--device", "cpu", "--force")
    assert code == 2


def test_eval_keeps_an_earlier_result_unless_forced(runs, capsys):
    """An evaluation can take hours of Inception on a CPU: its JSON is not replaced by the next one silently."""
    net = "resnet20-cifar10-random"
    first = _gen(runs, net, "--ref", "shapes", "--num-samples", 40, "--out", "mine.json")
    before = Path("mine.json").read_text()
    code, _ = cli("eval", "gen", "--samples", runs["samples"] / "samples.npz", "--features", net, "--ref", "shapes",
                  "--num-samples", 20, "--out", "mine.json", "--device", "cpu")
    assert code == 2 and "mine.json already holds an evaluation result; give --force" in capsys.readouterr().err
    assert Path("mine.json").read_text() == before and first["json"] == "mine.json"


def test_eval_gen_reference_forms_agree(runs, tmp_path):
    """The same 40 reference images as a data spec, as an ADM .npz batch and as stats; samples as .npz or a
    folder of PNGs: the same FID. Random-weights features: no shared data needed."""
    from maetok.data import open_dataset
    from maetok.data.images import float_to_uint8

    net, n = "resnet20-cifar10-random", NUM_SAMPLES
    key = f"fid[{net}]@{n}"
    by_spec = _gen(runs, net, "--ref", "shapes", "--split", "test", "--num", 40)  # --num: the old spelling
    assert by_spec["feature_net"] == net and key in by_spec["metrics"] and by_spec["reference"]["n"] == 40
    default_split = _gen(runs, net, "--ref", "shapes", "--num-samples", 40)  # no --split: shapes has test
    assert default_split["metrics"] == by_spec["metrics"]

    ds = open_dataset("shapes", "test", 16, limit=40)
    ref_images = float_to_uint8(torch.stack([ds[i][0] for i in range(40)])).numpy()  # exact: shapes are uint8
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    by_npz = _gen(runs, net, "--ref", tmp_path / "ref.npz")
    assert by_npz["metrics"] == pytest.approx(by_spec["metrics"], rel=1e-6, abs=1e-9)  # other memory layout

    stats_only = tmp_path / "stats-only.npz"
    from maetok.eval import FeatureStats, extract_features
    from maetok.eval.api import resolve_feature_net

    feats = extract_features(resolve_feature_net(net), ref_images, progress=False)
    FeatureStats.from_features(feats).save(stats_only)
    by_stats = _gen(runs, net, "--ref", stats_only)
    assert by_stats["metrics"] == {key: pytest.approx(by_spec["metrics"][key], rel=1e-9),
                                   f"is[{net}]@{n}": pytest.approx(by_spec["metrics"][f"is[{net}]@{n}"]),
                                   f"is_std[{net}]@{n}": pytest.approx(by_spec["metrics"][f"is_std[{net}]@{n}"])}
    assert "reference features" in by_stats["skipped"]["kid"]

    folder = tmp_path / "pngs"
    folder.mkdir()
    with np.load(runs["samples"] / "samples.npz") as z:
        for i, im in enumerate(z["arr_0"]):
            Image.fromarray(im).save(folder / f"{i:03d}.png")
    by_folder = cli_json("eval", "gen", "--samples", folder, "--features", net, "--ref", "shapes", "--num-samples",
                         40, "--device", "cpu", "--out", tmp_path / "results" / "gen.json")
    assert by_folder["metrics"] == pytest.approx(by_spec["metrics"], rel=1e-9, abs=1e-12)
    assert by_folder["json"] == str(tmp_path / "results" / "gen.json")  # --out FILE.json: exactly there
    assert json.loads((tmp_path / "results" / "gen.json").read_text())["metrics"] == by_folder["metrics"]
    into = cli_json("eval", "gen", "--samples", folder, "--features", net, "--ref", "shapes", "--num-samples", 40,
                    "--device", "cpu", "--out", tmp_path / "results")  # --out FOLDER: the default name in it
    assert into["json"] == str(tmp_path / "results" / f"{tmp_path.name}-pngs.eval-{net}.json")
    assert not list(folder.glob("*.json")) and not list(tmp_path.glob("*.json"))  # nothing beside the inputs


def test_eval_usage_errors_exit_2(runs, tmp_path):
    samples = runs["samples"] / "samples.npz"
    assert cli("eval", "gen", "--ref", "shapes", "--device", "cpu")[0] == 2  # no --samples
    assert cli("eval", "recon", "--ref", "shapes", "--device", "cpu")[0] == 2  # no --tokenizer
    assert cli("eval", "gen", "--samples", tmp_path / "missing.npz", "--ref", "shapes", "--device", "cpu")[0] == 2
    assert cli("eval", "gen", "--samples", samples, "--ref", tmp_path / "nowhere", "--features",
               "resnet20-cifar10-random", "--device", "cpu")[0] == 2
    assert cli("eval", "gen", "--samples", samples, "--ref", "shapes", "--features", "no-such-net")[0] == 2
    assert cli("analyze", "--latents", "no-equals-sign", "--out", tmp_path / "a")[0] == 2
    assert cli("analyze", "--latents", f"a={runs['cache']}", "--ks", "1,x", "--out", tmp_path / "a")[0] == 2


# ==============================================================================================================
# eval recon, tokenizer reconstruct
# ==============================================================================================================
def test_eval_recon(runs, real_features, tmp_path):
    net = real_features
    args = ("eval", "recon", "--tokenizer", runs["tok"] / "model", "--ref", "shapes", "--split", "test",
            "--num-samples", 24, "--features", net, "--stats-cache", tmp_path / "ref.npz", "--device", "cpu")
    result = cli_json(*args)
    assert result["reference_cached_to"] == str(tmp_path / "ref.npz")
    again = cli_json(*args, "--force")  # the originals' features from the cache: the same rFID
    assert "reference_cached_to" not in again and again["metrics"] == pytest.approx(result["metrics"], rel=1e-9)
    m = result["metrics"]
    assert set(m) == {f"rfid[{net}]@24", "psnr@24", "ssim@24"} and all(math.isfinite(v) for v in m.values())
    assert "LPIPS" in result["skipped"]["lpips"]  # no LPIPS weights on these machines: a reason, not a number
    written = Path("runs") / "eval" / f"tok-model.recon-{net}.json"  # ./runs/eval: not in the tokenizer's run
    assert result["json"] == str(written) and json.loads(written.read_text())["metrics"] == m
    assert not list(runs["tok"].glob("*.recon-*.json"))

    # PSNR recomputed independently: reconstructions as saved images (uint8 levels) against the originals.
    from maetok.data import open_dataset
    from maetok.eval import psnr

    tok = load_tokenizer(runs["tok"] / "model")
    ds = open_dataset("shapes", "test", 16, limit=24)
    x = torch.stack([ds[i][0] for i in range(24)])
    with torch.no_grad():
        r = ((tok.decode(tok.encode(x)).clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    assert m["psnr@24"] == pytest.approx(psnr(r, x).mean().item(), rel=1e-6)


def test_tokenizer_reconstruct_writes_grid_and_metrics(runs, tmp_path):
    code, out = cli("tokenizer", "reconstruct", "--model", runs["tok"] / "model", "--images", "shapes",
                    "--num-samples", 16, "--out", tmp_path)
    assert code == 0, out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 16 and math.isfinite(metrics["psnr"]) and -1 <= metrics["ssim"] <= 1
    assert metrics["split"] == "test"  # no --split: the held-out split
    with Image.open(tmp_path / "reconstructions.png") as im:
        # 8 per row, 2 pixels of padding: originals, reconstructions, originals, reconstructions.
        assert im.size == (8 * 16 + 9 * 2, 4 * 16 + 5 * 2)


# ==============================================================================================================
# analyze
# ==============================================================================================================
def test_analyze_cli_writes_json_and_plot(runs, tmp_path):
    out = tmp_path / "analysis"
    report = cli_json("analyze", "--latents", f"tok={runs['cache']}", f"other={runs['cache_test']}",
                      "--test-latents", f"tok={runs['cache_test']}", "--ks", "1,2,4,64", "--out", out)
    assert report == json.loads((out / "analysis.json").read_text())
    with Image.open(out / "gmm_nll.png") as im:
        assert im.format == "PNG" and im.width > 100
    assert report["ks"] == [1, 2, 4] and report["ks_dropped"]["ks"] == [64]  # more modes than latents
    tok, other = report["tokenizers"]["tok"], report["tokenizers"]["other"]
    assert tok["n_train"] == 48 and tok["n_test"] == 30 and tok["test"] == str(runs["cache_test"])
    assert other["n_train"] + other["n_test"] == 30 and other["test"].startswith("held out")
    for entry in (tok, other):
        assert entry["gmm"]["pca_dim"] == report["pca_dim"]  # one PCA space for every tokenizer
        assert len(entry["gmm"]["nll"]) == len(entry["gmm"]["bic"]) == 3 and entry["gmm"]["best_k_bic"] in (1, 2, 4)
        assert 0 <= entry["metrics"][f"probe_top1@{entry['n_test']}"] <= 1
        assert len(entry["token_stats"]["per_token_std"]) == 4


def test_analyze_latents_shares_the_pca_dimension():
    """Two 'tokenizers': a low-rank latent space (few components keep 90%) and an isotropic one (needs all).
    Both are fitted in the larger dimension, so their NLLs are comparable."""
    from maetok.eval.api import analyze_latents
    from maetok.eval.latent_analysis import pca_dim_for_variance

    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 8)) + 0.01 * rng.normal(size=(300, 8))
    isotropic = rng.normal(size=(300, 8))
    labels = rng.integers(0, 3, size=300)
    train = {"low": (low_rank[:200].reshape(200, 4, 2), labels[:200]),
             "iso": (isotropic[:200].reshape(200, 4, 2), labels[:200])}
    test = {"low": (low_rank[200:].reshape(100, 4, 2), labels[200:]),
            "iso": (isotropic[200:].reshape(100, 4, 2), labels[200:])}
    own = {k: pca_dim_for_variance(v[0]) for k, v in train.items()}
    assert own["low"] < own["iso"]
    report = analyze_latents(train, test, ks=(1, 2), out_dir=None)
    assert report["pca_dim"] == own["iso"]
    assert {r["gmm"]["pca_dim"] for r in report["tokenizers"].values()} == {own["iso"]}
    assert report["tokenizers"]["low"]["own_pca_dim"] == own["low"]
    # Random labels: the probe must not find signal that is not there (3 classes -> about 1/3).
    assert report["tokenizers"]["iso"]["metrics"]["probe_top1@100"] < 0.6
