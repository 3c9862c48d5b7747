"""GPU benchmark (H100 / H200): maetok-b-128 training step and SiT-XL/1 sampling in bf16, MFU vs a measured peak.

Run through benchmarks/gpu.sh, which bounds each part's time. Parts:
  --part eager    bf16 matmul peak (8192^3, random data); maetok-b-128 training step at batch 64 under bf16
                  autocast (masking, HOG + DINOv2-L/14- and SigLIP-SO400M-sized teachers with random weights, as
                  the hub cannot be reached there; HOG only; batch 128; the teachers in float32 instead of bf16);
                  SiT-XL/1 Euler sampling in bf16 on 128 tokens x 32 channels vs SiT-XL/2's 1024 tokens x 16
                  channels at 512 px
  --part compile  the same tokenizer step with torch.compile on the model and teachers (as train.compile does),
                  with the loop's host sync and without, each profiled (top kernels in OUT.md, GPU kernel time
                  per step); --batches 64 128 compiles and times more batch sizes; then SiT-XL/1 sampling on 128
                  tokens compiled (as `maetok sample --compile`)
  --part micro    scaled_dot_product_attention per backend on the step's attention shapes, one compiled
                  tokenizer attention layer with and without its RoPE, and the patch embeddings as a strided
                  convolution vs a matmul (seconds, no model)
  --part profile  where the eager tokenizer step's time goes: the frozen teachers' forward timed alone, and
                  torch.profiler's top operators and kernels by device time (gpu-profile.md)
  --merge PARTS   one gpu.json + gpu.md from the parts' JSON files (missing ones are listed as errors)
  --smoke         the same code paths on the CPU at toy sizes, to check the script before spending device time

FLOPs: torch.utils.flop_counter on one real call (forward + backward for training, the teachers' forward
included), 2 per multiply-add; compiled rows take theirs from the eager row of the same computation. MFU: against
the bf16 matmul peak measured in the same process. Memory: torch.cuda.max_memory_allocated growth over the timed
calls, per image.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from common import machine, machine_line, markdown_table, matmul_peak, measure, sync, utc_now, write_json

TOKENIZER_BATCH = 64
SIT_BATCH = 64
SIT_STEPS = 10
# --smoke: the same code paths on the CPU at toy sizes, to check the script before spending device time.
SMOKE = {"device": "cpu", "preset": "cpu-32", "batch": 2, "sit": "tiny", "sit_batch": 2, "sit_steps": 2}
SETUP = {"device": "cuda", "preset": "maetok-b-128", "batch": TOKENIZER_BATCH, "sit": "XL", "sit_batch": SIT_BATCH,
         "sit_steps": SIT_STEPS}
# Teacher targets with random weights: the hub is out of reach there, and only their cost matters here.
TEACHERS = [{"name": "hog", "weight": 1.0},
            {"name": "dinov2", "weight": 1.0, "options": {"pretrained": False}},
            {"name": "siglip", "weight": 1.0, "options": {"pretrained": False}}]
# The step benchmarked: no LPIPS (its VGG weights cannot be fetched there either) and no GAN (it starts at step
# 200k in the preset). Stated in the output.
STEP_OVERRIDES = ["loss.perceptual=none", "loss.gan.weight=0"]


def aux_targets(names: list[dict]):
    from maetok.config import AuxTargetConfig

    return [AuxTargetConfig(t["name"], t["weight"], dict(t.get("options", {}))) for t in names]


def tokenizer_case(label: str, targets: list[dict], compile: bool, reps: int, batch: int | None = None,
                   overrides: tuple[str, ...] = (), profile_steps: int = 0,
                   without_syncs: bool = False) -> list[dict]:
    """Rows for one tokenizer step: as the training loop runs it, and with `without_syncs` also without the
    loop's host sync (same compiled graphs, so no second compilation). profile_steps: add torch.profiler's
    top kernels and the GPU's busy time to each row."""
    from tokenizer import train_step_fn

    start = time.perf_counter()
    batch = batch or SETUP["batch"]
    step, one, info = train_step_fn(SETUP["preset"], batch, SETUP["device"], precision="bf16",
                                    overrides=[*STEP_OVERRIDES, *overrides], aux_targets=aux_targets(targets),
                                    compile=compile)
    built = time.perf_counter() - start  # with torch.compile: includes compiling the first step
    what = (f"{SETUP['preset']} train step, batch {batch}, bf16 autocast, aux {'+'.join(info['aux_targets'])}"
            + "".join(f", {o}" for o in overrides)
            + (f", torch.compile (teachers too: {', '.join(info.get('teachers_compiled', [])) or 'none'}; aux "
               f"losses {'compiled' if info.get('aux_losses_compiled') else 'eager'})" if info["compiled"] else ""))
    rows = []
    for syncs in (True, False) if without_syncs else (True,):
        step.syncs = syncs
        # A compiled step is not run under the FLOP counter (a dispatch mode would send it back through the
        # compiler); it does the eager step's arithmetic, so merge() takes the count from the eager row.
        # The batch-1 step creates the AdamW moments first, so that the memory per image counts activations
        # only (the compiled step has already run once, and a batch-1 call would compile another graph).
        # Steps back to back (one sync after the last), as the loop runs them: the only per-step sync left is
        # the loop's own check (absent in the no-sync row).
        r = measure(step, batch, reps, warmup=2, device=SETUP["device"], memory=syncs,
                    flops=not info["compiled"], prime=None if compile or not syncs else one, sync_each=False)
        row = {"case": label + ("" if syncs else "-nosync"),
               "what": what + (", the loop's one host sync per step" if syncs else ", no host sync"),
               "setup_s": built if syncs else 0.0, "syncs": syncs, **info, **r}
        if profile_steps:  # where the step's time goes, kernel by kernel, and how long the GPU idles
            row.update(profile_step(step, profile_steps))
        rows.append(row)
    return rows


