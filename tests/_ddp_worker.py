"""Worker for tests/test_distributed.py, launched as `torchrun --nproc_per_node 2 _ddp_worker.py OUT SCENARIOS`
(CPU, gloo). Each scenario writes what the test compares into OUT/<scenario>/; the test computes the single-process
reference itself with the helpers defined here. Not a test module (no test_ prefix).
"""
from __future__ import annotations

import json
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from maetok.config import (DiffusionRunConfig, SampleConfig, SiTConfig, TokenizerRunConfig, TrainConfig,
                           TransportConfig, load_config)
from maetok.io.distributed import DistInfo, init_distributed
from maetok.train.loop import Task, Trainer
from maetok.io.pretrained import load_sit, load_tokenizer

# Tiny tokenizer (as tests/test_resume.py TINY, without the GAN). Every randomness of variant ae is switched off
# (no masks, no flips, no perceptual/GAN), so the loss is a deterministic function of the batch.
TOK = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
       "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1",
       "model.dec_width=32", "model.dec_heads=2", "model.dec_depth=1", "model.aux_width=16",
       "model.aux_heads=1", "model.aux_depth=1", "data.limit=32", "train.batch_size=8", "train.log_every=1",
       "train.image_every=1000", "train.ckpt_every=1", "stats_batches=1", "train.optim.warmup_steps=0"]
TOK_AE = [*TOK, "model.variant=ae", "data.random_flip=false", "train.steps=1"]
TOK_MASKED = [*TOK, "model.variant=maetok", "train.steps=2"]
# The GAN from step 0 (PatchGAN: GroupNorm, so per-sample; no DiffAugment, so deterministic). With a fixed GAN
# weight a DDP run must equal one process; the adaptive weight uses each rank's local gradients (as VQGAN-style
# trainers do), so there the ranks need only agree with each other.
TOK_GAN_FIXED = [*TOK_AE[:-1], "train.steps=2", "loss.gan.weight=0.5", "loss.gan.start_step=0",
                 "loss.gan.adaptive_weight=false"]
TOK_GAN_ADAPTIVE = [*TOK_GAN_FIXED[:-1], "loss.gan.adaptive_weight=true"]

SIT = SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=2, heads=2, num_classes=10, class_dropout=0.0)


# --------------------------------------------------------------------------------------------------------------
# SiT with per-sample randomness derived from the sample index
# --------------------------------------------------------------------------------------------------------------
class IndexedLatents(torch.utils.data.Dataset):
    """(latents, label, index): the index lets the task draw each sample's noise from its own generator."""

    def __init__(self, n: int = 32, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.z = torch.randn(n, SIT.num_tokens, SIT.in_channels, generator=g)
        self.y = torch.arange(n) % SIT.num_classes

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int):
        return self.z[i], self.y[i], i


class IndexNoiseDiffusionTask(Task):
    """Flow matching on SiT as DiffusionTask does it (linear path, velocity MSE), except that t and eps of sample
    i come from a generator seeded with i. The per-rank global RNG then plays no part, so a DDP step over a
    global batch must equal a single-process step over the same batch: any difference is the loop's."""

    def __init__(self):
        from maetok.diffusion.sit import SiT

        torch.manual_seed(0)
        self.model = SiT.from_config(SIT)
        self.transport = TransportConfig(path="linear")

    def trainable_parameters(self):
        return list(self.model.parameters())

    def training_step(self, model, batch, step):
        from maetok.diffusion.transport import interpolate

        z, y, idx = batch
        gens = [torch.Generator().manual_seed(1000 * step + int(i)) for i in idx]
        t = torch.stack([torch.rand((), generator=g) for g in gens])
        eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens])
        x_t, v_target = interpolate(z, eps, t, self.transport.path)
        return {"loss": (model(x_t, t, y) - v_target).pow(2).mean()}


def sit_trainer(out: Path, info: DistInfo, steps: int = 2) -> Trainer:
    cfg = TrainConfig(steps=steps, batch_size=8, log_every=1, ckpt_every=1000, image_every=1000,
                      precision="fp32")
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(IndexNoiseDiffusionTask(), cfg, IndexedLatents(), out, cfg, info)


