"""`maetok` command line: thin wrappers over the Python API.

    maetok tokenizer train --config cpu-32 --out runs/tok model.latent_tokens=64 train.steps=2000
    maetok tokenizer reconstruct --model runs/tok/model --images shapes --num-samples 32 --out runs/recon
    maetok convert official-tokenizer --src DIR --out DIR [--weights FILE --config FILE]
    maetok convert official-sit --src DIR --out DIR [--weights FILE --config FILE]
    maetok diffusion distill --teacher runs/sit --out runs/sit-student distill.max_steps=32
    maetok pilot --data zip:../shared/data/cifar10-jpeg.zip --budget standard --out runs/pilot-cifar
    maetok push --model runs/tok/model --repo org/name --metrics runs/pilot-cifar/report.json
    maetok demo                      # the quick pilot on built-in shapes (the README's main command)

Every training command takes dotted `key=value` overrides after its options. Commands writing into --out refuse
one that already holds their output (`latents cache` resumes an unfinished cache); --force replaces it. Counts are
`--num-samples` (`--num` still works alone, but not under torchrun, whose parser reads it as an abbreviation of
--numa-binding).

Exit codes: 0 done; 1 a bug (shown with its traceback); 2 a command line, config or input refused; 3 a file that
cannot be read or verified (corrupt checkpoint, pickle); 4 training stopped by non-finite steps; 5 disk full or not
writable; 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM; --resume continues). Errors to act on are one
`maetok: error:` line.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

from .plugins import load_plugins, split_plugin_options


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
        # Start-up time: torch takes seconds to import, and only a device naming cuda or mps needs it here.
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
        # Start-up time: maetok.io.hub imports torch, and only a path that does not exist needs it here.
        from .io.hub import local_path_reason

        why = local_path_reason(text) if hub else "this option reads a local folder only"
        if why is not None:
            raise argparse.ArgumentTypeError(f"{text}: no such folder (read as a local path: {why})")
        return text
    parse.__name__ = "checkpoint"
    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # A week at most: the timeout becomes a timedelta, and "inf" would overflow it deep inside torch.distributed.
    if not 0 < value <= 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, 604800] (a week), got {text!r}")
    return value


# ==============================================================================================================
# The parser: each command names its handler as "module:function" of maetok.commands
# ==============================================================================================================
def _add_run_args(p: argparse.ArgumentParser, default_config: str, example: str) -> None:
    p.add_argument("--config", default=None,
                   help=f"YAML file or preset name under configs/ (default {default_config}; --resume keeps the "
                        f"run's own)")
    p.set_defaults(default_config=default_config)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="verified",
                   help="continue the run in --out from its newest checkpoint, refused when that does not verify "
                   "against its SHA-256 (--resume=verified: from the newest checkpoint that verifies, logging those "
                   "passed over), with its saved config (overrides may change only train.steps, intervals, "
                   "workers, compile, precision, train.optim.lr and grad_clip); "
                   "a missing --out starts a new run there (so one command line both starts and resumes a "
                   "scheduled job), so check the path")
    p.add_argument("--force", action="store_true", help="delete the maetok run in --out and start over")
    p.add_argument("--device", default="auto", type=_device_type(indexed=False), help=TRAIN_DEVICE_HELP)
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


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
    # Documents --plugin: main() takes it out of the command line first, so that it may also follow the command.
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="Python file registering auxiliary targets (@register_target), loaded before the "
                             "command and recorded with its runs (repeatable); installed packages' maetok.targets "
                             "entry points are always loaded")
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train and use tokenizers").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a tokenizer (MAETok, AE, VAE, MAE) or fine-tune its decoder")
    _add_run_args(p, "cpu-32", "model.latent_tokens=64 train.steps=2000")
    p.set_defaults(handler="training:cmd_tokenizer_train")
    p = tok.add_parser("reconstruct", help="encode+decode images; writes a side-by-side PNG grid and PSNR/SSIM")
    p.add_argument("--model", required=True, type=_checkpoint(hub=True),
                   help="weights folder (save_pretrained), official checkpoint folder, or hub id org/name")
    p.add_argument("--images", required=True, help="data spec: folder, zip:FILE, cifar:DIR, npz:FILE or shapes")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--num-samples", "--num", dest="num_samples", type=_count(1), default=32, metavar="N",
                   help="images to reconstruct" + NUM_ALIAS_HELP)
    p.add_argument("--tokens", type=_count(1), default=None, metavar="K",
                   help="decode from the first K latent tokens (a tokenizer trained with model.token_dropout=nested)")
    p.add_argument("--out", required=True, help="folder for reconstructions.png and metrics.json")
    p.add_argument("--force", action="store_true", help="replace the reconstructions already in --out (without "
                                                        "it, an --out holding them is refused)")
    p.set_defaults(handler="tokenizer:cmd_tokenizer_reconstruct")

    p = sub.add_parser("convert", help="convert official MAETok checkpoints into maetok's format",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=CONVERT_MODES)
    p.add_argument("what", choices=["official-tokenizer", "official-sit"], help="what to convert (see above)")
    p.add_argument("--src", required=True, help="folder with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default=None, help="weights file, if not in --src")
    p.add_argument("--config", default=None, help="config file, if not --src/config.json")
    p.add_argument("--force", action="store_true", help="overwrite the files of an existing, non-empty --out")
    p.set_defaults(handler="convert:cmd_convert")

    p = sub.add_parser("export", help="a tokenizer's pixel decoder, or a SiT, as an ONNX graph with a dynamic batch "
                                      "axis, checked against PyTorch with onnxruntime (pip install 'maetok[export]')")
    p.add_argument("--model", required=True, type=_checkpoint(hub=True),
                   help="a tokenizer folder or hub id (exports its decoder: normalised latents -> images) or a SiT "
                        "folder or hub id (exports its velocity model: x, t, y -> v)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="graph format (default onnx)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the .onnx file to write (a graph over 2 GB keeps its weights in FILE.data beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    p.set_defaults(handler="export:cmd_export")

    p = sub.add_parser("weights", help="the pretrained networks a preset needs: list them (check) or download "
                                       "them into the libraries' caches (fetch), e.g. before a cluster job")
    p.add_argument("action", choices=["check", "fetch"], help="check: what is here (exit 2 if anything is "
                   "missing); fetch: download what is not ($HF_HOME, $TORCH_HOME)")
    p.add_argument("--preset", default=None, help="tokenizer preset or YAML whose networks to take, e.g. "
                   "maetok-b-128 (default, without --name: every network maetok knows)")
    p.add_argument("--name", action="append", default=[], metavar="NETWORK",
                   help="one network (repeatable): dinov2-l, siglip-so400m, dino-vits16, vgg16, lpips-vgg-heads, "
                        "fid-inception, inception-is-head, or timm:MODEL")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the preset, as for tokenizer train")
    p.set_defaults(handler="weights:cmd_weights")

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
    p.add_argument("--tokens", type=_count(1), default=None, metavar="K",
                   help="keep the first K latent tokens (a tokenizer trained with model.token_dropout=nested, K "
                        "in its token_counts); a diffusion run on the cache then generates K tokens")
    p.add_argument("--out", required=True, help="cache folder; one holding shards but no meta.json (an "
                                                "interrupted cache) is resumed")
    p.add_argument("--force", action="store_true", help="delete the latent cache in --out, finished or not, and "
                                                        "encode again (without it, a finished cache is refused)")
    p.add_argument("--device", default="auto", type=_device_type(indexed=True), help=DEVICE_HELP)
    p.set_defaults(handler="latents:cmd_latents_cache")

    dif = sub.add_parser("diffusion", help="train SiT / LightningDiT, or distil one into a few-step student").add_subparsers(dest="action", required=True)
    p = dif.add_parser("train", help="train a diffusion model on a latent cache or on images encoded online")
    _add_run_args(p, "sit-cpu", "model.num_tokens=64 model.in_channels=12 train.steps=2000")
    p.set_defaults(handler="training:cmd_diffusion_train")
    p = dif.add_parser("distill", help="distil a SiT into a shortcut student: 1, 2, 4, ... steps, one forward each")
    p.add_argument("--teacher", type=_checkpoint(hub=False), help="the teacher's model folder, or its diffusion run "
                   "(whose latents and guidance are then the defaults); a resumed run keeps its own")
    _add_run_args(p, "distill-cpu", "distill.max_steps=32 distill.cfg_scale=1.5 train.steps=2000")
    p.set_defaults(handler="training:cmd_diffusion_distill")

    p = sub.add_parser("sample", help="sample images: PNG grid + ADM-compatible .npz (sharded under torchrun)")
    p.add_argument("--model", required=True, type=_checkpoint(hub=True), help="SiT weights folder or hub id")
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
    p.set_defaults(handler="sample:cmd_sample")

    p = sub.add_parser("eval", help="FID/KID/IS/PR of samples, or rFID/PSNR/SSIM of a tokenizer (runs as it is "
                                    "under torchrun: the ranks share the feature extraction)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=EVAL_MODES)
    p.add_argument("what", choices=["gen", "recon"], help="what to evaluate (see above)")
    p.add_argument("--samples", help="gen: .npz with arr_0 (uint8 NHWC), or an image folder")
    p.add_argument("--tokenizer", type=_checkpoint(hub=True), help="recon: tokenizer weights folder or hub id")
    p.add_argument("--tokens", type=_count(1), default=None, metavar="K",
                   help="recon: from the first K latent tokens (a tokenizer trained with nested token dropout)")
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
    p.set_defaults(handler="evaluate:cmd_eval")

    p = sub.add_parser("analyze", help="latent-space analysis: GMM NLL per K, linear probe, token statistics")
    p.add_argument("--latents", nargs="+", required=True, help="NAME=CACHE_DIR (train) pairs, one per tokenizer")
    p.add_argument("--test-latents", nargs="*", default=[], help="NAME=CACHE_DIR (held-out) pairs")
    p.add_argument("--ks", default="1,2,4,8,16,32", help="comma-separated GMM component counts K to fit (default "
                                                          "1,2,4,8,16,32; a K above the number of latents is dropped)")
    p.add_argument("--out", required=True, help="folder for analysis.json and gmm_nll.png")
    p.add_argument("--force", action="store_true", help="replace the analysis already in --out (without it, an "
                                                        "--out holding one is refused)")
    p.set_defaults(handler="evaluate:cmd_analyze")

    p = sub.add_parser("pilot", help="train AE/VAE/MAETok + the same diffusion model on each; one report")
    p.add_argument("--data", default="shapes", help="data spec (default: built-in shapes, no download)")
    p.add_argument("--variants", default="ae,vae,maetok")
    p.add_argument("--budget", default="quick", choices=["smoke", "quick", "standard", "full"])
    p.add_argument("--out", default="runs/pilot")
    p.add_argument("--inception", action="store_true", help="also compute Inception FIDs (slow on CPU)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="verified",
                   help="continue a pilot in --out: its finished stages are kept, an interrupted training stage "
                   "continues from its newest checkpoint (--resume=verified: the newest that verifies)")
    p.add_argument("--force", action="store_true", help="delete --out and start over")
    p.add_argument("--device", default="auto", type=_device_type(indexed=False), help=TRAIN_DEVICE_HELP)
    p.add_argument("--collective-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank may wait for the others (rank 0 computes the metrics and "
                        "the latent analysis alone while they wait); default 12 hours")
    p.add_argument("--tokenizer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every tokenizer run, after the budget's own (repeatable)")
    p.add_argument("--diffusion-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every diffusion run, after the budget's own (repeatable)")
    p.add_argument("--target-sets", default=None, metavar="SETS",
                   help="compare auxiliary target sets: one MAETok per set, in maetok's place among --variants, e.g. "
                        "\"hog;hog,sobel;hog,texture\" (sets ';', targets ',', each at weight 1.0; none = no target)")
    p.add_argument("overrides", nargs="*", help="budget fields, e.g. image_size=256 tokenizer_preset=maetok-b-128 "
                                                "diffusion_steps=400000 (see maetok.pilot.PilotBudget)")
    p.set_defaults(handler="pilot:cmd_pilot")

    p = sub.add_parser("sweep", help="Bayesian optimisation (Optuna) of a tokenizer's settings on your data: "
                                     "each trial a pilot; one report")
    p.add_argument("--data", default="shapes", help="data spec (default: built-in shapes, no download)")
    p.add_argument("--space", default="maetok", help="search space: a YAML file, or maetok / vae (configs/sweep/)")
    p.add_argument("--trials", type=_count(1), default=20, help="finished trials to reach, the default "
                   "configuration's included (a resumed sweep counts those it has)")
    p.add_argument("--budget", default="quick", choices=["smoke", "quick", "standard", "full"])
    p.add_argument("--out", default="runs/sweep", help="folder of the trials' pilots, the study (SQLite) and the "
                                                       "report; shared by every worker")
    p.add_argument("--objective", default="gfid", help="KPI to optimise, or several comma-separated for a Pareto "
                   "front (gfid, gfid_cfg, rfid, psnr, ssim, probe, gmm_nll, generation_gflops, peak_memory_gib, ...)")
    p.add_argument("--proxy", default="rfid", help="latent KPI the pruner judges a trial on before its diffusion "
                                                   "stage (one objective only)")
    p.add_argument("--constraint", action="append", default=[], metavar="KPI<=VALUE",
                   help="e.g. generation_gflops<=2.5 or peak_memory_gib<=40 (repeatable); a constraint on GFLOPs or "
                        "parameters is checked before training")
    p.add_argument("--sampler", default="gp", choices=["gp", "tpe", "random"])
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--storage", default=None, metavar="URL", help="Optuna storage shared by the workers: "
                   "postgresql://USER@HOST/DB, sqlite:///FILE or journal:FILE (default: sqlite in --out)")
    p.add_argument("--study", default=None, help="study name (default: the --out folder's name)")
    p.add_argument("--worker", action="store_true", help="join the study and run trials, without writing the report")
    p.add_argument("--heartbeat", type=_count(1), default=60, metavar="SECONDS",
                   help="database storages: a trial whose worker is silent 4x this long is failed and retried")
    p.add_argument("--inception", action="store_true", help="also compute Inception FIDs (slow on CPU)")
    p.add_argument("--device", default="auto", type=_device_type(indexed=False), help=TRAIN_DEVICE_HELP)
    p.add_argument("--collective-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank may wait for the others; default 12 hours")
    p.add_argument("--tokenizer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="setting of every trial's tokenizer runs, before the trial's own (repeatable)")
    p.add_argument("--diffusion-set", action="append", default=[], metavar="KEY=VALUE",
                   help="setting of every trial's diffusion runs, before the trial's own (repeatable)")
    p.add_argument("overrides", nargs="*", help="budget fields, as for maetok pilot")
    p.set_defaults(handler="sweep:cmd_sweep")

    p = sub.add_parser("push", help="upload a model folder (tokenizer or SiT) to the Hugging Face hub with a model "
                                    "card; load it back with --model/--tokenizer org/name (needs maetok[teachers])")
    p.add_argument("--model", required=True, type=_checkpoint(hub=False),
                   help="model folder written by save_pretrained or training (e.g. runs/tok/model)")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="hub repository, made if missing")
    p.add_argument("--private", action="store_true", help="make the repository private (when it is made here)")
    p.add_argument("--token", default=None, help="Hugging Face token with write access (default: $HF_TOKEN or "
                                                 "the one `hf auth login` saved, which keep it off the command line)")
    p.add_argument("--metrics", default=None, metavar="JSON",
                   help="JSON file of metrics for the model card, e.g. a pilot's report.json")
    p.add_argument("--license", default="other", help="license field of the model card (default other)")
    p.set_defaults(handler="hub:cmd_push")

    p = sub.add_parser("demo", help="the CPU demo: the quick pilot on the built-in shapes data (resumes)")
    p.add_argument("--out", default="runs/pilot-quick")
    p.add_argument("--budget", default="quick", choices=["smoke", "quick"])
    p.add_argument("--force", action="store_true", help="delete --out and start over (e.g. after an upgrade "
                                                        "changed the demo's settings)")
    p.set_defaults(handler="pilot:cmd_demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, plugin_files = split_plugin_options(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    if getattr(args, "out", None):
        # Once, for every use: the "already holds output" check and the writer must see the same folder (a
        # quoted or --out=~/x path reaches us unexpanded).
        args.out = str(Path(args.out).expanduser())
    module_name, _, function_name = args.handler.partition(":")
    # Start-up time: the command modules import torch and the models (seconds), which parsing and --help skip.
    handler = getattr(importlib.import_module(f".commands.{module_name}", __package__), function_name)
    from .commands.common import error_report  # start-up time, as above (loaded with the handler's module)

    try:
        load_plugins([*args.plugin, *plugin_files])  # before the command: its config may name their targets
        return handler(args)
    except Exception as e:
        # One line and a documented exit code (README: exit codes) for what the user can act on; a traceback only
        # for a bug. Under torchrun every rank that fails reports its own line.
        report = error_report(e, args)
        if report is None:
            raise
    # Printed once the error is gone, and with it the frames that held open progress bars: their last redraw
    # comes before the line, not after it.
    code, line = report
    print(f"maetok: error: {line}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
