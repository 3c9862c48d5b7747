"""Reliability of training runs: a real SIGKILL mid-run, then --resume, gives bit-identical weights on CPU, also
with DataLoader workers and an immediate restart.

Also: run directories are never silently overwritten, checkpoints are atomic and never in place without their
digest, one that cannot be verified is not trusted, pickles are refused, non-finite steps are skipped and
eventually stop the run with an emergency checkpoint rolled back to the last good one, SIGTERM writes a final
checkpoint.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import maetok.io.checkpoint as checkpoint_module
from maetok.io.checkpoint import latest_checkpoint, load_checkpoint, resume_checkpoint, save_checkpoint
from maetok.io.pretrained import save_pretrained

TINY = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
        "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1",
        "model.dec_width=32", "model.dec_heads=2", "model.dec_depth=1", "model.aux_width=16",
        "model.aux_heads=1", "model.aux_depth=1", "data.limit=48", "train.batch_size=8", "train.log_every=1",
        "train.image_every=1000", "train.ckpt_every=1", "train.keep_last=3", "stats_batches=1",
        "train.optim.warmup_steps=3", "loss.gan.weight=0.1", "loss.gan.start_step=2", "loss.gan.diffaug=true",
        "loss.gan.lecam_weight=0.01"]


def _train(out: Path, steps: int, *extra: str, resume: bool = False, new_session: bool = False,
           output: Path | None = None) -> subprocess.Popen:
    """`maetok tokenizer train` of the TINY model; `new_session`: in its own process group, as a job's; `output`:
    a file for its output instead of a pipe (whose end a DataLoader worker outliving the trainer would hold)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "maetok.cli", "tokenizer", "train", "--config", "cpu-32", "--out", str(out),
           "--device", "cpu", *(["--resume"] if resume else []), *TINY, f"train.steps={steps}", *extra]
    stdout = open(output, "w") if output else subprocess.PIPE
    try:
        return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                                start_new_session=new_session)
    finally:
        if output:
            stdout.close()  # the child holds its own copy


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state["ema"].items()},
            **{f"task.disc.{k}": v for k, v in state["task"]["disc"].items()}}


def _kill_after_checkpoint(proc: subprocess.Popen, run: Path, min_step: int) -> int:
    """SIGKILL `proc` as soon as a checkpoint at step >= min_step exists, wherever it is; the step resumed from."""
    deadline = time.time() + 240
    while time.time() < deadline:
        ckpt = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").exists() else None
        if ckpt is not None and int(ckpt.stem.split("-")[1]) >= min_step:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return int(latest_checkpoint(run / "checkpoints").stem.split("-")[1])


STEPS = 14


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted TINY run of STEPS steps (no DataLoader workers) that killed and resumed runs must match."""
    out = tmp_path_factory.mktemp("reference") / "ref"
    ref = _train(out, STEPS)
    out_ref, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out_ref
    return out


def _assert_same_final_state(ref: Path, run: Path, killed_at: int) -> None:
    a, b = _final_state(ref), _final_state(run)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"killed at step {killed_at}; resumed weights differ in {different[:5]}"
    assert (run / "model" / "model.safetensors").is_file()


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, reference_run: Path):
    steps = STEPS
    run = tmp_path / "killed"
    killed_at = _kill_after_checkpoint(_train(run, steps), run, 5)
    assert killed_at < steps, "the run finished before it could be killed"

    again = _train(run, steps, resume=True)
    out_again, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out_again
    _assert_same_final_state(reference_run, run, killed_at)


def _orphaned_workers_of(run: Path) -> list[int]:
    """Processes still running the killed command line (its forked DataLoader workers), but not as --resume."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in argv and b"--resume" not in argv:
            found.append(int(proc.name))
    return found


def test_a_run_with_dataloader_workers_killed_and_restarted_at_once_is_bit_identical(tmp_path: Path,
                                                                                      reference_run: Path):
    """A scheduler (Slurm, Kubernetes) restarts a killed job at once, while the DataLoader workers the SIGKILL
    orphaned still live (they notice a dead parent only within seconds): their inherited descriptor must not
    keep the run directory locked. Workers change nothing in what is trained: the reference has none."""
    run = tmp_path / "killed"
    proc = _train(run, STEPS, "data.num_workers=2", output=tmp_path / "killed.log")
    killed_at = _kill_after_checkpoint(proc, run, 5)
    assert killed_at < STEPS, "the run finished before it could be killed"
    orphans = _orphaned_workers_of(run)
    again = _train(run, STEPS, "data.num_workers=2", resume=True)  # no wait for the orphans
    out_again, _ = again.communicate(timeout=300)
    assert orphans, "no DataLoader worker outlived the killed trainer: the test did not test the restart"
    assert again.returncode == 0, out_again
    _assert_same_final_state(reference_run, run, killed_at)


