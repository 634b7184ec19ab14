"""A separately trained attribute classifier: the judge of generated images (never the CLIP used for guidance).

A small CNN with one softmax head per attribute of a procedural set (`dreamlab.procedural`), trained on
freshly drawn images of *every* attribute combination (held-out ones included: it is a judge, not a
generator) with a seed disjoint from the dataset splits. Saved as `judge.json` + `judge.safetensors`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab import procedural as P
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json, load_tensors, save_json, save_tensors

JUDGE_SEED = 4242  # disjoint from the split seeds 0, 1, 2


class AttributeClassifier(nn.Module):
    def __init__(self, kind: str, size: int = 32, width: int = 32) -> None:
        super().__init__()
        self.kind, self.size, self.width = kind, size, width
        self.num_values = P.num_values(kind)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.GELU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, sum(self.num_values))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in [0, 1], any size -> one logits tensor per attribute."""
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="area" if x.shape[-1] > self.size else "bilinear")
        return list(self.head(self.features(x * 2 - 1)).split(self.num_values, dim=1))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, n_attributes) predicted value indices."""
        self.eval()
        dev = next(self.parameters()).device
        out = [torch.stack([lg.argmax(1) for lg in self(x[i:i + batch_size].to(dev))], 1).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        save_tensors(d / "judge.safetensors", self.state_dict())
        save_json(d / "judge.json", {"kind": self.kind, "size": self.size, "width": self.width})
        return d

    @classmethod
    def load(cls, directory: str | Path) -> AttributeClassifier:
        d = Path(directory)
        if not (d / "judge.json").exists():
            raise DreamlabError(f"no attribute classifier in {d}; it is trained by: dreamlab multimodal evaluate")
        meta = load_json(d / "judge.json")
        m = cls(meta["kind"], meta["size"], meta["width"])
        m.load_state_dict(load_tensors(d / "judge.safetensors"))
        return m.eval()


def _data(kind: str, n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = P.generate(kind, n, seed=seed)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    return F.interpolate(x, size=(size, size), mode="area"), torch.from_numpy(y)


def train_attribute_classifier(kind: str, out_dir: str | Path, *, n_train: int = 8000, steps: int = 600, batch_size: int = 128,
                               size: int = 32, seed: int = JUDGE_SEED, progress: bool = True) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train the judge for `kind` on every attribute combination; returns it and its held-out test accuracy."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    x, y = _data(kind, n_train, seed, size)
    model = AttributeClassifier(kind, size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in tqdm(range(steps), desc=f"judge {kind}", unit="step", disable=not progress):
        idx = torch.from_numpy(rng.integers(0, len(x), batch_size))
        xb = x[idx]
        shift = rng.integers(-2, 3, 2)  # small translations: generated images are not centred exactly
        xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        logits = model(xb)
        loss = sum(F.cross_entropy(lg, y[idx, j]) for j, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    xt, yt = _data(kind, min(1000, n_train), seed + 1, size)
    pred = model.predict(xt)
    acc = {f"judge_{kind}_attr_acc": float((pred == yt).float().mean()),
           f"judge_{kind}_all_attrs_acc": float((pred == yt).all(1).float().mean())}
    model.save(out_dir)
    save_json(Path(out_dir) / "judge_eval.json", acc)
    return model, acc
