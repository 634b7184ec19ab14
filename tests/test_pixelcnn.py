"""PixelCNN: causal masks, exact likelihood, the logistic mixture, the cropped sampler, completion, the baseline."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from dreamlab.errors import DreamlabError
from generators.base import make_generator
from generators.pixelcnn import (
    MaskedConv2d,
    PixelCNNNet,
    discretized_logistic_mixture_log_probs,
    independent_pixel_bpd,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("kernel,blocks", [(7, 2), (3, 1), (5, 0)])
def test_an_output_pixel_depends_on_no_later_pixel(kernel: int, blocks: int) -> None:
    """Gradient check: d out[i, j] / d in[k, l] is zero for every (k, l) at or after (i, j) in raster order, and
    not zero for the pixels just left of it and just above it (the net does look at the past; PixelCNN's blind
    spot, up and to the right, is why not every earlier pixel counts)."""
    torch.manual_seed(0)
    net = PixelCNNNet(8, blocks, kernel, 3).double()
    s = 6
    for i, j in [(0, 0), (2, 3), (3, 0), (5, 5), (4, 2)]:
        x = torch.randn(1, 1, s, s, dtype=torch.float64, requires_grad=True)
        net(x)[0, :, i, j].sum().backward()
        g = x.grad[0, 0].abs()
        order = torch.arange(s * s).view(s, s)
        assert g[order >= i * s + j].max() == 0, (i, j)
        if j > 0:
            assert g[i, j - 1] > 0, (i, j)
        if i > 0:
            assert g[i - 1, j] > 0, (i, j)


def test_mask_types_hide_the_centre_only_for_type_a() -> None:
    a, b = MaskedConv2d(1, 1, 3, "A").mask[0, 0], MaskedConv2d(1, 1, 3, "B").mask[0, 0]
    assert a.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert b.tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    with pytest.raises(DreamlabError, match="kernel=4 must be odd"):
        MaskedConv2d(1, 1, 4, "A")


def test_logistic_mixture_sums_to_one_over_256_values() -> None:
    torch.manual_seed(0)
    k = 4
    params = torch.cat([torch.randn(6, k) * 3, torch.rand(6, k) * 2.4 - 1.2, torch.rand(6, k) * 9 - 7], -1).double()
    params[0, k:2 * k] = torch.tensor([-1.0, 1.0, 0.0, 0.5])  # means on the edge bins
    params[1, 2 * k:] = -7.0  # the narrowest scales: nearly all mass in one bin
    values = torch.arange(256, dtype=torch.float64) * (2 / 255) - 1
    logp = discretized_logistic_mixture_log_probs(params[:, None, :], values[None, :])
    assert torch.isfinite(logp).all()
    assert torch.allclose(logp.exp().sum(1), torch.ones(6, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("name,size,n_lev", [("pixelcnn", 2, 3), ("pixelcnn_mixture", 1, 256)])
def test_log_prob_is_a_normalised_distribution(name: str, size: int, n_lev: int) -> None:
    """Summed over every possible image, exp(log_prob) is 1: the likelihood is exact, not a bound (3^4 images of
    2x2 pixels at 3 levels; the 256 one-pixel images of the mixture model)."""
    torch.manual_seed(0)
    over = {"levels": n_lev} if name == "pixelcnn" else {}
    m = make_generator(name, size=size, filters=4, blocks=1, **over).double().eval()
    imgs = torch.tensor(list(itertools.product(range(n_lev), repeat=size * size))).view(-1, 1, size, size)
    with torch.no_grad():
        total = m.log_prob(imgs).exp().sum()
    assert len(imgs) == n_lev ** (size * size) and abs(float(total) - 1.0) < 1e-9


@pytest.mark.parametrize("name", ["pixelcnn", "pixelcnn_mixture"])
def test_cropped_output_equals_full_image_output_everywhere(name: str) -> None:
    torch.manual_seed(0)
    m = make_generator(name, size=12, filters=8, blocks=2, kernel=5).eval()
    x = torch.rand(3, 1, 12, 12) * 2 - 1
    with torch.no_grad():
        full = m.net(x)
        for i, j in itertools.product(range(12), range(12)):
            assert torch.allclose(m._out_at(x, i, j, crop=True), full[:, :, i, j], atol=1e-5), (i, j)


def test_crop_and_naive_samplers_draw_the_same_images() -> None:
    torch.manual_seed(0)
    m = make_generator("pixelcnn", size=8, filters=8, blocks=2).eval()
    a = m.sample(4, generator=torch.Generator().manual_seed(5), sampler="crop", progress=False)
    b = m.sample(4, generator=torch.Generator().manual_seed(5), sampler="naive", progress=False)
    assert torch.equal(a, b)
    assert set(torch.unique(a * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_completion_keeps_the_top_rows_and_samples_the_rest() -> None:
    torch.manual_seed(0)
    m = make_generator("pixelcnn", size=8, filters=8, blocks=1).eval()
    img = torch.full((2, 1, 8, 8), 3, dtype=torch.long)
    out = m.complete(img, keep_rows=5, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(out[:, :, :5], torch.ones(2, 1, 5, 8))
    assert not torch.equal(out[:, :, 5:], torch.ones(2, 1, 3, 8))  # 24 pixels of an untrained model: not all 3


def test_independent_pixel_baseline_on_a_known_histogram() -> None:
    train = torch.tensor([[[[0, 1]]], [[[0, 1]]], [[[0, 2]]]])  # pixel 0 always 0; pixel 1: 1, 1, 2
    bpd, per_pixel = independent_pixel_bpd(train, train[:1], levels=4)
    # add-one: pixel 0 p(0) = 4/7, pixel 1 p(1) = 3/7
    assert math.isclose(per_pixel[0, 0].item(), -math.log2(4 / 7), rel_tol=1e-6)
    assert math.isclose(bpd, (-math.log2(4 / 7) - math.log2(3 / 7)) / 2, rel_tol=1e-6)


def test_bad_inputs_name_the_fix() -> None:
    m = make_generator("pixelcnn", size=8, filters=4, blocks=1)
    with pytest.raises(DreamlabError, match="levels in 0..3"):
        m.log_prob(torch.full((1, 1, 8, 8), 7))
    with pytest.raises(DreamlabError, match="temperature=0"):
        m.sample(1, temperature=0, progress=False)
    with pytest.raises(DreamlabError, match="levels=1 must be in 2..256"):
        make_generator("pixelcnn", levels=1)


def test_evaluate_reports_bits_per_dim_beside_the_baseline_and_mnist() -> None:
    torch.manual_seed(0)
    m = make_generator("pixelcnn", size=8, filters=4, blocks=1)
    res = m.evaluate(max_items=40)
    assert set(res) == {"test_bpd", "test_bpd_independent", "test_nll_nats", "mnist_bpd", "mnist_bpd_independent"}
    assert 0 < res["test_bpd_independent"] < 2 and 0 < res["test_bpd"] < 2.5  # 4 levels: 2 bits is uniform
    assert math.isclose(res["test_nll_nats"], res["test_bpd"] * 64 * math.log(2), rel_tol=1e-6)
