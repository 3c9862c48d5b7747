"""CPU decode throughput of the pixel decoder: eager PyTorch (float32, and under bf16 autocast) against onnxruntime
running the graph `maetok export` writes.

    .venv/bin/python benchmarks/export.py [--quick] [--threads 1] [--out benchmarks/results/export]

Cases (random weights: the time does not depend on their values), each at batch 1 and 64:
  - demo: the quick pilot's tokenizer (cpu-32 with the quick budget's sizes: 32 px, patch 4, width 64, 2 decoder
    layers, 16 x 8 latents), the one `bash scripts/demo.sh` trains;
  - cpu-64: the preset (64 px, patch 8, width 192, 4 decoder layers, 64 x 16 latents);
  - cpu-64 at 128 px: the same with image_size=128 (256 patches).
Every case decodes the same normalised latents three ways, through what the exported graph computes
(`maetok.io.export.DecoderGraph`): eager float32 in inference mode, eager under torch.autocast(cpu, bfloat16), and
onnxruntime (CPU provider, all graph optimisations). One thread by default (torch and onnxruntime alike). The
table's rates are images per second of this process's CPU time: on a shared machine wall-clock time also counts
the neighbours' jobs (export.json holds both). Writes export.json and export.md into --out; a rerun replaces them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common import RESULTS_DIR, machine, machine_line, markdown_table, measure, utc_now, write_json
from maetok.config import TokenizerConfig, TokenizerRunConfig, load_config
from maetok.io.export import DecoderGraph, export_onnx, onnx_session
from maetok.io.pretrained import save_pretrained
from maetok.pilot.budgets import BUDGETS, as_overrides
from maetok.tokenizer import MAETok

OUT = RESULTS_DIR / "export"
BATCHES = (1, 64)


def cases() -> dict[str, TokenizerConfig]:
    demo = [s for s in as_overrides(BUDGETS["quick"].tokenizer) if s.startswith("model.")]
    return {"demo (cpu-32, quick budget)": load_config(TokenizerRunConfig, "cpu-32", demo).model,
            "cpu-64": load_config(TokenizerRunConfig, "cpu-64", []).model,
            "cpu-64 at 128 px": load_config(TokenizerRunConfig, "cpu-64",
                                            ["model.image_size=128", "data.image_size=128"]).model}


def measure_case(name: str, cfg: TokenizerConfig, folder: Path, reps: dict[int, int]) -> list[dict]:
    """One tokenizer: exported once, then each batch size decoded eagerly (float32, bf16 autocast) and by
    onnxruntime; rows with images/s and each way's max abs difference from eager float32."""
    torch.manual_seed(0)
    model = MAETok(cfg).eval()
    save_pretrained(model, folder / "model")
    report = export_onnx(folder / "model", folder / "decoder.onnx")
    graph = DecoderGraph(model).eval()
    session = onnx_session(folder / "decoder.onnx", threads=torch.get_num_threads())
    rows = []
    for batch in BATCHES:
        latents = torch.randn(batch, cfg.latent_tokens, cfg.latent_dim, generator=torch.Generator().manual_seed(1))
        feeds = {"normalized_latents": latents.numpy()}

        def eager() -> torch.Tensor:
            with torch.inference_mode():
                return graph(latents)

        def eager_bf16() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return graph(latents)

        def onnxruntime() -> torch.Tensor:
            return torch.from_numpy(session.run(None, feeds)[0])

        reference = eager()
        row = {"model": name, "image_size": cfg.image_size, "latent": [cfg.latent_tokens, cfg.latent_dim],
               "decoder_params_m": sum(p.numel() for p in model.decoder.parameters()) / 1e6, "batch": batch,
               "export_check_max_abs_error": report.max_abs_error}
        for way, fn in (("eager_fp32", eager), ("eager_bf16_autocast", eager_bf16), ("onnxruntime", onnxruntime)):
            row[way] = measure(fn, batch, reps[batch], flops=False)
            row[way]["images_per_cpu_s"] = batch / row[way]["cpu_seconds_per_call"]
            row[way]["max_abs_error_vs_eager_fp32"] = float((fn().float() - reference).abs().max())
            print(f"  {name} batch {batch} {way}: {row[way]['images_per_cpu_s']:.1f} images per CPU second",
                  file=sys.stderr)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a check that it runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for export.json and export.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = {1: 5, 64: 2} if args.quick else {1: 30, 64: 5}
    rows = []
    for name, cfg in cases().items():
        with tempfile.TemporaryDirectory() as folder:
            rows += measure_case(name, cfg, Path(folder), reps)
    result = {"machine": machine(), "date": utc_now(), "quick": args.quick, "threads": args.threads,
              "timing": f"median of {reps[1]} calls at batch 1 and {reps[64]} at batch 64, after 1 warm-up",
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "export.json", result)
    (args.out / "export.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out / 'export.json'} and export.md", file=sys.stderr)
    return result


def markdown(result: dict) -> str:
    table = []
    for r in result["rows"]:
        fp32, bf16, ort = (r[way]["images_per_cpu_s"] for way in ("eager_fp32", "eager_bf16_autocast", "onnxruntime"))
        table.append([r["model"], f"{r['image_size']} px, {r['latent'][0]} x {r['latent'][1]}", r["batch"],
                      f"{fp32:.1f}", f"{bf16:.1f} ({bf16 / fp32:.2f}x)", f"{ort:.1f} ({ort / fp32:.2f}x)",
                      f"{r['onnxruntime']['max_abs_error_vs_eager_fp32']:.1e}",
                      f"{r['eager_bf16_autocast']['max_abs_error_vs_eager_fp32']:.1e}"])
    headers = ["decoder", "images, latents", "batch", "eager fp32", "eager bf16 autocast", "onnxruntime",
               "onnxruntime max abs error", "bf16 max abs error"]
    return "\n".join([machine_line(result["machine"]) + (" (--quick)" if result["quick"] else ""),
                      f"Images per CPU second, {result['threads']} thread(s); {result['timing']}; max abs errors "
                      f"against eager fp32 on the timed batch (images of scale about 1); load average "
                      f"{result['machine'].get('loadavg_1min', '?')} at the end", "", markdown_table(headers, table)])


if __name__ == "__main__":
    main()
