"""Text-to-image: a diffusers `UNet2DConditionModel` conditioned on our CLIP's text embedding.

Training is DDPM (`DDPMScheduler.add_noise`, epsilon prediction, MSE) with caption dropout: a fraction
`caption_dropout` of captions is replaced by the null (all-zero) embedding, so the same network also
models p(x) and classifier-free guidance works. Sampling is DDIM (`DDIMScheduler`, eta 0, so a seed
fixes the images). The CLIP text embedding (normalised, `embed_dim`) enters the UNet twice: as a
one-token cross-attention context (`encoder_hidden_states`) and through the time embedding
(`class_embed_type="projection"`). With `patch_size=2` the UNet works on a space-to-depth view of the
image (`pixel_unshuffle`: 3x32x32 -> 12x16x16, a permutation of pixels, so the DDPM maths is unchanged),
which makes it about 4x cheaper on a CPU at the same output resolution.

Optional CLIP guidance at sampling time: at each step the clean image predicted from the (guided)
noise estimate, x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), is scored by CLIP against the prompt; the
gradient g of that cosine similarity with respect to x0 shifts eps by -sqrt(1 - a_t) * clip_guidance_scale * g,
as in classifier guidance (taken in x0 space, without the 1/sqrt(a_t) chain factor that explodes at
the first, noisiest steps).

`Text2ImgPipeline` is a dreamlab `Generator` (registered as "text2img", trained by the shared trainer)
and a diffusers-style pipeline: `pipe(prompt, num_inference_steps=, guidance_scale=,
clip_guidance_scale=, generator=, num_images_per_prompt=)` returns `.images`. `save_pretrained`
writes dreamlab's config.json + model.safetensors (UNet and CLIP weights) plus diffusers' layout
(model_index.json, unet/, scheduler/) so `UNet2DConditionModel.from_pretrained(dir + "/unet")` and
`DDIMScheduler.from_pretrained(dir + "/scheduler")` load the parts.

diffusers is imported inside functions: its import takes seconds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dreamlab import procedural as P
from dreamlab.config import check_ranges, to_dict
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, load_json, save_json, save_tensors
from generators.base import Generator, Metrics, TrainConfig, register
from multimodal.autoencoder import parse_sets
from multimodal.clip import ClipConfig, ClipModel, load_clip, validate_prompts

DEFAULT_RUN = "runs/text2img"
DEFAULT_CLIP = "runs/clip"
TINY_CLIP = {"sets": "faces", "max_per_set": 64, "image_size": 16, "embed_dim": 32, "vision_width": 32,
             "vision_layers": 1, "vision_head_width": 16, "patch_size": 4, "captions_per_class": 2}


@dataclass
class Text2ImgConfig:
    clip_dir: str = ""               # trained CLIP folder (the presets: runs/clip); "" = a small fresh CLIP (pretrained
                                     # MiniLM text tower, untrained projection), so the model can be built anywhere
    clip_config: str = ""            # filled in automatically: the CLIP's config as JSON (weights: model.safetensors)
    sets: str = "faces"              # procedural sets to train on (comma-separated: faces, flowers, bricks)
    max_per_set: int = 12000
    sample_size: int = 32
    patch_size: int = 2              # space-to-depth: the UNet sees (3*p*p, size/p, size/p); 4x cheaper at p=2
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    caption_dropout: float = 0.1
    captions_per_class: int = 24
    caption_seed: int = 7
    num_inference_steps: int = 50    # sampling defaults
    guidance_scale: float = 3.0
    clip_guidance_scale: float = 0.0
    timestep_spacing: str = "trailing"   # "trailing": the first DDIM step is t=999 (pure noise); v1 used "leading"
    x0_limit: str = "dynamic"        # predicted clean image: "dynamic" (Imagen's thresholding), "clip" (v1), "none"
    dynamic_threshold_ratio: float = 0.995  # Imagen's percentile p of |x0| per image (with x0_limit="dynamic")
    dynamic_threshold_max: float = 4.0  # the largest s (diffusers' sample_max_value; at 1.0 it is plain clipping)
    rederive_eps: bool = False       # re-derive eps from the limited x0 (GLIDE); measured worse here (docs/text2img.md)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("sample_size", "patch_size", "block_out_channels", "layers_per_block",
                                     "attention_head_dim", "norm_num_groups", "num_train_timesteps",
                                     "captions_per_class", "num_inference_steps"),
                     nonneg=("max_per_set", "caption_seed"), fraction=("caption_dropout", "dynamic_threshold_ratio"))
        for key, allowed in (("timestep_spacing", ("leading", "trailing", "linspace")),
                             ("x0_limit", ("clip", "dynamic", "none"))):
            if getattr(self, key) not in allowed:
                raise DreamlabError(f"{key}={getattr(self, key)!r}; choose one of {', '.join(allowed)}")


@dataclass
class Text2ImgOutput:
    """diffusers-style output: `images` float (N, 3, H, W) in [0, 1]."""

    images: torch.Tensor


@register
class Text2ImgPipeline(Generator):
    """Text-to-image: DDPM-trained UNet2DConditionModel on CLIP text embeddings, DDIM + CFG + CLIP guidance."""

    name = "text2img"
    config_class = Text2ImgConfig
    example_condition = {"prompt": "a smiling face with blonde hair and glasses"}
    presets = {
        "tiny": {"clip_dir": "", "max_per_set": 32, "sample_size": 16, "patch_size": 2, "block_out_channels": (16, 32),
                 "layers_per_block": 1,
                 "attention_head_dim": 4, "norm_num_groups": 8, "captions_per_class": 2, "num_inference_steps": 3,
                 "steps": 2, "batch_size": 8, "log_every": 1, "ckpt_every": 100},
        "quick": {"clip_dir": DEFAULT_CLIP, "steps": 800, "batch_size": 32, "lr": 5e-4, "log_every": 25,
                  "ckpt_every": 200, "grad_clip": 1.0},
        "full": {"clip_dir": DEFAULT_CLIP, "sets": "faces,flowers,bricks", "max_per_set": 0, "patch_size": 1,
                 "block_out_channels": (128, 256, 256),
                 "layers_per_block": 2,
                 "steps": 60000, "batch_size": 128, "lr": 2e-4, "ckpt_every": 2000, "grad_clip": 1.0},
    }

    def __init__(self, config: Text2ImgConfig) -> None:
        super().__init__(config)
        from diffusers import UNet2DConditionModel

        self.sets = parse_sets(config.sets)
        if config.clip_config:
            # rebuilding a saved pipeline: architecture from the stored config, weights from model.safetensors
            self.clip = ClipModel(ClipConfig(**json.loads(config.clip_config)), pretrained_text=False)
        elif config.clip_dir:
            self.clip = load_clip(config.clip_dir, device="cpu")
            config.clip_config = json.dumps(to_dict(self.clip.config))
        else:
            self.clip = ClipModel(ClipConfig(**TINY_CLIP))
            config.clip_config = json.dumps(to_dict(self.clip.config))
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        d = self.clip.config.embed_dim
        n = len(config.block_out_channels)
        if n < 2:
            raise DreamlabError(f"block_out_channels={config.block_out_channels} needs at least 2 levels, e.g. 64,128")
        bad = [c for c in config.block_out_channels if c % config.norm_num_groups]
        if bad:
            raise DreamlabError(f"block_out_channels {bad[0]} is not divisible by "
                                f"norm_num_groups={config.norm_num_groups}")
        p = config.patch_size
        if p < 1 or config.sample_size % p:
            raise DreamlabError(f"patch_size={p} must be >= 1 and divide sample_size={config.sample_size}")
        self.unet = UNet2DConditionModel(
            sample_size=config.sample_size // p, in_channels=3 * p * p, out_channels=3 * p * p,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            cross_attention_dim=d, attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
            class_embed_type="projection", projection_class_embeddings_input_dim=d,
        )
        self._pool: torch.Tensor | None = None
        self._offsets: dict[str, int] = {}
        off = 0
        for s in self.sets:
            self._offsets[s] = off
            off += len(P.all_combos(s))
        self._n_classes = off

    # ---- schedulers -----------------------------------------------------------------------
    def _scheduler_kwargs(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.config.num_train_timesteps, "beta_schedule": self.config.beta_schedule,
                "prediction_type": "epsilon", "clip_sample": True}

    def train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self._scheduler_kwargs())

    def scheduler(self, timestep_spacing: str | None = None, x0_limit: str | None = None):
        """DDIM for sampling. The clean-image estimate is clipped to [-1, 1] ("clip") or thresholded as Imagen does
        ("dynamic": s = the `dynamic_threshold_ratio` percentile of |x0|, at least 1; x0 <- clip(x0, -s, s) / s)."""
        from diffusers import DDIMScheduler

        limit = x0_limit or self.config.x0_limit
        kw = {**self._scheduler_kwargs(), "clip_sample": limit == "clip", "thresholding": limit == "dynamic",
              "dynamic_threshold_ratio": self.config.dynamic_threshold_ratio,
              "sample_max_value": self.config.dynamic_threshold_max}
        kw["dynamic_thresholding_ratio"] = kw.pop("dynamic_threshold_ratio")
        return DDIMScheduler(**kw, set_alpha_to_one=True,
                             timestep_spacing=timestep_spacing or self.config.timestep_spacing)

    # ---- data -----------------------------------------------------------------------------
    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """Images in [0, 1] at `sample_size` and their attribute-combination ids (captions come from a pool)."""
        self._build_pool()
        xs, cs = [], []
        for s in self.sets:
            d = P.load_procedural(s, split, max_items=self.config.max_per_set or None)
            x, c = d["x"], d["y"]
            xs.append(F.interpolate(x, size=(self.config.sample_size,) * 2, mode="area"))
            cs.append(c + self._offsets[s])
        return {"x": torch.cat(xs), "c": torch.cat(cs)}

    @torch.no_grad()
    def _build_pool(self) -> None:
        """CLIP text embeddings of `captions_per_class` captions per attribute combination (cached)."""
        if self._pool is not None and self._pool.device == self.device:
            return
        texts: list[str] = []
        for s in self.sets:
            labels = np.array([P.combo_indices(s, c) for c in P.all_combos(s)])
            texts += [t for row in P.captions(s, labels, seed=self.config.caption_seed + P.KINDS.index(s),
                                              per_image=self.config.captions_per_class) for t in row]
        emb = self.clip.encode_text_batched(texts)
        self._pool = emb.view(self._n_classes, self.config.captions_per_class, -1)

    # ---- training -------------------------------------------------------------------------
    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        h = F.pixel_unshuffle(x, p) if p > 1 else x
        out = self.unet(h, t, encoder_hidden_states=emb[:, None, :], class_labels=emb).sample
        return F.pixel_shuffle(out, p) if p > 1 else out

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        x0 = batch["x"] * 2 - 1
        c = batch["c"]
        self._build_pool()
        k = torch.randint(self.config.captions_per_class, (len(c),), device=c.device)
        emb = self._pool[c, k]
        drop = torch.rand(len(c), device=c.device) < self.config.caption_dropout
        emb = emb.masked_fill(drop[:, None], 0.0)
        sched = self._train_sched()
        t = torch.randint(0, sched.config.num_train_timesteps, (len(c),), device=x0.device)
        noise = torch.randn_like(x0)
        xt = sched.add_noise(x0, noise, t)
        pred = self._unet(xt, t, emb)
        loss = F.mse_loss(pred.float(), noise)
        return loss, {}

    def _train_sched(self):
        if getattr(self, "_ts", None) is None:
            self._ts = self.train_scheduler()
        return self._ts

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(self.unet.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                  weight_decay=tc.weight_decay)]

    # ---- sampling -------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str] | None, n: int) -> torch.Tensor:
        """(n, D) CLIP text embeddings; `None` gives the null (unconditional) embedding."""
        if prompts is None:
            return torch.zeros(n, self.clip.config.embed_dim, device=self.device)
        with torch.no_grad():
            return self.clip.encode_text(prompts)

    def __call__(self, prompt: str | list[str], *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None,
                 clip_guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 num_images_per_prompt: int = 1, progress: bool = False) -> Text2ImgOutput:
        prompts = validate_prompts(prompt)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise DreamlabError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        images = self._generate(prompts, len(prompts), num_inference_steps, guidance_scale, clip_guidance_scale,
                                generator, progress)
        return Text2ImgOutput(images=images)

    def sample(self, n: int, *, generator: torch.Generator | None = None, prompt: str | list[str] | None = None,
               **kw: Any) -> torch.Tensor:
        """n images for `prompt` (one prompt, or a list of n); without a prompt, unconditional samples."""
        if prompt is None:
            return self._generate(None, n, kw.get("num_inference_steps"), 1.0, 0.0, generator, False)
        prompts = validate_prompts(prompt)
        if len(prompts) == 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise DreamlabError(f"got {len(prompts)} prompts for n={n} images; pass one prompt or exactly n")
        return self._generate(prompts, n, kw.get("num_inference_steps"), kw.get("guidance_scale"),
                              kw.get("clip_guidance_scale"), generator, False)

    def _generate(self, prompts: list[str] | None, n: int, steps: int | None, gs: float | None, cgs: float | None,
                  generator: torch.Generator | None, progress: bool) -> torch.Tensor:
        from tqdm.auto import tqdm

        from dreamlab.device import autocast

        c = self.config
        steps = c.num_inference_steps if steps is None else int(steps)
        gs = c.guidance_scale if gs is None else float(gs)
        cgs = c.clip_guidance_scale if cgs is None else float(cgs)
        if steps < 1:
            raise DreamlabError(f"num_inference_steps={steps} must be at least 1")
        if not (0 <= gs < float("inf") and 0 <= cgs < float("inf")):  # NaN passed `gs < 0`: black images
            raise DreamlabError(f"guidance_scale={gs} and clip_guidance_scale={cgs} must be finite numbers >= 0")
        was = self.training
        self.eval()
        dev = self.device
        cond = self.encode_prompt(prompts, n)
        use_cfg = prompts is not None and gs != 1.0
        ctx = torch.cat([torch.zeros_like(cond), cond]) if use_cfg else cond
        limit = c.x0_limit
        sched = self.scheduler()
        sched.set_timesteps(steps, device=dev)
        shape = (n, 3, c.sample_size, c.sample_size)
        x = torch.randn(shape, generator=generator, device=generator.device if generator is not None else dev).to(dev)
        x = x * sched.init_noise_sigma
        alphas = sched.alphas_cumprod.to(dev)
        bar = tqdm(total=steps, desc="ddim", unit="step", disable=not progress)
        for i, t in enumerate(sched.timesteps):
            # step i + 1 of `steps`: predict noise (twice with CFG), optionally nudge it with CLIP, then a DDIM update
            bar.set_postfix_str(f"step {i + 1}/{steps} t={int(t)}", refresh=False)
            with torch.no_grad(), autocast(dev):
                inp = torch.cat([x, x]) if use_cfg else x
                eps = self._unet(sched.scale_model_input(inp, t), t.expand(len(inp)), ctx).float()
            if use_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + gs * (eps_c - eps_u)
            if cgs > 0 and prompts is not None:
                a = alphas[t]
                grad = self._clip_grad(x, eps, a, cond)
                eps = eps - (1 - a).sqrt() * cgs * grad
            # use_clipped_model_output: eps is re-derived from the clipped/thresholded x0 (as GLIDE and Imagen do), so
            # the step moves towards the image that was kept, not towards the out-of-range one that was cut
            x = sched.step(eps, t, x, use_clipped_model_output=c.rederive_eps and limit != "none").prev_sample
            bar.update(1)
        bar.close()
        self.train(was)
        return ((x.clamp(-1, 1) + 1) / 2).float()

    def _clip_grad(self, x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Gradient of the CLIP cosine similarity (image vs prompt) with respect to the predicted clean image x0.

        Taken in x0 space: the chain factor dx0/dx_t = 1/sqrt(a_t) would multiply the push by ~16 at the
        first DDIM steps (a_t ~ 0.004), where x0 is still a blur, and wreck the samples.
        """
        with torch.enable_grad():
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1).detach().requires_grad_(True)
            sim = (self.clip.encode_image((x0 + 1) / 2) * text).sum()
            (g,) = torch.autograd.grad(sim, x0)
        return g

    # ---- persistence ----------------------------------------------------------------------
    def save_extra(self, directory: Path) -> None:
        """diffusers' layout beside dreamlab's files: model_index.json, unet/, scheduler/."""
        save_json(directory / "model_index.json", {"_class_name": "Text2ImgPipeline", "_dreamlab_name": self.name,
                                             "unet": ["diffusers", "UNet2DConditionModel"],
                                             "scheduler": ["diffusers", "DDIMScheduler"],
                                             "text_encoder": ["open_clip", "CustomTextCLIP"]})
        (directory / "unet").mkdir()
        save_json(directory / "unet" / "config.json", dict(self.unet.config))
        save_tensors(directory / "unet" / "diffusion_pytorch_model.safetensors", self.unet.state_dict())
        (directory / "scheduler").mkdir()
        save_json(directory / "scheduler" / "scheduler_config.json",
                  {"_class_name": "DDIMScheduler", **dict(self.scheduler().config)})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "auto") -> Text2ImgPipeline:
        directory = Path(directory)
        if not (directory / "config.json").exists() and (directory / "model" / "config.json").exists():
            directory = directory / "model"
        return Generator.from_pretrained.__func__(cls, directory, device=device)  # type: ignore[attr-defined]

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves, save_grid
        from generators.trainer import read_metrics

        out = []
        p = plot_curves(read_metrics(run_dir), ["loss"], run_dir / "curves.png", title="text2img")
        if p:
            out.append(p)
        s = self.sets[0]
        prompts = [P.prompt_for(s, c) for c in P.HELD_OUT[s][:4]]
        g = torch.Generator(device="cpu").manual_seed(0)
        imgs = self(prompts, num_images_per_prompt=4, generator=g).images
        out.append(save_grid(imgs, run_dir / "samples_heldout_prompts.png", nrow=4, scale=3))
        atomic_write_text(run_dir / "samples_heldout_prompts.txt",
                          "\n".join(f"row {i + 1}: {p}" for i, p in enumerate(prompts)) + "\n")
        return out


def load_pipeline(run: str | Path = DEFAULT_RUN, device: str = "auto") -> Text2ImgPipeline:
    """A trained pipeline from a run folder (its model/ or last checkpoint) or a saved pipeline folder."""
    run = Path(run)
    if not run.exists():
        raise DreamlabError(
            f"no trained text-to-image model at {run}; train one with: dreamlab multimodal train-clip && "
            f"dreamlab multimodal train-text2img --out {run}   (or pass --run FOLDER)")
    from generators.trainer import load_run

    for d in (run, run / "model"):
        if (d / "config.json").exists() and (d / "model.safetensors").exists():
            meta = load_json(d / "config.json")
            if meta.get("name") != "text2img":
                raise DreamlabError(f"{d} holds a {meta.get('name')!r} model, not a text2img pipeline")
            return Text2ImgPipeline.from_pretrained(d, device=device)
    m = load_run(run, device=device)
    if not isinstance(m, Text2ImgPipeline):
        raise DreamlabError(f"{run} holds a {m.name!r} model, not a text2img pipeline")
    return m


__all__ = ["Text2ImgPipeline", "Text2ImgConfig", "Text2ImgOutput", "load_pipeline"]
