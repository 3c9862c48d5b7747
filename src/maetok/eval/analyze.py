"""`analyze_latents`: the latent-space report comparing tokenizers (what `maetok analyze` and the pilot write).

    analyze_latents({"maetok": "runs/cache", "ae": ae_cache}, {"maetok": "runs/cache-test"}, ks=(1, 2, 4),
                    out_dir="runs/analysis")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.latents import LatentDataset
from .inputs import EvalInputError
from .latent_analysis import GMMResult, gmm_analysis, linear_probe, pca_dim_for_variance, plot_gmm_nll, token_statistics


def _latents_and_labels(source) -> tuple[np.ndarray, np.ndarray | None]:
    """(latents (N, L, C), labels or None) from a cache dir, a LatentDataset, (latents, labels) or latents."""
    if isinstance(source, (str, Path)):
        source = LatentDataset(source)
    if isinstance(source, LatentDataset):
        # Unflipped latents only: the flipped copies are augmentation, not more images of the distribution.
        latents, labels = source.first()
        return latents.numpy(), labels.numpy()
    if isinstance(source, (tuple, list)) and len(source) == 2:
        latents, labels = source
        latents = latents.detach().cpu().numpy() if hasattr(latents, "detach") else np.asarray(latents)
        labels = None if labels is None else np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
        return latents, labels
    latents = source.detach().cpu().numpy() if hasattr(source, "detach") else np.asarray(source)
    return latents, None


def _train_and_test(name: str, source, test_caches: dict[str, Any], holdout: float, seed: int) -> dict[str, Any]:
    """One tokenizer's training and test latents (and labels): its own test set, or a held-out `holdout`
    fraction of its training latents (fixed by `seed`)."""
    z, y = _latents_and_labels(source)
    entry = {"train_source": str(source) if isinstance(source, (str, Path)) else "given"}
    if name in test_caches:
        zt, yt = _latents_and_labels(test_caches[name])
        entry["test_source"] = (str(test_caches[name]) if isinstance(test_caches[name], (str, Path))
                                else "given")
    else:
        n_test = max(1, int(round(holdout * len(z))))
        if len(z) - n_test < 2:
            raise EvalInputError(f"{name}: {len(z)} latents are too few to hold out a test set")
        perm = np.random.default_rng(seed).permutation(len(z))
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        zt, yt = z[test_idx], (None if y is None else y[test_idx])
        z, y = z[train_idx], (None if y is None else y[train_idx])
        entry["test_source"] = f"held out: {n_test} of the training latents (seed {seed})"
    entry.update(train=z, train_labels=y, test=zt, test_labels=yt)
    return entry


def _tokenizer_report(d: dict[str, Any], gmm: GMMResult, own_pca_dim: int, seed: int) -> dict[str, Any]:
    """One tokenizer's entry of the report: sources, GMM fit, linear probe (when labelled) and token statistics."""
    entry: dict[str, Any] = {
        "train": d["train_source"], "test": d["test_source"], "n_train": len(d["train"]),
        "n_test": len(d["test"]), "latent_shape": list(d["train"].shape[1:]), "own_pca_dim": own_pca_dim,
        "gmm": {"ks": gmm.ks, "nll": gmm.nll, "nll_per_dim": gmm.nll_per_dim, "train_nll": gmm.train_nll,
                "bic": gmm.bic, "best_k_bic": gmm.best_k_bic, "pca_dim": gmm.pca_dim,
                "explained_variance": gmm.explained_variance, "covariance": gmm.covariance},
        "metrics": gmm.metrics(), "skipped": {},
    }
    y, yt = d["train_labels"], d["test_labels"]
    if y is None or yt is None:
        entry["skipped"]["probe"] = "no labels"
    elif len(np.unique(y)) < 2:
        entry["skipped"]["probe"] = "the training latents hold a single class"
    else:
        entry["metrics"] |= linear_probe(d["train"], y, d["test"], yt, seed=seed)
    stats = token_statistics(d["train"])
    entry["token_stats"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}
    return entry


def analyze_latents(train_caches: Mapping[str, Any], test_caches: Mapping[str, Any] | None = None,
                    ks: Sequence[int] = (1, 2, 4, 8, 16, 32), out_dir: str | Path | None = None,
                    variance: float = 0.9, holdout: float = 0.2, seed: int = 0,
                    covariance: str = "full") -> dict[str, Any]:
    """GMM NLL per K (one PCA dimension shared by every tokenizer, so the likelihoods are comparable), BIC,
    linear-probe accuracy and per-token statistics, per tokenizer.

    train_caches / test_caches: name -> latent cache dir, LatentDataset, (latents, labels) or latents. A name
    without a test set is scored on a held-out `holdout` fraction of its training latents (fixed by `seed`),
    and everything is fitted on the rest. With `out_dir`, writes analysis.json and gmm_nll.png there.
    """
    test_caches = dict(test_caches or {})
    unknown = sorted(set(test_caches) - set(train_caches))
    if unknown:
        raise EvalInputError(f"test latents for {unknown} have no training latents (names: {sorted(train_caches)})")
    if not train_caches:
        raise EvalInputError("no latents to analyse")
    data = {name: _train_and_test(name, source, test_caches, holdout, seed)
            for name, source in train_caches.items()}

    # One PCA dimension for all: the largest needed by any tokenizer to keep `variance`, capped by what every
    # tokenizer can give (PCA dim <= min(n_train, dims)).
    own_dims = {name: pca_dim_for_variance(d["train"], variance) for name, d in data.items()}
    cap = min(min(len(d["train"]), int(np.prod(d["train"].shape[1:]))) for d in data.values())
    pca_dim = min(max(own_dims.values()), cap)
    n_min = min(len(d["train"]) for d in data.values())
    ks_used = sorted({int(k) for k in ks if 1 <= int(k) <= n_min})
    dropped = sorted({int(k) for k in ks} - set(ks_used))
    if not ks_used:
        raise EvalInputError(f"no K in {list(ks)} is usable with {n_min} training latents")

    results, report = {}, {}
    for name, d in data.items():
        results[name] = gmm_analysis(d["train"], d["test"], ks_used, pca_dim=pca_dim, variance=variance,
                                     covariance=covariance, seed=seed)
        report[name] = _tokenizer_report(d, results[name], own_dims[name], seed)

    out: dict[str, Any] = {"pca_dim": pca_dim, "pca_variance": variance, "ks": ks_used, "tokenizers": report}
    if dropped:
        out["ks_dropped"] = {"ks": dropped, "reason": f"more components than the {n_min} training latents"}
    if pca_dim < max(own_dims.values()):
        out["pca_note"] = (f"capped at {pca_dim} (fewest training latents or dims); a tokenizer needed "
                           f"{max(own_dims.values())} for {variance:.0%} of its variance")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out["plot"] = str(plot_gmm_nll(results, out_dir / "gmm_nll.png"))
        out["json"] = str(out_dir / "analysis.json")
        Path(out["json"]).write_text(json.dumps(out, indent=2))
    return out
