"""`maetok` command line: thin wrappers over the Python API.

    maetok tokenizer train --config cpu-32 --out runs/tok model.latent_tokens=64 train.steps=2000
    maetok tokenizer reconstruct --model runs/tok/model --images shapes --num-samples 32 --out runs/recon
    maetok convert official-tokenizer --src DIR --out DIR [--weights FILE --config FILE]
    maetok convert official-sit --src DIR --out DIR [--weights FILE --config FILE]
    maetok pilot --data zip:../shared/data/cifar10-jpeg.zip --budget standard --out runs/pilot-cifar
    maetok demo                      # the quick pilot on built-in shapes (the README's main command)

Every training command takes dotted `key=value` overrides after its options. Commands writing into --out refuse
one that already holds their output (`latents cache` resumes an unfinished cache); --force replaces it. Counts are
`--num-samples` (`--num` still works alone, but not under torchrun, whose parser reads it as an abbreviation of
--numa-binding).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from .io.pretrained import load_sit, load_tokenizer


class CLIError(Exception):
    """A command-line request that cannot be carried out as given (reported as one line, exit code 2)."""


# ==============================================================================================================
# Argument types: bad values are refused while parsing, before any model is loaded or sample drawn
# ==============================================================================================================
def _count(minimum: int):
    """An argparse type: an integer >= minimum (1 for counts of things to make, 0 where 0 means all)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = "count"  # argparse names the type in some messages
    return parse


def _guidance_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text!r}") from None
    if not (value >= 1 and math.isfinite(value)):  # also refuses nan; below 1 the samplers would not guide
        raise argparse.ArgumentTypeError(f"must be a number >= 1 (1 = no guidance), got {text}")
    return value


def _interval(text: str) -> tuple[float, float]:
    """'LOW,HIGH' with 0 <= LOW < HIGH <= 1 (a guidance interval in t)."""
    parts = text.split(",")
    try:
        low, high = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers LOW,HIGH in [0, 1], e.g. 0,0.75; "
                                         f"got {text!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= LOW < HIGH <= 1; got {text!r}")
    return low, high


def _device_type(indexed: bool):
    """An argparse type for --device: auto, cpu, cuda (and, where the command uses the device as given, cuda:N
    and mps). A device this machine lacks is refused here: the training code would silently run on the CPU."""
    forms = "auto, cpu, cuda" + (", cuda:N, mps" if indexed else "")

    def parse(text: str) -> str:
        name = text.strip().lower()
        family, _, index = name.partition(":")
        if name in ("auto", "cpu"):
            return name
        if not ((family == "cuda" and (not index or (indexed and index.isdigit()))) or (indexed and name == "mps")):
            hints = {"cuda": " (this command places its processes itself: choose the GPU with CUDA_VISIBLE_DEVICES)",
                     "mps": " (this command runs on CUDA or the CPU)"}
            hint = "" if indexed else hints.get(family, "")
            raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose {forms}{hint}")
        import torch

        if family == "cuda":
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch "
                                                 f"{torch.__version__}, CUDA build {torch.version.cuda}); use "
                                                 f"--device cpu or auto")
            if index and int(index) >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                                 f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        elif not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS (Apple GPU) is not available on this machine")
        return name
    parse.__name__ = "device"
    return parse


def _checkpoint(hub: bool):
    """An argparse type for --model/--tokenizer: an existing folder, or (when `hub`) a hub id org/name. A path
    that does not exist is refused here, instead of being downloaded as a hub id and failing confusingly."""
    def parse(text: str) -> str:
        if Path(text).expanduser().exists():
            return str(Path(text).expanduser())
        from .io.hub import local_path_reason

        why = local_path_reason(text) if hub else "this option reads a local folder only"
        if why is not None:
            raise argparse.ArgumentTypeError(f"{text}: no such folder (read as a local path: {why})")
        return text
    parse.__name__ = "checkpoint"
    return parse


