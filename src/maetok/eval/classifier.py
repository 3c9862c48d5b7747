"""A small CNN classifier trained on the dataset itself: the feature network for datasets that have neither
the standard Inception (too slow on a CPU, or absent) nor a pretrained network of their own.

Its FIDs are named `fid[<name>]` (e.g. `fid[cnn-shapes]`) and only compare runs that used the same network.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ..io.files import save_safetensors
from ..progress import progress_bar


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 16, feature_dim: int = 64):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_classes, self.width, self.feature_dim = num_classes, width, feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(self.body(images).mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save(self, out_dir: Path, meta: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.contiguous() for k, v in self.state_dict().items()}, out_dir / "model.safetensors")
        (out_dir / "config.json").write_text(json.dumps({"num_classes": self.num_classes, "width": self.width,
                                                         "feature_dim": self.feature_dim, **meta}, indent=2))

    @classmethod
    def load(cls, out_dir: Path) -> tuple["SmallCNN", dict]:
        meta = json.loads((out_dir / "config.json").read_text())
        model = cls(meta["num_classes"], meta["width"], meta["feature_dim"])
        model.load_state_dict(load_file(str(out_dir / "model.safetensors")))
        return model.eval(), meta


def train_classifier(train_set, test_set, num_classes: int, steps: int = 600, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> tuple[SmallCNN, float]:
    """Train on `train_set` ((image, label) pairs), return the model and its held-out top-1 accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    if len(train_set) == 0:
        raise ValueError("train_classifier: the training set is empty")
    # drop_last keeps batch statistics steady, but a set smaller than one batch would then yield nothing.
    batch_size = min(batch_size, len(train_set))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    it = iter(loader)
    model.train()
    for _ in progress_bar(range(steps), desc="feature classifier", disable=not progress):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), torch.as_tensor(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=256):
            correct += (model(x).argmax(1) == torch.as_tensor(y)).sum().item()
            total += len(x)
    return model, correct / max(1, total)