def profile_step(step, steps: int, top: int = 25) -> dict:
    """torch.profiler over `steps` calls of `step`: the top operators / kernels by self device time, and (on a
    GPU) the fraction of the wall time in which some kernel or copy ran."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = SETUP["device"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"  # kernels, not wrappers
    result = {"top_ops": prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60),
              "profiled_wall_s_per_step": wall / steps}
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    if spans:  # union of the device intervals (streams may overlap), in microseconds
        busy, (lo, hi) = 0.0, spans[0]
        for a, b in spans[1:]:
            if a > hi:
                busy, lo, hi = busy + hi - lo, a, b
            else:
                hi = max(hi, b)
        busy += hi - lo
        result["gpu_busy_s_per_step"] = busy / 1e6 / steps
        result["gpu_busy_fraction"] = busy / 1e6 / wall
    return result


def with_oom_fallback(fn, *args, **kwargs) -> list[dict]:
    """Run a tokenizer case at batch 64, or at 32 if 64 does not fit in this GPU's memory."""
    try:
        return fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        traceback.print_exc()
    # Out of the except block: the exception's frames (and the tensors they hold) are gone by now.
    gc.collect()
    torch.cuda.empty_cache()
    return fn(*args, **kwargs, batch=SETUP["batch"] // 2)


def sit_case(tokens: int, channels: int, reps: int, compile: bool = False) -> dict:
    from mfu import sit_sample_fn

    b, steps = SETUP["sit_batch"], SETUP["sit_steps"]
    start = time.perf_counter()
    fn = sit_sample_fn(SETUP["sit"], tokens, channels, b, steps, SETUP["device"], dtype=torch.bfloat16,
                       compile=compile)
    fn()  # with compile: compiles here
    built = time.perf_counter() - start
    # FLOPs of a compiled call are counted on the eager model (merge() takes them from the eager row).
    r = measure(fn, b, reps, warmup=1, device=SETUP["device"], memory=not compile, flops=not compile)
    return {"case": f"sit-xl-{tokens}" + ("-compiled" if compile else ""), "setup_s": built,
            "what": f"SiT-{SETUP['sit']} sampling, {tokens} tokens x {channels} ch, batch {b}, Euler {steps} steps, "
                    f"no CFG, bf16 weights" + (", torch.compile (sample --compile)" if compile else ""),
            "tokens": tokens, "channels": channels, "compiled": compile, **r}


# Attention shapes of the tokenizer step: (key, label, batch, heads, tokens, head dim, with backward).
ATTENTION_SHAPES = [("tokenizer", "tokenizer encoder/decoder layer", 64, 12, 385, 64, True),
                    ("dinov2", "DINOv2-L/14 teacher layer (forward)", 64, 16, 257, 64, False),
                    ("siglip", "SigLIP-SO400M/14 teacher layer (forward)", 64, 16, 256, 72, False)]
SMOKE_ATTENTION = [("toy", "toy layer", 2, 2, 17, 8, True)]


def attention_rows(reps: int = 20) -> list[dict]:
    """scaled_dot_product_attention per backend on the step's shapes: which kernel is fastest there? (The
    compiled step ran cuDNN's at ~200 TFLOP/s.)"""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = SETUP["device"]
    rows = []
    for key, label, b, h, n, d, backward in SMOKE_ATTENTION if device == "cpu" else ATTENTION_SHAPES:
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16, generator=g)
                   .requires_grad_(backward) for _ in range(3))
        grad = torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16, generator=g)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            def call():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
                    if backward:
                        out.backward(grad)
            what = f"{label}: B {b}, H {h}, N {n}, D {d}, {backend.name} " + ("fwd+bwd" if backward else "fwd")
            row = {"case": f"attention-{key}-{backend.name.lower()}", "what": what, "backend": backend.name,
                   "shape": [b, h, n, d], "backward": backward}
            try:
                call()
                row.update(measure(call, b, reps, warmup=3, device=device))
            except RuntimeError as e:  # a backend that does not take this shape or device
                row["error"] = str(e).splitlines()[0][:200]
            rows.append(row)
    return rows


