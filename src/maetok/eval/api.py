"""`maetok eval` and `maetok analyze` as Python functions: the CLI and the pilot call the same code.

    evaluate_generation("runs/samples/samples.npz", "shapes", "resnet20-cifar10", num_ref=10_000, split="test")
    evaluate_reconstruction(tokenizer, open_dataset("shapes", "test", 32, limit=1000), "resnet20-cifar10")
    analyze_latents({"maetok": "runs/cache", "ae": ae_cache}, {"maetok": "runs/cache-test"}, ks=(1, 2, 4),
                    out_dir="runs/analysis")

The evaluations live in `evaluate` (generation, reconstruction), `inputs` (feature networks, samples, reference
statistics and their caches) and `analyze` (latent analysis); this module adds the two commands, which read an
argparse namespace and write their result as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ..data import DatasetError, open_dataset
from ..data.datasets import held_out_split
from ..io.distributed import DistInfo, cleanup, init_distributed, resolve_device
from ..io.pretrained import load_tokenizer
from .analyze import analyze_latents
from .evaluate import evaluate_generation, evaluate_reconstruction, generation_report
from .inputs import EvalInputError, load_samples, reference_features, reference_key, resolve_feature_net

__all__ = ["evaluate_generation", "evaluate_reconstruction", "generation_report", "analyze_latents",
           "reference_features", "resolve_feature_net", "load_samples", "EvalInputError", "result_path",
           "evaluate_command", "analyze_command"]

log = logging.getLogger("maetok.eval")

DEFAULT_EVAL_DIR = Path("runs") / "eval"  # like `pilot`'s runs/pilot: never beside the inputs (maybe read-only)


def _write_json(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the result; a location that cannot be written only loses the file (the CLI prints the result)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        return {**result, "json": str(path)}
    except OSError as e:
        log.warning("could not write %s (%s); results are printed only", path, e)
        return {**result, "json": None}


def result_path(out: str | Path | None, source: str | Path, kind: str, net: str) -> Path:
    """Where `maetok eval` writes its JSON: `out` when it names a .json file, else a file in the folder `out`
    (default runs/eval/) named after the input's last two path components (run folders are often all called
    `model` or `samples`), e.g. runs/eval/tok-ae-model.recon-inception.json."""
    out = Path(out) if out else DEFAULT_EVAL_DIR
    if out.suffix.lower() == ".json":
        return out
    src = Path(source).expanduser()
    full = src.resolve() if src.exists() else Path(str(source))  # not there: a hub id, org/name
    parts = [p for p in full.parts if p != full.anchor][-2:]
    if src.is_file():
        parts[-1] = Path(parts[-1]).stem
    label = "-".join(parts) or "eval"
    return out / f"{label}.{kind}-{net}.json"


def evaluate_command(args: argparse.Namespace) -> dict[str, Any] | None:
    """`maetok eval gen|recon`; returns the result and writes it as JSON to `result_path(args.out, ...)`.
    Under torchrun the ranks share the work; rank 0 returns and writes the result, the others return None."""
    info = init_distributed(args.device)  # a cuda:N given to one process is used as is below
    try:
        result = _evaluate(args, info, info.device if info.enabled else resolve_device(args.device))
    finally:
        cleanup(info)
    return result if info.is_main else None


def _evaluate(args: argparse.Namespace, info: DistInfo, device) -> dict[str, Any]:
    write = _write_json if info.is_main else (lambda result, path: result)
    # No --split: the data's test/ folder, else its val/ folder (ImageNet has only train/ and val/).
    split = args.split or held_out_split(args.ref)
    out = getattr(args, "out", None)
    if args.what == "gen" and not args.samples:
        raise EvalInputError("maetok eval gen needs --samples (.npz with arr_0, or an image folder)")
    if args.what == "recon" and not args.tokenizer:
        raise EvalInputError("maetok eval recon needs --tokenizer (a tokenizer weights folder)")
    tokens = getattr(args, "tokens", None)
    if args.what == "gen" and tokens is not None:
        raise EvalInputError("--tokens is for maetok eval recon (reconstruct from the first K latent tokens); "
                             "samples carry their own token count")
    net = resolve_feature_net(args.features, device)
    # Before any work, and alike on every rank: an earlier result (hours of Inception on a CPU) is kept.
    path = result_path(out, args.samples, "eval", net.name) if args.what == "gen" else \
        result_path(out, args.tokenizer, "recon" if tokens is None else f"recon-k{tokens}", net.name)
    if path.exists() and not getattr(args, "force", False):
        raise EvalInputError(f"{path} already holds an evaluation result; give --force to replace it, or --out "
                             f"another .json file or folder")
    if args.what == "gen":
        result = evaluate_generation(args.samples, args.ref, net, split=split,
                                     num_ref=args.num_samples, stats_cache=args.stats_cache, device=device,
                                     progress=info.is_main, dist=info)
        return write(result, path)

    tokenizer = load_tokenizer(args.tokenizer)
    size = tokenizer.config.image_size
    try:
        dataset = open_dataset(args.ref, split=split, image_size=size, limit=args.num_samples)
    except DatasetError as e:
        raise EvalInputError(f"--ref {args.ref!r}: {e}") from None
    # The same key as `eval gen` uses: one cache of these reference images serves rFID and gFID alike.
    key = reference_key(args.ref, split, args.num_samples, size, net.name)
    result = evaluate_reconstruction(tokenizer, dataset, net, device=device, stats_cache=args.stats_cache,
                                     cache_key=key, progress=info.is_main, dist=info, tokens=tokens)
    result = {"tokenizer": str(args.tokenizer), "reference": {"source": args.ref, "split": split}, **result}
    return write(result, path)


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalInputError(f"{option}: {item!r} must look like NAME=CACHE_DIR")
        if name in out:
            raise EvalInputError(f"{option}: name {name!r} given twice")
        out[name] = path
    return out


def analyze_command(args: argparse.Namespace) -> dict[str, Any]:
    """`maetok analyze`: analysis.json and gmm_nll.png in --out; returns the analysis."""
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise EvalInputError(f"--ks {args.ks!r} must be comma-separated integers, e.g. 1,2,4,8") from None
    if not ks or min(ks) < 1:
        raise EvalInputError(f"--ks {args.ks!r} must list positive integers")
    return analyze_latents(_pairs(args.latents, "--latents"), _pairs(args.test_latents, "--test-latents"), ks,
                           args.out)