def trainer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights and the (all-reduced, clipped) gradients of the last step."""
    out = {f"w.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            out[f"g.{name}"] = p.grad.detach().clone()
    return out


# --------------------------------------------------------------------------------------------------------------
# A toy task for the loop's control flow (non-finite skips, signals)
# --------------------------------------------------------------------------------------------------------------
class ToyTask(Task):
    def __init__(self, hook=None):
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.hook = hook  # hook(step, loss) -> loss, may also raise a signal
        self.draws: list[list[float]] = []

    def trainable_parameters(self):
        return list(self.model.parameters())

    def training_step(self, model, batch, step):
        self.draws.append(torch.rand(2).tolist())  # what this rank's per-sample randomness would see
        loss = (model(batch[0]).squeeze(-1) - batch[1]).pow(2).mean()
        return {"loss": self.hook(step, loss) if self.hook else loss}


def toy_trainer(out: Path, info: DistInfo, hook=None, steps: int = 6) -> Trainer:
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, generator=g))
    cfg = TrainConfig(steps=steps, batch_size=4, log_every=1, ckpt_every=1000, image_every=1000, max_bad_steps=3)
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(ToyTask(hook), cfg, data, out, cfg, info)


# --------------------------------------------------------------------------------------------------------------
# Scenarios (run on every rank)
# --------------------------------------------------------------------------------------------------------------
def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def scenario_tok_ae(out: Path, info: DistInfo, inputs: Path) -> None:
    from maetok.train.run import run_tokenizer

    cfg = load_config(TokenizerRunConfig, "cpu-32", TOK_AE)
    # A fresh run directory, as a user's first `torchrun ... maetok tokenizer train --out DIR` would have.
    summary = run_tokenizer(cfg, out / "run", device="cpu")
    _json(out / f"summary-{info.rank}.json", summary)


def run_tokenizer_keeping_task(cfg, out: Path):
    """run_tokenizer, plus the TokenizerTask it trained (its discriminator is not in the saved model)."""
    import maetok.train.tokenizer_task as task_mod
    from maetok.train.run import run_tokenizer

    seen, original = {}, task_mod.TokenizerTask.after_step

    def capture(self, *args, **kwargs):
        if "task" not in seen:  # before the first discriminator step: its initial weights
            self.initial_disc = {k: v.detach().clone() for k, v in self.disc.state_dict().items()}
        seen["task"] = self
        return original(self, *args, **kwargs)

    task_mod.TokenizerTask.after_step = capture
    try:
        summary = run_tokenizer(cfg, out, device="cpu")
    finally:
        task_mod.TokenizerTask.after_step = original
    return summary, seen["task"]


def gan_tensors(task) -> dict[str, torch.Tensor]:
    return {**{f"disc.{k}": v.detach().clone().contiguous() for k, v in task.disc.state_dict().items()},
            **{f"model.{k}": v.detach().clone().contiguous() for k, v in task.model.state_dict().items()}}


def scenario_tok_gan(out: Path, info: DistInfo, inputs: Path) -> None:
    for name, overrides in (("fixed", TOK_GAN_FIXED), ("adaptive", TOK_GAN_ADAPTIVE)):
        summary, task = run_tokenizer_keeping_task(load_config(TokenizerRunConfig, "cpu-32", overrides),
                                                   out / name / "run")
        save_file(gan_tensors(task), str(out / name / f"rank{info.rank}.st"))
        _json(out / name / f"summary-{info.rank}.json", summary)


def scenario_tok_masks(out: Path, info: DistInfo, inputs: Path) -> None:
    import maetok.tokenizer.model as model_mod
    from maetok.train.run import run_tokenizer

    masks = []
    original = model_mod.random_patch_mask

    def recording(*args, **kwargs):
        m = original(*args, **kwargs)
        masks.append(m.clone())
        return m

    model_mod.random_patch_mask = recording
    try:
        run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", TOK_MASKED), out / "run", device="cpu")
    finally:
        model_mod.random_patch_mask = original
    save_file({f"step{i}": m.to(torch.uint8) for i, m in enumerate(masks)}, str(out / f"masks-{info.rank}.st"))


def scenario_sit(out: Path, info: DistInfo, inputs: Path) -> None:
    trainer = sit_trainer(out / "run", info)
    summary = trainer.fit()
    save_file({k: v.contiguous() for k, v in trainer_tensors(trainer).items()}, str(out / f"rank{info.rank}.st"))
    _json(out / f"summary-{info.rank}.json", summary)


def scenario_diffusion_run(out: Path, info: DistInfo, inputs: Path) -> None:
    """The real DiffusionTask under DDP through run_diffusion: must finish, in a fresh run directory."""
    from maetok.train.run import run_diffusion

    overrides = [f"latents={inputs / 'cache'}", f"tokenizer={inputs / 'tok'}", "model.in_channels=4",
                 "model.num_tokens=4", "model.hidden=32", "model.depth=1", "model.heads=2", "train.steps=2",
                 "train.batch_size=8", "train.log_every=1", "train.ckpt_every=1", "train.image_every=1000",
                 "sample.steps=2"]
    summary = run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", overrides), out / "run", device="cpu")
    _json(out / f"summary-{info.rank}.json", summary)


def scenario_nan(out: Path, info: DistInfo, inputs: Path) -> None:
    """Rank 1 alone sees a non-finite loss at step 2, from a term without gradients (so every rank's averaged
    gradients stay finite): every rank must skip that step together."""
    def hook(step, loss):
        return loss + torch.tensor(float("nan")) if (info.rank == 1 and step == 2) else loss

    trainer = toy_trainer(out / "run", info, hook)
    summary = trainer.fit()
    _json(out / f"summary-{info.rank}.json", {**summary, "weights": trainer.model.weight.flatten().tolist(),
                                              "draws": trainer.task.draws})


def scenario_sigterm(out: Path, info: DistInfo, inputs: Path) -> None:
    """Only rank 1 gets SIGTERM (during step 2): every rank must stop after the same step, and rank 0 must write
    the final checkpoint."""
    def hook(step, loss):
        if info.rank == 1 and step == 2:
            signal.raise_signal(signal.SIGTERM)
        return loss

    trainer = toy_trainer(out / "run", info, hook, steps=1000)
    summary = trainer.fit()
    _json(out / f"summary-{info.rank}.json", summary)


def scenario_sample(out: Path, info: DistInfo, inputs: Path) -> None:
    from maetok.eval.generate import generate_to_dir

    model, tok = load_sit(inputs / "sit"), load_tokenizer(inputs / "tok")
    for sampler in ("euler", "heun"):
        cfg = SampleConfig(sampler=sampler, steps=3, cfg_scale=1.5, seed=5)
        generate_to_dir(model, tok, 11, cfg, out / sampler, balanced=True, batch_size=4, device="cpu",
                        progress=False)


def toy_feature_net():
    """A randomly initialised CIFAR ResNet-20 as the feature network: the same weights in every process."""
    from maetok.eval.features import build_feature_net

    torch.manual_seed(0)
    return build_feature_net("resnet20-cifar10", pretrained=False)


def evaluate_both(inputs: Path, out: Path, dist_info: DistInfo | None) -> dict:
    """`maetok eval gen` and `eval recon` through the Python API: 13 samples and 13 held-out images, so the two
    ranks' shares differ in size. The reconstruction runs twice on one stats cache: written, then read."""
    import maetok.eval.api as api
    import maetok.eval.inputs as eval_inputs
    from maetok.data import open_dataset

    out.mkdir(parents=True, exist_ok=True)
    net = toy_feature_net()
    embedded, saved = [0], [0]  # images this process embedded, caches it wrote: each rank should do its share
    embed, save = net.embed, eval_inputs._save_stats_cache

    def counting_embed(images):
        embedded[0] += len(images)
        return embed(images)

    def counting_save(*args):
        saved[0] += 1
        return save(*args)

    net.embed, eval_inputs._save_stats_cache = counting_embed, counting_save
    try:
        gen = api.evaluate_generation(str(inputs / "samples.npz"), "shapes", net, split="test", num_ref=13,
                                      batch_size=4, stats_cache=out / "ref-stats.npz", kid_subsets=2,
                                      progress=False, dist=dist_info)
        tok, held_out = load_tokenizer(inputs / "tok"), open_dataset("shapes", "test", 16, limit=13)
        rec, rec_cached = (api.evaluate_reconstruction(tok, held_out, net, batch_size=4, lpips=None, progress=False,
                                                       stats_cache=out / "recon-stats.npz", dist=dist_info)
                           for _ in range(2))
    finally:
        eval_inputs._save_stats_cache = save
    return {"gen": gen, "recon": rec, "recon_cached": rec_cached, "embedded": embedded[0], "saved": saved[0]}


