"""The GANs of chapters 4 and 10: the gradient penalty, modulation/demodulation, ProGAN's fade-in, label
conditioning, exact resume, and the CLI (train, sample with --label / --truncation, eval)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dreamlab.errors import DreamlabError
from generators import gan
from generators.base import TrainConfig, make_model
from generators.gan import gradient_penalty, parse_labels
from generators.progan import minibatch_std
from generators.stylegan import ModulatedConv2d
from generators.trainer import iterate_train, train

pytestmark = pytest.mark.usefixtures("offline_small_procedural")


# ----------------------------------------------------------------------------- WGAN-GP's penalty


def test_gradient_penalty_of_a_linear_critic_is_known() -> None:
    """critic(x) = <w, x> has gradient w everywhere: the penalty is (sqrt(|w|^2 + eps) - 1)^2 whatever x_hat is,
    and its gradient with respect to w is 2 (|w| - 1) w / |w| (the graph is kept so it trains the critic)."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 1, bias=False)
    real, fake = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    gp = gradient_penalty(lambda x: lin(x.flatten(1)), real, fake, eps=0.0)
    w = lin.weight.detach()[0]
    assert math.isclose(gp.item(), float((w.norm() - 1) ** 2), rel_tol=1e-5)
    gp.backward()
    assert torch.allclose(lin.weight.grad[0], 2 * (w.norm() - 1) * w / w.norm(), atol=1e-6)


def test_gradient_penalty_interpolates_per_sample_and_keeps_eps_inside_the_root() -> None:
    """critic(x) = |x|^2 / 2 has gradient x: at x_hat = a real + (1 - a) fake (one a per sample) the penalty is
    mean((sqrt(|x_hat|^2 + eps) - 1)^2); a zero gradient gives a finite penalty gradient thanks to eps."""
    real, fake = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(4, 1, 1, 1)
    eps = 1e-3
    gp = gradient_penalty(lambda x: 0.5 * x.pow(2).flatten(1).sum(1), real, fake, alpha=alpha, eps=eps)
    x_hat = (alpha * real + (1 - alpha) * fake).flatten(1)
    direct = ((x_hat.pow(2).sum(1) + eps).sqrt() - 1).pow(2).mean()
    assert math.isclose(gp.item(), float(direct), rel_tol=1e-6)
    # a critic with zero gradient: |grad| = sqrt(eps), and the penalty's own gradient stays finite
    scale = nn.Parameter(torch.zeros(()))
    zero = gradient_penalty(lambda x: scale * x.flatten(1).sum(1), real, fake)
    zero.backward()
    assert math.isclose(zero.item(), 1.0, rel_tol=1e-5) and torch.isfinite(scale.grad)


# ----------------------------------------------------------------------------- StyleGAN2's modulated conv


def test_demodulation_keeps_unit_output_variance() -> None:
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 48, 3, w_dim=16)
    with torch.no_grad():
        conv.affine.bias.uniform_(0.2, 3.0)  # styles far from 1, different per channel
    x, w = torch.randn(16, 64, 12, 12), torch.randn(16, 16) * 2
    y = conv(x, w).detach()[:, :, 1:-1, 1:-1]  # away from the zero padding
    assert abs(float(y.std()) - 1.0) < 0.05
    per_channel = y.transpose(0, 1).flatten(1).std(1)
    assert per_channel.min() > 0.85 and per_channel.max() < 1.15
    conv.demodulate = False  # without demodulation the styles' scale goes straight through
    assert float(conv(x, w).detach().std()) > 1.3


def test_stylegan_critic_keeps_its_activations_near_unit_scale() -> None:
    """Equalised convs without weight gain under the sqrt(2)-gain activation: a fresh critic's features stay
    O(1) through every residual block at 64x64 (a second sqrt(2) per conv grew them ~2x per layer)."""
    from generators.stylegan import StyleCritic

    torch.manual_seed(0)
    critic = StyleCritic([32, 32, 16, 16, 8], 3)
    h = torch.nn.functional.leaky_relu(critic.from_rgb(torch.randn(16, 3, 64, 64)), 0.2) * math.sqrt(2)
    for blk in critic.blocks:
        h = blk(h)
        assert 0.3 < float(h.pow(2).mean().sqrt()) < 3.0


def test_minibatch_std_adds_the_spread_of_the_batch() -> None:
    same = torch.ones(8, 3, 4, 4)
    assert minibatch_std(same).shape == (8, 4, 4, 4) and minibatch_std(same)[:, 3].abs().max() < 1e-3
    assert minibatch_std(torch.randn(8, 3, 4, 4))[:, 3].min() > 0.3


# ----------------------------------------------------------------------------- ProGAN's growth


