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

Several processes (`torchrun --nproc_per_node=N -m dreamlab train NAME ...`, or `accelerate launch`, which sets the
same variables): each rank takes its share of every global batch (the global batch stays `batch_size`, and its items
are the ones a single process would have used), gradients are averaged across ranks, rank 0 alone writes the run
folder, and a checkpoint resumes on any number of processes. A model with the default `train_step` is wrapped in
torch's DistributedDataParallel (the gradient all-reduce overlaps the backward pass); a model that overrides
`train_step` (adversarial models, EMA) keeps its own step, and each of its optimisers averages the gradients of its
parameters across ranks just before it steps. See docs/scale.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dreamlab.config import apply_overrides, from_dict, to_dict
from dreamlab.device import autocast, resolve_device, seeded
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, load_json, load_tensors, replace_dir, save_json, save_tensors
from dreamlab.runtime import keep_freed_memory
from generators.base import (
    Model,
    TrainConfig,
    batch_count,
    check_model_size,
    get_model_class,
    load_weights,
    read_config_json,
    split_overrides,
    to_device,
)

# ----------------------------------------------------------------------------- data iteration


def iterate_train(data: Any, batch_size: int, seed: int, start_step: int, device: torch.device,
                  num_workers: int = 0, *, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches. The order depends only on (seed, epoch), so a resumed run sees exactly
    the batches an uninterrupted one would have seen. With `world` processes, rank `rank` gets its contiguous
    `batch_size // world` items of each global batch: the same global batches on any number of processes."""
    if isinstance(data, torch.utils.data.IterableDataset):
        # streaming data (e.g. rollouts on disk) shuffles itself from the torch RNG, which differs per rank;
        # resume skips nothing
        while True:
            loader = torch.utils.data.DataLoader(data, batch_size=max(1, batch_size // world), num_workers=num_workers)
            for b in loader:
                yield to_device(b, device)
    n = batch_count(data)
    batch_size = min(batch_size, n)
    local = batch_size // world
    if local < 1:
        raise DreamlabError(f"the data has {n} items: too few for one per process ({world} processes)")
    batch_size = local * world
    lo, hi = rank * local, (rank + 1) * local
    per_epoch = n // batch_size  # drop the ragged last batch: every step sees a full batch
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)
        for i in range(offset, per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size][lo:hi]
            if isinstance(data, dict):
                yield {k: v[idx].to(device, non_blocking=True) for k, v in data.items()}
            else:
                items = [data[int(j)] for j in idx]
                yield to_device(torch.utils.data.default_collate(items), device)
        epoch, offset = epoch + 1, 0


# ----------------------------------------------------------------------------- several processes (torchrun)


@dataclasses.dataclass
class _Dist:
    """This process's place among the training processes; world == 1 is the plain single-process run."""

    rank: int = 0
    world: int = 1
    ctrl: Any = None          # a gloo group for small CPU messages (stop flags, RNG states) beside an NCCL one
    created: bool = False     # this trainer started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.ctrl)

    def close(self) -> None:
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _setup_distributed(tc: TrainConfig) -> tuple[_Dist, torch.device]:
    """Join the process group that torchrun / accelerate describe in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT): gloo on CPU, NCCL on CUDA with one GPU per local rank."""
    device = resolve_device(tc.device)
    dist = torch.distributed
    joined = dist.is_available() and dist.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not joined:
        return _Dist(), device
    if not dist.is_available():
        raise DreamlabError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but this torch build has no torch.distributed; "
                            "train in one process")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not joined:
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:
            raise DreamlabError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but the process group did not start "
                                f"({str(e).splitlines()[0]}); launch with torchrun --nproc_per_node=N") from e
        created = True
    ctrl = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), ctrl, created), device