def scenario_eval(out: Path, info: DistInfo, inputs: Path) -> None:
    import contextlib
    import io
    import shutil

    from maetok.cli import main as cli
    from maetok.eval.features import available_feature_nets, register_feature_net

    _json(out / f"result-{info.rank}.json", evaluate_both(inputs, out, info))
    # The command line under torchrun: rank 0 alone prints and writes the result.
    if "toy-resnet20" not in available_feature_nets():
        register_feature_net("toy-resnet20", toy_feature_net)
    if info.is_main:
        shutil.copy(inputs / "samples.npz", out / "samples.npz")
        shutil.copytree(inputs / "tok", out / "tok")
    dist.barrier()
    for what, source in (("gen", ["--samples", str(out / "samples.npz")]), ("recon", ["--tokenizer", str(out / "tok")])):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli(["eval", what, *source, "--ref", "shapes", "--num-samples", "13", "--features",
                        "toy-resnet20", "--device", "cpu", "--out", str(out)])
        _json(out / f"cli-{what}-{info.rank}.json", {"code": code, "stdout": printed.getvalue()})


def pilot_evaluation(inputs: Path, out: Path, info: DistInfo | None) -> dict:
    """The pilot's evaluation on a fixed tokenizer, SiT and feature network: the real-data floor, reconstruction
    and generation, 13 images each (unequal shares), and how many images this process embedded."""
    import shutil

    from maetok.pilot import PilotPlan, open_pilot_data, pilot_settings
    from maetok.pilot.evaluation import FeatureSpace, evaluate_generation, evaluate_reconstruction, real_floor

    settings = pilot_settings("smoke", ["n_eval=13", "image_size=16", "sample_steps=3", "cfg_scale=1.5"])
    info = info or DistInfo()
    vdir = out / "ae"
    if info.is_main:
        shutil.copytree(inputs / "sit", vdir / "diffusion" / "model")
    if info.enabled:
        dist.barrier()
    data = open_pilot_data("shapes", settings)
    plan = PilotPlan("shapes", ["ae"], "smoke", settings, out, data.facts)
    net = toy_feature_net()
    embedded, embed = [0], net.embed

    def counting_embed(images):
        embedded[0] += len(images)
        return embed(images)

    net.embed = counting_embed
    space = FeatureSpace(net, plan, data, info)  # embeds the held-out reference
    tok = load_tokenizer(inputs / "tok")
    return {"floor": real_floor(plan, data, space),
            "recon": evaluate_reconstruction(plan, "ae", tok, data, space, info),
            "gen": evaluate_generation(plan, vdir, "cfg", tok, space, info), "embedded": embedded[0]}