def test_existing_run_dir_needs_resume_or_force(tmp_path: Path):
    from maetok.io.rundir import RUN_MARKER, RunDirExists, prepare_run_dir

    out = tmp_path / "run"
    prepare_run_dir(out, resume=False, force=False)
    assert (out / RUN_MARKER).is_file()
    (out / "checkpoints").mkdir()
    save_checkpoint(out / "checkpoints", 1, {"step": 1})
    with pytest.raises(RunDirExists, match="--resume"):
        prepare_run_dir(out, resume=False, force=False)
    assert prepare_run_dir(out, resume=True, force=False) == out and latest_checkpoint(out / "checkpoints")
    prepare_run_dir(out, resume=False, force=True)
    assert out.exists() and [p.name for p in out.iterdir()] == [RUN_MARKER]
    # Not a run (no marker, and files a run does not write): never resumed in, reused or deleted.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("x: 1")
    for resume, force in ((False, False), (True, False), (False, True)):
        with pytest.raises(RunDirExists, match="not a maetok run"):
            prepare_run_dir(other, resume=resume, force=force)
    assert (other / "config.yaml").read_text() == "x: 1"


def test_checkpoint_is_atomic_and_keeps_last_k(tmp_path: Path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep_last=2)
    names = sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))
    assert names == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 5
    assert not list(tmp_path.glob(".*tmp*"))

    class Boom(RuntimeError):
        pass

    def failing_write(f):
        f.write(b"partial")
        raise Boom()

    from maetok.io.files import atomic_write_bytes

    with pytest.raises(Boom):
        atomic_write_bytes(tmp_path / "ckpt-00000006.pt", failing_write)
    assert not (tmp_path / "ckpt-00000006.pt").exists() and not list(tmp_path.glob(".*tmp*"))
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 5


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _flip_a_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_save_killed_before_its_digest_is_written_leaves_no_checkpoint_without_one(tmp_path: Path, monkeypatch):
    """A SIGKILL between a checkpoint's rename and its digest's write left a checkpoint that loaded unchecked (a
    flipped byte then resumed as silently wrong weights): the digest is committed before the checkpoint."""
    weights = {"w": torch.arange(4096, dtype=torch.float32)}
    save_checkpoint(tmp_path, 1, {"step": 1, **weights})

    class Killed(BaseException):
        pass

    real_write = checkpoint_module.atomic_write_bytes

    def killed_at_the_digest(path, *args, **kwargs):
        if Path(path).name.endswith(".sha256") and "00000002" in Path(path).name:
            raise Killed()
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", killed_at_the_digest)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 2, {"step": 2, **weights})
    monkeypatch.undo()
    for ckpt in tmp_path.glob("*.pt"):  # whatever the kill left in place is refused once a byte flips
        _flip_a_byte(ckpt)
        with pytest.raises(ValueError, match=ckpt.name):
            load_checkpoint(ckpt)


def test_a_checkpoint_without_its_digest_is_not_trusted(tmp_path: Path):
    """A checkpoint that cannot be verified (its digest lost, or written before digests) is not loaded as good;
    resuming names the newest one that verifies."""
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.arange(4096, dtype=torch.float32)})
    unverified = tmp_path / "ckpt-00000002.pt"
    (tmp_path / "ckpt-00000002.pt.sha256").unlink()
    _flip_a_byte(unverified)
    with pytest.raises(ValueError, match=r"ckpt-00000002.pt: has no digest"):
        load_checkpoint(unverified)
    with pytest.raises(ValueError, match=r"no digest(.|\n)*--resume=verified(.|\n)*ckpt-00000001.pt \(step 1\)"):
        resume_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path, fallback=True).name == "ckpt-00000001.pt"


def test_pickle_payload_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(ValueError, match="nothing is unpickled"):
        load_checkpoint(path)
    from maetok.io.convert_tokenizer import read_official_weights

    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_official_weights(path)


