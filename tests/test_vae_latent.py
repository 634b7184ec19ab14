"""Ch. 3 latent-space tools: morphing and latent arithmetic, on tiny models."""
import pytest
import torch

from dreamlab.errors import DreamlabError
from generators.base import make_generator


def test_interpolate_endpoints_are_the_reconstructions() -> None:
    torch.manual_seed(0)
    vae = make_generator("vae", channels=(4, 8, 8)).eval()
    a, b = torch.rand(1, 28, 28), torch.rand(1, 28, 28)
    path = vae.interpolate(a, b, steps=5)
    assert path.shape == (5, 1, 28, 28)
    assert torch.allclose(path[0], vae.reconstruct(a[None])[0], atol=1e-6)
    assert torch.allclose(path[-1], vae.reconstruct(b[None])[0], atol=1e-6)


def test_attribute_vector_is_the_difference_of_means() -> None:
    torch.manual_seed(0)
    vae = make_generator("conv_vae", width=4, z_dim=4).eval()
    x = torch.rand(10, 3, 64, 64)
    has = torch.tensor([1, 0] * 5)
    z, _ = vae.encode(x)
    expected = z[has.bool()].mean(0) - z[~has.bool()].mean(0)
    assert torch.allclose(vae.attribute_vector(x, has), expected, atol=1e-5)
    grid = vae.add_attribute(x[:2], expected, scales=(0, 1, 2))
    assert grid.shape == (6, 3, 64, 64)
    assert torch.allclose(grid[0], vae.reconstruct(x[:1])[0], atol=1e-6)


def test_faces_vae_rejects_unknown_attribute() -> None:
    vae = make_generator("vae_faces", width=4, z_dim=4)
    d = {"smiling": torch.tensor([0, 1])}
    with pytest.raises(DreamlabError, match="not one of hair, skin, smiling, glasses"):
        vae._attribute_mask(d, "beard")
    with pytest.raises(DreamlabError, match="give a value"):
        vae._attribute_mask(d, "hair")