def scenario_pilot_eval(out: Path, info: DistInfo, inputs: Path) -> None:
    _json(out / f"result-{info.rank}.json", pilot_evaluation(inputs, out, info))


def scenario_latents(out: Path, info: DistInfo, inputs: Path) -> None:
    """A latent cache of 32 images in shards of 5: rank 0 encodes shards 0, 2, 4, 6 and rank 1 the others."""
    import contextlib
    import io
    import shutil

    from maetok.cli import main as cli
    from maetok.data import open_dataset
    from maetok.data.latents import cache_latents

    tok = load_tokenizer(inputs / "tok")
    data = open_dataset("shapes", "train", 16, limit=32)
    cache_latents(tok, data, out / "cache", batch_size=4, shard_size=5, progress=False, dist=info)
    # Finishing a cache one process started (shards 0 and 3 on disk, no meta.json): those two are kept as they are.
    if info.is_main:
        shutil.copytree(inputs / "partial-cache", out / "resumed")
    dist.barrier()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "resumed").glob("shard-*")}
    dist.barrier()  # every rank has looked before any writes a shard
    cache_latents(tok, data, out / "resumed", batch_size=4, shard_size=5, progress=False, dist=info)
    _json(out / f"kept-{info.rank}.json", {name: (mtime, (out / "resumed" / name).stat().st_mtime_ns)
                                           for name, mtime in kept.items()})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli(["latents", "cache", "--tokenizer", str(inputs / "tok"), "--data", "shapes", "--limit", "8",
                    "--out", str(out / "cli-cache"), "--device", "cpu"])
    _json(out / f"cli-{info.rank}.json", {"code": code, "stdout": printed.getvalue()})


