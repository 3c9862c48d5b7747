"""Class labels of a conditional model: indices [0, num_classes), and num_classes itself as the null label
(label dropout in training, the unconditional branch of classifier-free guidance)."""
from __future__ import annotations

import torch


def check_labels(labels: torch.Tensor, num_classes: int, what: str = "labels", null_label: bool = False) -> None:
    """ValueError naming the offending values unless every label is a class index in [0, num_classes), or
    num_classes itself (a conditional model's null label) where `null_label` allows it. On a GPU tensor this syncs
    the host: check once per run or on the host, not at every step."""
    top = num_classes if null_label else num_classes - 1
    bad = (labels < 0) | (labels > top)
    if bad.any():  # an out-of-range index would otherwise be a cryptic device-side assert on GPU
        allowed = (f"[0, {num_classes}] ({num_classes} is the null label)" if null_label
                   else f"[0, {num_classes}) ({num_classes} classes)")
        raise ValueError(f"{what} must lie in {allowed}; got {labels[bad][:8].tolist()}")
