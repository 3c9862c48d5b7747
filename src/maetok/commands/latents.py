"""`maetok latents cache`: a dataset encoded once into a latent cache, shared among the ranks under torchrun;
with --tokens K, the first K latent tokens of a tokenizer trained with nested token dropout."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data import open_dataset
from ..config import ConfigError
from ..data.latents import META, cache_files, cache_latents, check_prefix_tokens
from ..io.distributed import barrier, cleanup, init_distributed, resolve_device
from ..io.pretrained import load_tokenizer
from .common import CLIError, is_main_process, out_folder


def check_latent_out(args: argparse.Namespace) -> list[Path]:
    """Refuse a finished cache in --out (meta.json: a diffusion run may be training on it, and would resume on
    other data) unless --force; returns the cache files --force deletes. Shards without meta.json are an
    unfinished cache, which is resumed: its shards on disk are kept."""
    out = out_folder(args.out, "latent caches")
    files = cache_files(out)
    meta = out / META
    shards = [p for p in files if p.name.startswith("shard-")]
    if meta.exists() and not args.force:
        try:
            count = f"{json.loads(meta.read_text())['count']} latents, "
        except (OSError, ValueError, KeyError, TypeError):
            count = ""  # an unreadable meta.json is still a cache's
        raise CLIError(f"--out {out} already holds a finished latent cache ({count}meta.json + {len(shards)} "
                       f"shard(s)), which a diffusion run trained on it reads again when resumed; choose another "
                       f"--out, or pass --force to replace it")
    if shards and not args.force and is_main_process():
        print(f"maetok: {out} holds an unfinished latent cache ({len(shards)} shard(s), no meta.json): "
              f"resuming it, its shards kept as they are (--force starts over)", file=sys.stderr)
    return files if args.force else []


def cmd_latents_cache(args: argparse.Namespace) -> int:
    stale = check_latent_out(args)  # every rank, before any rank writes (no rank writes before init_distributed)
    tok = load_tokenizer(args.tokenizer)
    try:  # before the data is opened: a refused prefix costs nothing
        check_prefix_tokens(tok, args.tokens)
    except ConfigError as e:
        raise CLIError(f"--tokens {args.tokens}: --tokenizer {args.tokenizer}: {e}") from None
    ds = open_dataset(args.data, split=args.split, image_size=tok.config.image_size, limit=args.limit)
    # Under torchrun the ranks encode alternate shards (each on its own device); alone, the device as given.
    info = init_distributed(args.device)
    try:
        if args.force:
            # Deleted only now that the tokenizer and data have loaded, meta.json first (no half-replaced cache
            # passes for a finished one). Old shards would otherwise be kept as if encoded from this data. The
            # barrier keeps every rank from looking for its shards before rank 0 has deleted them.
            if info.is_main:
                for path in stale:
                    path.unlink(missing_ok=True)
            barrier(info)
        out = cache_latents(tok, ds, args.out, batch_size=args.batch_size, flip=not args.no_flip,
                            device=info.device if info.enabled else resolve_device(args.device), dist=info,
                            tokens=args.tokens)
    finally:
        cleanup(info)
    if info.is_main:
        which = "" if args.tokens is None else f" (the first {args.tokens} of {tok.config.latent_tokens} tokens)"
        print(f"cached {len(ds)} latents{which} of {args.data} ({args.split}) in {out}")
    return 0
