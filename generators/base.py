"""The common interface of every model in dreamlab, and the registry.

A model is an `nn.Module` with a typed config dataclass. Generators add `sample` (and `log_prob` where
it is exact or a bound). Everything is trained by the one shared trainer in `generators.trainer`:

    loss(batch) -> (scalar loss, {metric: float})          # likelihood / reconstruction models
    train_step(batch, optimizers, step) -> {metric: float or 0-d tensor}  # override for adversarial models
    train_data(split) -> dict of tensors or a torch Dataset # what the trainer iterates over
    sample(n, *, generator=None, **condition) -> Tensor     # images: float32 (n, C, H, W) in [0, 1]
    save_pretrained(dir) / from_pretrained(dir, device=)    # config.json + model.safetensors, no pickle
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from dreamlab.config import apply_overrides, check_ranges, from_dict, to_dict
from dreamlab.data import load_dataset
from dreamlab.device import autocast, resolve_device
from dreamlab.errors import DreamlabError
from dreamlab.io import load_json, load_tensors, replace_dir, save_json, save_tensors

Batch = Mapping[str, torch.Tensor]
#: training metrics: floats or 0-d device tensors (kept on the device so a step needs no host sync)
Metrics = dict[str, float | torch.Tensor]


@dataclasses.dataclass
class TrainConfig:
    """Settings of the shared trainer (every field can be set with `--set key=value`)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    grad_clip: float = 0.0          # 0 = off
    device: str = "auto"
    amp: bool = True                # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    eval_every: int = 0             # 0 = only at the end
    eval_items: int = 0             # held-out items used by evaluations (0 = the whole split)
    num_workers: int = 0            # DataLoader workers for Dataset-backed models
    threads: int = 0                # torch CPU threads, 0 = torch's default

    def __post_init__(self) -> None:
        # a bad --set fails here, before any data loads (a negative lr or a zero batch used to end in a traceback)
        check_ranges(self)  # NaN/inf in any float setting (lr=inf trained to NaN; nan passed every `< 0` check)
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise DreamlabError(f"{name}={getattr(self, name)} must be at least 1")
        for name, why in (("eval_every", "0 = only at the end"), ("eval_items", "0 = the whole split"),
                          ("num_workers", "0 = load in this process"), ("threads", "0 = torch's default"),
                          ("grad_clip", "0 = off"), ("weight_decay", "0 = none"),
                          ("seed", "numpy seeds are non-negative")):
            if getattr(self, name) < 0:
                raise DreamlabError(f"{name}={getattr(self, name)} must be >= 0 ({why})")
        for name in ("lr", "grad_clip", "weight_decay"):  # nan passes every comparison, inf every lower bound
            if not math.isfinite(getattr(self, name)):
                raise DreamlabError(f"{name}={getattr(self, name)} must be a finite number, e.g. --set {name}="
                                    f"{getattr(TrainConfig, name)}")
        if not self.lr > 0:
            raise DreamlabError(f"lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise DreamlabError(f"betas={tuple(self.betas)} must be two numbers in [0, 1), e.g. --set betas=0.9,0.999")


class Model(nn.Module):
    """Base of every registered model (generators and the ch2 classifiers)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    kind: ClassVar[str] = "model"
    #: preset name -> overrides; keys are fields of the model config or of TrainConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # ---- training -------------------------------------------------------------------------
    def train_data(self, split: str) -> Any:
        """Data for `split`: a dict of tensors (batched in memory by the trainer) or a torch Dataset."""
        return load_dataset(self.config.dataset, split)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch) or train_step(...)")

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(self.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)]

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        """One optimisation step; adversarial models override this and own their optimiser steps."""
        (opt,) = optimizers
        with autocast(self.device, tc.amp):
            loss, metrics = self.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.parameters(), tc.grad_clip).detach()
        opt.step()
        # values may stay 0-d device tensors: the trainer reads them once per logged window, not per step
        return {"loss": loss.detach(), **metrics}

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """Held-out metrics; default: mean loss over the split."""
        was = self.training
        self.eval()
        tot: dict[str, float] = {}
        n = 0
        for batch in iterate_eval(self, split, max_items=max_items):
            loss, m = self.loss(batch)
            b = len(next(iter(batch.values())))
            for k, v in {"loss": loss, **m}.items():
                tot[k] = tot.get(k, 0.0) + float(v) * b
            n += b
        self.train(was)
        return {f"{split}_{k}": v / max(n, 1) for k, v in tot.items()}

    def on_step_end(self, step: int, tc: TrainConfig, run_dir: Path) -> None:
        """Hook called by the trainer after every step (e.g. a progress frame every k steps), on the main process
        only. It must not draw from the global random state (use its own `torch.Generator`) or change the model, so
        a resumed run still repeats an uninterrupted one."""

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        """Pictures for a person (grids, plots); called at the end of training. Returns the files written."""
        return []

    # ---- persistence ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    #: extra safetensors metadata of `model.safetensors` (e.g. a format tag other libraries look for)
    weights_metadata: ClassVar[dict[str, str]] = {}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` (+ `save_extra` files) into `directory`, atomically:
        the folder is built beside it and swapped in whole, so a crash never leaves a half-written model."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():  # left over from a crashed save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_json(tmp / "config.json", {"name": self.name, "config": to_dict(self.config)})
        save_tensors(tmp / "model.safetensors", self.state_dict(),
                     metadata={"name": self.name, **self.weights_metadata})
        self.save_extra(tmp)
        replace_dir(tmp, directory)
        return directory

    def save_extra(self, directory: Path) -> None:
        """Hook: write other libraries' files (open_clip's, diffusers') beside dreamlab's in a model folder."""

    def load_extra(self, directory: Path) -> None:
        """Hook: read back what `save_extra` wrote (e.g. a text model's tokenizer), before the weights load."""

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "auto") -> Model:
        directory = Path(directory)
        meta = read_config_json(directory / "config.json")
        name = meta["name"]
        target = get_model_class(name) if cls in (Model, Generator) else cls
        if target.name != name:
            raise DreamlabError(f"{directory} holds a {name!r} model, not {target.name!r}")
        cfg = from_dict(target.config_class, meta["config"], what=f"{directory / 'config.json'}")
        check_model_size(target, cfg)
        model = target(cfg)
        model.load_extra(directory)
        load_weights(model, load_tensors(directory / "model.safetensors"), directory / "model.safetensors")
        return model.to(resolve_device(device)).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Generator(Model):
    kind: ClassVar[str] = "generator"
    #: "exact" (flows, autoregressive), "bound" (VAE ELBO) or None (GANs, EBMs, ...)
    log_prob_kind: ClassVar[Literal["exact", "bound"] | None] = None
    #: keyword arguments `sample` needs (e.g. {"prompt": "..."}); used by docs, the CLI and the contract test
    example_condition: ClassVar[dict[str, Any]] = {}
    #: range every sample lies in (images: [0, 1]); None for unbounded outputs such as latent sequences
    sample_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    #: dtype of what `sample` returns: float32 values, or integer token ids (language models: torch.long)
    sample_dtype: ClassVar[torch.dtype] = torch.float32

    def sample(self, n: int, *, generator: torch.Generator | None = None, **condition: Any) -> torch.Tensor:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every model's own `sample` checks n first: sample(-1) or sample(2.5) is a one-line error, not a traceback
        # from deep inside torch (one check here instead of one per model file)
        super().__init_subclass__(**kwargs)
        if "sample" in cls.__dict__:
            cls.sample = _checked_sample(cls.__dict__["sample"])

    #: file suffixes `save_samples` writes (`dreamlab sample --out`); a model with other outputs (MIDI, text) adds
    #: its own
    sample_formats: ClassVar[tuple[str, ...]] = (".png", ".safetensors")

    def save_samples(self, samples: torch.Tensor, path: str | Path) -> list[Path]:
        """Write what `sample` returned to `path`: an image grid (.png) or the raw tensor (.safetensors). Models whose
        samples are not images override this (and `sample_formats`), e.g. music as .mid + .wav + .png."""
        from dreamlab.images import save_grid

        path = Path(path)
        if path.suffix == ".safetensors":
            return [save_tensors(path, {"samples": samples})]
        if path.suffix != ".png" or samples.ndim != 4 or samples.shape[1] not in (1, 3):
            raise DreamlabError(f"{self.name} samples have shape {tuple(samples.shape)}, not images; "
                                f"write them to a .safetensors file instead of {path}")
        return [save_grid(samples, path)]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-item log-likelihood in nats (exact, or a lower bound: see `log_prob_kind`)."""
        raise NotImplementedError(f"{self.name} offers no log_prob (it has no tractable likelihood or bound)")


def _checked_sample(fn: Any) -> Any:
    if getattr(fn, "_checks_n", False):
        return fn

    @functools.wraps(fn)
    def sample(self: Generator, n: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            k = operator.index(n) if not isinstance(n, bool) else None
        except TypeError:
            k = None
        if k is None or k < 1:
            raise DreamlabError(f"{self.name}.sample(n={n!r}): n is the number of samples, a whole number >= 1")
        return fn(self, n, *args, **kwargs)

    sample._checks_n = True  # type: ignore[attr-defined]
    return sample


# ----------------------------------------------------------------------------- loading and sizing models


def read_config_json(path: Path, *, run: bool = False) -> dict[str, Any]:
    """A model's (or, with `run`, a run folder's) config.json, checked for the structure dreamlab writes: an object
    with "name" and "config" (and "train" for a run). Anything else is a one-line error naming the file."""
    meta = load_json(path)
    keys = ("name", "config", "train") if run else ("name", "config")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or \
            not all(isinstance(meta.get(k), dict) for k in keys[1:]):
        found = type(meta).__name__ if not isinstance(meta, dict) else "keys " + ", ".join(map(str, meta))
        raise DreamlabError(f"{path} is not a dreamlab config.json (expected an object with {', '.join(keys)}; "
                            f"found {found or 'nothing'}); restore it from the run or retrain")
    return meta


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model`, every tensor with its shape, or a one-line error naming `source` and the first
    mismatch (a config.json edited after training, or weights of another model)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches: torch lists them one per line
        first = next((ln.strip() for ln in str(e).splitlines() if "mismatch" in ln), str(e).splitlines()[0])
        raise DreamlabError(f"{source} does not match the model its config.json describes: {first}") from None
    if missing or unexpected:
        raise DreamlabError(f"{source} does not match the model its config.json describes "
                            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free for new tensors on `device`: MemAvailable of /proc/meminfo (or physical memory) for the CPU,
    the free memory of a CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_model_size(cls: type[Model], cfg: Any, *, copies: int = 1, device: str | torch.device = "cpu") -> None:
    """Refuse, before allocating anything, a model whose weights (times `copies`: 4 when training with AdamW:
    weights, gradients and two moments) exceed the memory free on `device`: `--set z_dim=1e8` is a one-line error
    naming the setting instead of minutes of swapping and an out-of-memory kill. The model is built on torch's meta
    device (shapes, no storage); a model whose constructor cannot run there (it reads files, computes values) is
    not checked."""
    try:
        # a constructor that loads trained parts (the latent model's autoencoder) copies them into shape-only
        # parameters here, which torch warns about once per tensor: expected for a probe, so not shown
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meta parameter.*")
            probe = cls(cfg)
        count = sum(p.numel() for p in probe.parameters())
        need = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    except Exception:  # noqa: BLE001 - see the docstring: the check is skipped, the real constructor still runs
        return
    free = available_memory(device)
    if need * copies <= free:
        return
    defaults = to_dict(type(cfg)()) if dataclasses.is_dataclass(cfg) else {}
    changed = [f"{k}={v}" for k, v in to_dict(cfg).items() if defaults.get(k) != v] if defaults else []
    what = "weights" if copies == 1 else "weights, gradients and optimiser state"
    raise DreamlabError(
        f"{cls.name} with {', '.join(changed) or 'its default sizes'} has {count:,} parameters: its {what} "
        f"need {_gib(need * copies)} but {_gib(free)} is free on {torch.device(device).type}; lower those sizes")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


# ----------------------------------------------------------------------------- held-out batches


def batch_count(data: Any) -> int:
    return len(next(iter(data.values()))) if isinstance(data, dict) else len(data)


def to_device(b: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch (dict, tuple or tensor) as a dict of tensors on `device`."""
    if isinstance(b, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
    if isinstance(b, (list, tuple)):
        keys = ("x", "y", "c", "d")
        return {keys[i]: v.to(device) for i, v in enumerate(b)}
    return {"x": b.to(device)}


def iterate_eval(model: Model, split: str, batch_size: int = 500,
                 max_items: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The items of `split` in order, in batches on the model's device (at most `max_items` of them)."""
    data = model.train_data(split)
    dev = model.device
    if isinstance(data, dict):
        n = batch_count(data)
        n = min(n, max_items or n)
        for i in range(0, n, batch_size):
            yield {k: v[i:min(i + batch_size, n)].to(dev) for k, v in data.items()}  # at most max_items in all
    else:
        seen = 0
        for b in torch.utils.data.DataLoader(data, batch_size=batch_size):
            yield to_device(b, dev)
            seen += batch_size
            if max_items and seen >= max_items:
                break


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Model]] = {}
#: the modules that define models are entry points of this group (pyproject.toml): the registry names no module,
#: so a model can live in any layer above this one (worlds' V and M, multimodal's pipelines) without an upward import
ENTRY_POINT_GROUP = "dreamlab.models"
_OPTIONAL_DEPS = ("diffusers", "open_clip", "transformers", "gymnasium")
_loaded = False