def test_progan_schedule_grows_8_to_64_with_fades() -> None:
    m = make_model("progan", phase_steps=10)
    levels = [m.schedule(s) for s in range(0, 80, 5)]
    assert [lv for lv, _ in levels] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    assert m.schedule(10)[1] == pytest.approx(0.1) and m.schedule(19)[1] == 1.0 and m.schedule(25)[1] == 1.0
    assert [m.resolution(lv) for lv in range(4)] == [8, 16, 32, 64]


def test_progan_sampling_works_across_a_fade_in() -> None:
    """At alpha = 0 the 16x16 level draws exactly the 8x8 level's images (upsampled); at every alpha of the fade
    the samples are finite 64x64 images in [0, 1] that move from one to the other; the critic fades the same way."""
    torch.manual_seed(0)
    m = make_model("progan", widths=(8, 8, 4, 4), z_dim=8, phase_steps=4).eval()
    z = m.latent(5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        old = m.generate(z, level=0)
        seq = [m.generate(z, level=1, alpha=a) for a in (0.0, 0.5, 1.0)]
        assert torch.allclose(seq[0], old, atol=1e-6)
        assert torch.allclose(seq[1], (seq[0] + seq[2]) / 2, atol=1e-5) and not torch.allclose(seq[0], seq[2])
        x16 = torch.randn(5, 3, 16, 16)
        assert torch.allclose(m.D(x16, 1, 0.0), m.D(torch.nn.functional.avg_pool2d(x16, 2), 0, 1.0), atol=1e-5)
    # the trained model samples at the level and fade weight it reached (buffers saved with the weights)
    tc = TrainConfig(device="cpu", batch_size=8, lr=1e-3, betas=(0.0, 0.99))
    m.train()
    opts = m.configure_optimizers(tc)
    batches = iterate_train(m.train_data("train"), 8, 0, 0, torch.device("cpu"))
    for step in range(4, 7):  # into the 16x16 fade-in
        m.train_step(next(batches), opts, step, tc)
    assert int(m.level) == 1 and 0 < float(m.alpha) < 1
    s = m.eval().sample(3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 3, 64, 64) and torch.isfinite(s).all() and 0 <= s.min() and s.max() <= 1


# ----------------------------------------------------------------------------- labels


def test_parse_labels_names_values_and_fails_clearly() -> None:
    g = torch.Generator().manual_seed(0)
    lab = parse_labels("hair=blonde,smiling=True", "faces", 50, g)
    assert lab.shape == (50, 4) and (lab[:, 0] == 2).all() and (lab[:, 2] == 1).all()
    assert len(lab[:, 1].unique()) > 1  # unnamed attributes are drawn
    assert (parse_labels("Dress", "fashion_mnist", 3) == 3).all() and (parse_labels(7, "fashion_mnist", 2) == 7).all()
    assert (parse_labels("class=bag", "fashion_mnist", 2) == 8).all()
    with pytest.raises(DreamlabError, match="hair=purple.*black"):
        parse_labels("hair=purple", "faces", 2)
    with pytest.raises(DreamlabError, match="name the attribute"):
        parse_labels("blonde", "faces", 2)
    with pytest.raises(DreamlabError, match="'eyes' is not one of"):
        parse_labels("eyes=blue", "faces", 2)


def test_unconditional_gans_refuse_labels_and_unknown_options() -> None:
    m = make_model("dcgan", width=4, z_dim=8).eval()
    with pytest.raises(DreamlabError, match="unconditional"):
        m.sample(2, labels="hair=red")
    with pytest.raises(DreamlabError, match="truncation"):
        m.sample(2, truncation=0.7)


@pytest.fixture
def halves(monkeypatch: pytest.MonkeyPatch) -> str:
    """A two-class set whose label is which half of the image is bright; its judge is independent of any GAN."""
    from dreamlab import data

    def load(split: str) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        y = torch.randint(0, 2, (256,), generator=g)
        x = torch.rand(256, 1, 28, 28, generator=g) * 0.2
        x[y == 0, :, :, :14] += 0.7
        x[y == 1, :, :, 14:] += 0.7
        return {"x": x, "y": y}

    monkeypatch.setitem(gan._GREY_SETS, "halves", ("left", "right"))
    monkeypatch.setitem(data._REGISTRY, "halves", data.DatasetInfo("halves", load, "test set", "tests"))
    return "halves"


def test_label_conditioning_changes_the_judged_label(halves: str) -> None:
    """A few hundred steps of the conditional WGAN-GP: asking for "left" or "right" with the same latents gives
    images an independent judge (which half is brighter) assigns to the requested label."""

    def judge(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 14:].mean((1, 2, 3)) > x[..., :14].mean((1, 2, 3))).long()

    torch.manual_seed(0)
    m = make_model("cgan", dataset=halves, width=4, z_dim=4, n_critic=1, dropout=0.0, snapshots=0)
    tc = TrainConfig(device="cpu", batch_size=16, lr=2e-3, betas=(0.5, 0.9))
    opts = m.configure_optimizers(tc)
    batches = iterate_train(m.train_data("train"), 16, 0, 0, torch.device("cpu"))
    for step in range(200):
        m.train_step(next(batches), opts, step, tc)
    m.eval()
    left = judge(m.sample(64, generator=torch.Generator().manual_seed(1), labels="left"))
    right = judge(m.sample(64, generator=torch.Generator().manual_seed(1), labels="right"))
    assert (left == 0).float().mean() >= 0.9 and (right == 1).float().mean() >= 0.9