def _toy_trainer(out: Path, steps: int, hook=None, **train):
    """A Trainer of a linear model on random 2-feature data; hook(call, loss) may change a step's loss (calls count
    from 1)."""
    from maetok.config import TrainConfig
    from maetok.io.distributed import DistInfo
    from maetok.train.loop import Task, Trainer

    class LinearTask(Task):
        def __init__(self):
            torch.manual_seed(0)
            self.model = torch.nn.Linear(2, 1)
            self.calls = 0

        def training_step(self, model, batch, step):
            self.calls += 1
            loss = (model(batch[0]) - 1).pow(2).mean()
            return {"loss": hook(self.calls, loss) if hook else loss}

    data = torch.utils.data.TensorDataset(torch.randn(32, 2, generator=torch.Generator().manual_seed(1)),
                                          torch.zeros(32))
    cfg = TrainConfig(steps=steps, batch_size=4, **{"log_every": 1, "ckpt_every": 100, **train})
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(LinearTask(), cfg, data, out, cfg, DistInfo())


def test_nonfinite_steps_are_skipped_then_stop_with_emergency_checkpoint(tmp_path: Path):
    trainer = _toy_trainer(tmp_path, 50, lambda call, loss: loss * float("nan") if call > 2 else loss,
                           max_bad_steps=3)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite"):
        trainer.fit()
    emergency = list((tmp_path / "checkpoints").glob("emergency-*.pt"))
    assert len(emergency) == 1
    state = load_checkpoint(emergency[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["counters"]["skipped_steps"] == 3


def test_a_run_does_not_finish_on_weights_that_give_nonfinite_losses(tmp_path: Path):
    """A short streak of non-finite steps at the end (fewer than max_bad_steps) whose cause is in the weights: the
    run stops as a diverged one (rolled back, exit 4) instead of saving a model of NaNs as finished."""
    def poison_the_weights(call, loss):
        if call == 3:  # as an update with an absurd learning rate would leave them
            with torch.no_grad():
                trainer.task.model.weight.fill_(float("inf"))
            return trainer.task.model(torch.ones(1, 2)).sum() * 0 + float("nan")
        return loss

    trainer = _toy_trainer(tmp_path, 4, poison_the_weights, ckpt_every=1)
    with pytest.raises(FloatingPointError, match=r"2 consecutive non-finite steps \(steps 2-3\); rolled back to step"):
        trainer.fit()
    emergency = load_checkpoint(next((tmp_path / "checkpoints").glob("emergency-*.pt")))
    assert all(torch.isfinite(v).all() for v in emergency["model"].values())


def test_a_nonfinite_loss_with_finite_gradients_is_still_skipped(tmp_path: Path):
    """Backward runs before the check (one host sync per step); a NaN that reaches the loss but no gradient (a
    term without parameters) must skip the step all the same."""
    trainer = _toy_trainer(tmp_path, 3, lambda call, loss: loss + torch.tensor(float("nan")) if call == 2 else loss)
    seen = []
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (seen.append(trainer.task.calls), original(*a, **k))[1]
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and seen == [1, 3]  # the optimizer never saw step 2's gradients


def test_a_signal_during_a_skipped_step_still_stops_with_a_checkpoint(tmp_path: Path):
    """The stop is agreed in the same sync as the finite check, so a signal during a non-finite step must not wait
    for the next good one."""
    def hook(call, loss):
        if call == 3:
            signal.raise_signal(signal.SIGTERM)
            return loss * float("nan")
        return loss

    trainer = _toy_trainer(tmp_path, 50, hook)
    summary = trainer.fit()
    assert summary["stopped_by"] == "SIGTERM" and not summary["finished"]
    # a skipped step still counts (its batch is consumed), so the third call ends at step 3
    assert summary["step"] == 3 and summary["skipped_steps"] == 1 and trainer.task.calls == 3
    state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert state["step"] == 3 and state["counters"]["skipped_steps"] == 1


def test_a_skipped_last_step_still_writes_the_final_checkpoint(tmp_path: Path):
    """Checkpoints, images and stops do not depend on whether the step was skipped: a non-finite last step of a
    run that checkpoints only at its end must not leave it finished with no checkpoint."""
    trainer = _toy_trainer(tmp_path, 4, lambda call, loss: loss * float("nan") if call == 4 else loss)
    summary = trainer.fit()
    assert summary["finished"] and summary["skipped_steps"] == 1
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 4


def test_resume_continues_from_the_emergency_checkpoint(tmp_path: Path):
    """The emergency checkpoint is what --resume reads (it is newer than the last regular one), and the learning
    rate may change on resume: the way out the error message gives."""
    trainer = _toy_trainer(tmp_path, 12, lambda call, loss: loss * float("nan") if call in (4, 5, 6) else loss,
                           max_bad_steps=3, ckpt_every=2)
    with pytest.raises(FloatingPointError, match=r"--resume continues from there(.|\n)*train.optim.lr="):
        trainer.fit()
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "emergency-00000006.pt"  # steps 4-6 skipped; the last regular checkpoint is at step 4
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    resumed = _toy_trainer(tmp_path, 12, ckpt_every=2)
    assert resumed.try_resume() and resumed.step == 6 and resumed.bad_steps == 0  # a new streak count
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in good.items())
    assert resumed.fit()["finished"] and latest_checkpoint(tmp_path / "checkpoints").name == "ckpt-00000012.pt"


def test_a_divergence_rolls_back_to_the_last_checkpoint_before_the_loss_blew_up(tmp_path: Path):
    """Weights that already exploded can give finite (huge) losses for a few steps before non-finite ones: the
    rollback goes to the last checkpoint before the loss spiked, which pruning keeps however long the streak."""
    def hook(call, loss):
        return loss * 1e6 if call in (11, 12) else loss * float("nan") if call > 12 else loss

    trainer = _toy_trainer(tmp_path, 50, hook, max_bad_steps=3, ckpt_every=1, keep_last=1)
    with pytest.raises(FloatingPointError, match=r"step 9 \(ckpt-00000009.pt\)(.|\n)*--resume continues from there"):
        trainer.fit()
    ckpts = tmp_path / "checkpoints"
    anchor, emergency = load_checkpoint(ckpts / "ckpt-00000009.pt"), load_checkpoint(ckpts / "emergency-00000015.pt")
    for part in ("model", "ema"):
        assert all(torch.equal(anchor[part][k], v) for k, v in emergency[part].items()), part
    # steps 12-14 skipped, and the updates of steps 9-11 undone; the data continues from where the run stopped
    assert emergency["step"] == 15 and emergency["counters"]["skipped_steps"] == 6
    resumed = _toy_trainer(tmp_path, 18, ckpt_every=1, keep_last=1)
    assert resumed.try_resume() and resumed.step == 15 and resumed.fit()["finished"]


def test_a_resumed_run_logs_each_step_once_and_clears_dead_temporaries(tmp_path: Path):
    """Steps logged after the checkpoint a run resumes from are dropped from log.jsonl before they are logged
    again; a temporary file a killed save left behind is removed."""
    import json

    _toy_trainer(tmp_path, 6, ckpt_every=2).fit()
    ckpts = tmp_path / "checkpoints"
    (ckpts / "ckpt-00000006.pt").unlink()  # as if killed between the step-6 log record and its checkpoint
    (ckpts / "last").write_text("ckpt-00000004.pt")
    (ckpts / ".ckpt-00000006.pt.tmp-12345").write_bytes(b"half a checkpoint")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a record cut short by the kill
    resumed = _toy_trainer(tmp_path, 6, ckpt_every=2)
    assert resumed.try_resume() and resumed.step == 4
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list(ckpts.glob(".*.tmp-*"))


def test_a_corrupt_latest_checkpoint_names_the_one_to_fall_back_on(tmp_path: Path):
    _toy_trainer(tmp_path, 4, ckpt_every=2).fit()
    ckpts = tmp_path / "checkpoints"
    (ckpts / "ckpt-00000004.pt").write_bytes(b"truncated")
    (ckpts / "ckpt-00000004.pt.sha256").unlink()  # as a checkpoint written before digests
    with pytest.raises(ValueError, match=r"ckpt-00000004.pt: cannot be loaded(.|\n)*delete it to resume from the "
                                         r"one before \(ckpt-00000002.pt\)"):
        _toy_trainer(tmp_path, 4, ckpt_every=2).try_resume()


def test_a_flipped_byte_in_a_checkpoint_is_caught_by_its_digest(tmp_path: Path):
    """torch's zip reader does not check CRCs: without the digest a flipped byte in a tensor loads silently."""
    _toy_trainer(tmp_path, 4, ckpt_every=2).fit()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.sha256")) == ["ckpt-00000002.pt.sha256", "ckpt-00000004.pt.sha256"]
    path = ckpts / "ckpt-00000004.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ckpt-00000004.pt: its bytes changed since it was written(.|\n)*"
                                         r"delete it to resume from the one before \(ckpt-00000002.pt\)"):
        _toy_trainer(tmp_path, 4, ckpt_every=2).try_resume()
    path.unlink()  # the advice works: the run resumes from the checkpoint before
    resumed = _toy_trainer(tmp_path, 4, ckpt_every=2)
    assert resumed.try_resume() and resumed.step == 2


