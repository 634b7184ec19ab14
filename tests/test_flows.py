"""Flows: inverses invert, log-determinants match brute-force Jacobians, the true moons density is a density."""
from __future__ import annotations

import math

import pytest
import torch

from dreamlab.errors import DreamlabError
from generators.base import make_generator
from generators.flows import InvConv1x1, moons_log_prob

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _perturbed(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Random weights everywhere: a fresh Glow starts as (nearly) the identity (zero-initialised couplings)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def test_realnvp_inverse_inverts_and_logdet_matches_the_jacobian() -> None:
    torch.manual_seed(0)
    m = _perturbed(make_generator("realnvp", coupling_layers=4, hidden=16, depth=2)).eval()
    x = torch.randn(64, 2) * 1.5
    with torch.no_grad():
        z, logdet = m.forward_flow(x)
        assert (m.inverse(z) - x).abs().max() < 1e-4
    m = m.double()
    for xi in x[:5].double():
        jac = torch.autograd.functional.jacobian(lambda v: m.forward_flow(v[None])[0][0], xi)
        brute = torch.linalg.slogdet(jac)[1]
        assert torch.isclose(m.forward_flow(xi[None])[1][0], brute, atol=1e-8)


def test_glow_inverse_inverts_and_logdet_matches_the_jacobian() -> None:
    """A tiny two-scale Glow on 1x4x4 images: 4x4 -> 4x2x2 (split 2 + 2) -> 8x1x1; the flow maps 16 numbers to 16."""
    torch.manual_seed(0)
    m = make_generator("glow", image_size=4, scales=2, depth=2, hidden=8)
    m.train()
    m.encode(torch.rand(32, 1, 4, 4) - 0.5)  # actnorm's data-dependent initialisation
    m = _perturbed(m, 0.2).eval().double()
    y = torch.rand(6, 1, 4, 4, dtype=torch.float64) - 0.5
    with torch.no_grad():
        zs, logdet, _ = m.encode(y)
        assert [tuple(z.shape[1:]) for z in zs] == [(2, 2, 2), (8, 1, 1)]
        assert (m.decode(zs) - y).abs().max() < 1e-4
    assert all(bool(layer.initialized) for layer in m.modules() if hasattr(layer, "initialized"))

    def flat(v: torch.Tensor) -> torch.Tensor:
        zs, _, _ = m.encode(v.view(1, 1, 4, 4))
        return torch.cat([z.flatten() for z in zs])

    for yi in y[:3]:
        jac = torch.autograd.functional.jacobian(flat, yi.flatten())
        assert jac.shape == (16, 16)
        brute = torch.linalg.slogdet(jac)[1]
        assert torch.isclose(m.encode(yi[None])[1][0], brute, atol=1e-7)


def test_invertible_1x1_conv_is_lu_parametrised() -> None:
    torch.manual_seed(0)
    conv = _perturbed(InvConv1x1(6)).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    y, logdet = conv(x)
    lower, upper = conv._factors()
    w = conv.perm @ lower @ upper
    assert torch.allclose(logdet, torch.linalg.slogdet(w)[1] * 15)
    assert torch.allclose(conv.inverse(y), x, atol=1e-10)


def test_glow_log_prob_is_the_dequantised_density_in_discrete_units() -> None:
    torch.manual_seed(0)
    m = make_generator("glow", image_size=8, scales=2, depth=1, hidden=8).eval()
    x = torch.randint(0, 256, (3, 1, 8, 8))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    lp = m.log_prob(x, generator=g1)
    y = m.dequantise(x, generator=g2)
    assert torch.allclose(lp, m.log_prob_continuous(y) - 64 * math.log(256))
    assert y.min() >= -0.5 and y.max() < 0.5
    with pytest.raises(DreamlabError, match="byte values 0..255"):
        m.log_prob(torch.full((1, 1, 8, 8), 300))
    with pytest.raises(DreamlabError, match="needs sides divisible by 8"):
        make_generator("glow", image_size=28, scales=3)


def test_true_moons_density_integrates_to_one_and_matches_the_known_nll() -> None:
    """The reference the flow is measured against: a density (integrates to 1 over the plane), about 0.29 nats per
    point in make_moons' raw coordinates, and 0.29 - sum(log std) in the standardised ones the dataset uses."""
    from sklearn.datasets import make_moons

    from dreamlab.data import load_dataset, moons_standardisation

    lin_x, lin_y = torch.linspace(-1.4, 2.4, 191), torch.linspace(-0.9, 1.4, 116)
    gx, gy = torch.meshgrid(lin_x, lin_y, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1).double()
    p = moons_log_prob(grid, standardised=False, quadrature=400).exp()
    assert abs(float(p.sum()) * (3.8 / 190) * (2.3 / 115) - 1.0) < 2e-3
    raw = torch.from_numpy(make_moons(n_samples=1000, noise=0.05, random_state=2)[0])
    nll_raw = float(-moons_log_prob(raw, standardised=False).mean())
    nll_std = float(-moons_log_prob(load_dataset("moons", "test")["x"]).mean())
    assert 0.2 < nll_raw < 0.4
    assert math.isclose(nll_std, nll_raw - float(sum(math.log(s) for s in moons_standardisation()[1])), abs_tol=1e-5)