def _is_main_process() -> bool:
    """Rank 0, or a run outside torchrun: the one process that prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def _out_folder(out_arg: str, what: str) -> Path:
    """--out as a folder path; refused when it names a file."""
    out = Path(out_arg).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; {what} are written into a folder")
    return out


def _finished_output(out_arg: str, names: tuple[str, ...], what: str, force: bool) -> None:
    """Refuse an --out that already holds this command's finished output (`names`), unless --force. It only
    reads files, so under torchrun every rank that calls it before any rank writes reaches the same decision
    (and raises together, instead of leaving the others waiting in a collective)."""
    out = _out_folder(out_arg, what)
    present = [name for name in names if (out / name).exists()]
    if present and not force:
        raise CLIError(f"--out {out} already holds {what} ({', '.join(present)}); choose another --out, or pass "
                       f"--force to replace them")


def _add_run_args(p: argparse.ArgumentParser, default_config: str, example: str) -> None:
    p.add_argument("--config", default=None,
                   help=f"YAML file or preset name under configs/ (default {default_config}; --resume keeps the "
                        f"run's own)")
    p.set_defaults(default_config=default_config)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                   "its saved config (overrides may change only train.steps, intervals, workers, compile, precision, "
                   "train.optim.lr and grad_clip); "
                   "a missing --out starts a new run there (so one command line both starts and resumes a "
                   "scheduled job), so check the path")
    p.add_argument("--force", action="store_true", help="delete the maetok run in --out and start over")
    p.add_argument("--device", default="auto", type=_device_type(indexed=False), help=TRAIN_DEVICE_HELP)
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


def _train(a: argparse.Namespace, config_cls, run_fn) -> int:
    from .config import load_config
    from .train.run import exit_status

    # `default`: a preset the user did not name, so that --resume may keep the run's own. Resuming without
    # --config starts from the run's own config.yaml: the command's default preset may not even validate alone
    # (a diffusion run needs its latents), and the run's saved config replaces it anyway.
    default = getattr(a, "default_config", None)
    saved = Path(a.out) / "config.yaml"
    if a.resume and a.config is None and saved.is_file():
        default = str(saved)
    cfg = load_config(config_cls, a.config, a.overrides, default=default)
    summary = run_fn(cfg, a.out, resume=a.resume, force=a.force, device=a.device)
    if _is_main_process():  # under torchrun every rank returns the summary; one copy is printed
        print(json.dumps(summary, indent=2))
    return exit_status(summary)  # 128 + N after signal N: a scheduler must not take a pre-empted run as done


def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from .config import TokenizerRunConfig
    from .train.run import run_tokenizer

    return _train(a, TokenizerRunConfig, run_tokenizer)


def cmd_tokenizer_reconstruct(a: argparse.Namespace) -> int:
    import torch

    from .data import open_dataset
    from .data.datasets import held_out_split
    from .data.images import save_image_grid
    from .eval.recon import psnr, ssim, to_uint8_levels

    # Before loading anything: a second run into the same folder would overwrite the first one's results.
    _finished_output(a.out, RECON_FILES, "reconstructions", a.force)
    model = load_tokenizer(a.model)
    size = model.config.image_size
    split = a.split or held_out_split(a.images)  # no --split: test/, else val/
    ds = open_dataset(a.images, split=split, image_size=size, limit=a.num_samples)
    x = torch.stack([ds[i][0] for i in range(min(a.num_samples, len(ds)))])
    with torch.no_grad():
        # Rounded to the 8-bit levels the PNG holds, as `eval recon` and the pilot measure reconstructions.
        recon = to_uint8_levels(torch.cat([model.decode(model.encode(b)) for b in x.split(16)]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nrow = min(8, x.shape[0])
    # Interleave rows: originals, then their reconstructions, so pairs sit one above the other; a short last row
    # is padded with white so the pairs stay aligned.
    pad = (-x.shape[0]) % nrow
    x_p, r_p = (torch.cat([t, torch.ones(pad, *t.shape[1:])]) for t in (x, recon))
    rows = [t for i in range(0, x_p.shape[0], nrow) for t in (x_p[i:i + nrow], r_p[i:i + nrow])]
    save_image_grid(torch.cat(rows), out / "reconstructions.png", nrow=nrow)
    metrics = {"psnr": psnr(recon, x).mean().item(), "ssim": ssim(recon, x).mean().item(),
               "num_images": int(x.shape[0]), "images": a.images, "split": split}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({**metrics, "grid": str(out / "reconstructions.png")}, indent=2))
    return 0


RECON_FILES = ("reconstructions.png", "metrics.json")


def cmd_convert(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.is_file():
        raise CLIError(f"--out {out} is a file; converted weights go into a folder")
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise CLIError(f"--out {out} already exists and is not empty; pass --force to overwrite its files or "
                       f"choose another --out")
    if a.what == "official-tokenizer":
        from .io.pretrained import convert_official_tokenizer

        report = convert_official_tokenizer(a.src, a.out, a.weights, a.config)
        print(report.summary())
    else:
        from .io.convert_sit import convert_official_sit

        report = convert_official_sit(a.src, a.out, weights=a.weights, config=a.config)
        print(report.summary() if hasattr(report, "summary") else report)
    print(f"saved to {a.out}")
    return 0


def _check_latent_out(a: argparse.Namespace) -> list[Path]:
    """Refuse a finished cache in --out (meta.json: a diffusion run may be training on it, and would resume on
    other data) unless --force; returns the cache files --force deletes. Shards without meta.json are an
    unfinished cache, which is resumed as before: shards on disk are kept."""
    from .data.latents import META, cache_files

    out = _out_folder(a.out, "latent caches")
    files = cache_files(out)
    meta = out / META
    shards = [p for p in files if p.name.startswith("shard-")]
    if meta.exists() and not a.force:
        try:
            count = f"{json.loads(meta.read_text())['count']} latents, "
        except (OSError, ValueError, KeyError, TypeError):
            count = ""  # an unreadable meta.json is still a cache's
        raise CLIError(f"--out {out} already holds a finished latent cache ({count}meta.json + {len(shards)} "
                       f"shard(s)), which a diffusion run trained on it reads again when resumed; choose another "
                       f"--out, or pass --force to replace it")
    if shards and not a.force and _is_main_process():
        print(f"maetok: {out} holds an unfinished latent cache ({len(shards)} shard(s), no meta.json): "
              f"resuming it, its shards kept as they are (--force starts over)", file=sys.stderr)
    return files if a.force else []


def cmd_latents_cache(a: argparse.Namespace) -> int:
    from .data import open_dataset
    from .data.latents import cache_latents

    from .io.distributed import barrier, cleanup, init_distributed, resolve_device

    stale = _check_latent_out(a)  # every rank, before any rank writes (no rank writes before init_distributed)
    tok = load_tokenizer(a.tokenizer)
    ds = open_dataset(a.data, split=a.split, image_size=tok.config.image_size, limit=a.limit)
    # Under torchrun the ranks encode alternate shards (each on its own device); alone, the device as given.
    info = init_distributed(a.device)
    try:
        if a.force:
            # Deleted only now that the tokenizer and data have loaded, meta.json first (no half-replaced cache
            # passes for a finished one). Old shards would otherwise be kept as if encoded from this data. The
            # barrier keeps every rank from looking for its shards before rank 0 has deleted them.
            if info.is_main:
                for path in stale:
                    path.unlink(missing_ok=True)
            barrier(info)
        out = cache_latents(tok, ds, a.out, batch_size=a.batch_size, flip=not a.no_flip,
                            device=info.device if info.enabled else resolve_device(a.device), dist=info)
    finally:
        cleanup(info)
    if info.is_main:
        print(f"cached {len(ds)} latents of {a.data} ({a.split}) in {out}")
    return 0


def cmd_diffusion_train(a: argparse.Namespace) -> int:
    from .config import DiffusionRunConfig
    from .train.run import run_diffusion

    return _train(a, DiffusionRunConfig, run_diffusion)


def cmd_sample(a: argparse.Namespace) -> int:
    from .config import SampleConfig, from_dict
    from .diffusion.generate import SETTINGS_FILE, check_compatible, generate_to_dir
    from .io.distributed import resolve_device

    # Every rank, before the work: under torchrun only rank 0 writes, after a collective every rank joins, so no
    # rank can see another's new files here. With --force the files are overwritten when the samples are written.
    _finished_output(a.out, ("samples.npz", "samples.png", SETTINGS_FILE), "samples", a.force)
    low, high = a.interval
    cfg = from_dict(SampleConfig, {"sampler": a.sampler, "steps": a.steps, "cfg_scale": a.cfg,
                                   "cfg_interval": [low, high], "seed": a.seed})
    model = load_sit(a.model)
    if not model.config.num_classes:  # an unconditional model: no labels, so nothing to guide or balance
        if a.cfg != 1.0:
            raise CLIError(f"--cfg {a.cfg:g}: classifier-free guidance needs a class-conditional model, but --model "
                           f"{a.model} is unconditional (num_classes=0); use --cfg 1")
        if a.balanced:
            raise CLIError(f"--balanced: --model {a.model} is unconditional (num_classes=0), so there are no "
                           f"classes to balance; leave out --balanced")
    tok = load_tokenizer(a.tokenizer)
    check_compatible(model, tok, f"--model {a.model}", f"--tokenizer {a.tokenizer}")  # before any sampling
    where = {"model": _recorded_path(a.model), "tokenizer": _recorded_path(a.tokenizer),
             "batch_size": a.batch_size}  # batch size and process count fix the SDE sampler's noise
    path = generate_to_dir(model, tok, a.num_samples, cfg, Path(a.out), balanced=a.balanced,
                           batch_size=a.batch_size, device=resolve_device(a.device), settings=where,
                           compile=a.compile)
    if _is_main_process():  # under torchrun only rank 0 writes the files
        print(f"wrote {path}, {path.with_suffix('.png')} and {path.with_name(SETTINGS_FILE)}")
    return 0


def _recorded_path(text: str) -> str:
    """A local path made absolute (the record stays meaningful from another folder); a hub id as given."""
    p = Path(text).expanduser()
    return str(p.resolve()) if p.exists() else text


def cmd_eval(a: argparse.Namespace) -> int:
    from .eval.api import evaluate_command

    result = evaluate_command(a)
    if result is not None:  # None on ranks other than 0 under torchrun
        print(json.dumps(result, indent=2))
        if result.get("json"):
            print(f"maetok: wrote {result['json']}", file=sys.stderr)  # stdout stays one JSON document
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from .eval.api import analyze_command

    _finished_output(a.out, ("analysis.json", "gmm_nll.png"), "analysis results", a.force)
    print(json.dumps(analyze_command(a), indent=2))
    return 0


def cmd_pilot(a: argparse.Namespace) -> int:
    from .pilot import PilotInterrupted, pilot_settings, run_pilot
    from .io.distributed import resolve_device

    settings = pilot_settings(a.budget, a.overrides, a.tokenizer_set, a.diffusion_set)
    try:
        report = run_pilot(a.data, a.variants.split(","), a.budget, Path(a.out), resume=a.resume, force=a.force,
                           device=resolve_device(a.device), inception=a.inception, settings=settings,
                           collective_timeout=a.collective_timeout)
    except PilotInterrupted as e:
        print(f"maetok: pilot interrupted: {e}", file=sys.stderr)
        return e.exit_code
    if report is not None:  # None on ranks other than 0 under torchrun
        print(f"report: {report}")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # A week at most: the timeout becomes a timedelta, and "inf" would overflow it deep inside torch.distributed.
    if not 0 < value <= 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, 604800] (a week), got {text!r}")
    return value


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    from .pilot import PilotInterrupted

    try:
        run_demo(Path(a.out), budget=a.budget, force=a.force)
    except PilotInterrupted as e:
        print(f"maetok: demo interrupted: {e}", file=sys.stderr)
        return e.exit_code
    return 0


SPLIT_HELP = "held-out split folder to read (default: test/, or val/ when there is no test/)"
NUM_ALIAS_HELP = "; --num is the old spelling (it clashes with torchrun's --numa-binding under torchrun)"
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
# Training and the pilot place each process themselves (cuda:LOCAL_RANK under torchrun, else the first GPU), so
# they refuse cuda:N (which they would ignore) and mps.
TRAIN_DEVICE_HELP = ("auto, cpu or cuda (not cuda:N or mps: choose the GPU with CUDA_VISIBLE_DEVICES; under "
                     "torchrun each rank uses cuda:LOCAL_RANK)")


CONVERT_MODES = """\
Convert an official MAETok checkpoint into a maetok weights folder (config.json + model.safetensors).

