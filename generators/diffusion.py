"""Denoising diffusion models (book ch. 8): DDPM training, DDPM and DDIM sampling, three noise schedules.

`DDPM` ("ddpm") is a diffusers `UNet2DModel` trained to predict the noise ε that was mixed into an image at a random
step t (epsilon prediction, the MSE of Ho et al. 2020's L_simple), with an exponential moving average of its weights
(decay 0.999, the book's, reached after diffusers' EMA warm-up: `ema_update`): the average is what samples. The
maths of the forward and reverse processes is diffusers' own: `DDPMScheduler.add_noise` makes the training inputs,
`DDPMScheduler.step` is ancestral sampling (1000 steps by default) and `DDIMScheduler.step` the deterministic sampler
(eta 0, any number of steps, "trailing" spacing, so the first step starts from pure noise at t = T - 1). The
schedules (`schedule=`):

* `linear`: β_t from 1e-4 to 0.02 (Ho et al.), diffusers' "linear".
* `cosine`: ᾱ(t) = f(t + 1) / f(0), f(u) = cos²((u / T + s) / (1 + s) · π / 2), s = 0.008, each β capped at 0.999
  (Nichol & Dhariwal 2021; diffusers' "squaredcos_cap_v2"). The book's plain cosine is this curve with s = 0.
* `offset_cosine` (the book's): the signal rate √ᾱ falls from 0.95 to 0.02 as the cosine of a linearly growing
  angle, ᾱ_t = cos²(θ0 + t / (T - 1) · (θ1 - θ0)) with θ0 = arccos 0.95 and θ1 = arccos 0.02. It is not a diffusers
  built-in, so both schedulers get `trained_betas` computed from this closed form (β_t = 1 - ᾱ_t / ᾱ_{t-1}).

`log_prob` is the variational bound of Ho et al. (their eq. 5): L_T (the last latent against N(0, I)) + Σ_t
KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)) + the discretised-Gaussian decoder -log p(x_0 | x_1) on 8-bit pixels,
with the reverse variances fixed to the posterior's (diffusers' "fixed_small") and the model mean built from the same
clipped x0 prediction the DDPM sampler uses. It is a lower bound on log P(x) of the 8-bit image, in nats per image;
`bits_per_dim` turns it into an upper bound in bits/dim. Evaluating all T - 1 KL terms costs T network calls per
image, so `timesteps=K` evaluates one random t in each of K equal strata, weighted by the stratum's size: an unbiased
estimate of the bound, not a bound per draw.

Images are scaled to [-1, 1] for the network and returned in [0, 1]. diffusers is imported inside functions (its
import takes seconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dreamlab import procedural
from dreamlab.config import check_ranges
from dreamlab.data import load_dataset
from dreamlab.device import autocast, randn, seeded
from dreamlab.errors import DreamlabError
from generators.base import Batch, Generator, Metrics, TrainConfig, register

SCHEDULES = ("linear", "cosine", "offset_cosine")
SAMPLERS = ("ddim", "ddpm")
LINEAR_BETAS = (1e-4, 0.02)       # Ho et al.'s linear schedule
COSINE_S = 0.008                  # Nichol & Dhariwal's offset (diffusers' squaredcos_cap_v2)
MAX_BETA = 0.999                  # diffusers caps the cosine schedule's betas here
OFFSET_SIGNAL_RATES = (0.95, 0.02)  # the book's offset cosine: max and min signal rate sqrt(alpha_bar)

# ----------------------------------------------------------------------------- schedules


def alpha_bar(schedule: str, T: int = 1000) -> np.ndarray:
    """ᾱ_t for t = 0..T-1 in float64, from each schedule's closed form (see the module docstring). The schedulers
    compute their own ᾱ in float32 from betas; the tests hold the two together."""
    _check_schedule(schedule)
    t = np.arange(T, dtype=np.float64)
    if schedule == "linear":
        betas = np.linspace(*LINEAR_BETAS, T, dtype=np.float64)
        return np.exp(np.cumsum(np.log1p(-betas)))
    if schedule == "cosine":
        f = lambda u: np.cos((u / T + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2  # noqa: E731
        # the betas diffusers derives from f, capped at MAX_BETA (only the last step or two reach the cap)
        betas = np.minimum(1 - f(t + 1) / f(t), MAX_BETA)
        return np.exp(np.cumsum(np.log1p(-betas)))
    hi, lo = OFFSET_SIGNAL_RATES
    th0, th1 = math.acos(hi), math.acos(lo)
    return np.cos(th0 + t / max(T - 1, 1) * (th1 - th0)) ** 2


def offset_cosine_betas(T: int) -> list[float]:
    """β_t = 1 - ᾱ_t / ᾱ_{t-1} (ᾱ_{-1} = 1) of the book's offset cosine schedule: diffusers' `trained_betas`."""
    ab = alpha_bar("offset_cosine", T)
    return (1 - ab / np.concatenate([[1.0], ab[:-1]])).tolist()


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise DreamlabError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}; e.g. --set schedule=cosine")


def scheduler_kwargs(schedule: str, T: int, clip_sample: bool = True) -> dict[str, Any]:
    """Keyword arguments that make a diffusers DDPM/DDIM scheduler follow `schedule`."""
    _check_schedule(schedule)
    kw: dict[str, Any] = {"num_train_timesteps": T, "prediction_type": "epsilon", "clip_sample": clip_sample}
    if schedule == "linear":
        kw.update(beta_schedule="linear", beta_start=LINEAR_BETAS[0], beta_end=LINEAR_BETAS[1])
    elif schedule == "cosine":
        kw.update(beta_schedule="squaredcos_cap_v2")
    else:
        kw.update(trained_betas=offset_cosine_betas(T))
    return kw


def make_scheduler(kind: str, schedule: str, T: int = 1000, clip_sample: bool = True):
    """A diffusers scheduler: "ddpm" (ancestral sampling; also training's add_noise) or "ddim" (deterministic at
    eta 0)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = scheduler_kwargs(schedule, T, clip_sample)
    # trailing spacing: with few steps the first one is t = T - 1 (pure noise), not T - T/steps
    if kind == "ddpm":
        return DDPMScheduler(**kw, variance_type="fixed_small", timestep_spacing="trailing")
    if kind == "ddim":
        return DDIMScheduler(**kw, set_alpha_to_one=True, timestep_spacing="trailing")
    raise DreamlabError(f"scheduler={kind!r} is not one of {', '.join(SAMPLERS)}; e.g. --cond scheduler=ddpm")


