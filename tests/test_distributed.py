"""DDP on CPU (gloo, 2 processes under torchrun): one global-batch step equals the single-process step, ranks
agree on skipping and stopping, per-rank randomness differs, sharded sampling equals the single-process output.

One torchrun launch runs every scenario of tests/_ddp_worker.py (launching is the slow part); each test here
compares one scenario's files with a single-process reference computed in this process.

Why the equality checks avoid per-sample randomness: under DDP each rank draws its own flips, masks, noise and
times from its own RNG stream (deliberately different per rank), so a DDP step over batch B cannot draw the same
values as one process over B. The tokenizer check therefore uses variant ae without flips (a deterministic
loss), and the SiT check a task whose t and noise come from generators seeded by the sample index; that masks
really differ across ranks is checked separately.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import _ddp_worker as W
from conftest import free_port
from maetok.io.checkpoint import latest_checkpoint, load_checkpoint
from maetok.io.distributed import DistInfo
from maetok.io.pretrained import load_sit, load_tokenizer, save_pretrained

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_ddp_worker.py")


@dataclass
class DDPRun:
    out: Path
    inputs: Path
    returncode: int
    log: str

    def check(self, scenario: str) -> Path:
        """The scenario's folder, after failing with the workers' tracebacks if any rank raised in it, or with
        torchrun's output if the job died before reaching it."""
        folder = self.out / scenario
        errors = sorted(folder.glob("error-*.json"))
        if errors:
            pytest.fail(f"{scenario} failed under torchrun:\n" + "\n".join(json.loads(e.read_text()) for e in errors))
        if not folder.is_dir():
            pytest.fail(f"{scenario} never ran; torchrun exited with {self.returncode}:\n{self.log[-6000:]}")
        return folder

    def summaries(self, scenario: str) -> list[dict]:
        folder = self.check(scenario)
        return [json.loads((folder / f"summary-{r}.json").read_text()) for r in (0, 1)]