modes:
  official-tokenizer  an official MAETok tokenizer -> a folder that MAETok.from_pretrained and --tokenizer read
      maetok convert official-tokenizer --src path/to/MAETok/maetok-b-128 --out weights/maetok-b-128
  official-sit        an official SiT / LightningDiT trained on MAETok latents -> a folder for sample --model
      maetok convert official-sit --src path/to/sit-xl --out weights/sit-xl
  either: --weights FILE when --src holds several weight files, --config FILE when it has no config.json;
  --force writes into a non-empty --out
"""

EVAL_MODES = """\
Evaluate samples (gen) or a tokenizer's reconstructions (recon) against reference images (--ref).

modes:
  gen    FID/KID/IS/precision/recall of --samples (.npz with arr_0, or an image folder) against --ref
      maetok eval gen --samples runs/samples/samples.npz --ref shapes --num-samples 1000 --features inception
  recon  rFID/PSNR/SSIM of --tokenizer, reconstructing the --ref images
      maetok eval recon --tokenizer runs/tok/model --ref shapes --features resnet56-cifar10
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maetok", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train and use tokenizers").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a tokenizer (MAETok, AE, VAE, MAE) or fine-tune its decoder")
    _add_run_args(p, "cpu-32", "model.latent_tokens=64 train.steps=2000")
    p.set_defaults(fn=cmd_tokenizer_train)
    p = tok.add_parser("reconstruct", help="encode+decode images; writes a side-by-side PNG grid and PSNR/SSIM")
    p.add_argument("--model", required=True, type=_checkpoint(hub=True),
                   help="weights folder (save_pretrained), official checkpoint folder, or hub id org/name")
    p.add_argument("--images", required=True, help="data spec: folder, zip:FILE, cifar:DIR, npz:FILE or shapes")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--num-samples", "--num", dest="num_samples", type=_count(1), default=32, metavar="N",
                   help="images to reconstruct" + NUM_ALIAS_HELP)
    p.add_argument("--out", required=True, help="folder for reconstructions.png and metrics.json")
    p.add_argument("--force", action="store_true", help="replace the reconstructions already in --out (without "
                                                        "it, an --out holding them is refused)")
    p.set_defaults(fn=cmd_tokenizer_reconstruct)

    p = sub.add_parser("convert", help="convert official MAETok checkpoints into maetok's format",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=CONVERT_MODES)
    p.add_argument("what", choices=["official-tokenizer", "official-sit"], help="what to convert (see above)")
    p.add_argument("--src", required=True, help="folder with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None, help="weights file, if not in --src")
    p.add_argument("--config", default=None, help="config file, if not --src/config.json")
    p.add_argument("--force", action="store_true", help="overwrite the files of an existing, non-empty --out")
    p.set_defaults(fn=cmd_convert)

    lat = sub.add_parser("latents", help="latent caches").add_subparsers(dest="action", required=True)
    p = lat.add_parser("cache", help="encode a dataset once into sharded safetensors (with flipped copies); "
                                     "under torchrun the ranks share the shards")
    p.add_argument("--tokenizer", required=True, type=_checkpoint(hub=True), help="tokenizer folder or hub id")
    p.add_argument("--data", required=True, help="data spec: folder, zip:FILE, cifar:DIR, npz:FILE or shapes")
    p.add_argument("--split", default="train", help="split folder of --data to encode (default train; e.g. test "
                                                     "for held-out latents for `maetok analyze --test-latents`)")
    p.add_argument("--limit", type=_count(0), default=0, help="images to encode (0 = all)")
    p.add_argument("--batch-size", type=_count(1), default=64)
    p.add_argument("--no-flip", action="store_true", help="do not also cache horizontally flipped images")
    p.add_argument("--out", required=True, help="cache folder; one holding shards but no meta.json (an "
                                                "interrupted cache) is resumed")
    p.add_argument("--force", action="store_true", help="delete the latent cache in --out, finished or not, and "
                                                        "encode again (without it, a finished cache is refused)")
    p.add_argument("--device", default="auto", type=_device_type(indexed=True), help=DEVICE_HELP)
    p.set_defaults(fn=cmd_latents_cache)

    dif = sub.add_parser("diffusion", help="train SiT / LightningDiT").add_subparsers(dest="action", required=True)
    p = dif.add_parser("train", help="train a diffusion model on a latent cache or on images encoded online")
    _add_run_args(p, "sit-cpu", "model.num_tokens=64 model.in_channels=12 train.steps=2000")
    p.set_defaults(fn=cmd_diffusion_train)

    p = sub.add_parser("sample", help="sample images: PNG grid + ADM-compatible .npz (sharded under torchrun)")
    p.add_argument("--model", required=True, type=_checkpoint(hub=False), help="SiT weights folder")
    p.add_argument("--tokenizer", required=True, type=_checkpoint(hub=True), help="tokenizer folder or hub id")
    p.add_argument("--num-samples", "--num", dest="num_samples", type=_count(1), default=64, metavar="N",
                   help="images to generate" + NUM_ALIAS_HELP)
    p.add_argument("--cfg", type=_guidance_scale, default=1.0,
                   help="classifier-free guidance scale (1 = none; guidance needs a class-conditional model)")
    p.add_argument("--interval", type=_interval, default=(0.0, 1.0), metavar="LOW,HIGH",
                   help="guidance interval in t, 0 <= LOW < HIGH <= 1 (t=0 data, t=1 noise); default 0,1")
    p.add_argument("--sampler", default="heun", choices=["euler", "heun", "sde"])
    p.add_argument("--steps", type=_count(1), default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true",
                   help="labels 0, 1, ..., K-1, 0, 1, ... (K classes): counts per class as equal as possible "
                        "(they differ by at most one, the lower classes getting the extra); without it labels "
                        "are drawn uniformly at random. Needs a class-conditional model")
    p.add_argument("--batch-size", type=_count(1), default=64)
    p.add_argument("--compile", action="store_true",
                   help="run the diffusion model through torch.compile (a GPU speed-up for many samples; it "
                        "compiles once per batch shape, and runs eagerly if compilation fails)")
    p.add_argument("--out", required=True, help="folder for samples.npz, samples.png and sampling.json")
    p.add_argument("--force", action="store_true", help="replace the samples already in --out (without it, an "
                                                        "--out holding them is refused)")
    p.add_argument("--device", default="auto", type=_device_type(indexed=True), help=DEVICE_HELP)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("eval", help="FID/KID/IS/PR of samples, or rFID/PSNR/SSIM of a tokenizer (runs as it is "
                                    "under torchrun: the ranks share the feature extraction)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=EVAL_MODES)
    p.add_argument("what", choices=["gen", "recon"], help="what to evaluate (see above)")
    p.add_argument("--samples", help="gen: .npz with arr_0 (uint8 NHWC), or an image folder")
    p.add_argument("--tokenizer", type=_checkpoint(hub=True), help="recon: tokenizer weights folder or hub id")
    p.add_argument("--ref", required=True, help="reference: data spec, ADM .npz batch or cached stats .npz")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--num-samples", "--num", dest="num_samples", type=_count(0), default=0, metavar="N",
                   help="images from --ref (0 = all)" + NUM_ALIAS_HELP)
    p.add_argument("--features", default="inception", help="feature network: inception, resnet56-cifar10, ...")
    p.add_argument("--stats-cache", default=None, help="where to cache the reference statistics")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="result JSON: a .json file, or a folder for an automatically named one (default "
                        "runs/eval/, named after the input, e.g. runs/eval/tok-model.recon-inception.json)")
    p.add_argument("--force", action="store_true", help="replace an earlier result at that path")
    p.add_argument("--device", default="auto", type=_device_type(indexed=True), help=DEVICE_HELP)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("analyze", help="latent-space analysis: GMM NLL per K, linear probe, token statistics")
    p.add_argument("--latents", nargs="+", required=True, help="NAME=CACHE_DIR (train) pairs, one per tokenizer")
    p.add_argument("--test-latents", nargs="*", default=[], help="NAME=CACHE_DIR (held-out) pairs")
    p.add_argument("--ks", default="1,2,4,8,16,32", help="comma-separated GMM component counts K to fit (default "
                                                          "1,2,4,8,16,32; a K above the number of latents is dropped)")
    p.add_argument("--out", required=True, help="folder for analysis.json and gmm_nll.png")
    p.add_argument("--force", action="store_true", help="replace the analysis already in --out (without it, an "
                                                        "--out holding one is refused)")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("pilot", help="train AE/VAE/MAETok + the same diffusion model on each; one report")
    p.add_argument("--data", default="shapes", help="data spec (default: built-in shapes, no download)")
    p.add_argument("--variants", default="ae,vae,maetok")
    p.add_argument("--budget", default="quick", choices=["smoke", "quick", "standard", "full"])
    p.add_argument("--out", default="runs/pilot")
    p.add_argument("--inception", action="store_true", help="also compute Inception FIDs (slow on CPU)")
    p.add_argument("--resume", action="store_true", help="continue a pilot in --out")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--device", default="auto", type=_device_type(indexed=False), help=TRAIN_DEVICE_HELP)
    p.add_argument("--collective-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank may wait for the others (rank 0 computes the metrics and "
                        "the latent analysis alone while they wait); default 12 hours")
    p.add_argument("--tokenizer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every tokenizer run, after the budget's own (repeatable)")
    p.add_argument("--diffusion-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every diffusion run, after the budget's own (repeatable)")
    p.add_argument("overrides", nargs="*", help="budget fields, e.g. image_size=256 tokenizer_preset=maetok-b-128 "
                                                "diffusion_steps=400000 (see maetok.pilot.PilotBudget)")
    p.set_defaults(fn=cmd_pilot)

    p = sub.add_parser("demo", help="the CPU demo: the quick pilot on the built-in shapes data (resumes)")
    p.add_argument("--out", default="runs/pilot-quick")
    p.add_argument("--budget", default="quick", choices=["smoke", "quick"])
    p.add_argument("--force", action="store_true", help="delete --out and start over (e.g. after an upgrade "
                                                        "changed the demo's settings)")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.datasets import DatasetError
    from .io.convert_sit import ConversionError
    from .io.hub import MissingWeightsError
    from .io.rundir import RunDirExists

    args = build_parser().parse_args(argv)
    if getattr(args, "out", None):
        # Once, for every use: the "already holds output" check and the writer must see the same folder (a
        # quoted or --out=~/x path reaches us unexpanded).
        args.out = str(Path(args.out).expanduser())
    try:
        return args.fn(args)
    except (CLIError, ConfigError, DatasetError, ConversionError, MissingWeightsError, RunDirExists,
            FileNotFoundError) as e:
        print(f"maetok: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