def test_pruned_checkpoints_take_their_digests_with_them(tmp_path: Path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.pt", "ckpt-00000003.pt.sha256", "ckpt-00000004.pt", "ckpt-00000004.pt.sha256", "last"]


def test_a_checkpoint_records_the_dataset_size_and_warns_when_it_changed(tmp_path: Path, caplog):
    trainer = _toy_trainer(tmp_path, 2)
    trainer.fit()
    state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert state["data_position"]["num_items"] == 32 and "cuda_device" not in state["rng"]
    resumed = _toy_trainer(tmp_path, 2)
    resumed.dataset = torch.utils.data.Subset(resumed.dataset, range(28))
    with caplog.at_level("WARNING"):
        resumed.try_resume()
    assert "had 32 items when the checkpoint was written and has 28 now" in caplog.text


def test_the_checkpoint_is_written_before_the_preview_images(tmp_path: Path):
    """A preview grid that fails (a bad sampler setting, a full disk) must not cost the steps since the last
    checkpoint: the step's checkpoint is already on disk when the images are drawn."""
    trainer = _toy_trainer(tmp_path, 4, ckpt_every=2, image_every=2)

    def failing_images(*args):
        raise OSError("No space left on device")

    trainer.task.write_images = failing_images
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 2


def test_a_model_that_fails_to_compile_trains_eagerly(tmp_path: Path, failing_compile, caplog):
    weights = []
    for compile in (False, True):
        trainer = _toy_trainer(tmp_path / f"compile-{compile}", 4, compile=compile)
        with caplog.at_level("WARNING"):
            trainer.fit()
        weights.append(trainer.model.weight.detach().clone())
    assert "torch.compile failed for the model" in caplog.text and len(failing_compile) == 1
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=0)  # the same steps, eagerly