def register(cls: type[Model]) -> type[Model]:
    """Class decorator: make a model available to `make_generator` and the CLI by its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module listed under the entry-point group (once); their `@register` fills the registry."""
    global _loaded
    if _loaded:
        return
    from importlib.metadata import entry_points

    eps = list(entry_points(group=ENTRY_POINT_GROUP))
    if not eps:
        raise DreamlabError("dreamlab is not installed, so no model is registered; install it with: make install "
                            "(or pip install -e .)")
    for ep in eps:
        try:
            ep.load()
        except ModuleNotFoundError as e:
            # an optional layer that is not present (or lacks its optional deps) simply registers nothing
            if not (e.name and (ep.value.startswith(e.name) or e.name.split(".")[0] in _OPTIONAL_DEPS)):
                raise
    _loaded = True


def list_models(kind: str | None = None) -> list[str]:
    _load_all()
    return sorted(n for n, c in _REGISTRY.items() if kind is None or c.kind == kind)


def list_generators() -> list[str]:
    return list_models("generator")


def get_model_class(name: str) -> type[Model]:
    _load_all()
    if name not in _REGISTRY:
        raise DreamlabError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_model(name: str, **overrides: Any) -> Model:
    cls = get_model_class(name)
    cfg = apply_overrides(cls.config_class(), overrides, what=f"{name} config")
    check_model_size(cls, cfg)
    return cls(cfg)


def make_generator(name: str, **overrides: Any) -> Generator:
    model = make_model(name, **overrides)
    if not isinstance(model, Generator):
        raise DreamlabError(f"{name!r} is a {model.kind}, not a generator; generators: {', '.join(list_generators())}")
    return model


def split_overrides(cls: type[Model], overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route `key=value` overrides to the model config or the TrainConfig; unknown keys name both lists."""
    mfields = {f.name for f in dataclasses.fields(cls.config_class)}
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_o, train_o = {}, {}
    for k, v in overrides.items():
        if k in mfields:
            model_o[k] = v
        elif k in tfields:
            train_o[k] = v
        else:
            raise DreamlabError(
                f"unknown key {k!r} for {cls.name}; model keys: {', '.join(sorted(mfields))}; "
                f"trainer keys: {', '.join(sorted(tfields))}"
            )
    return model_o, train_o
