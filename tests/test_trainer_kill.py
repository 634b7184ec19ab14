"""Kill tests of the shared trainer (issue 62, item 4): SIGKILL at seeded moments of a run, then what a user does
next (`--resume` when a checkpoint exists, else the same command again); the run completes, every file it lists
loads, no checkpointed step is lost, and the weights equal an uninterrupted run's bit for bit.

The moments are the trainer's own events, counted in a dry run: every optimisation step, every metrics line (the kill
lands mid-line: half of it written), every tensor/JSON file written and every rename of dreamlab.io (so kills between
the two renames of a checkpoint swap, and inside the final model/eval/report writes, are among them). A seeded choice
of at least two moments of each kind (12 in all) runs in a forked child, which SIGKILLs itself at its moment."""
from __future__ import annotations

import json
import os
import random
import signal
import types
from pathlib import Path

import pytest
import torch
from test_trainer import _tc, _vae

import dreamlab.io as dio
import generators.base as B
import generators.trainer as T
from dreamlab.io import load_tensors
from generators.trainer import find_checkpoint, load_run, read_metrics, train

STEPS = 8
KINDS = ("step", "metrics", "tensors", "json", "rename")


def _config():
    return _tc(steps=STEPS, ckpt_every=3, threads=1)


def _instrument(model, target: int | None, trace: list[tuple[str, int]]) -> None:
    """Count the run's moments into `trace` as (kind, step of the last completed checkpoint); at moment number
    `target`, SIGKILL this process (a metrics line is first written halfway). It patches modules: for forked children
    only."""
    done = {"ckpt": -1}

    def moment(kind: str, half_line: tuple[Path, str] | None = None) -> None:
        trace.append((kind, done["ckpt"]))
        if len(trace) == target:
            if half_line is not None:
                path, line = half_line
                with open(path, "a") as f:
                    f.write(line[: len(line) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    step_fn = model.train_step

    def train_step(*a, **k):
        moment("step")
        return step_fn(*a, **k)

    model.train_step = train_step
    log = T.MetricLogger.log

    def metrics_log(self, step, metrics):
        if self.enabled:
            line = json.dumps({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}) + "\n"
            moment("metrics", (self.path, line))
        return log(self, step, metrics)

    T.MetricLogger.log = metrics_log
    def counted(fn, kind: str):
        return lambda *a, **k: (moment(kind), fn(*a, **k))[1]

    for mod in (T, B):  # the trainer's checkpoints, and Model.save_pretrained's files
        for name, kind in (("save_tensors", "tensors"), ("save_json", "json")):
            setattr(mod, name, counted(getattr(mod, name), kind))
    real_replace = os.replace
    dio.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    dio.os.replace = counted(real_replace, "rename")
    save_ckpt = T.save_checkpoint

    def save_checkpoint(run_dir, model, opts, step, *a, **k):
        out = save_ckpt(run_dir, model, opts, step, *a, **k)
        done["ckpt"] = step
        return out

    T.save_checkpoint = save_checkpoint


def _dry_run(tmp: Path) -> list[tuple[str, int]]:
    """The moments of an uninterrupted run, counted in a forked child (the patches never touch this process)."""
    trace_file = tmp / "trace.json"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            trace: list[tuple[str, int]] = []
            model = _vae()
            _instrument(model, None, trace)
            train(model, _config(), tmp / "dry", progress=False)
            trace_file.write_text(json.dumps(trace))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return [tuple(t) for t in json.loads(trace_file.read_text())]


def _killed_run(run: Path, target: int) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            model = _vae()
            _instrument(model, target, [])
            train(model, _config(), run, progress=False)
        finally:
            os._exit(3)  # reached only if the moment never came
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"moment {target} never came"


@pytest.mark.slow
def test_sigkill_at_seeded_moments_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ref = _vae()
    train(ref, _config(), tmp_path / "ref", progress=False)
    want = load_tensors(tmp_path / "ref" / "model" / "model.safetensors")
    trace = _dry_run(tmp_path)
    by_kind = {k: [i + 1 for i, (kind, _) in enumerate(trace) if kind == k] for k in KINDS}
    assert all(len(v) >= 2 for v in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    rng = random.Random(62)
    targets = sorted({m for k in KINDS for m in rng.sample(by_kind[k], 2)} | set(rng.sample(range(1, len(trace)), 2)))
    assert len(targets) >= 10
    for target in targets:
        run = tmp_path / f"kill{target}"
        _killed_run(run, target)
        ckpt = find_checkpoint(run)
        kept = -1 if ckpt is None else json.loads((ckpt / "state.json").read_text())["step"]
        assert kept >= trace[target - 1][1], (target, trace[target - 1])  # no completed checkpoint is lost
        # what the user does next: resume, or (killed before the first checkpoint) the same command again
        res = train(_vae(), _config(), run, resume=ckpt is not None, progress=False)
        assert res["status"] == "finished" and res["step"] == STEPS
        got = load_tensors(run / "model" / "model.safetensors")
        assert all(torch.equal(want[k], got[k]) for k in want), f"moment {target} ({trace[target - 1][0]})"
        assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, STEPS + 1)), target
        assert (run / "metrics.jsonl").read_text().count("\n") == (tmp_path / "ref" / "metrics.jsonl").read_text(
        ).count("\n"), target  # no half line or duplicate left
        for f in ("config.json", "eval.json"):
            json.loads((run / f).read_text())
        assert load_run(run, device="cpu").name == "vae"
        assert (run / "report.md").exists()
        assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old"))], target
