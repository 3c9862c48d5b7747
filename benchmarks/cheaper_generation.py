"""The three levers of cheaper generation, measured on a pilot's data with its budget, sampler and metrics:
fewer latent tokens (a nested-dropout tokenizer decoding from its first k tokens, and a diffusion model on them),
fewer sampler steps (Euler and Heun with the pilot's guidance), and a distilled shortcut student (guidance folded
in, one forward per step).

    python benchmarks/cheaper_generation.py --nested runs/pilot-cifar-nested --fixed runs/pilot-cifar-fixed \\
        --out runs/cheaper-generation
    python benchmarks/cheaper_generation.py --out runs/cheaper-generation --collect
    # --collect writes benchmarks/results/cheaper-generation/ (JSON, tables, two figures, README) from --out

Inputs: two finished pilots of one variant on the same data and budget, one with `--tokenizer-set
model.token_dropout=nested --tokenizer-set 'model.token_counts=[8,16,24,32]'` (--nested: its tokenizer, diffusion
model and sampling settings are the levers' base) and one without (--fixed: the fixed-length baseline at L tokens,
re-measured alike). Run the script where the pilots ran: their data spec may be a relative path. Stages, each
skipped when its output exists (rerunning resumes; training runs continue from their checkpoints):
  1. reconstruction (rFID, PSNR, SSIM) from the first k = L/4, L/2, 3L/4, L tokens, and the fixed tokenizer's;
  2. a diffusion model per k < L with the nested pilot's diffusion settings (only the latents and num_tokens
     change), sampled as the pilot samples; k = L is the nested pilot's own model;
  3. the nested pilot's L-token model distilled into a shortcut student, and gFID against sampler steps for the
     teacher (Euler, Heun, the pilot's CFG) and the student.
Every gFID is against the pilot's held-out set under the pilot's feature network, with its bootstrap standard error.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import RESULTS_DIR, machine, process_cpu_seconds, write_json
from maetok.cli import main as maetok_main
from maetok.config import DiffusionRunConfig, SampleConfig, config_source, from_dict, load_config, to_dict
from maetok.config.distill import is_power_of_two
from maetok.data.latents import cache_latents
from maetok.diffusion.samplers import forward_passes_per_sample
from maetok.eval.cost import count_params, generation_gflops
from maetok.eval.fid import fid, fid_bootstrap_se, load_adm_images
from maetok.eval.generate import generate_to_dir
from maetok.eval.recon import ReconstructionMetrics, to_uint8_levels
from maetok.io.distributed import DistInfo
from maetok.io.pretrained import load_sit, load_tokenizer
from maetok.pilot import PilotBudget, PilotData, PilotPlan, open_pilot_data
from maetok.pilot.budgets import recorded_settings
from maetok.pilot.evaluation import FeatureSpace, pilot_feature_net
from maetok.pilot.stages import train_diffusion
from maetok.train.run import setup_logging

STATE = "measurements.json"     # in --out: every measured point, written after each one
DISTILL_MAX_STEPS = 32          # the student samples in 1, 2, 4, ..., 32 steps
# Settings a rerun must share with the measurements already in --out (the steps list may grow).
FIXED_SETTINGS = ("nested", "fixed", "variant", "fixed_variant", "num_samples", "distill_steps", "distill_set")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nested", type=Path, help="finished pilot whose tokenizer has nested token dropout")
    ap.add_argument("--fixed", type=Path, help="finished pilot with the same settings, without nested dropout")
    ap.add_argument("--also-nested", type=Path, nargs="*", default=[], metavar="PILOT",
                    help="more finished nested-dropout pilots (e.g. another model.token_full_prob), measured in "
                         "reconstruction only, each labelled by the tokenizer settings it changes")
    ap.add_argument("--variant", help="the variant in --nested (default: its first)")
    ap.add_argument("--fixed-variant", help="the variant in --fixed (default: its first)")
    ap.add_argument("--out", type=Path, default=Path("runs/cheaper-generation"))
    ap.add_argument("--num-samples", type=int, default=0, help="samples per gFID (default: the pilot's n_eval)")
    ap.add_argument("--steps-list", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="sampler steps")
    ap.add_argument("--distill-steps", type=int, default=2000, help="training steps of the student")
    ap.add_argument("--distill-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides of the distillation run (e.g. train.batch_size=64)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--collect", action="store_true", help="write --results from what --out holds, and stop")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "cheaper-generation")
    args = ap.parse_args(argv)
    if not args.collect and (args.nested is None or args.fixed is None):
        ap.error("--nested and --fixed are required (except with --collect)")
    return args


# --------------------------------------------------------------------------------------------------------------
# The pilots and what every stage shares
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Pilot:
    folder: Path
    recorded: dict          # pilot_results.json's "plan"
    plan: PilotPlan
    variant: str

    @property
    def variant_dir(self) -> Path:
        return self.plan.variant_dir(self.variant)

    @property
    def tokenizer_dir(self) -> Path:
        return self.plan.tokenizer_dir(self.variant) / "model"

    @property
    def diffusion_dir(self) -> Path:
        return self.variant_dir / "diffusion"

    def results(self) -> dict:
        return json.loads((self.variant_dir / "results.json").read_text())


def open_pilot(folder: Path, variant: str | None, data: PilotData | None = None) -> tuple[Pilot, PilotData]:
    """A finished pilot's plan (its folder may have moved since), and its data unless `data` is given."""
    folder = folder.resolve()
    path = folder / "pilot_results.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no pilot_results.json; run the pilot first")
    recorded = json.loads(path.read_text())["plan"]
    settings = from_dict(PilotBudget, recorded_settings(recorded["settings"]))
    data = data or open_pilot_data(recorded["data"], settings)
    plan = PilotPlan(recorded["data"], recorded["variants"], recorded["budget"], settings, folder, data.facts)
    pilot = Pilot(folder, recorded, plan, variant or plan.variants[0])
    if pilot.variant not in plan.variants:
        raise SystemExit(f"{folder}: no variant {pilot.variant!r}; it has {', '.join(plan.variants)}")
    if "generation_cfg" not in pilot.results():
        raise SystemExit(f"{pilot.variant_dir}: the pilot has not finished (no generation_cfg in results.json)")
    return pilot, data


