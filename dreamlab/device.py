"""Device selection, bf16 autocast and seeding, shared by every trainer and sampler."""
from __future__ import annotations

import contextlib

import torch

from dreamlab.errors import DreamlabError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA when present, else CPU. Any explicit torch device string is validated."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DreamlabError(f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DreamlabError(f"device={device!r} asked for CUDA but none is available; use device='auto' or 'cpu'")
    return dev


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaler needed for bf16); a no-op on CPU, where fp32 is faster."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def randn(
    shape: tuple[int, ...], *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise on `device`, drawn on the generator's own device: a seeded CPU generator works
    for a CUDA model (torch refuses a generator of another device) and gives the same numbers on CPU and CUDA."""
    return _draw(torch.randn, shape, generator, device)


def rand(
    shape: tuple[int, ...], *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform [0, 1) noise on `device`, drawn on the generator's own device (see `randn`)."""
    return _draw(torch.rand, shape, generator, device)


def _draw(fn, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    return fn(shape, generator=generator, device=generator.device if generator is not None else device).to(device)


@contextlib.contextmanager
def seeded(seed: int):
    """Build a model under `seed` without touching the caller's RNG: its initial weights depend on the seed alone,
    not on whatever drew random numbers earlier in the process (a second model, a data split, a previous stage)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