# ----------------------------------------------------------------------------- training, resume, CLI


def _tiny(name: str, **kw):
    from generators.base import get_model_class, split_overrides

    cls = get_model_class(name)
    mo, to = split_overrides(cls, {**cls.presets["tiny"], **kw})
    torch.manual_seed(0)
    return make_model(name, **mo), TrainConfig(**{"device": "cpu", "log_every": 1, "ckpt_every": 2, **to})


def test_weight_average_samples_and_trails_the_generator() -> None:
    """With `ema_kimg` > 0 DCGAN keeps G_ema (in the checkpoint's state), samples from it, and it lags G."""
    m, tc = _tiny("dcgan", ema_kimg=1.0)
    assert m.sampler() is m.G_ema and any(k.startswith("G_ema.") for k in m.state_dict())
    opts = m.configure_optimizers(tc)
    batches = iterate_train(m.train_data("train"), tc.batch_size, 0, 0, torch.device("cpu"))
    start = [p.clone() for p in m.G.parameters()]
    for step in range(3):
        m.train_step(next(batches), opts, step, tc)
    moved = [(pe - s0).norm() / (p - s0).norm() for pe, p, s0 in zip(m.G_ema.parameters(), m.G.parameters(), start)
             if (p - s0).norm() > 0]
    assert moved and all(0 < float(r) < 1 for r in moved)
    plain, _ = _tiny("dcgan")
    assert plain.sampler() is plain.G and not any(k.startswith("G_ema.") for k in plain.state_dict())


def test_stylegan2_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both optimisers, the weight average, w_avg, lazy R1's schedule and the noise inputs' random numbers all
    come back from the checkpoint: 3 + 3 resumed steps equal 6 uninterrupted ones, bit for bit."""
    from dataclasses import replace

    from generators.stylegan import StyleGAN2

    # the pictures and the Fréchet evaluation are checked by the CLI test; here only the weights matter
    monkeypatch.setattr(StyleGAN2, "write_artifacts", lambda self, run_dir: [])
    monkeypatch.setattr(StyleGAN2, "evaluate", lambda self, split="test", max_items=None: {})
    full, tc = _tiny("stylegan2", r1_every=2)
    tc = replace(tc, steps=6)
    train(full, tc, tmp_path / "a", progress=False)
    part, _ = _tiny("stylegan2", r1_every=2)
    train(part, replace(tc, steps=3), tmp_path / "b", progress=False)
    resumed, _ = _tiny("stylegan2", r1_every=2)
    train(resumed, tc, tmp_path / "b", resume=True, progress=False)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert any(not torch.equal(v, part.state_dict()[k]) for k, v in full.state_dict().items())


def test_cli_trains_samples_with_label_and_truncation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from dreamlab.cli import main

    run = tmp_path / "sg"
    assert main(["train", "stylegan2", "--preset", "tiny", "--out", str(run), "--no-progress", "--device", "cpu"]) == 0
    for f in ("progress.gif", "samples.png", "interpolation.png", "style_mixing.png", "truncation_sweep.png",
              "loss_curves.png", "report.md", "model/model.safetensors"):
        assert (run / f).exists(), f
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "a.png"), "--truncation", "0.5",
                 "--device", "cpu"]) == 0
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "b.png"), "--truncation", "1",
                 "--device", "cpu"]) == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == b.size and a.tobytes() != b.tobytes()  # psi moves the samples

    run = tmp_path / "cg"
    assert main(["train", "cgan", "--preset", "tiny", "--out", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert (run / "labels.png").exists() and (run / "labels_glasses.png").exists()
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "c.safetensors"), "--label",
                 "hair=red,glasses=True", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "d.png"), "--label", "hair=teal"]) == 2
    assert "hair=teal is not one of black|brown|blonde|red|grey" in capsys.readouterr().err
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    res = json.loads((run / "eval_test.json").read_text())
    assert res["test_frechet"] > 0 and 0 <= res["test_label_acc_hair"] <= 1