@pytest.mark.parametrize("to", ["process", "job"])
def test_sigterm_writes_a_final_checkpoint_and_exits_143(tmp_path: Path, to: str):
    """`job`: a scheduler (Slurm's scancel, a time limit) signals every process of the job, DataLoader workers
    included; a worker killed by it must not make the run crash instead of saving."""
    workers = ["data.num_workers=2"] if to == "job" else []
    proc = _train(tmp_path / "run", 10_000, "train.ckpt_every=100000", *workers, new_session=to == "job")
    deadline = time.time() + 120
    log = tmp_path / "run" / "log.jsonl"
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    if to == "job":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    # Non-zero, as a process killed by it would exit: a job scheduler must not take a pre-empted run as finished.
    assert proc.returncode == 128 + signal.SIGTERM, out
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and load_checkpoint(ckpt)["step"] >= 2
    assert "SIGTERM" in out


def _tiny_latent_cache(root: Path) -> tuple[Path, Path]:
    """A random-init tiny tokenizer and its latent cache of 48 shapes images (with flips)."""
    from maetok.config import TokenizerConfig
    from maetok.data import open_dataset
    from maetok.data.latents import cache_latents
    from maetok.tokenizer import MAETok

    cfg = TokenizerConfig(image_size=16, patch_size=4, latent_tokens=4, latent_dim=4, enc_width=32, enc_depth=1,
                          enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, aux_targets=[])
    tok = MAETok(cfg).eval()
    save_pretrained(tok, root / "tok")
    cache_latents(tok, open_dataset("shapes", image_size=16, limit=48), root / "latents", progress=False)
    return root / "tok", root / "latents"


def test_diffusion_sigkill_then_resume_is_bit_identical(tmp_path: Path):
    tok, latents = _tiny_latent_cache(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["--config", "sit-cpu", "--device", "cpu", f"latents={latents}", f"tokenizer={tok}",
            "model.num_tokens=4", "model.in_channels=4", "model.hidden=32", "model.depth=2", "model.heads=2",
            "train.batch_size=8", "train.steps=16", "train.ckpt_every=1", "train.log_every=1",
            "train.image_every=8", "train.optim.warmup_steps=4", "sample.steps=2"]

    def launch(out: Path, resume: bool = False) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "maetok.cli", "diffusion", "train", "--out", str(out),
               *(["--resume"] if resume else []), *args]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref = launch(tmp_path / "ref")
    out_ref, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out_ref
    run = tmp_path / "killed"
    assert _kill_after_checkpoint(launch(run), run, 6) < 16
    again = launch(run, resume=True)
    out_again, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out_again
    a = load_checkpoint(latest_checkpoint(tmp_path / "ref" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    for part in ("model", "ema"):
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part} differs after resume: {different[:5]}"
    assert (run / "model" / "model.safetensors").is_file() and list((run / "images").glob("samples_*.png"))