def _make_inputs(root: Path) -> None:
    """A tiny random tokenizer, a latent cache of it, and a random SiT, both perturbed away from their init so
    that samples depend on the noise and the model."""
    from maetok.config import TokenizerConfig
    from maetok.data import open_dataset
    from maetok.data.latents import cache_latents
    from maetok.diffusion.sit import SiT
    from maetok.tokenizer import MAETok

    torch.manual_seed(0)
    tok = MAETok(TokenizerConfig(variant="ae", image_size=16, patch_size=4, latent_tokens=4, latent_dim=4,
                                 enc_width=32, enc_heads=2, enc_depth=1, dec_width=32, dec_heads=2, dec_depth=1,
                                 aux_targets=[]))
    sit = SiT.from_config(W.SIT)
    with torch.no_grad():  # both start with zero-initialised gates (the decoder ignores z, SiT outputs 0): perturb
        for p in (*tok.parameters(), *sit.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    save_pretrained(tok, root / "tok")
    cache_latents(tok, open_dataset("shapes", "train", 16, limit=32), root / "cache", batch_size=16,
                  progress=False)
    save_pretrained(sit, root / "sit")
    rng = np.random.default_rng(0)
    np.savez(root / "samples.npz", arr_0=rng.integers(0, 256, (13, 16, 16, 3), dtype=np.uint8))
    # A latent cache one process left unfinished: shards 0 and 3 of 7 on disk, no meta.json yet.
    partial = root / "partial-cache"
    cache_latents(tok, open_dataset("shapes", "train", 16, limit=32), partial, batch_size=4, shard_size=5,
                  progress=False)
    for p in partial.iterdir():
        if p.name not in ("shard-00000.safetensors", "shard-00003.safetensors"):
            p.unlink()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> DDPRun:
    root = tmp_path_factory.mktemp("ddp")
    _make_inputs(root / "inputs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(root / "out"), ",".join(W.SCENARIOS),
           str(root / "inputs")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return DDPRun(root / "out", root / "inputs", proc.returncode, proc.stdout + proc.stderr)


def test_torchrun_job_exits_cleanly(ddp: DDPRun):
    assert ddp.returncode == 0, ddp.log[-6000:]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, rtol: float = 1e-5) -> list[str]:
    assert a.keys() == b.keys()
    return [f"{k}: max |diff| {float((a[k] - b[k]).abs().max()):.3g}" for k in a
            if not torch.allclose(a[k], b[k], atol=atol, rtol=rtol)]


# ==============================================================================================================
# Training: one DDP step == one single-process step
# ==============================================================================================================
def test_tokenizer_ddp_step_equals_single_process(ddp: DDPRun, tmp_path: Path):
    from maetok.config import TokenizerRunConfig, load_config
    from maetok.train.run import run_tokenizer

    summaries = ddp.summaries("tok_ae")
    assert all(s["finished"] and s["step"] == 1 for s in summaries), summaries
    single = run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", W.TOK_AE), tmp_path / "single", device="cpu")
    assert single["finished"]
    a = load_checkpoint(latest_checkpoint(ddp.out / "tok_ae" / "run" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "single" / "checkpoints"))
    assert a["step"] == b["step"] == 1
    # Adam's first moment after one step is 0.1 x the (averaged, clipped) gradient: the gradients must match...
    moments = lambda s: {f"{i}.{k}": v for i, st in s["optimizer"]["state"].items() for k, v in st.items()
                         if k in ("exp_avg", "exp_avg_sq")}
    ma, mb = moments(a), moments(b)
    assert any(float(v.abs().max()) > 0 for k, v in mb.items() if k.endswith("exp_avg")), "no gradient at all"
    assert not _close(ma, mb, atol=1e-9, rtol=1e-4), _close(ma, mb, atol=1e-9, rtol=1e-4)[:5]
    # ...and so must the weights and their EMA (one lr-sized Adam step each, float32 round-off apart).
    assert not _close(a["model"], b["model"], atol=1e-6), _close(a["model"], b["model"], atol=1e-6)[:5]
    assert not _close(a["ema"], b["ema"], atol=1e-6)
    assert (ddp.out / "tok_ae" / "run" / "model" / "model.safetensors").is_file()  # rank 0 finalised


def test_gan_discriminator_under_ddp_equals_single_process(ddp: DDPRun, tmp_path: Path):
    """The discriminator is trained outside DDP (its gradients averaged by hand): after two steps with the GAN on,
    both ranks hold the same discriminator and tokenizer, and with a fixed GAN weight they equal one process
    trained on the same global batches."""
    from maetok.config import TokenizerRunConfig, load_config

    for name in ("fixed", "adaptive"):
        folder = ddp.check("tok_gan") / name
        summaries = [json.loads((folder / f"summary-{r}.json").read_text()) for r in (0, 1)]
        assert all(s["finished"] and s["step"] == 2 and s["skipped_steps"] == 0 for s in summaries), summaries
        r0, r1 = load_file(str(folder / "rank0.st")), load_file(str(folder / "rank1.st"))
        assert any(k.startswith("disc.") for k in r0)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{name}: ranks disagree"
    summary, task = W.run_tokenizer_keeping_task(load_config(TokenizerRunConfig, "cpu-32", W.TOK_GAN_FIXED),
                                                 tmp_path / "single")
    assert summary["finished"]
    single = W.gan_tensors(task)
    r0 = load_file(str(ddp.out / "tok_gan" / "fixed" / "rank0.st"))
    moved = [k for k, v in task.initial_disc.items() if not torch.equal(v, single[f"disc.{k}"])]
    assert moved, "the discriminator never trained"
    # Adam divides by sqrt(v): where a gradient is ~0, summation-order round-off becomes a visible share of one
    # lr-sized step (1e-4 for the discriminator). Per-rank gradients stepped unaveraged would differ by ~1e-4.
    bad = _close(r0, single, atol=1e-5)
    assert not bad, bad[:5]


def test_sit_ddp_steps_equal_single_process(ddp: DDPRun, tmp_path: Path):
    folder = ddp.check("sit")
    r0, r1 = load_file(str(folder / "rank0.st")), load_file(str(folder / "rank1.st"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "DDP ranks hold different weights or gradients"
    trainer = W.sit_trainer(tmp_path / "single", DistInfo())
    assert trainer.fit()["finished"]
    single = W.trainer_tensors(trainer)
    grads = {k for k in single if k.startswith("g.")}
    # Two steps: after the first, the zero-initialised adaLN gates open and the blocks get gradients too.
    assert sum(float(single[k].abs().max()) > 0 for k in grads if ".blocks." in k) > 0
    bad = _close(r0, single, atol=1e-6)
    assert not bad, bad[:5]


def test_real_diffusion_task_runs_under_ddp_in_a_fresh_run_dir(ddp: DDPRun):
    summaries = ddp.summaries("diffusion_run")
    assert [s["step"] for s in summaries] == [2, 2] and all(s["finished"] for s in summaries)
    run = ddp.out / "diffusion_run" / "run"
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"))["step"] == 2
    assert (run / "model" / "model.safetensors").is_file()


# ==============================================================================================================
# Per-rank randomness, and ranks that must agree
# ==============================================================================================================
def test_masks_differ_across_ranks(ddp: DDPRun):
    folder = ddp.check("tok_masks")
    m0, m1 = load_file(str(folder / "masks-0.st")), load_file(str(folder / "masks-1.st"))
    assert sorted(m0) == sorted(m1) == ["step0", "step1"]
    for step in m0:
        assert m0[step].shape == (4, 16)  # global batch 8 over 2 ranks, 4x4 patches
        # Identical RNG streams would give rank 1 exactly rank 0's masks: half the global batch's mask draws.
        assert not torch.equal(m0[step], m1[step]), f"{step}: both ranks drew the same masks"
    assert not torch.equal(m0["step0"], m0["step1"])


def test_nonfinite_loss_on_one_rank_is_skipped_on_all(ddp: DDPRun):
    s0, s1 = ddp.summaries("nan")
    for s in (s0, s1):
        assert s["finished"] and s["step"] == 6 and s["skipped_steps"] == 1, s
    assert s0["weights"] == s1["weights"]
    assert all(a != b for a, b in zip(s0["draws"], s1["draws"])), "ranks drew the same random numbers"


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(ddp: DDPRun):
    s0, s1 = ddp.summaries("sigterm")
    assert s0["step"] == s1["step"] == 3, (s0, s1)
    assert s0["stopped_by"] == s1["stopped_by"] == "SIGTERM"
    ckpt = latest_checkpoint(ddp.out / "sigterm" / "run" / "checkpoints")
    assert ckpt is not None and load_checkpoint(ckpt)["step"] == 3  # the final checkpoint, by rank 0


# ==============================================================================================================
# Sharded sampling
# ==============================================================================================================
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sharded_sampling_equals_single_process(ddp: DDPRun, tmp_path: Path, sampler: str):
    from maetok.config import SampleConfig
    from maetok.eval.generate import generate_to_dir

    folder = ddp.check("sample") / sampler
    model, tok = load_sit(ddp.inputs / "sit"), load_tokenizer(ddp.inputs / "tok")
    cfg = SampleConfig(sampler=sampler, steps=3, cfg_scale=1.5, seed=5)
    single = generate_to_dir(model, tok, 11, cfg, tmp_path, balanced=True, batch_size=4, progress=False)
    with np.load(folder / "samples.npz") as a, np.load(single) as b:
        assert a["arr_0"].shape == (11, 16, 16, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_1"], np.arange(11) % 10)
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        # Ranks batch different samples together; per-sample results must not depend on that.
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
        assert len({a["arr_0"][i].tobytes() for i in range(11)}) == 11  # no sample written twice or left blank
    assert (folder / "samples.png").is_file()
    assert not list(folder.glob(".shard-*"))  # rank 0 assembled the ranks' shares and removed them


# ==============================================================================================================
# Sharded evaluation
# ==============================================================================================================
def test_sharded_evaluation_equals_single_process(ddp: DDPRun, tmp_path: Path):
    """`maetok eval` under torchrun: the ranks split the feature extraction and the reconstructions, every rank
    returns the same result, equal to one process's, and rank 0 alone writes the reference caches."""
    from maetok.eval.fid import FeatureStats

    folder = ddp.check("eval")
    results = [json.loads((folder / f"result-{r}.json").read_text()) for r in (0, 1)]
    single = W.evaluate_both(ddp.inputs, tmp_path, None)
    # 13 references, 13 samples, then twice 13 reconstructions (+ 13 originals the first time, before the cache
    # holds them): 7 + 6 of each per rank. Two caches, written by rank 0 alone.
    assert single["embedded"] == 65 and [r.pop("embedded") for r in results] == [35, 30]
    assert single["saved"] == 2 and [r.pop("saved") for r in results] == [2, 0]
    assert results[0] == results[1]
    for kind in ("gen", "recon", "recon_cached"):
        got, want = results[0][kind], single[kind]
        assert got["skipped"] == want["skipped"] and got["metrics"].keys() == want["metrics"].keys(), kind
        for key, value in want["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (kind, key)
    assert results[0]["recon_cached"]["metrics"] == results[0]["recon"]["metrics"]  # the cache gives the same rFID
    assert "reference_cached_to" in results[0]["recon"] and "reference_cached_to" not in results[0]["recon_cached"]
    assert results[0]["gen"]["num_samples"] == 13 and results[0]["recon"]["num_images"] == 13
    a, b = FeatureStats.load(folder / "ref-stats.npz"), FeatureStats.load(tmp_path / "ref-stats.npz")
    assert a.n == b.n == 13 and np.allclose(a.mu, b.mu, rtol=1e-6, atol=1e-9)
    # `maetok eval gen|recon` under torchrun: one printed result (rank 0's), written once into --out.
    for what, written_glob, api_result in (("gen", "*samples.eval-*.json", results[0]["gen"]),
                                           ("recon", "*tok.recon-*.json", results[0]["recon"])):
        cli = [json.loads((folder / f"cli-{what}-{r}.json").read_text()) for r in (0, 1)]
        assert [c["code"] for c in cli] == [0, 0] and cli[1]["stdout"] == "", what
        printed = json.loads(cli[0]["stdout"])
        [written] = [json.loads(p.read_text()) for p in folder.glob(written_glob)]
        assert printed["metrics"] == written["metrics"], what
        # The API's numbers (same net and data; LPIPS is skipped by the CLI here, left out by the API).
        shared = {k: v for k, v in printed["metrics"].items() if k in api_result["metrics"]}
        assert shared and shared == pytest.approx({k: api_result["metrics"][k] for k in shared}), what


def test_pilot_evaluation_is_sharded_and_equals_single_process(ddp: DDPRun, tmp_path: Path):
    """Under torchrun the pilot's evaluation stages split the work: each rank embeds its share of the references,
    reconstructions and samples, and rank 0's metrics equal one process's."""
    folder = ddp.check("pilot_eval")
    results = [json.loads((folder / f"result-{r}.json").read_text()) for r in (0, 1)]
    single = W.pilot_evaluation(ddp.inputs, tmp_path, None)
    # Held-out reference, training floor, reconstructions, samples: 4 x 13 images, shares of 7 and 6.
    assert single["embedded"] == 52 and [r["embedded"] for r in results] == [28, 24]
    assert results[0]["floor"] == results[1]["floor"] and results[0]["recon"] == results[1]["recon"]
    assert results[1]["gen"] == {}  # rank 0 computes the generation metrics from everyone's features
    for kind in ("floor", "recon", "gen"):
        got, want = results[0][kind], single[kind]
        want.pop("sampling_images_per_s", None), got.pop("sampling_images_per_s", None)
        assert got.keys() == want.keys() and got, kind
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (kind, key)
    assert {"rfid[resnet20-cifar10-random]@13", "psnr@13", "ssim@13"} <= results[0]["recon"].keys()
    assert (folder / "ae" / "reconstructions.png").is_file()


def test_sharded_latent_cache_equals_single_process(ddp: DDPRun, tmp_path: Path):
    from maetok.data import open_dataset
    from maetok.data.latents import LatentDataset, cache_latents

    folder = ddp.check("latents")
    tok = load_tokenizer(ddp.inputs / "tok")
    cache_latents(tok, open_dataset("shapes", "train", 16, limit=32), tmp_path, batch_size=4, shard_size=5,
                  progress=False)
    a, b = LatentDataset(folder / "cache"), LatentDataset(tmp_path)
    assert len(a) == len(b) == 32 and len(a.meta["shards"]) == 7
    assert a.meta == b.meta
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.latents_flip, b.latents_flip, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.labels, b.labels)
    # An unfinished cache completed by two ranks: the shards on disk are kept, the result is the same cache.
    resumed = LatentDataset(folder / "resumed")
    torch.testing.assert_close(resumed.latents, b.latents, rtol=1e-5, atol=1e-6)
    kept = json.loads((folder / "kept-0.json").read_text())
    assert sorted(kept) == ["shard-00000.safetensors", "shard-00003.safetensors"]
    assert all(before == after for before, after in kept.values())
    # The command line under torchrun: one cache, one message.
    cli = [json.loads((folder / f"cli-{r}.json").read_text()) for r in (0, 1)]
    assert [c["code"] for c in cli] == [0, 0] and cli[1]["stdout"] == "" and "cached 8 latents" in cli[0]["stdout"]
    assert len(LatentDataset(folder / "cli-cache")) == 8


def test_pilot_stages_agree_when_a_rank_arrives_late(ddp: DDPRun):
    folder = ddp.check("pilot_stage")
    seen = [json.loads((folder / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] == {"keys": ["every_rank", "rank0_only"], "sum": 1.0}


@pytest.mark.parametrize("n,world", [(13, 2), (2, 4), (0, 3), (16, 4)])
def test_shards_cover_every_item_once_in_order(n: int, world: int):
    from maetok.io.distributed import shard_range

    shares = [shard_range(n, DistInfo(rank=r, world=world)) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_checkpoint_that_rank_0_cannot_write_stops_every_rank_with_its_errno(ddp: DDPRun):
    # A full disk under torch.save on rank 0: rank 1 raises an OSError with the same errno (exit code 5, one line)
    # instead of dying in the next collective with a connection error.
    folder = ddp.check("disk_full")
    seen = [json.loads((folder / f"disk-full-{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["type"] == "RuntimeError" and seen[1]["type"] == "OSError", seen
    assert seen[0]["errno"] == seen[1]["errno"] == errno.ENOSPC and seen[1]["seconds"] < 20, seen


def test_a_refused_run_directory_stops_every_rank_at_once(ddp: DDPRun):
    # Rank 0 alone decides on the run directory; rank 1 must get the same refusal, not wait in a collective.
    folder = ddp.check("refused_run_dir")
    seen = [json.loads((folder / f"refused-{r}.json").read_text()) for r in (0, 1)]
    assert all("already exists" in s["error"] for s in seen), seen
    assert seen[0]["error"] == seen[1]["error"] and seen[1]["seconds"] < 20  # the worker's timeout is 30 s