def ema_update(decay: float):
    """The EMA step for `torch.optim.swa_utils.AveragedModel`, with diffusers' `EMAModel` warm-up: after n updates
    the decay is min(decay, (1 + n) / (10 + n)). A plain 0.999 from the first step (the book's, over its 6,400
    steps) would leave 0.999^1500 = 22 % of the *initial* weights in the average of a 1,500-step run; the warm-up
    forgets them within a few hundred steps and reaches 0.999 after about 9,000. The decay stays a device tensor
    (no host sync per step)."""

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        n = n.to(torch.float32)
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_mul_(ema_params, d)
        torch._foreach_add_(ema_params, torch._foreach_mul(params, 1 - d))

    return update


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two batches of noise (per item): keeps the norm that a Gaussian sample of
    this size has, which a straight line through the middle would shrink by up to √2."""
    af, bf = a.flatten(1).double(), b.flatten(1).double()
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1))
    omega = torch.arccos(cos.clamp(-1, 1))
    so = torch.sin(omega)
    wa = torch.where(so > 1e-6, torch.sin((1 - w) * omega) / so, torch.full_like(so, 1 - w))
    wb = torch.where(so > 1e-6, torch.sin(w * omega) / so, torch.full_like(so, w))
    return (wa[:, None] * af + wb[:, None] * bf).view_as(a).to(a.dtype)


# ----------------------------------------------------------------------------- the bound's pieces


def _log_diff_ndtr(u: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """log(Φ(u) - Φ(lo)) for u > lo, stable in both tails (uses Φ(u) - Φ(lo) = Φ(-lo) - Φ(-u) right of zero)."""
    right = (u + lo) > 0
    a = torch.where(right, -lo, u)
    b = torch.where(right, -u, lo)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return la + torch.log(-torch.expm1(lb - la))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per pixel for x on the 256-level grid of [-1, 1]: the Gaussian's mass in x's bin (width 2/255),
    the outer bins reaching to ±infinity (Ho et al.'s decoder)."""
    inv = torch.exp(-log_scale)
    up, lo = inv * (x - mean + 1 / 255), inv * (x - mean - 1 / 255)
    mid = _log_diff_ndtr(up, lo)
    return torch.where(x < -0.999, torch.special.log_ndtr(up), torch.where(x > 0.999, torch.special.log_ndtr(-lo), mid))


