"""The one trainer every dreamlab model goes through.

It owns: device selection (`device="auto"`), bf16 autocast on CUDA, a progress bar with rate,
metrics to `metrics.jsonl` and TensorBoard, atomic checkpoints (model + optimisers + step + every RNG)
every `ckpt_every` steps and at the end, exact `resume`, and a clean exit on Ctrl-C (a checkpoint is
saved first). A run folder looks like:

    run/config.json        model name, model config, train config
    run/metrics.jsonl      one JSON object per logged step
    run/tb/                TensorBoard events
    run/checkpoint/        model.safetensors, optim.safetensors, state.json (step, RNG states)
    run/model/             the final weights, loadable with `from_pretrained`
    run/eval.json          held-out metrics
    run/*.png              the model's pictures (grids, latent plots, loss curves)
    run/report.md          one page: held-out metrics, every picture, the commands to sample / evaluate / resume
"""
from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dreamlab.config import apply_overrides, from_dict, to_dict
from dreamlab.device import resolve_device, seeded
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, load_json, load_tensors, replace_dir, save_json, save_tensors
from generators.base import (
    Model,
    TrainConfig,
    batch_count,
    get_model_class,
    split_overrides,
    to_device,
)

# ----------------------------------------------------------------------------- data iteration


def iterate_train(data: Any, batch_size: int, seed: int, start_step: int, device: torch.device,
                  num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches. The order depends only on (seed, epoch), so a resumed run sees exactly
    the batches an uninterrupted one would have seen."""
    if isinstance(data, torch.utils.data.IterableDataset):
        # streaming data (e.g. rollouts on disk) shuffles itself; resume skips nothing
        while True:
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers)
            for b in loader:
                yield to_device(b, device)
    n = batch_count(data)
    if n < batch_size:
        batch_size = n
    per_epoch = n // batch_size  # drop the ragged last batch: every step sees a full batch
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)
        for i in range(offset, per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            if isinstance(data, dict):
                yield {k: v[idx].to(device, non_blocking=True) for k, v in data.items()}
            else:
                items = [data[int(j)] for j in idx]
                yield to_device(torch.utils.data.default_collate(items), device)
        epoch, offset = epoch + 1, 0


# ----------------------------------------------------------------------------- checkpoints


def _optim_to_tensors(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: list[Any] = []
    for oi, opt in enumerate(opts):
        sd = opt.state_dict()
        scalars: dict[str, Any] = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{oi}.{pid}.{k}"] = v
                else:
                    scalars[f"{pid}.{k}"] = v
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, meta


def _optim_from_tensors(opts: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: list[Any]) -> None:
    for oi, opt in enumerate(opts):
        state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            o, pid, k = key.split(".", 2)
            if int(o) == oi:
                state.setdefault(int(pid), {})[k] = v
        for key, v in meta[oi]["scalars"].items():
            pid, k = key.split(".", 1)
            state.setdefault(int(pid), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": meta[oi]["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"torch_cuda{i}"] = s
    np_state = np.random.get_state()
    py = random.getstate()
    j = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": [py[0], list(py[1]), py[2]]}
    return t, j


def _set_rng_state(t: dict[str, torch.Tensor], j: dict[str, Any]) -> None:
    torch.set_rng_state(t["torch_cpu"])
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(t) if k.startswith("torch_cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    n = j["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = j["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(run_dir: Path, model: Model, opts: list[torch.optim.Optimizer], step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write run/checkpoint atomically: a complete temp folder is swapped in, so a crash leaves the old one."""
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_tensors(tmp / "model.safetensors", model.state_dict())
    ot, ometa = _optim_to_tensors(opts)
    rt, rj = _rng_state()
    save_tensors(tmp / "optim.safetensors", {**{f"optim.{k}": v for k, v in ot.items()}, **{f"rng.{k}": v for k, v in rt.items()}})
    save_json(tmp / "state.json", {"step": step, "optim": ometa, "rng": rj, **(extra or {})})
    replace_dir(tmp, final)
    return final


def load_checkpoint(run_dir: Path, model: Model, opts: list[torch.optim.Optimizer]) -> dict[str, Any]:
    ck = run_dir / "checkpoint"
    state = load_json(ck / "state.json")
    model.load_state_dict(load_tensors(ck / "model.safetensors", device=model.device))
    t = load_tensors(ck / "optim.safetensors", device=model.device)
    _optim_from_tensors(opts, {k[6:]: v for k, v in t.items() if k.startswith("optim.")}, state["optim"])
    _set_rng_state({k[4:]: v.cpu() for k, v in t.items() if k.startswith("rng.")}, state["rng"])
    return state


# ----------------------------------------------------------------------------- logging


class MetricLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is a core dependency, but never fail a run over logging
                self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so metrics.jsonl has no duplicates."""
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


# ----------------------------------------------------------------------------- the loop


def resolve_preset(cls: type[Model], preset: str | None) -> dict[str, Any]:
    if preset is None:
        return {}
    if preset not in cls.presets:
        raise DreamlabError(f"unknown preset {preset!r} for {cls.name}; choose one of {', '.join(sorted(cls.presets)) or '(none)'}")
    return dict(cls.presets[preset])


def train(model: Model, tc: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `model` for `tc.steps` steps into `run_dir`; returns the final metrics (eval included).

    With `resume=True` an existing `run_dir/checkpoint` is loaded and training continues exactly where it
    stopped (same batches, same random numbers), up to `tc.steps` (which may have been raised).
    """
    run_dir = Path(run_dir)
    device = resolve_device(tc.device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    has_ckpt = (run_dir / "checkpoint" / "state.json").exists()
    if has_ckpt and not resume:
        raise DreamlabError(f"{run_dir} already holds a checkpoint; pass --resume to continue it, or choose another --out")
    if resume and not has_ckpt:
        raise DreamlabError(f"--resume given but {run_dir / 'checkpoint'} does not exist; start without --resume")
    # the outermost folder this call creates (run_dir or a parent of it): removed again if the data cannot load
    created = next((d for d in [*reversed(run_dir.parents), run_dir] if not d.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    cfg_json = {"name": model.name, "config": to_dict(model.config), "train": to_dict(tc), **(extra_config or {})}
    if resume:
        old = load_json(run_dir / "config.json")
        same = old.get("name") == model.name and \
            to_dict(from_dict(type(model.config), old.get("config", {}), what="config.json")) == cfg_json["config"]
        if not same:
            raise DreamlabError(f"{run_dir} was trained with a different model or model config; resume with the same settings")
    save_json(run_dir / "config.json", cfg_json)

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model.to(device).train()
    opts = model.configure_optimizers(tc)
    step = 0
    logger = MetricLogger(run_dir)
    if resume:
        step = int(load_checkpoint(run_dir, model, opts)["step"])
        logger.truncate_after(step)

    try:
        data = model.train_data("train")
    except BaseException:
        if created is not None:  # e.g. a missing data package: leave no run folder behind for a run that never started
            logger.close()
            shutil.rmtree(created, ignore_errors=True)
        raise
    batches = iterate_train(data, tc.batch_size, tc.seed, step, device, tc.num_workers)
    interrupted = {"flag": False}

    def _on_sigint(signum: int, frame: Any) -> None:
        interrupted["flag"] = True

    prev_handler = signal.signal(signal.SIGINT, _on_sigint) if _is_main_thread() else None
    acc: dict[str, Any] = {}  # metric sums since the last log line (device tensors: no host sync per step)
    nacc = 0

    def window_mean() -> dict[str, float]:
        """The window's mean metrics (one host sync); a NaN/inf stops training before anything is saved."""
        avg = {k: float(v) / max(nacc, 1) for k, v in acc.items()}
        bad = [k for k, v in avg.items() if not math.isfinite(v)]
        if bad:
            where = f"at step {step - 1}" if nacc == 1 else f"in steps {step - nacc}..{step - 1}"
            raise DreamlabError(
                f"{bad[0]} became {avg[bad[0]]} {where} of {model.name}; the last good checkpoint is in "
                f"{run_dir / 'checkpoint'}: lower the learning rate (--set lr=...) or enable grad_clip and --resume"
            )
        return avg

    t0 = time.perf_counter()
    bar = tqdm(total=tc.steps, initial=step, desc=f"train {model.name}", unit="step", disable=not progress, dynamic_ncols=True)
    status = "finished"
    try:
        while step < tc.steps:
            if interrupted["flag"]:
                window_mean()  # never checkpoint weights that a NaN step has reached
                status = "interrupted"
                break
            batch = next(batches)
            metrics = model.train_step(batch, opts, step, tc)
            step += 1
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else float(v))
            nacc += 1
            if step % tc.ckpt_every == 0 and step < tc.steps and step % tc.log_every:
                window_mean()  # checked before the checkpoint below is written
            if step % tc.log_every == 0 or step == tc.steps:
                avg = window_mean()
                avg["steps_per_s"] = nacc / max(time.perf_counter() - t0, 1e-9)
                logger.log(step, avg)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(avg.items())[:3]})
                acc, nacc, t0 = {}, 0, time.perf_counter()
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                logger.log(step, model.evaluate("val", max_items=tc.eval_items or None))
                model.train()
            if step % tc.ckpt_every == 0 and step < tc.steps:
                save_checkpoint(run_dir, model, opts, step)
            bar.update(1)
    finally:
        bar.close()
        if prev_handler is not None:
            signal.signal(signal.SIGINT, prev_handler)
    save_checkpoint(run_dir, model, opts, step)
    result: dict[str, Any] = {"status": status, "step": step}
    if status == "interrupted":
        logger.close()
        print(f"interrupted at step {step}: checkpoint saved to {run_dir / 'checkpoint'}; continue with --resume")
        return result
    model.save_pretrained(run_dir / "model")
    model.eval()
    result.update(model.evaluate("test", max_items=tc.eval_items or None))
    save_json(run_dir / "eval.json", result)
    logger.log(step, {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "step"})
    logger.close()
    model.write_artifacts(run_dir)
    try:
        write_run_report(run_dir, model, result, cfg_json, device=str(device), seconds=time.perf_counter() - t_run)
    except Exception as e:  # noqa: BLE001 - the page is a view of files already written; never fail a finished run on it
        print(f"warning: {run_dir / 'report.md'} not written ({type(e).__name__}: {e})")
    return result


def write_run_report(run_dir: Path, model: Model, result: dict[str, Any], meta: dict[str, Any], *, device: str = "",
                     seconds: float | None = None) -> Path:
    """run/report.md: what was trained (`meta`: the run's config.json), its held-out metrics, every picture, how to use it."""
    run_dir = Path(run_dir)
    tc = meta.get("train", {})
    doc = (type(model).__doc__ or "").strip().splitlines()
    lines = [f"# `{model.name}` run `{run_dir.name}`", "", *(doc[:1] + [""] if doc else [])]
    bits = [f"preset **{meta.get('preset') or 'custom'}**", f"{result.get('step')} steps of batch {tc.get('batch_size')}"]
    if device:
        bits.append(f"on {device}")
    if seconds is not None:
        bits.append(f"{seconds:,.0f} s this call (training, test evaluation, pictures)")
    lines += ["; ".join(bits) + ". Settings: `config.json`; training curves: `metrics.jsonl` and TensorBoard "
              f"(`tensorboard --logdir {run_dir}`).", ""]
    nums = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    if nums:
        lines += ["## Held-out metrics (test split)", "", "| metric | value |", "|---|---:|"]
        lines += [f"| `{k}` | {v:.6g} |" for k, v in nums.items()]
        lines.append("")
        if "fid_fmnist" in nums:
            lines += ["`fid_fmnist`: Fréchet distance between samples and test images on the features of dreamlab's own "
                      "Fashion-MNIST CNN (lower is better; not Inception FID). Losses and likelihoods are in nats.", ""]
    pics = sorted(p.name for p in run_dir.glob("*.png"))
    if pics:
        lines += ["## Pictures", ""]
        for n in pics:
            lines += [f"**{n[:-4].replace('_', ' ')}**", "", f"![{n}]({n})", ""]
    lines += ["## Use it", "", "```bash"]
    if getattr(model, "kind", "") == "generator":
        ext = "png" if (run_dir / "samples.png").exists() else "safetensors"  # image grids, or raw tensors (e.g. latent sequences)
        lines.append(f"dreamlab sample {run_dir} -n 64 --out {run_dir}/more_samples.{ext}")
    lines += [f"dreamlab eval {run_dir}",
              f"dreamlab train {model.name} --out {run_dir} --resume --set steps={int(result.get('step') or 0) * 2}   # train on",
              "```", "", "```python", "from generators.trainer import load_run",
              f"model = load_run({str(run_dir)!r})   # or {type(model).__name__}.from_pretrained({str(run_dir / 'model')!r})", "```", ""]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def train_from_name(name: str, *, preset: str | None = "quick", overrides: dict[str, Any] | None = None,
                    out: str | Path | None = None, resume: bool = False, progress: bool = True) -> tuple[Model, dict[str, Any], Path]:
    """Build a registered model from preset + overrides and train it; what `dreamlab train` calls."""
    cls = get_model_class(name)
    merged = {**resolve_preset(cls, preset), **(overrides or {})}
    mo, to = split_overrides(cls, merged)
    tc = apply_overrides(TrainConfig(), to, what="trainer config")
    with seeded(tc.seed):  # initial weights from the seed alone, whatever ran before in this process
        model = cls(apply_overrides(cls.config_class(), mo, what=f"{name} config"))
    run_dir = Path(out) if out else Path("runs") / f"{name}-{preset or 'custom'}"
    if resume:
        # settings come from the run folder; explicit overrides (e.g. more steps) still apply
        old = load_json(run_dir / "config.json")
        model = cls(apply_overrides(from_dict(cls.config_class, old["config"], what=f"{run_dir / 'config.json'}"), mo,
                                    what=f"{name} config"))
        tc = apply_overrides(TrainConfig(), {**old["train"], **to}, what="trainer config")
    res = train(model, tc, run_dir, resume=resume, progress=progress, extra_config={"preset": preset})
    return model, res, run_dir


def load_run(run_dir: str | Path, device: str = "auto") -> Model:
    """Load the final model of a run folder (or its last checkpoint if training was interrupted)."""
    run_dir = Path(run_dir)
    if (run_dir / "model" / "config.json").exists():
        return Model.from_pretrained(run_dir / "model", device=device)
    if (run_dir / "checkpoint" / "model.safetensors").exists():
        meta = load_json(run_dir / "config.json")
        cls = get_model_class(meta["name"])
        m = cls(from_dict(cls.config_class, meta["config"], what=f"{run_dir / 'config.json'}"))
        m.load_state_dict(load_tensors(run_dir / "checkpoint" / "model.safetensors"))
        return m.to(resolve_device(device)).eval()
    if (run_dir / "config.json").exists() and (run_dir / "model.safetensors").exists():
        return Model.from_pretrained(run_dir, device=device)
    raise DreamlabError(f"{run_dir} is not a run folder (no model/ or checkpoint/); train one with: dreamlab train NAME --out {run_dir}")
