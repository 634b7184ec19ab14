"""The shared trainer: exact resume, Ctrl-C, NaN, atomic checkpoints, run folder contents."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from dreamlab.errors import DreamlabError
from dreamlab.io import load_tensors
from generators.base import TrainConfig
from generators.classifiers import MLPClassifier, MLPConfig
from generators.trainer import train
from generators.vae import VAE, VAEConfig


class _SmallData:
    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        x = torch.rand(64, 1, 28, 28, generator=g)
        return {"x": x, "y": (x.mean((1, 2, 3)) * 1000).long() % 10}


class TinyVAE(_SmallData, VAE):
    pass


class TinyMLP(_SmallData, MLPClassifier):
    pass


def _tc(**kw) -> TrainConfig:
    return TrainConfig(
        **{"steps": 6, "batch_size": 16, "device": "cpu", "log_every": 1, "ckpt_every": 2, "eval_items": 64, **kw}
    )


def _vae() -> TinyVAE:
    torch.manual_seed(0)
    return TinyVAE(VAEConfig(channels=(4, 8, 8)))


def test_resume_continues_exactly(tmp_path: Path) -> None:
    # uninterrupted: 6 steps (the VAE draws random numbers every step, so RNG state must be restored too)
    full = _vae()
    train(full, _tc(), tmp_path / "a", progress=False)
    # interrupted after 3 steps, then resumed to 6 in a fresh model object
    part = _vae()
    train(part, _tc(steps=3), tmp_path / "b", progress=False)
    resumed = _vae()
    train(resumed, _tc(), tmp_path / "b", resume=True, progress=False)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 6] == sorted(s for s in steps if s <= 6)  # no duplicated steps after resume


def test_run_folder_contents(tmp_path: Path) -> None:
    res = train(_vae(), _tc(), tmp_path / "r", progress=False)
    run = tmp_path / "r"
    for f in (
        "config.json",
        "metrics.jsonl",
        "eval.json",
        "model/config.json",
        "model/model.safetensors",
        "checkpoint/state.json",
        "reconstructions.png",
        "samples.png",
        "latent_scatter.png",
        "latent_plane.png",
        "loss_curves.png",
    ):
        assert (run / f).exists(), f
    assert res["status"] == "finished" and res["test_elbo"] < 0
    assert any((run / "tb").iterdir())
    # report.md: the held-out metrics as measured, every picture of the folder, linked to files that exist
    page = (run / "report.md").read_text()
    assert page.startswith("# `vae` run `r`") and f"| `test_elbo` | {res['test_elbo']:.6g} |" in page
    links = re.findall(r"\]\(([^)]+)\)", page)
    assert sorted(links) == sorted(p.name for p in run.glob("*.png")) and len(links) >= 5
    assert f"dreamlab sample {run} -n 64 --out {run}/more_samples.png" in page


def test_existing_checkpoint_needs_resume(tmp_path: Path) -> None:
    train(_vae(), _tc(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(DreamlabError, match="--resume"):
        train(_vae(), _tc(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(DreamlabError, match="does not exist"):
        train(_vae(), _tc(), tmp_path / "fresh", resume=True, progress=False)


class InterruptedMLP(TinyMLP):
    def train_step(self, batch, optimizers, step, tc):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers
        return super().train_step(batch, optimizers, step, tc)


def test_sigint_saves_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = InterruptedMLP(MLPConfig(hidden=(8,)))
    res = train(m, _tc(steps=50, ckpt_every=100), tmp_path / "r", progress=False)
    assert res["status"] == "interrupted" and res["step"] == 3
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    assert not (tmp_path / "r" / "model").exists()  # no final model from an interrupted run
    # and it resumes to the end
    torch.manual_seed(0)
    res2 = train(
        TinyMLP(MLPConfig(hidden=(8,))), _tc(steps=5, ckpt_every=100), tmp_path / "r", resume=True, progress=False
    )
    assert res2["status"] == "finished" and res2["step"] == 5


class NaNMLP(TinyMLP):
    def loss(self, batch):
        loss, m = super().loss(batch)
        if self._calls >= 3:
            loss = loss * float("nan")
        self._calls += 1
        return loss, m

    _calls = 0


def test_nan_loss_stops_with_named_error_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = NaNMLP(MLPConfig(hidden=(8,)))
    with pytest.raises(DreamlabError, match="loss became nan at step 3 of mlp.*lr"):
        train(m, _tc(steps=10, ckpt_every=2), tmp_path / "r", progress=False)
    ck = load_tensors(tmp_path / "r" / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in ck.values())
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_nan_inside_a_log_window_is_caught_before_the_next_checkpoint(tmp_path: Path) -> None:
    # metrics stay on the device between log lines; the check runs at every log line and before every checkpoint
    torch.manual_seed(0)
    m = NaNMLP(MLPConfig(hidden=(8,)))
    with pytest.raises(DreamlabError, match=r"loss became nan in steps 0\.\.3 of mlp"):
        train(m, _tc(steps=10, log_every=4, ckpt_every=2), tmp_path / "r", progress=False)
    ck = load_tensors(tmp_path / "r" / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in ck.values())
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_no_temp_files_left(tmp_path: Path) -> None:
    train(_vae(), _tc(steps=4), tmp_path / "r", progress=False)
    leftovers = [p for p in (tmp_path / "r").rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers


def test_train_from_name_repeats_by_seed(tmp_path: Path) -> None:
    """`dreamlab train` builds the model under the run's seed: two runs in one process give the same weights."""
    from generators.trainer import train_from_name

    torch.rand(7)  # move the global RNG: the initial weights must not depend on it
    a, _, _ = train_from_name("autoencoder", preset="tiny", out=tmp_path / "a", progress=False)
    b, _, _ = train_from_name("autoencoder", preset="tiny", out=tmp_path / "b", progress=False)
    c, _, _ = train_from_name("autoencoder", preset="tiny", overrides={"seed": 1}, out=tmp_path / "c", progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
