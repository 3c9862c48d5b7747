"""Tokenizer throughput: encode, decode and training steps in images per second.

    .venv/bin/python benchmarks/tokenizer.py [--quick] [--threads N] [--device cpu]

Cases:
  - `cpu-32` preset (32x32, patch 4, width 192, 4+4 layers, 32 latent tokens; masking on, HOG auxiliary decoder),
    batch 64: encode, decode (eval, inference mode) and a full training step exactly as the training loop runs it
    (masked forward, HOG targets, losses, backward, gradient clipping, AdamW, EMA update), fp32;
  - `maetok-b-128` (256x256, patch 16, ViT-B encoder and decoder, 128 tokens of dim 32), batch 2, forward only:
    encode, decode, and encode+decode.

GFLOPs per image come from torch.utils.flop_counter on one real call (matmuls, convolutions and attention,
2 FLOPs per multiply-add). Writes benchmarks/results/tokenizer.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch

from common import RESULTS_DIR, machine, machine_line, markdown_table, measure, utc_now, write_json
from maetok.config import AuxTargetConfig, TokenizerRunConfig, load_config
from maetok.tokenizer import MAETok
from maetok.train.loop import CompiledOrEager, autocast_for, build_optimizer, ema_decay_at, ema_update
from maetok.train.tokenizer_task import TokenizerTask

RESULTS = RESULTS_DIR / "tokenizer.json"


def random_images(batch: int, size: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)


def tokenizer_run_config(preset: str, overrides: list[str] | None = None) -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, preset, overrides or [])


def train_step_fn(preset: str, batch: int, device, precision: str = "fp32", overrides: list[str] | None = None,
                  aux_targets: list[AuxTargetConfig] | None = None, compile: bool = False,
                  return_task: bool = False) -> tuple:
    """One training step of the tokenizer as `Trainer.fit` runs it; returns (step, batch-1 step, info).

    aux_targets replaces the preset's (e.g. teachers with random weights where none can be downloaded).
    compile: torch.compile the model as train.compile does, falling back to eager when compilation fails.
    `step.syncs = False` drops the loop's host sync (its non-finite check of the loss and the gradient norm): on
    a GPU the difference is what that check costs.
    """
    device = torch.device(device)
    cfg = tokenizer_run_config(preset, overrides)
    # As the training loop would be configured: the task casts and compiles its frozen teachers from these.
    cfg.train.precision, cfg.train.compile = precision, compile
    if aux_targets is not None:
        cfg.model.aux_targets = aux_targets
    torch.manual_seed(0)
    with torch.device(device):  # teachers initialise on the GPU there: seconds, not a minute
        task = TokenizerTask(cfg, device)
    model = task.model
    params = [p for p in task.trainable_parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.train.optim)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    info = {"preset": preset, "batch": batch, "precision": precision, "aux_targets": [t.name for t in
            cfg.model.aux_targets], "compiled": False,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    # As Trainer.fit: the model through torch.compile, eagerly (with a warning) if compilation fails.
    state = {"step": 0, "forward": CompiledOrEager(model, "the model", enabled=compile)}

    def run(images: torch.Tensor) -> None:
        model.train()
        with autocast_for(device, precision):
            out = task.training_step(state["forward"], (images,), state["step"])
        loss = out["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.train.optim.grad_clip or float("inf"))
        # The loop's non-finite check of loss and gradient norm: a host sync on a GPU, as there.
        if not step.syncs or bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)):
            opt.step()
            ema_update(ema, model, ema_decay_at(state["step"], cfg.train.ema_decay))
        state["step"] += 1

    images = random_images(batch, cfg.model.image_size, device)
    one = images[:1].clone()

    def step() -> None:
        run(images)
    step.syncs = True
    if compile:  # compile at the timed batch size (a batch-1 call would compile a second graph)
        run(images)
        info["compiled"] = state["forward"].is_compiled
        info["teachers_compiled"] = [n for n, fn in task.target_fns.items() if fn.is_compiled]
        info["aux_losses_compiled"] = task.aux_losses.is_compiled
    if return_task:  # profiling (benchmarks/gpu.py) times the task's frozen targets on the same images
        return step, (lambda: run(one)), info, (task, images)
    return step, (lambda: run(one)), info


def inference_model(preset: str, device, dtype: torch.dtype | None = None) -> MAETok:
    """The inference tokenizer of a preset (encoder + pixel decoder, no auxiliary decoders), random weights."""
    cfg = tokenizer_run_config(preset).model
    torch.manual_seed(0)
    with torch.device(device):
        model = MAETok(cfg).eval()
    return model.to(dtype) if dtype is not None else model


def inference_fns(preset: str, batch: int, device, precision: str = "fp32") -> tuple[dict[str, Callable], dict]:
    """encode, decode and encode+decode closures under inference mode (bf16 autocast for precision=bf16)."""
    device = torch.device(device)
    model = inference_model(preset, device)
    cfg = model.config
    images = random_images(batch, cfg.image_size, device)
    # Random latents for decode: its cost does not depend on the values, and no encode runs before a decode
    # case (a process's peak memory would otherwise already hold the encoder's).
    z = torch.randn(batch, cfg.latent_tokens, cfg.latent_dim, generator=torch.Generator().manual_seed(1)).to(device)

    def wrap(f):
        def call():
            with torch.inference_mode(), autocast_for(device, precision):
                return f()
        return call

    fns = {"encode": wrap(lambda: model.encode(images)), "decode": wrap(lambda: model.decode(z)),
           "encode+decode": wrap(lambda: model.decode(model.encode(images)))}
    info = {"preset": preset, "batch": batch, "precision": precision, "image_size": cfg.image_size,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return fns, info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute on 2 cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 by default, see benchmarks/mfu.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 2 if args.quick else 5
    device = torch.device(args.device)

    rows = []
    step, _, info = train_step_fn("cpu-32", 64, device)
    fns, _ = inference_fns("cpu-32", 64, device)
    for mode, fn in [("encode", fns["encode"]), ("decode", fns["decode"]), ("train step", step)]:
        r = measure(fn, 64, reps, device=device)
        rows.append({"model": "cpu-32", "image_size": 32, "batch": 64, "mode": mode, **r})
        print(f"  cpu-32 {mode}: {r['images_per_s']:.1f} img/s", file=sys.stderr)
    del step, fns
    fns, binfo = inference_fns("maetok-b-128", 2, device)
    for mode in ("encode", "decode", "encode+decode"):
        r = measure(fns[mode], 2, max(2, reps - 2), device=device)
        rows.append({"model": "maetok-b-128", "image_size": 256, "batch": 2, "mode": mode, **r})
        print(f"  maetok-b-128 {mode}: {r['images_per_s']:.2f} img/s", file=sys.stderr)

    result = {"machine": machine(device), "date": utc_now(), "quick": args.quick, "device": str(device),
              "settings": {"cpu-32": f"batch 64, fp32, masking + HOG aux ({info['params_m']:.1f}M params with "
                                     f"the aux decoder); train step = forward, losses, backward, clip, AdamW, EMA",
                           "maetok-b-128": f"batch 2, fp32, forward only, inference mode ({binfo['params_m']:.0f}M "
                                           f"params)",
                           "timing": f"median of {reps} calls after 1 warm-up (maetok-b-128: "
                                     f"{max(2, reps - 2)} calls)",
                           "flops": "torch.utils.flop_counter on one real call, 2 FLOPs per multiply-add"},
              "rows": rows}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return result


def markdown(result: dict) -> str:
    table = [[r["model"], f"{r['image_size']}x{r['image_size']}", r["batch"], r["mode"], f"{r['images_per_s']:.2f}",
              f"{r['seconds_per_call'] * 1e3:.0f}", f"{r['gflops_per_image']:.2f}",
              f"{r['flops_per_s'] / 1e9:.1f}"] for r in result["rows"]]
    return "\n".join([machine_line(result["machine"]) + (" (--quick)" if result["quick"] else ""), "",
                      markdown_table(["model", "images", "batch", "mode", "images/s", "ms / call",
                                      "GFLOPs / image", "GFLOP/s"], table)])


if __name__ == "__main__":
    main()