def rotate_halves(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The same rotation as `maetok.layers.rotate_pairs` with the pairs de-interleaved: channel j pairs with
    j + D/2 (a fixed permutation of q's and k's channels, which attention does not see). A candidate layout whose
    backward reads contiguous halves instead of gathering interleaved pairs; benchmarked here only."""
    dtype = x.dtype
    re, im = x.float().chunk(2, dim=-1)
    cos, sin = table.float().unbind(-1)
    return torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1).to(dtype)


def rope_rows(reps: int = 20) -> list[dict]:
    """One attention layer's qkv -> RoPE -> SDPA, forward and backward, compiled: with the model's interleaved
    RoPE, with a de-interleaved candidate, and without RoPE, so that the differences are what the rotation (and
    its backward into the stacked qkv gradient) costs in each layout."""
    import torch.nn.functional as F

    from maetok.layers import rotate_pairs

    device = SETUP["device"]
    _, _, b, h, n, d, _ = SMOKE_ATTENTION[0] if device == "cpu" else ATTENTION_SHAPES[0]
    g = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(b, n, 3 * h * d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    table = torch.randn(n, h, d // 2, 2, device=device, generator=g).requires_grad_(True)  # learnable (RoPE-Mixed)
    grad = torch.randn(b, n, h * d, device=device, dtype=torch.bfloat16, generator=g)
    variants = {"rope-layer": ("RoPE on q and k, interleaved pairs (the model's)", rotate_pairs),
                "rope-halves-layer": ("RoPE on q and k, de-interleaved halves (candidate)", rotate_halves),
                "no-rope-layer": ("no RoPE", None)}

    def layer(qkv, table, rotate):
        q, k, v = qkv.view(b, n, 3, h, d).unbind(2)
        if rotate is not None:
            q, k = rotate(q, table), rotate(k, table)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, n, h * d)

    rows = []
    for case, (label, rotate) in variants.items():
        compiled = torch.compile(lambda qkv, table, rotate=rotate: layer(qkv, table, rotate))

        def call():
            compiled(qkv, table).backward(grad)
        start = time.perf_counter()
        call()
        built = time.perf_counter() - start
        r = measure(call, b, reps, warmup=3, device=device, flops=False)
        rows.append({"case": case, "setup_s": built,
                     "what": f"tokenizer attention layer (B {b}, H {h}, N {n}, D {d}), compiled, fwd+bwd, {label}",
                     **r})
    return rows


# (key, label, batch, image size, patch, output width, weight gradient): the step's three patch embeddings
PATCH_EMBED_SHAPES = [("tokenizer", "tokenizer encoder", 64, 256, 16, 768, True),
                      ("dinov2", "DINOv2-L teacher", 64, 256, 16, 1024, False),
                      ("siglip", "SigLIP-SO400M teacher", 64, 256, 16, 1152, False)]
SMOKE_PATCH_EMBED = [("toy", "toy", 2, 32, 4, 16, True)]


def patch_embed_rows(reps: int = 20) -> list[dict]:
    """The patch embedding as cuDNN's strided convolution vs `PatchConv2d`'s matmul (what the model and
    teachers run on CUDA), as the step runs each: the tokenizer's float32 weights under bf16 autocast, forward and
    weight gradient; the teachers' bf16 weights on bf16 images outside autocast, forward only."""
    from maetok.layers import PatchConv2d

    device = SETUP["device"]
    rows = []
    for key, label, b, size, p, width, backward in SMOKE_PATCH_EMBED if device == "cpu" else PATCH_EMBED_SHAPES:
        g = torch.Generator(device).manual_seed(0)
        dtype = torch.float32 if backward else torch.bfloat16
        images = torch.randn(b, 3, size, size, device=device, generator=g).to(dtype)
        conv = torch.nn.Conv2d(3, width, p, p).to(device, dtype).requires_grad_(backward)
        grad = torch.randn(b, (size // p) ** 2, width, device=device, dtype=torch.bfloat16, generator=g)
        for how, layer in (("conv", conv), ("matmul", PatchConv2d.from_conv(conv).as_matmul)):
            def call(layer=layer):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" and backward):
                    tokens = layer(images).flatten(2).transpose(1, 2)
                if backward:
                    tokens.backward(grad.to(tokens.dtype))
            what = (f"{label} patch embedding ({b}x3x{size}x{size}, patch {p}, width {width}) as a "
                    f"{'strided convolution' if how == 'conv' else 'matmul (PatchConv2d)'}, "
                    + ("fwd + weight grad" if backward else "fwd"))
            rows.append({"case": f"patch-embed-{key}-{how}", "what": what,
                         **measure(call, b, reps, warmup=3, device=device)})
    return rows


def profile_tokenizer_step(out: Path, steps: int = 3, top: int = 25) -> None:
    """Time the teachers alone, then profile whole steps; writes OUT (json) and OUT.md (tables)."""
    from tokenizer import train_step_fn

    device = SETUP["device"]
    step, _, _, (task, images) = train_step_fn(SETUP["preset"], SETUP["batch"], device, precision="bf16",
                                               overrides=STEP_OVERRIDES, aux_targets=aux_targets(TEACHERS),
                                               return_task=True)
    for _ in range(2):
        step()
    teachers = {}
    for name, fn in task.target_fns.items():  # what each frozen target costs per step, run as the step runs it
        def teacher(fn=fn):
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                fn(images, task.model.config.patch_size)
        teachers[name] = measure(teacher, SETUP["batch"], 5, warmup=1, device=device)["seconds_per_call"]
    whole = measure(step, SETUP["batch"], 5, warmup=0, device=device)["seconds_per_call"]
    table = profile_step(step, steps, top)["top_ops"]
    result = {"machine": machine(device), "date": utc_now(), "batch": SETUP["batch"], "step_s": whole,
              "teacher_forward_s": teachers, "profiled_steps": steps, "top_ops": table}
    write_json(out, result)
    md = [machine_line(result["machine"]), "",
          f"{SETUP['preset']} train step, batch {SETUP['batch']}, bf16 autocast, eager: {whole * 1e3:.1f} ms. "
          "Frozen targets' forward alone: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in teachers.items()) + ".",
          "", f"Top {top} operators by {'device' if device == 'cuda' else 'CPU'} time over {steps} steps:", "",
          "```", table, "```"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:3]), flush=True)


def run_part(part: str, out: Path, quick: bool, compile_batches: list[int] | None = None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # any float32 matmul left outside autocast
    result = {"machine": machine(SETUP["device"]), "date": utc_now(), "part": part,
              "settings": {"tokenizer_step": f"{SETUP['preset']} preset with " + ", ".join(STEP_OVERRIDES) +
                           "; teachers dinov2 / siglip built by timm at their real sizes with pretrained=false, "
                           "held in bf16 and run outside autocast (teacher_precision=auto) unless a row says "
                           "otherwise; with torch.compile the teachers are compiled too",
                           "flops": "torch.utils.flop_counter on one real call, 2 per multiply-add",
                           "timing": "tokenizer steps: back to back after warm-up, one CUDA sync after the last "
                                     "(as the training loop runs them); other cases: median of the timed calls, "
                                     "host clock with a CUDA sync after each"},
              "rows": [], "errors": []}
    peak = matmul_peak(SETUP["device"], torch.bfloat16, n=8192 if SETUP["device"] == "cuda" else 512, reps=10)
    result["peak"] = {**peak, "how": f"{peak['n']}^3 bf16 matmul on random data, {peak['statistic']} of 10"}
    print(f"bf16 matmul peak: {peak['flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    reps = 3 if quick else 6

    if part == "micro":  # seconds each, no model
        cases = [attention_rows, rope_rows, patch_embed_rows]
    elif part == "eager":
        cases = [lambda: with_oom_fallback(tokenizer_case, "tokenizer-train", TEACHERS, False, reps),
                 lambda: with_oom_fallback(tokenizer_case, "tokenizer-train-hog", TEACHERS[:1], False, reps),
                 # larger matmuls for the same launches: does batch size move the MFU?
                 lambda: tokenizer_case("tokenizer-train-b2x", TEACHERS, False, reps, batch=2 * SETUP["batch"]),
                 lambda: sit_case(128, 32, 6),  # launch-bound at 0.2-0.3 s a call: more calls than the rest
                 lambda: sit_case(1024, 16, 3),
                 # last, so a part stopped by its time limit loses only this: what bf16 teachers (the default,
                 # teacher_precision=auto) save over float32 ones
                 lambda: with_oom_fallback(tokenizer_case, "tokenizer-train-fp32-teachers", TEACHERS, False, reps,
                                           overrides=("teacher_precision=fp32",))]
    else:  # one compilation per batch size (torch._dynamo.reset between: static shapes, as in training)
        def compiled(batch: int):
            torch._dynamo.reset()
            label = "tokenizer-train-compiled" if batch == SETUP["batch"] else f"tokenizer-train-b{batch}-compiled"
            return tokenizer_case(label, TEACHERS, True, reps, batch=batch, profile_steps=3, without_syncs=True)
        cases = [lambda b=b: compiled(b) for b in compile_batches or [SETUP["batch"]]]
        cases.append(lambda: sit_case(128, 32, 6, compile=True))
    for case in cases:
        try:
            rows = case()
            for row in rows if isinstance(rows, list) else [rows]:
                if "flops_per_s" in row:
                    row["mfu"] = row["flops_per_s"] / peak["flops_per_s"]
                result["rows"].append(row)
                if "error" in row:
                    print(f"  {row['what']}: not run ({row['error']})", flush=True)
                    continue
                print(f"  {row['case']}: {row['seconds_per_call'] * 1e3:.2f} ms, {row['images_per_s']:.1f} img/s, "
                      f"MFU {row.get('mfu', float('nan')):.0%} (setup {row.get('setup_s', 0):.0f} s)"
                      + (f", GPU busy {row['gpu_busy_fraction']:.0%}" if "gpu_busy_fraction" in row else ""),
                      flush=True)
        except Exception as e:  # keep the other cases' numbers
            traceback.print_exc()
            result["errors"].append(f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            gc.collect()  # the case's model, teachers and optimizer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # After every case: a part stopped by its time limit keeps what it measured, profiles included.
        write_json(out, result)
        profiles = [f"{r['what']}: {r['seconds_per_call'] * 1e3:.1f} ms per step. Top operators by "
                    f"{'device' if SETUP['device'] == 'cuda' else 'CPU'} time:\n\n```\n{r['top_ops']}\n```"
                    for r in result["rows"] if "top_ops" in r]
        if profiles:
            out.with_suffix(".md").write_text("\n\n".join([machine_line(result["machine"]), *profiles]) + "\n")


def merge(parts: list[Path], json_out: Path, md_out: Path) -> dict:
    loaded = [json.loads(p.read_text()) for p in parts if p.is_file()]
    if not loaded:
        raise SystemExit("no part results to merge")
    result = {k: loaded[0][k] for k in ("machine", "date", "settings", "peak")}
    result["parts"] = [{"part": d["part"], "peak": d["peak"]} for d in loaded]
    # Each row's MFU is against the peak measured in its own process (it moved 738..792 TFLOP/s between runs).
    result["rows"] = [{**r, "peak_flops_per_s": d["peak"]["flops_per_s"]} for d in loaded for r in d["rows"]]
    counted = {r["case"]: r for r in result["rows"] if "flops_per_call" in r}
    for r in result["rows"]:
        # The eager step that does the same arithmetic: "tokenizer-train-b128-compiled-nosync" -> "tokenizer-train"
        # (the step's FLOPs are proportional to the batch).
        src = counted.get(re.sub(r"-(compiled|nosync|b\d+)", "", r["case"]))
        if "flops_per_call" not in r and src:
            r["flops_per_call"] = src["flops_per_call"] / src["images_per_call"] * r["images_per_call"]
            r["gflops_per_image"] = src["gflops_per_image"]
            r["flops_per_s"] = r["flops_per_call"] / r["seconds_per_call"]
            r["mfu"] = r["flops_per_s"] / r["peak_flops_per_s"]
            r["flops_from"] = src["case"]
    result["errors"] = [e for d in loaded for e in d["errors"]]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        result["errors"].append(f"no results from {missing} (stopped by its time limit?)")
    sit = {r["tokens"]: r for r in result["rows"] if r["case"].startswith("sit-xl-") and not r.get("compiled")}
    if 128 in sit and 1024 in sit:
        result["sit_xl_128_vs_1024"] = {
            "throughput_ratio": sit[128]["images_per_s"] / sit[1024]["images_per_s"],
            "flop_ratio": sit[1024]["gflops_per_image"] / sit[128]["gflops_per_image"],
            "paper_throughput_ratio": 31}
    write_json(json_out, result)
    md = markdown(result)
    md_out.write_text(md + "\n")
    print(md)
    return result


def markdown(result: dict) -> str:
    peaks = " and ".join(f"{d['peak']['flops_per_s'] / 1e12:.0f} TFLOP/s ({d['part']} part)"
                         for d in result.get("parts", [])) or f"{result['peak']['flops_per_s'] / 1e12:.0f} TFLOP/s"
    def num(r, key, fmt, scale=1.0):
        return format(r[key] / scale, fmt) if key in r else "?"

    def kernels(r):  # the profiled kernel time against the unprofiled step (the profiler slows the host)
        if "gpu_busy_s_per_step" not in r:
            return "-"
        return f"{r['gpu_busy_s_per_step'] * 1e3:.0f} ({r['gpu_busy_s_per_step'] / r['seconds_per_call']:.0%})"

    rows = [[r["what"] + (f" (not run: {r['error']})" if "error" in r else ""),
             num(r, "images_per_s", ".1f"), num(r, "seconds_per_call", ".2f", 1e-3), num(r, "gflops_per_image", ".0f"),
             num(r, "flops_per_s", ".0f", 1e12), num(r, "mfu", ".0%"),
             num(r, "peak_memory_mib_per_image", ".0f") if "peak_memory_mib_per_image" in r else "-", kernels(r)]
            for r in result["rows"]]
    lines = [machine_line(result["machine"]),
             f"Peak: {peaks} ({result['peak']['how']}); each row's MFU is against its own part's peak. "
             f"Tokenizer step: {result['settings']['tokenizer_step']}. Kernel time: the union of the GPU's kernels "
             "and copies in a profiled step, and its share of the step's time.", "",
             markdown_table(["case", "images/s", "ms / call", "GFLOPs / image", "TFLOP/s", "MFU (bf16 peak)",
                             "peak MiB / image", "kernel ms / step (busy)"], rows)]
    ratio = result.get("sit_xl_128_vs_1024")
    if ratio:
        lines += ["", f"SiT-XL sampling at 512 px, 128 tokens vs 1024: {ratio['throughput_ratio']:.1f}x the "
                      f"images/s for {ratio['flop_ratio']:.1f}x fewer FLOPs (the paper measured "
                      f"{ratio['paper_throughput_ratio']}x)."]
    if result["errors"]:
        lines += ["", "Errors: " + "; ".join(result["errors"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["eager", "compile", "micro", "profile"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="--part compile: the batch sizes to compile and time (default: 64 only)")
    parser.add_argument("--merge", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script only")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.json, args.md)
        return
    if args.smoke:
        SETUP.update(SMOKE)
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    if args.part == "profile":
        profile_tokenizer_step(args.out)
        return
    run_part(args.part, args.out, args.quick, args.batches)


if __name__ == "__main__":
    sys.exit(main())