# ----------------------------------------------------------------------------- the model


@dataclass
class DDPMConfig:
    dataset: str = "flowers"            # any registered image set: flowers (64x64 RGB), fashion_mnist (28x28 grey)
    image_size: int = 64                # images are resized to this (area averaging), then kept on the 8-bit grid
    channels: int = 3                   # 3 for flowers, 1 for Fashion-MNIST
    max_items: int = 0                  # train on the first N images only (0 = the whole split)
    block_out_channels: tuple[int, ...] = (32, 64, 96, 128)  # the book's UNet widths; one level per width
    layers_per_block: int = 2           # the book's block depth (residual blocks per level)
    norm_num_groups: int = 8
    schedule: Literal["linear", "cosine", "offset_cosine"] = "offset_cosine"  # the book's
    num_train_timesteps: int = 1000
    clip_sample: bool = True            # samplers clip the predicted clean image to [-1, 1] (and so does the bound)
    ema_decay: float = 0.999            # the book's EMA of the weights (after a warm-up: `ema_update`); it samples
    num_inference_steps: int = 50       # DDIM steps when `sample` is not told
    eval_samples: int = 500             # samples for the Fréchet distance in `evaluate` (0 = skip it)
    eval_bound_items: int = 200         # test images for the bits/dim bound in `evaluate` (0 = skip it)
    eval_bound_timesteps: int = 50      # strata of the bound's KL sum in `evaluate`

    def __post_init__(self) -> None:
        check_ranges(self, positive=("image_size", "channels", "block_out_channels", "layers_per_block",
                                     "norm_num_groups", "num_train_timesteps", "num_inference_steps",
                                     "eval_bound_timesteps"),
                     nonneg=("max_items", "eval_samples", "eval_bound_items"), fraction=("ema_decay",))
        _check_schedule(self.schedule)
        n = len(self.block_out_channels)
        if n < 2:
            raise DreamlabError(f"block_out_channels={self.block_out_channels} needs at least 2 levels, e.g. 32,64")
        if self.image_size % 2 ** (n - 1):
            raise DreamlabError(f"image_size={self.image_size} must be divisible by 2^{n - 1} (the UNet halves it "
                                f"{n - 1} times for block_out_channels={','.join(map(str, self.block_out_channels))})")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise DreamlabError(f"block_out_channels {bad[0]} is not divisible by "
                                f"norm_num_groups={self.norm_num_groups}")
        if self.num_inference_steps > self.num_train_timesteps:
            raise DreamlabError(f"num_inference_steps={self.num_inference_steps} is more than "
                                f"num_train_timesteps={self.num_train_timesteps}")
        if self.eval_bound_timesteps > self.num_train_timesteps - 1 and self.num_train_timesteps > 1:
            raise DreamlabError(f"eval_bound_timesteps={self.eval_bound_timesteps} is more than the "
                                f"{self.num_train_timesteps - 1} KL terms of the bound")


_SMALL_FLOWERS = {"image_size": 32, "block_out_channels": (32, 64, 64), "layers_per_block": 1}


