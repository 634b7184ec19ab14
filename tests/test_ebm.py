"""The energy-based model: Langevin dynamics on a known energy, the replay buffer, the OOD evaluation."""
from __future__ import annotations

import pytest
import torch

from dreamlab.errors import DreamlabError
from generators.base import make_generator
from generators.ebm import langevin, to_ebm_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")


MU = torch.tensor([0.5, -1.0])
SIGMA = torch.tensor([0.5, 1.5])


def gaussian_energy(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (((x - MU) / SIGMA) ** 2).sum(1)


def test_true_langevin_reaches_the_mean_and_variance_of_a_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4000, 2, generator=g) * 6 - 3
    x, _ = langevin(gaussian_energy, x0, steps=1500, step_size=0.01, mode="true", bounds=None, generator=g)
    assert torch.allclose(x.mean(0), MU, atol=0.06)
    assert torch.allclose(x.var(0) / SIGMA ** 2, torch.ones(2), atol=0.08)


def test_the_books_heuristic_is_not_a_sampler_of_the_energy() -> None:
    """Its fixed noise (0.005) is far too small for its step: the chains collapse near the mode."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2000, 2, generator=g) * 6 - 3
    x, _ = langevin(gaussian_energy, x0, steps=600, step_size=10.0, mode="book", bounds=None, generator=g)
    assert (x.var(0) / SIGMA ** 2).min() < 0.5


def test_langevin_moves_x_only_and_checks_its_arguments() -> None:
    m = make_generator("ebm", channels=(4, 4, 8, 8), hidden=8, buffer_size=32)
    x0 = torch.rand(3, 1, 32, 32) * 2 - 1
    x, chain = langevin(m.energy, x0, steps=4, step_size=0.01, keep_every=2)
    assert all(p.grad is None for p in m.parameters())
    assert len(chain) == 3 and torch.equal(chain[0], x0) and torch.equal(chain[-1], x)
    assert x.min() >= -1 and x.max() <= 1 and not torch.equal(x, x0)
    with pytest.raises(DreamlabError, match="mode='exact'"):
        langevin(m.energy, x0, 1, 0.1, mode="exact")
    with pytest.raises(DreamlabError, match="step_size=0"):
        make_generator("ebm", step_size=0)


def test_replay_buffer_starts_from_noise_then_reuses_chains_with_five_percent_fresh() -> None:
    torch.manual_seed(0)
    m = make_generator("ebm", channels=(4, 4, 8, 8), hidden=8, buffer_size=1000)
    start, fresh = m._chain_starts(10)
    assert fresh.all() and start.shape == (10, 1, 32, 32)
    m._remember(torch.zeros(1000, 1, 32, 32))
    m._remember(torch.full((300, 1, 32, 32), 0.5))  # wraps around the ring: the 300 oldest are replaced
    assert m.replay_filled == 1000 and m.replay_head == 300
    assert torch.equal(m.replay[:300], torch.full((300, 1, 32, 32), 0.5)) and m.replay[300:].abs().max() == 0
    start, fresh = m._chain_starts(4000)
    assert 0.03 < fresh.float().mean() < 0.07
    reused = start[~fresh]
    assert ((reused == 0) | (reused == 0.5)).all()


def test_images_are_padded_to_32_and_scaled_to_minus_one_one() -> None:
    x = torch.rand(2, 1, 28, 28)
    y = to_ebm_images(x)
    assert y.shape == (2, 1, 32, 32) and y[:, :, :2].eq(-1).all()
    assert torch.allclose(y[:, :, 2:30, 2:30], x * 2 - 1)


def test_evaluate_gives_aurocs_energies_and_a_frechet_distance() -> None:
    torch.manual_seed(0)
    m = make_generator("ebm", channels=(4, 4, 8, 8), hidden=8, buffer_size=32, sample_steps=3)
    res = m.evaluate(max_items=50)
    assert {"auroc_fashion_mnist", "auroc_noise", "energy_mnist", "energy_noise"} <= set(res)
    assert all(0.0 <= res[k] <= 1.0 for k in ("auroc_fashion_mnist", "auroc_noise"))
    assert res["fd_mnist_50"] > 10  # 3 Langevin steps from uniform noise are nothing like digits
