"""The World Models controller's parameter layout and action mapping, shared by the collector, the dream
and the agents layer (which owns training it).

C is a single linear layer on [z, h]: raw = [z, h] @ W + b, W of shape (Z + H, A), flattened as
`theta = concat(W.flatten(), b)`: A·(Z+H) + A parameters (867 for Z=32, H=256, A=3).
Actions follow the paper: steer = tanh(raw0), gas = (tanh(raw1) + 1) / 2, brake = clip(tanh(raw2), 0, 1).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dreamlab.errors import DreamlabError

ACTION_DIM = 3
ACTION_LOW = (-1.0, 0.0, 0.0)  # CarRacing's action box, which `map_action` maps into: steer, gas, brake
ACTION_HIGH = (1.0, 1.0, 1.0)


def num_params(z_dim: int, hidden: int, action_dim: int = ACTION_DIM) -> int:
    return action_dim * (z_dim + hidden) + action_dim


def unflatten(
    theta: torch.Tensor, z_dim: int, hidden: int, action_dim: int = ACTION_DIM
) -> tuple[torch.Tensor, torch.Tensor]:
    """theta (..., P) -> W (..., Z+H, A), b (..., A)."""
    n = num_params(z_dim, hidden, action_dim)
    if theta.shape[-1] != n:
        raise DreamlabError(
            f"controller has {theta.shape[-1]} parameters, but z_dim={z_dim}, hidden={hidden} needs {n}"
        )
    k = action_dim * (z_dim + hidden)
    w = theta[..., :k].reshape(*theta.shape[:-1], z_dim + hidden, action_dim)
    return w, theta[..., k:]


def map_action(raw: torch.Tensor) -> torch.Tensor:
    """Raw controller output (..., 3) -> CarRacing action: steer in [-1, 1], gas in [0, 1], brake in [0, 1]."""
    t = torch.tanh(raw)
    return torch.stack([t[..., 0], (t[..., 1] + 1.0) * 0.5, t[..., 2].clamp(0.0, 1.0)], -1)


def act(theta: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Actions (B, A) for one controller theta (P,) and features z (B, Z), h (B, H)."""
    w, b = unflatten(theta, z.shape[-1], h.shape[-1])
    return map_action(torch.cat([z, h], -1) @ w + b)


def save_controller(path: str | Path, theta: np.ndarray | torch.Tensor, z_dim: int, hidden: int, **meta: str) -> Path:
    from dreamlab.io import save_tensors

    t = torch.as_tensor(np.asarray(theta, dtype=np.float32))
    return save_tensors(
        path,
        {"theta": t},
        metadata={"z_dim": str(z_dim), "hidden": str(hidden), **{k: str(v) for k, v in meta.items()}},
    )


def retrain_hint(path: str | Path) -> str:
    """What replaces a bad controller file: RUN/controller/* come from a search that a resume would not redo (it only
    rewrites them when it finds better), so the search starts again in an emptied folder."""
    folder = Path(path).parent
    folder = folder.parent if folder.name == "checks" else folder
    if folder.name == "controller":
        return f"delete {folder} and train it again: dreamlab worldmodel train-controller {folder.parent}"
    return "train the controller again: dreamlab worldmodel train-controller RUN"


def controller_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a controller file (z_dim, hidden, generation, mdn, ...)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DreamlabError(f"controller file {path} does not exist; {retrain_hint(path)}")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors (and OSError) for a damaged file
        raise DreamlabError(f"controller file {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                            f"{retrain_hint(path)}") from e


def load_controller(path: str | Path) -> tuple[torch.Tensor, int, int]:
    """Returns (theta, z_dim, hidden) from a controller safetensors file; a bad one is an error naming it."""
    from dreamlab.io import load_tensors

    path = Path(path)
    md = controller_metadata(path)
    t = load_tensors(path)
    fix = retrain_hint(path)
    if "theta" not in t:
        raise DreamlabError(f"{path} holds no 'theta' tensor; it is not a dreamlab controller: {fix}")
    try:
        z_dim, hidden = int(md["z_dim"]), int(md["hidden"])
    except (KeyError, ValueError) as e:
        raise DreamlabError(f"{path} lacks z_dim/hidden metadata; {fix}") from e
    theta = t["theta"].float()
    if theta.ndim != 1:
        raise DreamlabError(f"{path} holds theta of shape {tuple(theta.shape)}, expected a vector; {fix}")
    if not torch.isfinite(theta).all():
        raise DreamlabError(f"{path} contains NaN/inf parameters; {fix}")
    try:
        unflatten(theta, z_dim, hidden)  # validates the size
    except DreamlabError as e:
        raise DreamlabError(f"{path}: {e}; {fix}") from e
    return theta, z_dim, hidden


def controller_mdn(path: str | Path) -> Path | None:
    """The M snapshot a controller was trained with (metadata `mdn`, a folder beside the file), if it has one.

    A controller reads M's hidden state h, so it is only meaningful with the M it was trained in; after
    iterative training replaced RUN/mdn, a controller kept from an earlier round must still run with its own M.
    """
    path = Path(path)
    rel = controller_metadata(path).get("mdn", "")
    if not rel:
        return None
    d = Path(os.path.normpath(path.parent / rel))  # checks/gen_*.safetensors name ../mdn_<hash>
    if not (d / "model.safetensors").exists():
        raise DreamlabError(
            f"{path} was trained with the M in {d}, which is missing; restore it or retrain the controller"
        )
    return d
