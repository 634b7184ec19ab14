"""DDPM (book ch. 8): schedules, forward noising, samplers, EMA, the bits/dim bound, save/load and the CLI."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm

from dreamlab.errors import DreamlabError
from generators.base import Generator, TrainConfig, get_model_class, make_model, split_overrides
from generators.diffusion import SCHEDULES, DDPMConfig, alpha_bar, make_scheduler, slerp

T = 1000


def _tiny(**over):
    cls = get_model_class("ddpm")
    mo, to = split_overrides(cls, {**cls.presets["tiny"], **over})
    torch.manual_seed(0)
    return make_model("ddpm", **mo), TrainConfig(**{"device": "cpu", **to})


# ----------------------------------------------------------------------------- schedules


def _closed_form(schedule: str) -> tuple[np.ndarray, np.ndarray]:
    """The test's own ᾱ_t and a mask of the t it applies to (written out here, independently of the module)."""
    t = np.arange(T, dtype=np.float64)
    if schedule == "linear":
        return np.cumprod(1 - np.linspace(1e-4, 0.02, T)), np.ones(T, bool)
    if schedule == "cosine":
        f = np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
        f_next = np.cos(((t + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        return f_next / f[0], 1 - f_next / f < 0.999  # where diffusers caps beta at 0.999 the product departs
    th0, th1 = np.arccos(0.95), np.arccos(0.02)
    return np.cos(th0 + t / (T - 1) * (th1 - th0)) ** 2, np.ones(T, bool)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_alpha_bar_is_monotone_in_unit_interval_and_matches_closed_form(schedule: str, kind: str) -> None:
    ab = make_scheduler(kind, schedule, T).alphas_cumprod.double().numpy()
    assert ab.shape == (T,)
    assert (ab > 0).all() and (ab <= 1).all()
    assert (np.diff(ab) < 0).all(), "ᾱ_t must fall strictly with t"
    ref, where = _closed_form(schedule)
    assert where.sum() >= T - 2  # the cosine cap touches at most the last steps
    np.testing.assert_allclose(ab[where], ref[where], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(alpha_bar(schedule, T), ab, rtol=2e-5, atol=1e-7)  # what the plots draw
    if schedule == "offset_cosine":  # the book's end points: signal rate 0.95 at t=0, 0.02 at t=T-1
        assert math.isclose(math.sqrt(ab[0]), 0.95, rel_tol=1e-6)
        assert math.isclose(math.sqrt(ab[-1]), 0.02, rel_tol=1e-4)


def test_schedules_differ_where_the_book_says() -> None:
    """Mid-way the linear schedule has destroyed far more signal than the cosine ones (the book's figure 8-4)."""
    mid = {s: float(alpha_bar(s, T)[T // 2]) for s in SCHEDULES}
    assert mid["linear"] < 0.1 < mid["cosine"] and mid["linear"] < mid["offset_cosine"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_forward_noising_recovers_x0_from_xt_and_eps(schedule: str) -> None:
    sched = make_scheduler("ddpm", schedule, T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(T, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(T, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.arange(T)
    xt = sched.add_noise(x0, eps, t)
    ab = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    rec = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
    assert torch.allclose(rec, x0, atol=1e-10, rtol=0)
    # and x_t really is the mix: at the last step almost all noise, at the first almost all signal (linear/cosine)
    assert float((xt[-1] - eps[-1]).abs().max()) < 0.05


# ----------------------------------------------------------------------------- samplers


def test_ddim_eta0_is_deterministic_by_seed_and_ddpm_is_not(offline_small_procedural) -> None:
    m, _ = _tiny()
    m.eval()
    a = m.sample(2, generator=torch.Generator().manual_seed(5), num_inference_steps=4)
    b = m.sample(2, generator=torch.Generator().manual_seed(5), num_inference_steps=4)
    c = m.sample(2, generator=torch.Generator().manual_seed(6), num_inference_steps=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # from the same initial noise, DDIM (eta 0) ignores the generator; DDPM draws fresh noise at every step
    z = torch.randn(2, *m.image_shape, generator=torch.Generator().manual_seed(1))
    d1 = m.sample(2, noise=z, generator=torch.Generator().manual_seed(1), num_inference_steps=4)
    d2 = m.sample(2, noise=z, generator=torch.Generator().manual_seed(2), num_inference_steps=4)
    assert torch.equal(d1, d2)
    p1 = m.sample(2, noise=z, generator=torch.Generator().manual_seed(1), scheduler="ddpm")
    p2 = m.sample(2, noise=z, generator=torch.Generator().manual_seed(2), scheduler="ddpm")
    p3 = m.sample(2, noise=z, generator=torch.Generator().manual_seed(1), scheduler="ddpm")
    assert torch.equal(p1, p3) and not torch.equal(p1, p2)
    # eta > 0 makes DDIM stochastic again
    e1 = m.sample(2, noise=z, generator=torch.Generator().manual_seed(1), num_inference_steps=4, eta=1.0)
    e2 = m.sample(2, noise=z, generator=torch.Generator().manual_seed(2), num_inference_steps=4, eta=1.0)
    assert not torch.equal(e1, e2)


def test_step_counts_and_bad_sampler_values(offline_small_procedural) -> None:
    m, _ = _tiny()
    seen: list[int] = []
    z = torch.randn(1, *m.image_shape)
    m.denoise(z, num_inference_steps=5, callback=lambda i, t, x, x0: seen.append(t))
    assert seen[0] == m.config.num_train_timesteps - 1 and len(seen) == 5  # trailing: starts from pure noise
    seen.clear()
    m.denoise(z, scheduler="ddpm", callback=lambda i, t, x, x0: seen.append(t))
    assert seen == list(range(m.config.num_train_timesteps - 1, -1, -1))  # DDPM: every step by default
    for kw, msg in [({"scheduler": "euler"}, "scheduler='euler'"), ({"num_inference_steps": 0}, "from 1 to"),
                    ({"num_inference_steps": 10_000}, "from 1 to"), ({"eta": -1.0}, "eta=-1.0"),
                    ({"prompt": "a rose"}, "takes no prompt")]:
        with pytest.raises(DreamlabError, match=msg):
            m.sample(1, **kw)


def test_slerp_keeps_the_ends_and_the_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    lerp = 0.5 * (a + b)
    ref = 0.5 * (a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1))
    assert torch.allclose(mid.flatten(1).norm(dim=1), ref, rtol=0.05)  # a straight line shrinks it by ~√2
    assert (lerp.flatten(1).norm(dim=1) < 0.8 * ref).all()


def test_interpolation_rows_start_and_end_at_their_own_samples(offline_small_procedural) -> None:
    m, _ = _tiny()
    m.eval()
    g = torch.Generator().manual_seed(3)
    rows = m.interpolate(4, pairs=2, generator=g, num_inference_steps=3)
    assert rows.shape == (8, *m.image_shape)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, *m.image_shape, generator=g)
    b = torch.randn(2, *m.image_shape, generator=g)
    ends = m.sample(4, noise=torch.cat([a, b]), num_inference_steps=3)
    assert torch.allclose(rows[[0, 4]], ends[:2], atol=1e-5) and torch.allclose(rows[[3, 7]], ends[2:], atol=1e-5)


# ----------------------------------------------------------------------------- training and EMA


@pytest.mark.parametrize("cap", [0.999, 0.2])
def test_ema_warms_up_to_its_decay_and_is_what_samples(offline_small_procedural, cap: float) -> None:
    m, tc = _tiny(ema_decay=cap)
    m.train()
    opts = m.configure_optimizers(tc)
    x = m.train_data("train")["x"]
    name = "conv_in.weight"
    w = []
    for i in range(3):
        m.train_step({"x": x[i * 8:(i + 1) * 8]}, opts, i, tc)
        w.append(dict(m.unet.named_parameters())[name].detach().clone())
    ema = dict(m.ema.module.named_parameters())[name]
    d1, d2 = min(cap, 2 / 11), min(cap, 3 / 12)  # the first update copies; then min(cap, (1 + n) / (10 + n))
    expect = d2 * (d1 * w[0] + (1 - d1) * w[1]) + (1 - d2) * w[2]
    assert torch.allclose(ema, expect, atol=1e-7)
    assert not torch.allclose(ema, w[2])
    assert all(id(p) not in {id(q) for g in opts for q in g.param_groups[0]["params"]} for p in m.ema.parameters())
    m.eval()
    z = torch.randn(2, *m.image_shape)
    assert not torch.equal(m.sample(2, noise=z, num_inference_steps=3), m.sample(2, noise=z, num_inference_steps=3,
                                                                                 ema=False))


def test_ema_decay_reaches_its_cap() -> None:
    from generators.diffusion import ema_update

    e, p = [torch.ones(2)], [torch.zeros(2)]
    ema_update(0.999)(e, p, torch.tensor(20_000))
    assert torch.allclose(e[0], torch.full((2,), 0.999))
    e = [torch.ones(2)]
    ema_update(0.999)(e, p, torch.tensor(90))
    assert torch.allclose(e[0], torch.full((2,), 0.91))


# ----------------------------------------------------------------------------- the bound


class _Oracle(torch.nn.Module):
    """The best ε-predictor for data that is a single image x*, plus a constant error δ."""

    def __init__(self, x_star: torch.Tensor, ab: torch.Tensor, delta: float) -> None:
        super().__init__()
        self.x_star, self.ab, self.delta = x_star, ab.double(), delta
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        a = self.ab[t.long()].view(-1, 1, 1, 1)
        eps = (xt.double() - a.sqrt() * self.x_star) / (1 - a).sqrt()
        return SimpleNamespace(sample=(eps + self.delta).float())


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_bound_matches_ho_et_al_closed_form_for_an_oracle(offline_small_procedural, delta: float) -> None:
    """With ε_θ = true ε + δ the KL terms are δ²·D·β_t² / (2 σ_t² α_t (1 - ᾱ_t)) (Ho et al. eq. 12 with
    σ_t² = β̃_t), the prior and decoder terms closed forms: the bound must equal their sum exactly."""
    m, _ = _tiny(num_train_timesteps=50, schedule="linear", clip_sample=False)
    x = m.train_data("test")["x"][:1]
    x_star = x * 2 - 1
    s = m.noise_scheduler
    ab, beta = s.alphas_cumprod.double(), s.betas.double()
    m.ema.module = _Oracle(x_star.double(), ab, delta)
    n_kl = 49
    lp = m.log_prob(x, timesteps=n_kl, generator=torch.Generator().manual_seed(0))  # every term once
    D = x.numel()
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    post = beta * (1 - ab_prev) / (1 - ab)
    t = torch.arange(1, 50)
    kl = float((beta[t] ** 2 / (2 * post[t] * (1 - beta[t]) * (1 - ab[t]))).sum()) * delta**2 * D
    a = float(ab[-1])
    xs = x_star.double().flatten().numpy()
    prior = float(np.sum(0.5 * (-math.log(1 - a) + (1 - a) + a * xs**2 - 1)))
    mean = xs - math.sqrt(1 - float(ab[0])) / math.sqrt(float(ab[0])) * delta
    sd = math.sqrt(float(post[1]))
    up, lo = (xs - mean + 1 / 255) / sd, (xs - mean - 1 / 255) / sd
    mass = np.where(xs < -0.999, norm.cdf(up), np.where(xs > 0.999, norm.sf(lo), norm.cdf(up) - norm.cdf(lo)))
    expect = -prior - kl + float(np.log(mass).sum())
    assert float(lp[0]) == pytest.approx(expect, rel=1e-5)
    bpd = float(m.bits_per_dim(x, timesteps=n_kl, generator=torch.Generator().manual_seed(0))[0])
    assert bpd == pytest.approx(-expect / (D * math.log(2)), rel=1e-5)


def test_stratified_bound_is_unbiased(offline_small_procedural) -> None:
    """Few strata scatter around the all-terms bound; their mean over draws comes back to it."""
    m, _ = _tiny(num_train_timesteps=40)
    m.eval()
    x = m.train_data("test")["x"][:2]
    full = torch.stack([m.log_prob(x, generator=torch.Generator().manual_seed(s)) for s in range(6)]).mean(0)
    few = torch.stack([m.log_prob(x, timesteps=3, generator=torch.Generator().manual_seed(100 + s)) for s in range(30)])
    assert few.std(0).min() > 0  # really random
    assert torch.allclose(few.mean(0), full, rtol=0.03)


def test_bound_rejects_bad_input(offline_small_procedural) -> None:
    m, _ = _tiny()
    with pytest.raises(DreamlabError, match="timesteps=0"):
        m.log_prob(m.train_data("test")["x"][:1], timesteps=0)
    with pytest.raises(DreamlabError, match="shape"):
        m.log_prob(torch.zeros(1, 1, 16, 16))


def test_evaluate_reports_the_frechet_distance_beside_its_floor(offline_small_procedural) -> None:
    """An untrained model draws noise: far above the floor that n training images score."""
    m, _ = _tiny(eval_samples=16, eval_bound_items=2)
    m.eval()
    res = m.evaluate("test", max_items=16)
    assert {"test_loss", "test_nll_bound_bpd", "test_fd", "test_fd_floor", "test_fd_n"} <= set(res)
    assert res["test_fd_n"] == 16 and 0 < res["test_fd_floor"] < res["test_fd"] / 5
    assert make_model("ddpm", dataset="moons").frechet() == {}  # no feature network: no distance


# ----------------------------------------------------------------------------- config, persistence, CLI


@pytest.mark.parametrize("over, msg", [
    ({"schedule": "quadratic"}, "schedule='quadratic' is not allowed"),
    ({"image_size": 30, "block_out_channels": (8, 16, 16)}, "image_size=30 must be divisible by 2^2"),
    ({"block_out_channels": (8, 12)}, "not divisible by norm_num_groups"),
    ({"num_inference_steps": 2000}, "num_inference_steps=2000 is more than"),
    ({"ema_decay": 1.5}, "ema_decay=1.5 must be in"),
])
def test_bad_config_names_the_value(over: dict, msg: str) -> None:
    from dreamlab.config import apply_overrides

    with pytest.raises(DreamlabError, match=re.escape(msg)):
        apply_overrides(DDPMConfig(), over)


def test_save_load_gives_the_same_samples_for_both_samplers(offline_small_procedural, tmp_path: Path) -> None:
    from diffusers import DDPMPipeline

    m, tc = _tiny(schedule="offset_cosine")
    opts = m.configure_optimizers(tc)
    x = m.train_data("train")["x"]
    for i in range(2):
        m.train_step({"x": x[i * 8:(i + 1) * 8]}, opts, i, tc)
    m.eval()
    m.save_pretrained(tmp_path / "m")
    back = Generator.from_pretrained(tmp_path / "m", device="cpu")
    for kw in ({"num_inference_steps": 3}, {"scheduler": "ddpm"}):
        s1 = m.sample(2, generator=torch.Generator().manual_seed(7), **kw)
        s2 = back.sample(2, generator=torch.Generator().manual_seed(7), **kw)
        assert torch.equal(s1, s2)
    # diffusers itself reads the folder: the EMA UNet and the offset-cosine DDPM scheduler
    pipe = DDPMPipeline.from_pretrained(tmp_path / "m")
    assert torch.allclose(pipe.scheduler.alphas_cumprod, m.noise_scheduler.alphas_cumprod)
    for (k, a), b in zip(pipe.unet.state_dict().items(), m.ema.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_cli_train_sample_eval(offline_small_procedural, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from dreamlab.cli import main

    run = tmp_path / "run"
    assert main(["train", "ddpm", "--preset", "tiny", "--out", str(run), "--no-progress", "--device", "cpu",
                 "--set", "schedule=cosine"]) == 0
    for pic in ("samples.png", "schedules.png", "noising.png", "interpolation.png", "denoising.png", "ddim_steps.png"):
        assert (run / pic).stat().st_size > 1000, pic
    report = (run / "report.md").read_text()
    assert "noising.png" in report and "test_nll_bound_bpd" in report
    assert main(["sample", str(run), "-n", "4", "--steps", "2", "--out", str(tmp_path / "a.png"),
                 "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "a.png").size[0] > 2 * 16
    assert main(["sample", str(run), "-n", "2", "--cond", "scheduler=ddpm", "--out", str(tmp_path / "b.safetensors"),
                 "--device", "cpu"]) == 0
    assert main(["sample", str(run), "-n", "2", "--steps", "999", "--out", str(tmp_path / "c.png")]) == 2
    assert "num_inference_steps=999 must be an integer from 1 to 20" in capsys.readouterr().err
    assert main(["eval", str(run), "--device", "cpu", "--max-items", "20"]) == 0
    res = json.loads((run / "eval_test.json").read_text())
    assert res["test_nll_bound_bpd"] > 0 and res["test_loss"] > 0


def test_chapter_script_orders_its_sample_sets_and_can_skip_the_sweep() -> None:
    """examples/ddpm_chapter.py: the schedule comparison (DDIM 50 per schedule) comes first; `sweep=None` (its
    `--no-sweep`) draws that comparison alone, the default adds the sampler sweep with DDPM 1000 once."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "ddpm_chapter.py"
    spec = importlib.util.spec_from_file_location("ddpm_chapter", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.settings(("linear", "cosine"), None) == [("linear", "ddim", 50), ("cosine", "ddim", 50)]
    full = mod.settings(("linear", "cosine"), "cosine")
    assert full[:2] == [("linear", "ddim", 50), ("cosine", "ddim", 50)]
    assert full.count(("cosine", "ddpm", 1000)) == 1 and full.count(("cosine", "ddim", 50)) == 1
    assert {k for s, p, k in full if p == "ddim" and s == "cosine"} == set(mod.DDIM_STEPS)