class _LossOf(nn.Module):
    """`model.loss` as a module's forward, so that DistributedDataParallel can wrap it (it hooks forward/backward)."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model.loss(batch)


def _ddp_train_step(ddp: nn.Module, model: Model, batch: dict[str, torch.Tensor], opts: list[torch.optim.Optimizer],
                    tc: TrainConfig) -> dict[str, Any]:
    """`Model.train_step` with the forward through DDP: backward then all-reduces the gradients bucket by bucket."""
    (opt,) = opts
    with autocast(model.device, tc.amp):
        loss, metrics = ddp(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip > 0:
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).detach()
    opt.step()
    return {"loss": loss.detach(), **metrics}


def _average_grads_before_step(world: int):
    """Optimizer step pre-hook for models that own their step: average this optimiser's gradients across ranks
    (one flat all-reduce per dtype) just before it updates, as DDP would have after backward."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in groups.values():
            flat = _flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            flat.div_(world)
            for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)

    return hook


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Rank 0 keeps the run's seed (a one-process run is unchanged); other ranks get their own noise streams."""
    if rank == 0 and step == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _gather_bytes(d: _Dist, payload: bytes) -> list[bytes]:
    """Every rank's `payload`, on every rank (gloo tensors of bytes: no pickling between processes)."""
    dist = torch.distributed
    n = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n, group=d.ctrl)
    width = int(max(s.item() for s in sizes))
    buf = torch.zeros(width, dtype=torch.uint8)
    if payload:
        buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    bufs = [torch.zeros_like(buf) for _ in range(d.world)]
    dist.all_gather(bufs, buf, group=d.ctrl)
    return [bytes(b[:int(s.item())].tolist()) for b, s in zip(bufs, sizes)]


def _gather_rng(d: _Dist) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """The RNG states of every rank (for a checkpoint that resumes exactly on the same number of processes)."""
    t, j = _rng_state()
    payload = json.dumps({"t": {k: v.tolist() for k, v in t.items()}, "j": j}).encode()
    out = []
    for blob in _gather_bytes(d, payload):
        obj = json.loads(blob)
        out.append(({k: torch.tensor(v, dtype=torch.uint8) for k, v in obj["t"].items()}, obj["j"]))
    return out


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