def settings_differences(nested: Pilot, fixed: Pilot) -> dict:
    """Budget settings in which the two pilots differ, the nested-dropout ones expected."""
    a, b = to_dict(nested.plan.settings), to_dict(fixed.plan.settings)
    out = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k != "tokenizer" and a.get(k) != b.get(k)}
    ta, tb = a.get("tokenizer", {}), b.get("tokenizer", {})
    out |= {f"tokenizer.{k}": (ta.get(k), tb.get(k)) for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k)}
    return out


@dataclass
class Context:
    out: Path
    dist: DistInfo
    nested: Pilot
    fixed: Pilot
    data: PilotData
    state: dict
    num_samples: int
    also_nested: dict[str, Pilot] = field(default_factory=dict)  # label -> pilot, reconstruction only
    _tokenizers: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @cached_property
    def space(self) -> FeatureSpace:
        """The nested pilot's feature network and held-out reference, for every point (built at first use: a
        finished run needs neither)."""
        net, made = pilot_feature_net(self.nested.plan, self.data, self.device)
        self.state["feature_net"] = made
        return FeatureSpace(net, self.nested.plan, self.data, self.dist)

    @property
    def L(self) -> int:
        return int(self.nested.plan.tokenizer_runs[self.nested.variant][-1].config.model.latent_tokens)

    @property
    def ks(self) -> list[int]:
        return [self.L * i // 4 for i in (1, 2, 3, 4)]

    def tokenizer(self, pilot: Pilot):
        if pilot.folder not in self._tokenizers:
            self._tokenizers[pilot.folder] = load_tokenizer(pilot.tokenizer_dir).to(self.device).eval()
        return self._tokenizers[pilot.folder]

    def save(self, section: str, key: str, record: dict) -> None:
        """Record a finished point: written at once, so that an interrupted run keeps what it measured."""
        self.state.setdefault(section, {})[key] = record
        write_json(self.out / STATE, self.state)


def open_context(args: argparse.Namespace) -> Context:
    nested, data = open_pilot(args.nested, args.variant)
    fixed, _ = open_pilot(args.fixed, args.fixed_variant, data)
    also = {}
    for folder in args.also_nested:
        pilot, _ = open_pilot(folder, None, data)
        changed = settings_differences(pilot, nested)
        if pilot.plan.settings.tokenizer.get("model.latent_tokens") != nested.plan.settings.tokenizer.get(
                "model.latent_tokens"):
            raise SystemExit(f"--also-nested {folder}: another latent token count than --nested's")
        also["nested[" + ", ".join(k.removeprefix("tokenizer.") + (" unset" if v[0] is None else f"={v[0]}")
                                   for k, v in changed.items()) + "]"] = pilot
    if (nested.recorded["data"], nested.plan.n_eval) != (fixed.recorded["data"], fixed.plan.n_eval):
        raise SystemExit(f"the pilots measure on different data or counts: {nested.recorded['data']} "
                         f"(n_eval {nested.plan.n_eval}) and {fixed.recorded['data']} (n_eval {fixed.plan.n_eval})")
    settings = {"nested": str(nested.folder), "fixed": str(fixed.folder), "variant": nested.variant,
                "fixed_variant": fixed.variant, "num_samples": args.num_samples or nested.plan.n_eval,
                "distill_steps": args.distill_steps, "distill_set": list(args.distill_set)}
    path = args.out / STATE
    state = json.loads(path.read_text()) if path.is_file() else {}
    before = state.get("settings", {})
    changed = [k for k in FIXED_SETTINGS if k in before and before[k] != settings[k]]
    if changed:
        raise SystemExit(f"{args.out} holds measurements with other {', '.join(changed)}; use a new --out")
    state["out"] = str(args.out.resolve())
    state["settings"] = {**settings, "steps_list": sorted(set(before.get("steps_list", [])) | set(args.steps_list))}
    state["pilots"] = {name: {"folder": str(p.folder), "variant": p.variant, "data": p.recorded["data"],
                              "budget": p.recorded["budget"], "settings": p.recorded["settings"],
                              "n_eval": p.plan.n_eval} for name, p in (("nested", nested), ("fixed", fixed))}
    state["pilots"] |= {label: {"folder": str(p.folder), "variant": p.variant, "settings": p.recorded["settings"]}
                        for label, p in also.items()}
    state["settings_differ"] = settings_differences(nested, fixed)
    state["pilot_sampling"] = {name: to_dict(cfg) for name, cfg in nested.plan.sampling.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    return Context(args.out, DistInfo(device=torch.device(args.device)), nested, fixed, data, state,
                   settings["num_samples"], also)


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------
def _pick(metrics: dict, prefix: str) -> float:
    return next(v for k, v in metrics.items() if k.startswith(prefix))


@torch.no_grad()
def reconstruct(tokenizer, space: FeatureSpace, tokens: int | None, device: torch.device) -> dict:
    """rFID (+ bootstrap SE), PSNR and SSIM of the held-out set reconstructed from the first `tokens` latent
    tokens: the pilot's reconstruction stage (uint8 levels, its reference features) at a prefix length."""
    meter, recons = ReconstructionMetrics(lpips=None), []
    for x, _ in DataLoader(space.held_out, batch_size=256, shuffle=False):
        x = x.to(device)
        recon = to_uint8_levels(tokenizer.decode(tokenizer.encode(x, tokens=tokens), tokens=tokens).float())
        meter.update(recon, x)
        recons.append(recon.cpu())
    feats = space.features(torch.cat(recons))
    metrics = {**meter.compute(), **fid(feats, space.reference), **fid_bootstrap_se(feats, space.reference)}
    return {"rfid": _pick(metrics, "fid["), "rfid_se": _pick(metrics, "fid_se["), "psnr": _pick(metrics, "psnr@"),
            "ssim": _pick(metrics, "ssim@"), "num_images": feats.n, "metrics": metrics}


def stage_reconstruction(ctx: Context) -> None:
    """Lever 1: the nested tokenizer from its first k tokens, and the fixed tokenizer at L, measured alike. The
    pilots' own reconstruction records are kept beside (they should agree at L)."""
    tokenizers = {"nested": ctx.nested, **ctx.also_nested}
    points = [(f"{label}-k{k}", label, pilot, k) for label, pilot in tokenizers.items() for k in ctx.ks]
    for key, label, pilot, k in points + [(f"fixed-k{ctx.L}", "fixed", ctx.fixed, None)]:
        if key in ctx.state.get("reconstruction", {}):
            continue
        started = time.perf_counter()
        record = reconstruct(ctx.tokenizer(pilot), ctx.space, k, ctx.device)
        own = pilot.results()["reconstruction"] if k in (None, ctx.L) else {}
        ctx.save("reconstruction", key, {"tokenizer": label,
                                         "tokens": k or ctx.L, **record, "pilot_record": own,
                                         "wall_s": time.perf_counter() - started})
    print(f"[1/4] reconstruction from k in {ctx.ks} tokens, and the fixed tokenizer at {ctx.L}: done", flush=True)


def model_cost(ctx: Context, tag: str, sit, tokenizer) -> dict:
    """SiT forward and decode GFLOPs per image at the model's token count (once per model). A student's
    step-size embedding is a table lookup that FlopCounterMode counts as 0: its forward costs its teacher's."""
    models = ctx.state.setdefault("models", {})
    if tag not in models:
        counted = load_sit(ctx.nested.diffusion_dir / "model").to(ctx.device).eval() \
            if sit.is_shortcut_student else sit
        image = ctx.space.held_out[0][0][None].to(ctx.device)
        models[tag] = {**generation_gflops(tokenizer, counted, image), "sit_params_M": count_params(sit) / 1e6}
    return models[tag]


def measure_generation(ctx: Context, tag: str, model_dir: Path, cfg: SampleConfig, pilot: Pilot,
                       pilot_record: dict | None = None) -> None:
    """One point: `num_samples` balanced samples of the model in `model_dir` with `cfg`, timed (sampling and
    decoding), and their gFID against the held-out set; skipped when recorded. Tag "student": the shortcut
    student, which takes the steps of `cfg` and its own folded guidance. `pilot_record`: the pilot's own
    measurement of this point, kept beside (the same samples when --num-samples is the pilot's n_eval)."""
    student = tag == "student"
    guidance = "folded" if student else ("cfg" if cfg.cfg_scale > 1 else "nocfg")
    sampler = "shortcut" if student else cfg.sampler
    key = f"{tag}-{sampler}{cfg.steps}-{guidance}"
    if key in ctx.state.get("generation", {}):
        return
    sit, tokenizer = load_sit(model_dir).to(ctx.device).eval(), ctx.tokenizer(pilot)
    cpu, started = process_cpu_seconds(), time.perf_counter()
    path = generate_to_dir(sit, tokenizer, ctx.num_samples, cfg, ctx.out / "samples" / key, balanced=True,
                           batch_size=250, device=ctx.device, progress=False, settings={"model": str(model_dir)})
    wall, cpu = time.perf_counter() - started, process_cpu_seconds() - cpu
    feats = ctx.space.features(load_adm_images(path))
    metrics = {**fid(feats, ctx.space.reference), **fid_bootstrap_se(feats, ctx.space.reference)}
    cost = model_cost(ctx, tag, sit, tokenizer)
    ctx.state["machine"] = machine(ctx.device)  # where the timings were taken
    passes = cfg.steps if student else forward_passes_per_sample(cfg)
    ctx.save("generation", key, {
        "model": tag, "tokens": cost["tokens"], "tokenizer": "nested" if pilot is ctx.nested else "fixed",
        "sampler": sampler, "steps": cfg.steps, "guidance": guidance,
        "cfg_scale": sit.config.shortcut_cfg_scale if student else cfg.cfg_scale,
        "cfg_interval": list(sit.config.shortcut_cfg_interval if student else cfg.cfg_interval),
        "forward_passes": passes, "sit_forward_gflops": cost["sit_forward_gflops"],
        "decode_gflops": cost["decode_gflops"], "gflops_per_image": passes * cost["sit_forward_gflops"]
        + cost["decode_gflops"], "images_per_s": feats.n / wall, "images_per_cpu_s": feats.n / max(cpu, 1e-9),
        "torch_threads": torch.get_num_threads(), "gfid": _pick(metrics, "fid["), "gfid_se": _pick(metrics, "fid_se["),
        "num_samples": feats.n, "metrics": metrics, "loadavg_1min": round(os.getloadavg()[0], 2),
        **({"pilot_record": pilot_record} if pilot_record else {})})


def stage_token_models(ctx: Context) -> None:
    """Lever 2: per k < L a latent cache of the first k tokens and a diffusion model trained on it exactly as the
    nested pilot trained its own (same preset, overrides, steps, seed and rate; only latents and num_tokens)."""
    plan, variant = ctx.nested.plan, ctx.nested.variant
    source = config_source(plan.diffusion_runs[variant])
    for k in ctx.ks[:-1]:
        cache = ctx.out / f"latents-k{k}"
        if not (cache / "meta.json").is_file():  # an unfinished cache resumes from its shards
            cache_latents(ctx.tokenizer(ctx.nested), ctx.data.train_set, cache, flip=plan.settings.cache_flip,
                          device=ctx.device, batch_size=256, progress=False, tokens=k)
        run = ctx.out / f"sit-k{k}"
        if not (run / "model" / "config.json").is_file():  # an unfinished run continues from its checkpoint
            cfg = load_config(DiffusionRunConfig, source.preset, [*source.overrides, f"latents={cache}",
                                                                  f"model.num_tokens={k}"])
            train_diffusion(cfg, run, ctx.dist)
    print(f"[2/4] latent caches and diffusion models at k in {ctx.ks[:-1]}: done", flush=True)
    models = {k: ctx.out / f"sit-k{k}" / "model" for k in ctx.ks[:-1]} | {ctx.L: ctx.nested.diffusion_dir / "model"}
    for k, model_dir in models.items():
        for name, cfg in plan.sampling.items():
            own = ctx.nested.results()[f"generation_{name}"] if k == ctx.L else None
            measure_generation(ctx, f"k{k}", model_dir, cfg, ctx.nested, own)
    for name, cfg in ctx.fixed.plan.sampling.items():  # the baseline, measured alike on this machine
        measure_generation(ctx, "fixed", ctx.fixed.diffusion_dir / "model", cfg, ctx.fixed,
                           ctx.fixed.results()[f"generation_{name}"])
    print("[3/4] gFID of every k (and of the fixed tokenizer) at the pilot's sampler, with and without CFG: done",
          flush=True)


def distil_student(ctx: Context, steps: int, extra: list[str]) -> Path:
    """`maetok diffusion distill` of the nested pilot's L-token model, the pilot's CFG (scale and interval) folded
    in; resumed from its checkpoints when interrupted. The guidance is given, not left to the teacher run's: a
    pilot's diffusion run keeps its preset's sample.cfg_scale, and the pilot samples at its budget's cfg_scale."""
    student = ctx.out / "student"
    if (student / "model" / "config.json").is_file():
        return student / "model"
    cfg = ctx.nested.plan.sampling["cfg"]
    low, high = cfg.cfg_interval
    argv = ["diffusion", "distill", "--teacher", str(ctx.nested.diffusion_dir), "--out", str(student),
            "--device", ctx.device.type, "--resume", "latest",
            f"latents={ctx.nested.variant_dir / 'latents-train'}", f"tokenizer={ctx.nested.tokenizer_dir}",
            f"distill.max_steps={DISTILL_MAX_STEPS}", f"train.steps={steps}", f"distill.cfg_scale={cfg.cfg_scale}",
            f"distill.cfg_interval=[{low}, {high}]", *extra]
    started, printed = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(printed):  # its summary goes into the record, not onto the progress lines
        code = maetok_main(argv)
    if code != 0:
        raise SystemExit(f"maetok {' '.join(argv)} failed with exit status {code}")
    try:
        summary = json.loads(printed.getvalue())
    except ValueError:  # not the summary alone: keep what it printed
        summary = {"printed": printed.getvalue()}
    ctx.save("distill", "student", {"command": "maetok " + " ".join(argv), "summary": summary,
                                    "wall_s": time.perf_counter() - started})
    return student / "model"


def stage_steps(ctx: Context, distill_steps: int, extra: list[str]) -> None:
    """Lever 3: gFID against sampler steps for the teacher (Euler, Heun; the pilot's CFG) and the student."""
    student = distil_student(ctx, distill_steps, extra)
    cfg, teacher = ctx.nested.plan.sampling["cfg"], ctx.nested.diffusion_dir / "model"
    for steps in ctx.state["settings"]["steps_list"]:
        for sampler in ("euler", "heun"):
            measure_generation(ctx, f"k{ctx.L}", teacher, replace(cfg, sampler=sampler, steps=steps), ctx.nested)
        if is_power_of_two(steps) and steps <= DISTILL_MAX_STEPS:
            measure_generation(ctx, "student", student, replace(cfg, steps=steps), ctx.nested)
    print(f"[4/4] student distilled ({distill_steps} steps); teacher Euler / Heun and student at "
          f"{ctx.state['settings']['steps_list']} steps: done", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.collect:
        from cheaper_generation_report import collect  # matplotlib only for --collect
        if not (args.out / STATE).is_file():
            raise SystemExit(f"{args.out}: no {STATE}; run the measurements first")
        collect(json.loads((args.out / STATE).read_text()), args.results)
        return 0
    setup_logging(None)
    ctx = open_context(args)
    write_json(ctx.out / STATE, ctx.state)
    stage_reconstruction(ctx)
    stage_token_models(ctx)
    stage_steps(ctx, args.distill_steps, args.distill_set)
    write_json(ctx.out / STATE, ctx.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
