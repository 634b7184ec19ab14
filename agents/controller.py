"""C: the World Models linear controller a = tanh(W [z, h] + b) (867 parameters at the paper's sizes).

The parameter layout and action mapping live in `worlds.policies` (the dream and the collector need them);
this module is the agent-facing object: build, act, save/load as safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worlds.policies import act, load_controller, num_params, save_controller


@dataclass
class LinearController:
    theta: torch.Tensor
    z_dim: int = 32
    hidden: int = 256

    @classmethod
    def zeros(cls, z_dim: int = 32, hidden: int = 256) -> LinearController:
        return cls(torch.zeros(num_params(z_dim, hidden)), z_dim, hidden)

    @classmethod
    def random(cls, z_dim: int = 32, hidden: int = 256, std: float = 0.1, seed: int = 0) -> LinearController:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(num_params(z_dim, hidden), generator=g) * std, z_dim, hidden)

    @property
    def num_parameters(self) -> int:
        return int(self.theta.numel())

    def act(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return act(self.theta.to(z.device), z, h)

    def save(self, path: str | Path, **meta: str) -> Path:
        return save_controller(path, self.theta, self.z_dim, self.hidden, **meta)

    @classmethod
    def load(cls, path: str | Path) -> LinearController:
        theta, z, h = load_controller(path)
        return cls(theta, z, h)

    def numpy(self) -> np.ndarray:
        return self.theta.detach().cpu().numpy().astype(np.float64)