def save_checkpoint(run_dir: Path, model: Model, opts: list[torch.optim.Optimizer], step: int,
                    extra: dict[str, Any] | None = None, *,
                    rank_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write run/checkpoint atomically: a complete temp folder is swapped in, so a crash leaves the old one (or, killed
    between the swap's two renames, both: `find_checkpoint` takes the newest). `rank_rng`: the RNG states of ranks
    1.. of a multi-process run, saved beside rank 0's."""
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    if tmp.exists():  # left by a process killed while writing: never mix its files with this checkpoint's
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "model.safetensors", model.state_dict())
    ot, ometa = _optim_to_tensors(opts)
    rt, rj = _rng_state()
    tensors = {**{f"optim.{k}": v for k, v in ot.items()}, **{f"rng.{k}": v for k, v in rt.items()}}
    for r, (t, _) in enumerate(rank_rng or [], start=1):
        tensors.update({f"rng{r}.{k}": v for k, v in t.items()})
    save_tensors(tmp / "optim.safetensors", tensors)
    state = {"step": step, "optim": ometa, "rng": rj, **(extra or {})}
    if rank_rng:
        state["rng_ranks"] = [j for _, j in rank_rng]
    save_json(tmp / "state.json", state)  # written last: a folder with state.json is complete
    replace_dir(tmp, final)
    return final


_CKPT_FILES = ("model.safetensors", "optim.safetensors", "state.json")


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder holding the run's newest complete checkpoint: `checkpoint/`, or what a kill inside the swap left
    (`checkpoint.tmp/`, fully written, or `checkpoint.old/`, the previous one). Reads only; None if there is none."""
    run_dir = Path(run_dir)
    best, best_step = None, -1
    for d in (run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"):
        if not all((d / f).is_file() for f in _CKPT_FILES):
            continue
        try:
            step = int(load_json(d / "state.json")["step"])
        except (DreamlabError, KeyError, TypeError, ValueError):
            continue
        if step > best_step:
            best, best_step = d, step
    return best


def recover_checkpoint(run_dir: str | Path) -> Path | None:
    """Put the newest complete checkpoint (see `find_checkpoint`) in `run_dir/checkpoint` and return that folder."""
    run_dir = Path(run_dir)
    final = run_dir / "checkpoint"
    found = find_checkpoint(run_dir)
    if found is None or found == final:
        return found
    if found.name == "checkpoint.old":
        if final.exists():  # an incomplete folder in the way (only a damaged one can be)
            shutil.rmtree(final)
        os.replace(found, final)
    else:
        replace_dir(found, final)
    return final


def load_checkpoint(run_dir: Path, model: Model, opts: list[torch.optim.Optimizer], *, rank: int = 0) -> dict[str, Any]:
    """Load run/checkpoint into `model` and `opts` and restore the RNG states of `rank`. The returned state has
    "rng_restored": False when the checkpoint holds no RNG state for that rank (it was written by fewer processes)."""
    ck = Path(run_dir) / "checkpoint"
    state = load_json(ck / "state.json")
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("optim"), list)):
        raise DreamlabError(f"{ck / 'state.json'} is not a dreamlab checkpoint state (no step/optim); the checkpoint "
                            "is damaged: train again without --resume")
    load_weights(model, load_tensors(ck / "model.safetensors", device=model.device), ck / "model.safetensors")
    t = load_tensors(ck / "optim.safetensors", device=model.device)
    try:
        _optim_from_tensors(opts, {k[6:]: v for k, v in t.items() if k.startswith("optim.")}, state["optim"])
    except (ValueError, KeyError, IndexError) as e:
        raise DreamlabError(f"{ck / 'optim.safetensors'} does not match this model's optimisers ({e}); "
                            "resume with the run's own settings") from None
    if rank == 0:
        prefix, js = "rng.", state.get("rng")
    else:
        others = state.get("rng_ranks") or []
        prefix, js = f"rng{rank}.", others[rank - 1] if rank - 1 < len(others) else None
    rng = {k[len(prefix):]: v.cpu() for k, v in t.items() if k.startswith(prefix)}
    state["rng_restored"] = bool(rng) and js is not None
    if state["rng_restored"]:
        _set_rng_state(rng, js)
    return state


# ----------------------------------------------------------------------------- logging


class MetricLogger:
    """metrics.jsonl (one JSON object per line, appended) and TensorBoard. `lines` counts the lines of the file, so a
    checkpoint can record how much of it belongs before it. Disabled on ranks other than 0."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, *, purge_step: int | None = None,
                 enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.lines = sum(1 for ln in self.path.read_text(errors="replace").splitlines() if ln.strip()) \
            if enabled and self.path.exists() else 0
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: on resume, TensorBoard hides the events a killed run logged after its checkpoint
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
            except ImportError:  # tensorboard is a core dependency, but never fail a run over logging
                self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}) + "\n")
        self.lines += 1
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int, lines: int | None = None) -> None:
        """On resume, keep what was logged before the checkpoint (its first `lines` lines, when the checkpoint
        recorded that, and no step after `step`): metrics.jsonl then has no duplicates. A line a kill cut in half
        (or any other unreadable line) is dropped with a note."""
        if not self.path.exists():
            self.lines = 0
            return
        rows, bad = _read_jsonl(self.path)
        keep = [ln for ln, row in rows[:lines] if row["step"] <= step]
        if bad:
            print(f"note: {self.path}: dropped {bad} unreadable line(s) (a line cut short when the run was killed)",
                  file=sys.stderr)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self.lines = len(keep)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _read_jsonl(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """(line, row) for every line that is a JSON object with an integer "step", and the number of other lines."""
    rows, bad = [], 0
    for ln in path.read_text(errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append((ln, row))
        else:
            bad += 1
    return rows, bad


def _reset_logs(run_dir: Path) -> None:
    """A run that starts from step 0 in a folder where an earlier attempt was killed before its first checkpoint:
    its metrics and TensorBoard events would be mixed into this run's (duplicate, out-of-order steps)."""
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    for f in (run_dir / "tb").glob("events.out.tfevents.*"):
        f.unlink()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Every readable line of run/metrics.jsonl (a line a kill cut short is skipped)."""
    p = Path(run_dir) / "metrics.jsonl"
    return [row for _, row in _read_jsonl(p)[0]] if p.exists() else []


# ----------------------------------------------------------------------------- the loop


def resolve_preset(cls: type[Model], preset: str | None) -> dict[str, Any]:
    if preset is None:
        return {}
    if preset not in cls.presets:
        raise DreamlabError(f"unknown preset {preset!r} for {cls.name}; "
                            f"choose one of {', '.join(sorted(cls.presets)) or '(none)'}")
    return dict(cls.presets[preset])


def _check_out_dir(run_dir: Path) -> None:
    """A run folder that cannot be one: a one-line error before anything is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DreamlabError(f"--out {run_dir} is a file, not a folder; choose a folder for the run (it is created)")
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DreamlabError(f"--out {run_dir}: {probe} is a file, so no folder can be made under it; "
                            "choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DreamlabError(f"--out {run_dir} is not writable (no permission to write in {probe}); "
                            "choose another --out")


def train(model: Model, tc: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `model` for `tc.steps` steps into `run_dir`; returns the final metrics (eval included).

    With `resume=True` an existing `run_dir/checkpoint` is loaded and training continues exactly where it
    stopped (same batches, same random numbers), up to `tc.steps` (which may have been raised). Under torchrun the
    processes train together (see the module docstring); ranks other than 0 return {"status", "step"} only.
    """
    run_dir = Path(run_dir)
    keep_freed_memory()  # no page faults for every step's tensors (dreamlab.runtime)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    d, device = _setup_distributed(tc)
    try:
        return _train(model, tc, run_dir, d, device, resume=resume, progress=progress, extra_config=extra_config)
    finally:
        d.close()


def _train(model: Model, tc: TrainConfig, run_dir: Path, d: _Dist, device: torch.device, *, resume: bool,
           progress: bool, extra_config: dict[str, Any] | None) -> dict[str, Any]:
    # ---- checks that read only, the same on every rank (so every rank fails alike, before any collective)
    _check_out_dir(run_dir)
    ckpt = find_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise DreamlabError(f"{run_dir} already holds a checkpoint; pass --resume to continue it, "
                            "or choose another --out")
    if resume and ckpt is None:
        raise DreamlabError(f"--resume given but {run_dir / 'checkpoint'} does not exist; start without --resume")
    if tc.batch_size % d.world:
        raise DreamlabError(f"batch_size={tc.batch_size} is not divisible by the {d.world} processes: each takes an "
                            f"equal share of the global batch; use a multiple of {d.world}")
    t_run = time.perf_counter()
    cfg_json = {"name": model.name, "config": to_dict(model.config), "train": to_dict(tc), **(extra_config or {})}
    if resume:
        old = read_config_json(run_dir / "config.json", run=True)
        was = from_dict(type(model.config), old["config"], what=str(run_dir / "config.json"))
        if old["name"] != model.name or to_dict(was) != cfg_json["config"]:
            raise DreamlabError(f"{run_dir} was trained with a different model or model config; "
                                "resume with the same settings")
        done = int(load_json(ckpt / "state.json")["step"])  # find_checkpoint read it: an int
        if done > tc.steps:  # before config.json is rewritten: the run stays as it was
            raise DreamlabError(f"steps={tc.steps} is below the checkpoint's step {done} in {run_dir}; "
                                f"set steps to {done} or more to continue")
    d.barrier()
    # ---- rank 0 prepares the folder
    created = None  # the outermost folder this call creates: removed again if the data cannot load
    if d.main:
        created = next((p for p in [*reversed(run_dir.parents), run_dir] if not p.exists()), None)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DreamlabError(f"--out {run_dir} cannot be created ({e.strerror}); choose another --out") from None
        if resume:
            recover_checkpoint(run_dir)
        else:
            _reset_logs(run_dir)
        save_json(run_dir / "config.json", cfg_json)
    d.barrier()

    _seed_all(_rank_seed(tc.seed, d.rank))
    model.to(device).train()
    opts = model.configure_optimizers(tc)
    step = 0
    state: dict[str, Any] = {}
    if resume:
        fresh_lrs = [[g["lr"] for g in opt.param_groups] for opt in opts]
        state = load_checkpoint(run_dir, model, opts, rank=d.rank)
        step = int(state["step"])
        if old["train"].get("lr") != tc.lr:  # `--resume --set lr=...` (the NaN hint's fix): the checkpoint's
            for opt, lrs in zip(opts, fresh_lrs):  # optimiser state keeps its moments, takes the new rates
                for g, lr in zip(opt.param_groups, lrs):
                    g["lr"] = lr
        if step > tc.steps:
            raise DreamlabError(f"steps={tc.steps} is below the checkpoint's step {step} in {run_dir}; "
                                f"set steps to {step} or more to continue")
        if not state["rng_restored"]:  # a rank the checkpoint's run did not have: its own stream from here on
            _seed_all(_rank_seed(tc.seed, d.rank, step))
    logger = MetricLogger(run_dir, purge_step=step if resume else None, enabled=d.main)
    if resume and d.main:
        logger.truncate_after(step, state.get("metrics_lines"))

    try:
        data = model.train_data("train")
    except BaseException:
        if created is not None:  # e.g. a missing data package: leave no run folder behind for a run that never started
            logger.close()
            shutil.rmtree(created, ignore_errors=True)
        raise
    batches = iterate_train(data, tc.batch_size, tc.seed, step, device, tc.num_workers, rank=d.rank, world=d.world)

    ddp, hooks = None, []
    if d.world > 1:
        for t in [*model.parameters(), *model.buffers()]:  # every rank starts from rank 0's weights
            torch.distributed.broadcast(t.data, src=0)
        if type(model).train_step is Model.train_step:
            from torch.nn.parallel import DistributedDataParallel

            # static_graph: `loss` builds the same graph every step (models whose step changes override train_step and
            # take the hook path below); DDP then learns on the first step which parameters the loss leaves out (a
            # head used only for sampling) instead of waiting for their gradients or searching the graph every step
            ddp = DistributedDataParallel(_LossOf(model), device_ids=[device.index] if device.type == "cuda" else None,
                                          static_graph=True)
        else:
            hooks = [opt.register_step_pre_hook(_average_grads_before_step(d.world)) for opt in opts]

    interrupted = {"flag": False}

    def _on_sigint(signum: int, frame: Any) -> None:
        interrupted["flag"] = True

    prev_handler = signal.signal(signal.SIGINT, _on_sigint) if _is_main_thread() else None
    stop_flag: dict[str, Any] = {"pending": None, "t": None}

    def stop_requested() -> bool:
        """Ctrl-C on any rank stops every rank at the same step: each step starts an all-reduce of the flags and reads
        the one started a step earlier (no wait in the step's critical path)."""
        if d.world == 1:
            return interrupted["flag"]
        stop = False
        if stop_flag["pending"] is not None:
            stop_flag["pending"].wait()
            stop = bool(stop_flag["t"].item())
        stop_flag["t"] = torch.tensor([int(interrupted["flag"])])
        stop_flag["pending"] = torch.distributed.all_reduce(stop_flag["t"], op=torch.distributed.ReduceOp.MAX,
                                                            group=d.ctrl, async_op=True)
        return stop

    acc: dict[str, Any] = {}  # metric sums since the last log line (device tensors: no host sync per step)
    nacc = 0

    def window_mean() -> dict[str, float]:
        """The window's mean metrics over every rank (one host sync); a NaN/inf stops training before anything is
        saved."""
        keys = sorted(acc)
        if d.world > 1:
            vals = [acc[k] if torch.is_tensor(acc[k]) else torch.tensor(float(acc[k])) for k in keys]
            sums = torch.stack([v.float().to(device) for v in vals] + [torch.tensor(float(nacc), device=device)])
            torch.distributed.all_reduce(sums)
            sums = sums.tolist()
            avg = {k: v / max(sums[-1], 1) for k, v in zip(keys, sums[:-1])}
        else:
            avg = {k: float(acc[k]) / max(nacc, 1) for k in acc}
        bad = [k for k, v in avg.items() if not math.isfinite(v)]
        if bad:
            where = f"at step {step - 1}" if nacc == 1 else f"in steps {step - nacc}..{step - 1}"
            last = find_checkpoint(run_dir)
            fix = "lower the learning rate (--set lr=...) or enable grad_clip (--set grad_clip=1)"
            if last is None:  # diverged before the first checkpoint: nothing to resume from
                raise DreamlabError(f"{bad[0]} became {avg[bad[0]]} {where} of {model.name}, before the first "
                                    f"checkpoint (none saved in {run_dir}): {fix} and train again without --resume")
            raise DreamlabError(f"{bad[0]} became {avg[bad[0]]} {where} of {model.name}; the last good checkpoint is "
                                f"in {last}: {fix} and --resume")
        return avg

    def checkpoint() -> None:
        rank_rng = _gather_rng(d)[1:] if d.world > 1 else None
        if d.main:
            save_checkpoint(run_dir, model, opts, step, {"metrics_lines": logger.lines, "world_size": d.world},
                            rank_rng=rank_rng)

    t0 = time.perf_counter()
    bar = tqdm(total=tc.steps, initial=step, desc=f"train {model.name}", unit="step", disable=not (progress and d.main),
               dynamic_ncols=True)
    status = "finished"
    try:
        while step < tc.steps:
            if stop_requested():
                window_mean()  # never checkpoint weights that a NaN step has reached
                status = "interrupted"
                break
            batch = next(batches)
            metrics = _ddp_train_step(ddp, model, batch, opts, tc) if ddp is not None else \
                model.train_step(batch, opts, step, tc)
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
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps and d.main:
                logger.log(step, model.evaluate("val", max_items=tc.eval_items or None))
                model.train()
            if step % tc.ckpt_every == 0 and step < tc.steps:
                checkpoint()
            bar.update(1)
    finally:
        bar.close()
        if prev_handler is not None:
            signal.signal(signal.SIGINT, prev_handler)
        if stop_flag["pending"] is not None:
            stop_flag["pending"].wait()
    checkpoint()
    for h in hooks:
        h.remove()
    del ddp
    result: dict[str, Any] = {"status": status, "step": step}
    if not d.main:
        return result
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
    """run/report.md: what was trained (`meta`: the run's config.json), its held-out metrics, every picture, how to
    use it."""
    run_dir = Path(run_dir)
    tc = meta.get("train", {})
    doc = (type(model).__doc__ or "").strip().splitlines()
    lines = [f"# `{model.name}` run `{run_dir.name}`", "", *(doc[:1] + [""] if doc else [])]
    bits = [f"preset **{meta.get('preset') or 'custom'}**",
            f"{result.get('step')} steps of batch {tc.get('batch_size')}"]
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
            lines += ["`fid_fmnist`: Fréchet distance between samples and test images on the features of dreamlab's "
                      "own Fashion-MNIST CNN (lower is better; not Inception FID). Losses and likelihoods are in "
                      "nats.", ""]
    pics = sorted(p.name for p in run_dir.glob("*.png"))
    if pics:
        lines += ["## Pictures", ""]
        for n in pics:
            lines += [f"**{n[:-4].replace('_', ' ')}**", "", f"![{n}]({n})", ""]
    pages = sorted(p.name for p in run_dir.glob("*.md") if p.name != "report.md")
    if pages:  # text the model wrote (e.g. a language model's samples.md)
        lines += ["## Pages", "", *[f"- [{n}]({n})" for n in pages], ""]
    lines += ["## Use it", "", "```bash"]
    if getattr(model, "kind", "") == "generator":
        formats = getattr(model, "sample_formats", (".png",))
        # image grids, the model's own format (e.g. text as .md), or raw tensors (e.g. latent sequences)
        ext = ("png" if (run_dir / "samples.png").exists() else formats[0][1:] if ".png" not in formats
               else "safetensors")
        lines.append(f"dreamlab sample {run_dir} -n 64 --out {run_dir}/more_samples.{ext}")
    lines += [f"dreamlab eval {run_dir}",
              f"dreamlab train {model.name} --out {run_dir} --resume --set steps={int(result.get('step') or 0) * 2}"
              "   # train on",
              "```", "", "```python", "from generators.trainer import load_run",
              f"model = load_run({str(run_dir)!r})   "
              f"# or {type(model).__name__}.from_pretrained({str(run_dir / 'model')!r})", "```", ""]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


#: trainer settings that `--resume` may change: how long, where and how fast it runs and how often it reports. The
#: others (batch, learning rate, seed, ...) would make the continuation a different run than the one checkpointed.
#: `lr` and `grad_clip` may change too: they are the fix the NaN error suggests for a run that diverged.
RESUME_MAY_CHANGE = ("steps", "device", "threads", "num_workers", "log_every", "ckpt_every", "eval_every", "eval_items",
                     "lr", "grad_clip")


def train_from_name(name: str, *, preset: str | None = "quick", overrides: dict[str, Any] | None = None,
                    out: str | Path | None = None, resume: bool = False,
                    progress: bool = True) -> tuple[Model, dict[str, Any], Path]:
    """Build a registered model from preset + overrides and train it; what `dreamlab train` calls.

    With `resume`, the settings are the run's own (its config.json); `preset=None` means "the run's preset", and a
    preset or override that contradicts the run is an error naming both values (only `RESUME_MAY_CHANGE` may differ,
    e.g. more `steps` to train on)."""
    cls = get_model_class(name)
    run_dir = Path(out) if out else Path("runs") / f"{name}-{preset or 'custom'}"
    if resume:
        model, tc, preset = _resumed_settings(cls, run_dir, preset, dict(overrides or {}))
    else:
        mo, to = split_overrides(cls, {**resolve_preset(cls, preset), **(overrides or {})})
        tc = apply_overrides(TrainConfig(), to, what="trainer config")
        cfg = apply_overrides(cls.config_class(), mo, what=f"{name} config")
        check_model_size(cls, cfg, copies=4, device=resolve_device(tc.device))
        with seeded(tc.seed):  # initial weights from the seed alone, whatever ran before in this process
            model = cls(cfg)
    res = train(model, tc, run_dir, resume=resume, progress=progress, extra_config={"preset": preset})
    return model, res, run_dir


def _resumed_settings(cls: type[Model], run_dir: Path, preset: str | None,
                      overrides: dict[str, Any]) -> tuple[Model, TrainConfig, str | None]:
    path = run_dir / "config.json"
    if not path.exists():
        raise DreamlabError(f"--resume given but {run_dir} holds no run (no config.json); start without --resume")
    old = read_config_json(path, run=True)
    if old["name"] != cls.name:
        raise DreamlabError(f"{run_dir} holds a {old['name']!r} run, not {cls.name!r}; continue it with: "
                            f"dreamlab train {old['name']} --out {run_dir} --resume")
    if preset is not None and preset != old.get("preset"):
        raise DreamlabError(f"--preset {preset} conflicts with the run's preset {old.get('preset') or 'custom'} "
                            f"({path}); --resume continues a run with its own settings: drop --preset")
    mcfg = from_dict(cls.config_class, old["config"], what=str(path))
    tcfg = from_dict(TrainConfig, old["train"], what=str(path))
    mo, to = split_overrides(cls, overrides)
    new_m = apply_overrides(mcfg, mo, what=f"{cls.name} config")
    new_t = apply_overrides(tcfg, to, what="trainer config")
    for key, before, after in [*((k, getattr(mcfg, k), getattr(new_m, k)) for k in mo),
                               *((k, getattr(tcfg, k), getattr(new_t, k)) for k in to if k not in RESUME_MAY_CHANGE)]:
        if before != after:
            raise DreamlabError(f"--set {key}={overrides[key]} conflicts with the run's {key}={_shown(before)} "
                                f"({path}); --resume continues a run with its own settings: drop the flag, or start "
                                "a new run with another --out")
    check_model_size(cls, mcfg, copies=4, device=resolve_device(new_t.device))
    with seeded(new_t.seed):
        model = cls(mcfg)
    return model, new_t, old.get("preset")


def _shown(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def load_run(run_dir: str | Path, device: str = "auto") -> Model:
    """Load the final model of a run folder (or its last checkpoint if training was interrupted)."""
    run_dir = Path(run_dir)
    if (run_dir / "model" / "config.json").exists():
        return Model.from_pretrained(run_dir / "model", device=device)
    ckpt = find_checkpoint(run_dir)
    if ckpt is not None and (run_dir / "config.json").exists():
        path = run_dir / "config.json"
        meta = read_config_json(path)
        cls = get_model_class(meta["name"])
        cfg = from_dict(cls.config_class, meta["config"], what=str(path))
        check_model_size(cls, cfg)
        m = cls(cfg)
        load_weights(m, load_tensors(ckpt / "model.safetensors"), ckpt / "model.safetensors")
        return m.to(resolve_device(device)).eval()
    if (run_dir / "config.json").exists() and (run_dir / "model.safetensors").exists():
        return Model.from_pretrained(run_dir, device=device)
    raise DreamlabError(f"{run_dir} is not a run folder (no model/ or checkpoint/); "
                        f"train one with: dreamlab train NAME --out {run_dir}")