def scenario_pilot_stage(out: Path, info: DistInfo, inputs: Path) -> None:
    """Rank 1 opens the pilot's results file late: rank 0 must not record a stage before rank 1 has read the file,
    or rank 1 skips that stage's barrier and the ranks' collectives pair up wrongly from then on."""
    import time

    from maetok.pilot.stages import ResultsFile

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if info.rank == 1:
        time.sleep(1.0)
    results = ResultsFile(out / "results.json", info)
    if results.pending("rank0_only"):
        results.record("rank0_only", {"x": 1} if info.is_main else None)
    if results.pending("every_rank"):
        results.record("every_rank", {"world": float(dist.get_world_size())})
    checked = torch.tensor([float(info.rank)])
    dist.all_reduce(checked)  # a collective after the stages: it pairs up only if both ranks took every barrier
    _json(out / f"seen-{info.rank}.json", {"keys": sorted(results.stages), "sum": float(checked)})


def scenario_refused_run_dir(out: Path, info: DistInfo, inputs: Path) -> None:
    """The run directory exists and neither --resume nor --force is given: rank 0 alone decides, and every rank
    must raise at once (not wait for rank 0 in a collective until the timeout)."""
    import time

    from maetok.io.rundir import RunDirExists
    from maetok.train.run import run_diffusion

    if info.is_main:
        (out / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "run" / "checkpoints" / "ckpt-00000001.pt").write_bytes(b"")
        (out / "run" / "train.log").write_text("")
    dist.barrier()
    overrides = [f"latents={inputs / 'cache'}", "model.in_channels=4", "model.num_tokens=4", "train.steps=1",
                 "train.batch_size=8"]
    start = time.perf_counter()
    try:
        run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", overrides), out / "run", device="cpu")
        raised = ""
    except RunDirExists as e:
        raised = str(e)
    _json(out / f"refused-{info.rank}.json", {"error": raised, "seconds": time.perf_counter() - start})


def scenario_disk_full(out: Path, info: DistInfo, inputs: Path) -> None:
    """Rank 0's checkpoint write fails as on a full disk (inside torch.save, as a RuntimeError over the OSError):
    every rank must stop with the same errno at once, not wait for rank 0 in the next step's collective."""
    import errno
    import time

    import maetok.train.loop as loop_mod
    from maetok.train.run import run_diffusion

    def full_disk(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file") from e

    real_save, loop_mod.save_checkpoint = loop_mod.save_checkpoint, full_disk
    overrides = [f"latents={inputs / 'cache'}", "model.in_channels=4", "model.num_tokens=4", "train.steps=4",
                 "train.batch_size=8", "train.ckpt_every=2"]
    start = time.perf_counter()
    try:
        run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", overrides), out / "run", device="cpu")
        raised = {}
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__cause__
        raised = {"type": type(e).__name__, "errno": getattr(cause, "errno", None)}
    finally:
        loop_mod.save_checkpoint = real_save
    _json(out / f"disk-full-{info.rank}.json", {**raised, "seconds": time.perf_counter() - start})


# Control-flow scenarios last: if one deadlocks, the collective timeout breaks the group for what follows.
SCENARIOS = {"tok_ae": scenario_tok_ae, "tok_gan": scenario_tok_gan, "tok_masks": scenario_tok_masks,
             "sit": scenario_sit, "diffusion_run": scenario_diffusion_run, "sample": scenario_sample,
             "eval": scenario_eval, "pilot_eval": scenario_pilot_eval, "latents": scenario_latents,
             "pilot_stage": scenario_pilot_stage,
             "refused_run_dir": scenario_refused_run_dir, "disk_full": scenario_disk_full,
             "nan": scenario_nan, "sigterm": scenario_sigterm}


def main() -> None:
    out, names, inputs = Path(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3])
    torch.set_num_threads(1)
    # A short collective timeout turns a deadlock (ranks taking different branches) into an error, not a hang.
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    info = init_distributed("cpu")  # joins the group above: the same DistInfo the CLI would build
    import maetok.train.run as run_mod

    run_mod.cleanup = lambda info: None  # keep the group alive for the next scenario
    failed = False
    for name in names:
        try:
            SCENARIOS[name](out / name, info, inputs)
        except Exception:  # recorded for the test to show; the next scenario still runs
            _json(out / name / f"error-{info.rank}.json", traceback.format_exc())
            failed = True
        dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
