"""Latent cache: encode a dataset once with a tokenizer into sharded safetensors, then train diffusion on it.

Layout of a cache folder:
    meta.json                      tokenizer config (with its latent mean/std), counts, shard names, flip flag;
                                   for a prefix cache also `tokens` (K) and `tokenizer_latent_tokens` (L)
    shard-00000.safetensors ...    `latents` (n, L, C) ((n, K, C) in a prefix cache) float32 raw (un-normalised),
                                   `labels` (n,) int64,
                                   and `latents_flip` (n, L, C) for the horizontally flipped images when cached

A prefix cache (`tokens=K`) holds the first K of the L latent tokens of a tokenizer trained with nested token
dropout, so its latents are (n, K, C) and a diffusion model trained on it generates K tokens, which the same
tokenizer decodes with `decode(z, tokens=K)`. It is normalised with the tokenizer's latent mean/std, as a full
cache is: `maetok sample` un-normalises with the tokenizer's, the one place it can read them (a SiT model folder
records no latent statistics), so statistics of the K-token latents here would decode at the wrong scale.
"""
from __future__ import annotations

import bisect
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError, to_dict
from ..diffusion.labels import check_labels
from ..io.distributed import DistInfo, barrier
from ..io.files import atomic_write_bytes, save_safetensors
from ..progress import progress_bar
from .image_datasets import class_count
from .layout import DatasetError


META, REQUEST = "meta.json", "request.json"