@register
class DDPM(Generator):
    """Denoising diffusion (book ch. 8): diffusers UNet2DModel, EMA weights, DDPM/DDIM sampling, bits/dim bound."""

    name = "ddpm"
    config_class = DDPMConfig
    log_prob_kind = "bound"
    presets = {
        "tiny": {"image_size": 16, "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4,
                 "num_train_timesteps": 20, "num_inference_steps": 3, "max_items": 64, "eval_samples": 0,
                 "eval_bound_items": 8, "eval_bound_timesteps": 4, "steps": 2, "batch_size": 8, "log_every": 1},
        # flowers at 32x32 (area-downsampled from 64), a 3-level UNet: minutes on 2 CPU cores
        "quick": {**_SMALL_FLOWERS, "steps": 1500, "batch_size": 32, "lr": 1e-3, "grad_clip": 1.0,
                  "log_every": 50, "ckpt_every": 500},
        # the book's: 64x64 flowers, widths 32/64/96/128, two residual blocks per level, AdamW 1e-3, wd 1e-4
        "full": {"steps": 10000, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 1.0,
                 "ckpt_every": 1000, "eval_samples": 2000, "eval_bound_items": 500},
        # Fashion-MNIST at its own 28x28 (two halvings: 28 -> 14 -> 7), the quick budget
        "fashion_mnist": {"dataset": "fashion_mnist", "image_size": 28, "channels": 1,
                          "block_out_channels": (32, 64, 64), "layers_per_block": 1, "steps": 2000, "batch_size": 32,
                          "lr": 1e-3, "grad_clip": 1.0, "log_every": 50, "ckpt_every": 500},
    }

    def __init__(self, config: DDPMConfig) -> None:
        super().__init__(config)
        from diffusers import UNet2DModel
        from torch.optim.swa_utils import AveragedModel

        c = config
        n = len(c.block_out_channels)
        self.unet = UNet2DModel(
            sample_size=c.image_size, in_channels=c.channels, out_channels=c.channels,
            block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n, norm_num_groups=c.norm_num_groups,
        )
        # torch's own averaging wrapper: a module, so the average is in every checkpoint and in model.safetensors
        self.ema = AveragedModel(self.unet, multi_avg_fn=ema_update(c.ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.noise_scheduler = make_scheduler("ddpm", c.schedule, c.num_train_timesteps, c.clip_sample)

    # ---- data -----------------------------------------------------------------------------
    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """{"x": (N, channels, image_size, image_size) in [0, 1], on the 8-bit grid}."""
        c = self.config
        if c.dataset in procedural.KINDS:  # converts only the first max_items images to float
            x = procedural.load_procedural(c.dataset, split, max_items=c.max_items or None)["x"]
        else:
            x = load_dataset(c.dataset, split)["x"][: c.max_items or None]
        if x.ndim != 4 or x.shape[1] != c.channels:
            raise DreamlabError(f"dataset {c.dataset!r} has images of shape {tuple(x.shape[1:])}, not "
                                f"{c.channels} channels; --set channels={x.shape[1] if x.ndim == 4 else '?'}")
        if x.shape[-1] != c.image_size or x.shape[-2] != c.image_size:
            mode = "area" if x.shape[-1] >= c.image_size else "bilinear"
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode=mode)
        # the bound is a likelihood of 8-bit images: resized data go back onto that grid
        return {"x": x.mul_(255).round_().div_(255)}

    # ---- training -------------------------------------------------------------------------
    def _eps_loss(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x * 2 - 1
        t = torch.randint(0, self.config.num_train_timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        return F.mse_loss(self.unet(xt, t).sample.float(), noise)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        return self._eps_loss(batch["x"]), {}

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        # the EMA copy is not optimised: it follows the UNet in train_step
        return [torch.optim.AdamW(self.unet.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                  weight_decay=tc.weight_decay)]

    def train_step(self, batch: Batch, optimizers: list[torch.optim.Optimizer], step: int, tc: TrainConfig) -> Metrics:
        metrics = super().train_step(batch, optimizers, step, tc)
        self.ema.update_parameters(self.unet)
        return metrics

    # ---- sampling -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.channels, c.image_size, c.image_size)

    def _steps(self, scheduler: str, num_inference_steps: int | None) -> int:
        if scheduler not in SAMPLERS:
            raise DreamlabError(f"scheduler={scheduler!r} is not one of {', '.join(SAMPLERS)}")
        T = self.config.num_train_timesteps
        steps = (T if scheduler == "ddpm" else self.config.num_inference_steps) if num_inference_steps is None \
            else num_inference_steps
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise DreamlabError(f"num_inference_steps={steps!r} must be an integer from 1 to {T} (--steps N)")
        return steps

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, *, scheduler: str = "ddim", num_inference_steps: int | None = None,
                generator: torch.Generator | None = None, eta: float = 0.0, ema: bool = True,
                callback: Any = None, progress: bool = False) -> torch.Tensor:
        """Run the reverse process from `noise` (x at t = T - 1) to a clean image in [-1, 1]. `callback(i, t, x_t,
        x0_pred)` sees every step (the denoising pictures use it)."""
        from tqdm.auto import tqdm

        steps = self._steps(scheduler, num_inference_steps)
        if eta < 0:
            raise DreamlabError(f"eta={eta} must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise)")
        c = self.config
        sched = make_scheduler(scheduler, c.schedule, c.num_train_timesteps, c.clip_sample)
        dev = self.device
        sched.set_timesteps(steps, device=dev)
        net = self.ema.module if ema else self.unet
        was = net.training
        net.eval()
        x = noise.to(dev).float() * sched.init_noise_sigma
        # DDIM keeps the network's ε beside the clipped x0 (diffusers' default, as DDIMPipeline): re-deriving ε from the
        # clipped x0 (use_clipped_model_output=True) bakes the first steps' clipped, saturated colours into the
        # trajectory: on the quick linear run it raised DDIM 50's Fréchet distance from 231 to 671 (docs/diffusion.md)
        kw = {"eta": eta} if scheduler == "ddim" else {}
        for i, t in enumerate(tqdm(sched.timesteps, desc=scheduler, unit="step", disable=not progress, leave=False)):
            with autocast(dev):
                eps = net(x, t).sample.float()
            out = sched.step(eps, t, x, generator=generator, **kw)
            if callback is not None:
                callback(i, int(t), x, out.pred_original_sample)
            x = out.prev_sample
        net.train(was)
        return x

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, num_inference_steps: int | None = None,
               scheduler: str = "ddim", eta: float = 0.0, noise: torch.Tensor | None = None, ema: bool = True,
               progress: bool | None = None, **condition: Any) -> torch.Tensor:
        """n images in [0, 1]: DDIM (`num_inference_steps`, default the config's 50; eta 0 = deterministic) or DDPM
        (default 1000 steps). The seed of `generator` fixes the initial noise (and DDPM's noise at every step).
        `progress` None shows a bar only for long runs (n x steps >= 5,000, e.g. `dreamlab sample` with DDPM)."""
        if condition:
            raise DreamlabError(f"ddpm is unconditional; it takes no {', '.join(sorted(condition))}")
        if noise is None:
            noise = randn((n, *self.image_shape), generator=generator, device=self.device)
        elif tuple(noise.shape) != (n, *self.image_shape):
            raise DreamlabError(f"noise has shape {tuple(noise.shape)}, not {(n, *self.image_shape)}")
        if progress is None:
            progress = n * self._steps(scheduler, num_inference_steps) >= 5000
        x = self.denoise(noise, scheduler=scheduler, num_inference_steps=num_inference_steps, generator=generator,
                         eta=eta, ema=ema, progress=progress)
        return ((x.clamp(-1, 1) + 1) / 2).float()

    @torch.no_grad()
    def interpolate(self, frames: int = 9, *, pairs: int = 1, generator: torch.Generator | None = None,
                    num_inference_steps: int | None = None) -> torch.Tensor:
        """`pairs` rows of `frames` DDIM samples whose initial noises move along the great circle between two
        random noises (spherical interpolation): (pairs * frames, C, H, W), row-major."""
        if frames < 2 or pairs < 1:
            raise DreamlabError(f"frames={frames} must be >= 2 and pairs={pairs} >= 1")
        a = randn((pairs, *self.image_shape), generator=generator, device=self.device)
        b = randn((pairs, *self.image_shape), generator=generator, device=self.device)
        z = torch.stack([slerp(a, b, float(w)) for w in torch.linspace(0, 1, frames)], 1).flatten(0, 1)
        return self.sample(len(z), noise=z, scheduler="ddim", num_inference_steps=num_inference_steps)

    # ---- the variational bound -------------------------------------------------------------
    def _bound_terms(self) -> dict[str, torch.Tensor]:
        s = self.noise_scheduler
        ab = s.alphas_cumprod.double()
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        betas = s.betas.double()
        post_var = betas * (1 - ab_prev) / (1 - ab)               # β̃_t (0 at t = 0)
        c0 = ab_prev.sqrt() * betas / (1 - ab)                    # weight of x0 in the posterior mean
        # the decoder's variance: β̃ of the next step (Ho et al.'s clipped log variance), since β̃_0 = 0
        dec_var = post_var[1] if len(post_var) > 1 else betas[0]
        return {"ab": ab, "post_var": post_var, "c0": c0, "dec_var": dec_var}

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, *, timesteps: int | None = None, generator: torch.Generator | None = None,
                 ema: bool = True, batch_size: int = 64) -> torch.Tensor:
        """The variational lower bound on log P(x) of 8-bit images `x` in [0, 1], in nats per image (see the module
        docstring). `timesteps=K` estimates the KL sum from K strata (unbiased); None evaluates all T - 1 terms."""
        T = self.config.num_train_timesteps
        n_kl = T - 1
        K = n_kl if timesteps is None else int(timesteps)
        if not 1 <= K <= max(n_kl, 1):
            raise DreamlabError(f"timesteps={timesteps} must be from 1 to {n_kl} (or None for every term)")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise DreamlabError(f"x has shape {tuple(x.shape)}; this ddpm scores images of shape (N, {shape})")
        net = self.ema.module if ema else self.unet
        was = net.training
        net.eval()
        dev = self.device
        q = self._bound_terms()
        ab, post_var, c0 = q["ab"], q["post_var"], q["c0"]
        # strata of the KL terms t = 1..T-1: K near-equal runs, one random t each, weighted by the run's length
        edges = torch.linspace(1, T, K + 1).round().long().tolist() if n_kl else []
        out = []
        for xb in x.split(batch_size):
            x0 = (xb.to(dev).double() * 255).round() / 255 * 2 - 1
            dims = tuple(range(1, x0.ndim))
            a_last = ab[-1]
            prior = 0.5 * (-torch.log1p(-a_last) + (1 - a_last) + a_last * x0.pow(2) - 1).sum(dims)
            kl = torch.zeros(len(x0), dtype=torch.float64, device=dev)
            for lo, hi in zip(edges[:-1], edges[1:]):
                if hi <= lo:
                    continue
                pick = lo + int(torch.randint(hi - lo, (1,), generator=generator, device=generator.device
                                              if generator is not None else "cpu"))
                err = (x0 - self._x0_pred(net, x0, pick, ab, generator)).pow(2)
                kl += (hi - lo) * (c0[pick] ** 2 * err / (2 * post_var[pick])).sum(dims)
            dec = discretized_gaussian_log_likelihood(x0, self._x0_pred(net, x0, 0, ab, generator),
                                                       0.5 * torch.log(q["dec_var"]).to(dev).expand_as(x0))
            out.append((-(prior + kl) + dec.sum(dims)).float().cpu())
        net.train(was)
        return torch.cat(out)

    def _x0_pred(self, net: torch.nn.Module, x0: torch.Tensor, t: int, ab: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        """x_t ~ q(x_t | x0), then the network's clean-image prediction from it (clipped as the samplers clip)."""
        eps = randn(tuple(x0.shape), generator=generator, device=x0.device).double()
        xt = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        with autocast(x0.device):
            e = net(xt.float(), torch.full((len(x0),), t, device=x0.device)).sample.double()
        pred = (xt - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        return pred.clamp(-1, 1) if self.config.clip_sample else pred

    def bits_per_dim(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        """-log_prob / (dims · ln 2): an upper bound on the negative log-likelihood in bits per dimension."""
        return -self.log_prob(x, **kw) / (math.prod(self.image_shape) * math.log(2))

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """Held-out noise-prediction MSE, the bits/dim bound and, where a feature network exists for the dataset,
        the Fréchet distance of `eval_samples` DDIM samples to the split (with the train-vs-split floor)."""
        c = self.config
        x = self.train_data(split)["x"][: max_items or None]
        with seeded(0):
            losses = [float(self._eps_loss(b.to(self.device))) * len(b) for b in x.split(100)]
        res = {f"{split}_loss": sum(losses) / len(x)}
        if c.eval_bound_items:
            g = torch.Generator().manual_seed(0)
            bpd = self.bits_per_dim(x[: c.eval_bound_items], timesteps=min(c.eval_bound_timesteps,
                                                                            max(c.num_train_timesteps - 1, 1)),
                                    generator=g)
            res[f"{split}_nll_bound_bpd"] = float(bpd.mean())
        if c.eval_samples:
            res.update({f"{split}_{k}": v for k, v in self.frechet(split, n=c.eval_samples).items()})
        return res

    def frechet(self, split: str = "test", n: int = 500, *, scheduler: str = "ddim",
                num_inference_steps: int | None = None, seed: int = 0,
                samples: torch.Tensor | None = None) -> dict[str, float]:
        """{"fd": Fréchet distance of n samples to the `split` images, "fd_floor": the same for n random training
        images at this model's resolution, "fd_n": n} on the dataset's feature network (`generators.features`,
        our features, not Inception); {} when the dataset has none."""
        set_name = feature_set(self.config.dataset)
        if set_name is None:
            return {}
        from generators.features import frechet_distance

        if samples is None:
            samples = self.sample_many(n, seed=seed, scheduler=scheduler, num_inference_steps=num_inference_steps)
        return {"fd": frechet_distance(set_name, samples[:n].float().clamp(0, 1), reference=split),
                "fd_floor": self.fd_floor(n, split=split, seed=seed), "fd_n": float(min(n, len(samples)))}

    def fd_floor(self, n: int, *, split: str = "test", seed: int = 0) -> float:
        """The Fréchet distance of n random training images, at this model's size and 8-bit grid, to `split`: what a
        perfect generator would score with n samples (FD grows as n shrinks)."""
        from generators.features import frechet_distance

        train = self.train_data("train")["x"]
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
        return frechet_distance(feature_set(self.config.dataset), train[idx], reference=split)

    @torch.no_grad()
    def sample_many(self, n: int, *, seed: int = 0, batch: int = 100, progress: bool = False,
                    **kw: Any) -> torch.Tensor:
        """n samples drawn `batch` at a time from one seeded generator (on the CPU)."""
        g = torch.Generator().manual_seed(seed)
        return torch.cat([self.sample(min(batch, n - i), generator=g, progress=progress, **kw).cpu()
                          for i in range(0, n, batch)])

    # ---- pictures -------------------------------------------------------------------------
    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves, save_grid
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        self.eval()
        out: list[Path] = []
        c = self.config
        p = plot_curves(read_metrics(run_dir), ["loss"], run_dir / "loss_curve.png", title=f"ddpm ({c.schedule})")
        if p:
            out.append(p)
        test = self.train_data("test")["x"]
        out += [plot_schedules(run_dir / "schedules.png", c.num_train_timesteps, highlight=c.schedule),
                plot_noising(test[0], run_dir / "noising.png", c.num_train_timesteps)]
        g = torch.Generator().manual_seed(0)
        out.append(save_grid(self.sample(64, generator=g), run_dir / "samples.png", nrow=8))
        out.append(save_grid(self.interpolate(9, pairs=4, generator=torch.Generator().manual_seed(1)),
                             run_dir / "interpolation.png", nrow=9))
        out.append(self._trajectory_picture(run_dir / "denoising.png"))
        out.append(self._steps_picture(run_dir / "ddim_steps.png"))
        return out

    def _trajectory_picture(self, path: Path, n: int = 3, steps: int = 20) -> Path:
        """For n samples, x_t and the predicted clean image x0 along a 20-step DDIM run, every other step."""
        xs: list[torch.Tensor] = []
        x0s: list[torch.Tensor] = []
        ts: list[int] = []

        def keep(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if i % 2 == 0 or i == steps - 1:
                xs.append((x.clamp(-1, 1).cpu() + 1) / 2)
                x0s.append((x0.clamp(-1, 1).cpu() + 1) / 2)
                ts.append(t)

        noise = randn((n, *self.image_shape), generator=torch.Generator().manual_seed(2), device=self.device)
        self.denoise(noise, scheduler="ddim", num_inference_steps=steps, callback=keep)
        rows, labels = [], []
        for i in range(n):
            rows += [torch.stack([x[i] for x in xs]), torch.stack([x[i] for x in x0s])]
            labels += [f"{i + 1}: x_t", f"{i + 1}: predicted x0"]
        return labelled_grid(rows, path, row_labels=labels, col_labels=[f"t={t}" for t in ts],
                             title=f"reverse process, DDIM {steps} steps ({self.config.schedule} schedule)")

    def _steps_picture(self, path: Path, n: int = 8, step_counts: tuple[int, ...] = (5, 10, 20, 50, 100)) -> Path:
        """The same initial noise through DDIM at several step counts: one row per count."""
        T = self.config.num_train_timesteps
        counts = [s for s in step_counts if s <= T]
        noise = randn((n, *self.image_shape), generator=torch.Generator().manual_seed(3), device=self.device)
        rows = [self.sample(n, noise=noise, num_inference_steps=s).cpu() for s in counts]
        return labelled_grid(rows, path, row_labels=[f"DDIM {s}" for s in counts],
                             title="the same initial noise, DDIM with more and more steps")

    # ---- persistence ----------------------------------------------------------------------
    def save_extra(self, directory: Path) -> None:
        """diffusers' layout beside dreamlab's files: `DDPMPipeline.from_pretrained(directory)` loads the EMA UNet and
        the DDPM scheduler (`DDIMScheduler.from_pretrained(directory, subfolder="scheduler")` the DDIM one)."""
        from dreamlab.io import save_json

        save_json(directory / "model_index.json", {"_class_name": "DDPMPipeline", "_diffusers_version": _dv(),
                                                   "unet": ["diffusers", "UNet2DModel"],
                                                   "scheduler": ["diffusers", "DDPMScheduler"]})
        self.ema.module.save_pretrained(directory / "unet", safe_serialization=True)
        self.noise_scheduler.save_config(directory / "scheduler")


def _dv() -> str:
    import diffusers

    return diffusers.__version__


# ----------------------------------------------------------------------------- feature networks for Fréchet distances


def feature_set(dataset: str) -> str | None:
    """The `generators.features` image set that measures `dataset`, or None when it has no feature network."""
    from generators.features import image_set

    try:
        s = image_set(dataset)
    except DreamlabError:
        return None
    return s.name if s.dataset == dataset else None


# ----------------------------------------------------------------------------- schedule pictures


def plot_schedules(path: Path, T: int = 1000, highlight: str | None = None) -> Path:
    """Each schedule's ᾱ_t, its signal rate √ᾱ_t (solid) and noise rate √(1 - ᾱ_t) (dashed) as in the book's
    figure 8-4, and its log signal-to-noise ratio log(ᾱ_t / (1 - ᾱ_t))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamlab.images import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    t = np.arange(T)
    for i, s in enumerate(SCHEDULES):
        ab = alpha_bar(s, T)
        lw, col = (2.5 if s == highlight else 1.3), f"C{i}"
        label = s + (" (this run)" if s == highlight else "")
        axes[0].plot(t, ab, lw=lw, color=col, label=label)
        axes[1].plot(t, np.sqrt(ab), lw=lw, color=col, label=f"{s}: signal")
        axes[1].plot(t, np.sqrt(1 - ab), lw=lw, color=col, ls="--", label=f"{s}: noise")
        axes[2].plot(t, np.log(ab / (1 - ab)), lw=lw, color=col, label=label)
    axes[0].set(xlabel="t", ylabel="ᾱ_t", title="ᾱ_t (signal variance)")
    axes[1].set(xlabel="t", ylabel="rate", title="signal rate √ᾱ_t and noise rate √(1-ᾱ_t)")
    axes[2].set(xlabel="t", ylabel="log SNR", title="log(ᾱ_t / (1-ᾱ_t))")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_noising(image: torch.Tensor, path: Path, T: int = 1000,
                 ts: tuple[int, ...] = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)) -> Path:
    """One image noised by `DDPMScheduler.add_noise` at several t, one row per schedule, the same ε everywhere."""
    ts = tuple(t for t in ts if t < T) or (T - 1,)
    x0 = image[None].float() * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for s in SCHEDULES:
        sched = make_scheduler("ddpm", s, T)
        xt = sched.add_noise(x0.expand(len(ts), -1, -1, -1), eps.expand(len(ts), -1, -1, -1), torch.tensor(ts))
        rows.append((xt.clamp(-1, 1) + 1) / 2)
    return labelled_grid(rows, path, row_labels=list(SCHEDULES), col_labels=[f"t={t}" for t in ts],
                         title="forward process q(x_t | x_0): the same image and noise under each schedule")


def labelled_grid(rows: list[torch.Tensor], path: Path, *, row_labels: list[str], col_labels: list[str] | None = None,
                  title: str = "") -> Path:
    """Image rows (each (n, C, H, W) in [0, 1]) as a matplotlib figure with a label per row and per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamlab.images import save_figure, to_uint8

    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 0.8, 1.15 * len(rows) + 0.4), squeeze=False)
    for i, r in enumerate(rows):
        imgs = to_uint8(r)
        for j in range(n):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if j < len(imgs):
                im = imgs[j]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                          vmin=0, vmax=255)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
            if i == 0 and col_labels:
                ax.set_title(col_labels[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["DDPM", "DDPMConfig", "SCHEDULES", "alpha_bar", "make_scheduler", "offset_cosine_betas", "plot_noising",
           "plot_schedules", "scheduler_kwargs", "slerp", "labelled_grid"]
