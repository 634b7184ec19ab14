"""Run by tests/test_trainer_ddp.py under `torchrun --nproc_per_node=2` (and imported by it for the one-process
references): tiny models trained by the shared trainer, one per path of its multi-process support.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_child.py OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dreamlab.device import seeded
from generators.base import TrainConfig
from generators.trainer import train
from generators.vae import AEConfig, Autoencoder


class SmallData:
    """64 fixed random images: no dataset to load, the same on every rank."""

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        x = torch.rand(64, 1, 28, 28, generator=g)
        return {"x": x, "y": (x.mean((1, 2, 3)) * 1000).long() % 10}

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        return []


class TinyAE(SmallData, Autoencoder):
    """The default train_step (the DDP path), with a parameter its loss never uses (DDP must not wait for it)."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__(config)
        self.sampling_head = nn.Linear(2, 2)


class TwoStepAE(SmallData, Autoencoder):
    """Owns its step like a GAN: two optimisers (SGD, so that a wrongly scaled gradient average would show), the
    second stepping through what the first just updated (the optimiser-hook path)."""

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        dec = [*self.net.fc.parameters(), *self.net.dec.parameters()]
        return [torch.optim.SGD(dec, lr=0.05), torch.optim.SGD(self.net.enc.parameters(), lr=0.05)]

    def train_step(self, batch, optimizers, step, tc):
        dec_opt, enc_opt = optimizers
        x = batch["x"]

        def rec(logits):
            return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()

        dec_loss = rec(self.net.decode_logits(self.net.encode(x).detach()))
        dec_opt.zero_grad(set_to_none=True)
        dec_loss.backward()
        dec_opt.step()
        enc_loss = rec(self.net.decode_logits(self.net.encode(x)))
        enc_opt.zero_grad(set_to_none=True)
        enc_loss.backward()
        enc_opt.step()
        return {"loss": dec_loss.detach(), "enc_loss": enc_loss.detach()}


def make(cls: type, seed: int = 0):
    with seeded(seed):
        return cls(AEConfig(channels=(4, 8, 8)))


def tc(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 16, "device": "cpu", "log_every": 1, "ckpt_every": 2,
                          "eval_items": 64, "threads": 1, **kw})


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.distributed.init_process_group("gloo")  # one group for three runs (the CLI test covers the trainer's own)
    train(make(TinyAE), tc(), out / "ae", progress=False)
    train(make(TwoStepAE), tc(), out / "adv", progress=False)
    train(make(TinyAE), tc(), out / "resume", resume=True, progress=False)  # a one-process checkpoint at step 2
    torch.distributed.destroy_process_group()