def cache_files(out_dir: str | Path) -> list[Path]:
    """The files of the latent cache in `out_dir` (none for a folder without one): meta.json first, which alone
    makes it a finished cache, then the shards and the record of an unfinished cache's request."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return [p for p in (out / META,) if p.is_file()] + sorted(out.glob("shard-*.safetensors")) + \
        [p for p in (out / REQUEST,) if p.is_file()]


def check_prefix_tokens(tokenizer, tokens: int | None) -> int | None:
    """`tokens` (None: all L) if the tokenizer decodes from that prefix of its latent tokens, else a ConfigError
    of one line naming K, L and the trained prefix lengths: the tokenizer's own rule and message, which its
    encode and decode apply, raised before any work instead of at the first batch."""
    if tokens is None:
        return None
    try:
        return tokenizer.check_tokens(int(tokens))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _prefix_record(tokenizer, tokens: int | None) -> dict[str, int]:
    """What meta.json and request.json add for a prefix cache: K and the tokenizer's L. Nothing for a full cache,
    whose files stay byte for byte those written before prefixes existed."""
    return {} if tokens is None else {"tokens": tokens, "tokenizer_latent_tokens": tokenizer.config.latent_tokens}


@torch.no_grad()
def cache_latents(tokenizer, dataset, out_dir: str | Path, batch_size: int = 64, flip: bool = True,
                  shard_size: int = 10_000, device: str | torch.device = "cpu", progress: bool = True,
                  num_workers: int = 0, dist: DistInfo | None = None, tokens: int | None = None) -> Path:
    """Encode every item of `dataset` ((image, label) pairs, images in [-1, 1]); resumable by shard.
    `tokens`: keep the first K latent tokens (a prefix the tokenizer was trained to decode from; None: all L).

    `dist` (torchrun): rank r encodes shards r, r + world, ...; meta.json, which makes the folder a cache, is
    written by rank 0 once every shard is on disk. Every rank must see the same `out_dir` (a shared filesystem
    across nodes). Shard names depend only on (len(dataset), shard_size), so an interrupted cache can be
    finished with any number of ranks."""
    tokens = check_prefix_tokens(tokenizer, tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer.to(device).eval()
    n = len(dataset)
    shards = []
    rank, world = (dist.rank, dist.world) if dist is not None and dist.enabled else (0, 1)
    # Shards are resumed by name, so an unfinished cache records what it encodes: finishing it with another
    # tokenizer or other data would silently mix the two. Every rank compares; only rank 0 writes it, and
    # only when absent (a rank reading it meanwhile finds the same request).
    request = {"count": n, "shard_size": shard_size, "flip": flip, "tokenizer_config": to_dict(tokenizer.config),
               "data": {"source": str(getattr(dataset, "where", type(dataset).__name__)),
                        "split": getattr(dataset, "split", None), "image_size": getattr(dataset, "image_size", None)},
               **_prefix_record(tokenizer, tokens)}
    request = json.loads(json.dumps(request))  # as it reads back (tuples become lists)
    request_path = out / REQUEST
    if request_path.is_file():
        before = json.loads(request_path.read_text())
        if before != request:
            changed = sorted(k for k in set(before) | set(request) if before.get(k) != request.get(k))
            raise DatasetError(f"{out} holds an unfinished latent cache of another request (differs in {changed}); "
                             f"finish it with the same tokenizer and data, or start over (--force)")
    elif rank == 0:
        atomic_write_bytes(request_path, lambda f: f.write(json.dumps(request, indent=2).encode()))
    mine = sum(min(shard_size, n - start) for s, start in enumerate(range(0, n, shard_size)) if s % world == rank)
    # closed on an error too, so that the error line is not followed by a last redraw of the bar
    with progress_bar(total=mine, desc="encode latents", disable=not progress or rank != 0) as bar:
        for s, start in enumerate(range(0, n, shard_size)):
            name = f"shard-{s:05d}.safetensors"
            shards.append(name)
            stop = min(n, start + shard_size)
            if s % world != rank:
                continue
            if (out / name).is_file():  # written atomically, so present means complete
                bar.update(stop - start)
                continue
            subset = torch.utils.data.Subset(dataset, range(start, stop))
            loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
            zs, zfs, ys = [], [], []
            for images, labels in loader:
                images = images.to(device)
                zs.append(tokenizer.encode(images, tokens=tokens).float().cpu())
                if flip:
                    zfs.append(tokenizer.encode(images.flip(-1), tokens=tokens).float().cpu())
                ys.append(torch.as_tensor(labels, dtype=torch.int64))
                bar.update(images.shape[0])
            tensors = {"latents": torch.cat(zs), "labels": torch.cat(ys)}
            if flip:
                tensors["latents_flip"] = torch.cat(zfs)
            save_safetensors(tensors, out / name)  # atomic: a killed run never leaves half a shard
    if world > 1:
        barrier(dist)
        # Every rank checks, so all raise together (a rank left waiting for rank 0 would hang until the timeout).
        missing = [name for name in shards if not (out / name).is_file()]
        if missing:
            raise RuntimeError(f"{out}: shards {missing[:5]} written by other ranks are not visible here; the "
                               f"ranks need a shared filesystem")
        if rank != 0:
            barrier(dist)  # returns once rank 0 has written meta.json
            return out
    meta = {"kind": "maetok-latent-cache", "count": n, "shards": shards, "flip": flip,
            "latent_shape": [tokenizer.config.latent_tokens if tokens is None else tokens, tokenizer.config.latent_dim],
            "latent_mean": tokenizer.config.latent_mean, "latent_std": tokenizer.config.latent_std,
            "num_classes": class_count(dataset),  # 0 for unlabelled data: a conditional model refuses the cache
            "tokenizer_config": to_dict(tokenizer.config), **_prefix_record(tokenizer, tokens)}
    atomic_write_bytes(out / META, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    if world > 1:
        barrier(dist)
    return out


class LatentDataset(Dataset):
    """Items are (latents (L, C), or (K, C) for a prefix cache, latents of the flipped image or the same again, label).

    The shards are memory-mapped, not read: the torchrun ranks of a node share one copy in the page cache (an
    ImageNet cache with flips is about 40 GB, which every rank would otherwise hold, twice while loading).
    Latents are raw; the diffusion task normalises them with the cache's mean/std and picks flipped or not
    per item with the training RNG (so the choice is part of the resumable state).
    """

    def __init__(self, cache_dir: str | Path):
        root = Path(cache_dir).expanduser()
        meta_path = root / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} is not a latent cache (no meta.json); create one with "
                                    f"`maetok latents cache`")
        self.root = root
        self.meta = json.loads(meta_path.read_text())
        shape = tuple(self.meta["latent_shape"])
        keys = ("latents", "labels") + (("latents_flip",) if self.meta["flip"] else ())
        self._shards = [_map_shard(root / name, keys, shape) for name in self.meta["shards"]]
        self._ends = list(itertools.accumulate(len(shard["labels"]) for shard in self._shards))
        count = self._ends[-1] if self._ends else 0
        if count != self.meta["count"]:
            raise ValueError(f"{root}: meta.json says {self.meta['count']} items, shards hold {count}")
        self.num_classes = self.meta["num_classes"]
        if self.num_classes:
            for name, shard in zip(self.meta["shards"], self._shards):
                check_labels(shard["labels"], self.num_classes, f"{root / name}: labels")
        self.mean, self.std = float(self.meta["latent_mean"]), float(self.meta["latent_std"])

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a latent cache of {len(self)}")
        i %= len(self)
        k = bisect.bisect_right(self._ends, i)
        shard, j = self._shards[k], i - (self._ends[k - 1] if k else 0)
        flip = shard.get("latents_flip", shard["latents"])
        return shard["latents"][j], flip[j], shard["labels"][j]

    # The whole cache as one in-memory tensor each (copies: for analysis and tests; training indexes items).
    @property
    def latents(self) -> torch.Tensor:
        return self._concat("latents")

    @property
    def latents_flip(self) -> torch.Tensor:
        return self._concat("latents_flip" if self.meta["flip"] else "latents")

    @property
    def labels(self) -> torch.Tensor:
        return self._concat("labels")

    def _concat(self, key: str) -> torch.Tensor:
        if not self._shards:
            return torch.zeros(0, dtype=torch.long) if key == "labels" else torch.zeros((0, *self.meta["latent_shape"]))
        return torch.cat([shard[key] for shard in self._shards])

    def first(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, labels) of the first n items (all for None) as in-memory tensors, reading only the shards
        they lie in."""
        n = len(self) if n is None else min(n, len(self))
        latents, labels, have = [], [], 0
        for shard in self._shards:
            if have >= n:
                break
            take = min(n - have, len(shard["labels"]))
            latents.append(shard["latents"][:take].clone())
            labels.append(shard["labels"][:take].clone())
            have += take
        shape = tuple(self.meta["latent_shape"])
        return (torch.cat(latents) if latents else torch.zeros((0, *shape)),
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))


_SAFETENSORS_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _map_shard(path: Path, keys: tuple[str, ...], latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors shard, memory-mapped (copy on write: nothing reaches the file), each
    checked against the cache's layout. Errors name the shard."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= 100_000_000:
                raise ValueError("not a safetensors file (bad header length)")
            header = json.loads(f.read(header_len))
        size = path.stat().st_size
        tensors = {}
        for key in keys:
            if key not in header:
                raise ValueError(f"no {key!r} tensor (it holds {sorted(k for k in header if k != '__metadata__')})")
            info = header[key]
            begin, end = info["data_offsets"]
            if 8 + header_len + end > size:
                raise ValueError(f"truncated: {key!r} ends at byte {8 + header_len + end} of {size}")
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{key!r} has dtype {info['dtype']}, not one a latent cache is written in")
            shape = tuple(info["shape"])
            array = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_len + begin, shape=shape) \
                if end > begin else np.zeros(shape, dtype)
            tensors[key] = torch.from_numpy(array)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read as a latent-cache shard ({e}); delete it and run "
                           f"`maetok latents cache` again to re-encode it") from e
    n = len(tensors["labels"])
    for key in keys:
        want = (n,) if key == "labels" else (n, *latent_shape)
        if tuple(tensors[key].shape) != want:
            raise DatasetError(f"{path}: {key!r} has shape {tuple(tensors[key].shape)}, the cache's layout says "
                               f"{want} (labels and latents must have one row per item)")
    return tensors
