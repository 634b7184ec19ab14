"""Text-to-music: a music transformer conditioned on text, with classifier-free and CLAP guidance.

The prompt is encoded by the frozen MiniLM of our CLAP (`multimodal.clap`): its `text_tokens` token states
(384-d each, standardised per dimension with the caption pool's statistics) pass through a small MLP and are placed
before the events, and the GPT-2 blocks of the book's notes + durations model (`generators.music.TokenTransformer`)
continue from there: START, the key/meter/tempo header the text asks for, then bars of notes. Token states, not one
pooled sentence vector: the MiniLM is uncased and the key of a caption is one letter among ~20 tokens ("in d major",
"in a minor key"), which mean pooling all but averages away (docs/experiments/music.md has the measured difference).

Training items are captioned windows of the corpus (`music_text.captioned_windows`), transposed at random so every
key is seen, with a caption drawn per step from the pool of their attribute combination; the held-out (key, meter,
source) triples are never shown. A fraction `caption_dropout` of captions is replaced by a learned null text, so
the same network models p(music) too and:

- **classifier-free guidance** (`guidance_scale` s): both logits of every event (note, then duration) are
  l_null + s (l_text - l_null); s = 1 is plain conditional sampling;
- **CLAP guidance** (`clap_guidance_candidates` k), the discrete-token counterpart of CLIP guidance: draw k
  candidates per wanted piece and keep the one our CLAP scores closest to the prompt. Its worth is measured by
  `multimodal.music_eval` against attributes read back from the notes with music21, never against CLAP itself.

`Text2MusicPipeline` is a dreamlab `Generator` (registered "text2music", trained by the shared trainer) with the
text-to-image pipeline's call shape: `pipe(prompt, max_new_tokens=, guidance_scale=, clap_guidance_candidates=,
temperature=, generator=, num_samples=)` returns `.pieces`, `.tokens` and `.clap_scores`, and `.save("song.mid")`
writes MIDI + WAV + piano-roll PNG (+ MusicXML for one voice). The CLAP rides inside the saved pipeline (its weights
are in model.safetensors), so a pipeline folder is all that sampling needs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dreamlab import music as M
from dreamlab.config import check_ranges, to_dict
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, load_json
from generators.base import Generator, Metrics, TrainConfig, register
from generators.music import TokenTransformer, sample_tokens, samples_to_pieces, transpose_batch, write_token_samples
from multimodal import music_text as T
from multimodal.clap import ClapConfig, ClapModel, load_clap

DEFAULT_RUN = "runs/text2music"
DEFAULT_CLAP = "runs/clap"
TINY_CLAP = {"sources": "chorales", "max_pieces": 4, "window": 24, "stride_bars": 2, "embed_dim": 16, "d_model": 16,
             "n_layers": 1, "n_heads": 2, "captions_per_combo": 1}
EXAMPLE_PROMPTS = ("a lively jig in D major", "a slow four-part chorale in a minor key",
                   "a calm waltz in F major", "a busy Irish tune in E minor in 4/4 time")


@dataclass
class Text2MusicConfig:
    clap_dir: str = ""             # trained CLAP folder (the presets: runs/clap); "" = a small fresh CLAP (pretrained
                                   # MiniLM text tower, untrained projection), so the model can be built anywhere
    clap_config: str = ""          # filled in automatically: the CLAP's config as JSON (its weights are in ours)
    sources: str = ",".join(M.SOURCE_NAMES)
    max_pieces: int = 0            # pieces per source (whole corpus files; 0 = all)
    seq_len: int = 192             # events per training window (header included)
    stride_bars: int = 2           # a window starts every `stride_bars` bars of a piece
    transpose: bool = True
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1
    text_tokens: int = 32          # MiniLM token states of the prompt placed before the events
    caption_dropout: float = 0.15
    captions_per_combo: int = 2
    caption_seed: int = 0
    max_new_tokens: int = 160      # sampling defaults
    min_new_tokens: int = 64       # no END before this many events (at most max_new_tokens - 1)
    temperature: float = 1.0
    guidance_scale: float = 1.5    # with 8 CLAP candidates the best measured on held-out prompts (docs/music.md)
    clap_guidance_candidates: int = 8
    bar_grammar: bool = True       # sample every bar to the written time signature's length (generators.music)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("seq_len", "stride_bars", "d_model", "n_layers", "n_heads", "text_tokens",
                                     "captions_per_combo", "max_new_tokens", "clap_guidance_candidates"),
                     nonneg=("max_pieces", "caption_seed", "min_new_tokens"), fraction=("dropout", "caption_dropout"))
        M.parse_sources(self.sources)
        if self.d_model % self.n_heads:
            raise DreamlabError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.max_new_tokens >= self.seq_len:
            raise DreamlabError(f"max_new_tokens={self.max_new_tokens} must be < seq_len={self.seq_len} "
                                "(the context the model was trained on)")
        if self.guidance_scale < 0 or self.temperature < 0:
            raise DreamlabError(f"guidance_scale={self.guidance_scale} and temperature={self.temperature} must be >= 0")


@dataclass
class Text2MusicOutput:
    """What the pipeline returns: decoded pieces, their tokens (N, T, 2) and CLAP scores (0-100) against the prompt."""

    pieces: list[M.Piece]
    tokens: torch.Tensor
    clap_scores: torch.Tensor
    prompts: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> list[Path]:
        """MIDI + WAV + piano-roll PNG (+ MusicXML for one voice) named after `path`, plus a .txt of the prompts."""
        from dreamlab.music_io import write_music

        titles = [f"{p[:60]} (CLAP {s:.0f})" for p, s in zip(self.prompts, self.clap_scores.tolist())]
        files = write_music(self.pieces, path, titles=titles)
        txt = Path(path).with_suffix(".txt")
        lines = [f"{i + 1}. {p}  |  CLAP score {s:.1f}  |  {piece_summary(x)}"
                 for i, (p, s, x) in enumerate(zip(self.prompts, self.clap_scores.tolist(), self.pieces))]
        files.append(atomic_write_text(txt, "\n".join(lines) + "\n"))
        return files


def piece_summary(p: M.Piece) -> str:
    r = M.readback(p)
    if r["key"] < 0:
        return "no notes"
    meter = M.METERS[r["meter"]] if r["meter"] >= 0 else "no clear meter"
    return (f"read back: {M.key_name(r['key'])}, {meter}, {M.DENSITY_BANDS[r['density']]}, {r['voices']} voice(s), "
            f"{len(p.notes)} notes, {p.quarters():.0f} quarter notes")


@register
class Text2MusicPipeline(Generator):
    """Text-to-music: MiniLM prompt prefix -> notes + durations transformer, classifier-free and CLAP guidance."""

    name = "text2music"
    config_class = Text2MusicConfig
    sample_range = None
    sample_formats = (".mid", ".wav", ".png", ".musicxml", ".safetensors")
    example_condition = {"prompt": "a lively jig in D major"}
    presets = {
        "tiny": {"clap_dir": "", "sources": "chorales", "max_pieces": 4, "seq_len": 32, "d_model": 32, "n_layers": 1,
                 "n_heads": 2, "text_tokens": 12, "captions_per_combo": 1, "max_new_tokens": 12, "steps": 2,
                 "batch_size": 8, "log_every": 1, "ckpt_every": 100},
        "quick": {"clap_dir": DEFAULT_CLAP, "max_pieces": 600, "seq_len": 160, "d_model": 128, "n_layers": 4,
                  "max_new_tokens": 128, "steps": 2000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01,
                  "grad_clip": 1.0, "log_every": 25, "ckpt_every": 500},
        "full": {"clap_dir": DEFAULT_CLAP, "max_pieces": 0, "seq_len": 384, "d_model": 384, "n_layers": 8,
                 "n_heads": 8, "max_new_tokens": 320, "captions_per_combo": 4, "steps": 40000, "batch_size": 64,
                 "lr": 5e-4, "weight_decay": 0.05, "grad_clip": 1.0, "ckpt_every": 2000},
    }

    def __init__(self, config: Text2MusicConfig) -> None:
        super().__init__(config)
        if config.clap_config:
            self.clap = ClapModel(ClapConfig(**json.loads(config.clap_config)), pretrained_text=False)
        elif config.clap_dir:
            self.clap = load_clap(config.clap_dir, device="cpu")
            config.clap_config = json.dumps(to_dict(self.clap.config))
        else:
            self.clap = ClapModel(ClapConfig(**TINY_CLAP))
            config.clap_config = json.dumps(to_dict(self.clap.config))
        for p in self.clap.parameters():
            p.requires_grad_(False)
        self.clap.eval()
        c = config
        width = self.clap.text.width
        self.core = TokenTransformer(c.d_model, c.n_layers, c.n_heads, c.text_tokens + c.seq_len, c.dropout)
        self.cond = nn.Sequential(nn.Linear(width, c.d_model), nn.GELU(), nn.Linear(c.d_model, c.d_model))
        self.null_text = nn.Parameter(torch.zeros(width))  # the null (dropped) caption: this vector at every position
        # per-dimension mean and spread of the caption pool's token states (set once from the training pool, saved
        # with the model): standardised, the states of different words differ by order one
        self.register_buffer("text_mean", torch.zeros(width))
        self.register_buffer("text_std", torch.ones(width))
        self._pool: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def train(self, mode: bool = True) -> Text2MusicPipeline:
        super().train(mode)
        self.clap.eval()  # frozen
        return self

    # ---- data -----------------------------------------------------------------------------
    def pieces(self, split: str) -> list[M.Piece]:
        return M.pieces_for_split(M.load_pieces(self.config.sources, self.config.max_pieces), split)

    def held_out(self) -> set[tuple[int, int, int]]:
        return self.clap.held_out()

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """Captioned windows: x (N, seq_len, 2), attr (N, 5), allowed transpositions (N, 12)."""
        c = self.config
        train = split == "train"
        d = T.captioned_windows(self.pieces(split), c.seq_len, c.stride_bars, self.held_out() if train else set(),
                                c.transpose and train)
        if train:
            texts = T.caption_pool(d["combos"], c.captions_per_combo, c.caption_seed)
            feats = T.cached_text_features(texts, self.encode_texts_np, f"minilm_states{c.text_tokens}", np.float16)
            rows = torch.full((T.N_COMBOS,), -1, dtype=torch.long)
            rows[torch.from_numpy(d["combos"])] = torch.arange(len(d["combos"]))
            self._pool = torch.from_numpy(feats).view(len(d["combos"]), c.captions_per_combo, c.text_tokens, -1)
            self._rows = rows
            if bool((self.text_std == 1).all()) and bool((self.text_mean == 0).all()):
                f = torch.from_numpy(feats).float().flatten(0, 1)
                f = f[f.abs().sum(-1) > 0]  # real tokens, not padding
                self.text_mean.copy_(f.mean(0))
                self.text_std.copy_(f.std(0).clamp(min=1e-4))
        return {k: torch.from_numpy(v) for k, v in d.items() if k != "combos"}

    def encode_texts_np(self, texts: list[str]) -> np.ndarray:
        return self.clap.text.states(texts, self.config.text_tokens).cpu().numpy()

    def text_states(self, prompts: list[str]) -> torch.Tensor:
        return self.clap.text.states(T.validate_prompts(prompts), self.config.text_tokens)

    def prefix(self, states: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
        """(B, text_tokens, 384) MiniLM token states -> (B, text_tokens, d_model) prefix embeddings: standardised,
        padding kept at 0, rows flagged in `null` (B,) replaced by the learned null text."""
        states = states.float()
        pad = states.abs().sum(-1, keepdim=True) == 0
        z = ((states - self.text_mean) / self.text_std).masked_fill(pad, 0.0)
        if null is not None:
            z = torch.where(null[:, None, None], self.null_text.expand_as(z), z)
        return self.cond(z)

    def null_prefix(self, b: int) -> torch.Tensor:
        z = torch.zeros(b, self.config.text_tokens, len(self.null_text), device=self.device)
        return self.prefix(z, torch.ones(b, dtype=torch.bool, device=self.device))

    # ---- training -------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        x, attr = batch["x"], batch["attr"]
        if self._pool is None:
            self.train_data("train")
        if self.training and self.config.transpose:
            x, s = transpose_batch(x, allowed=batch["allowed"].bool())
        else:
            s = torch.zeros(len(x), dtype=torch.long, device=x.device)
        key = (attr[:, 0] % 12 + s) % 12 + 12 * (attr[:, 0] // 12)
        cid = T.combo_id(key, attr[:, 1], attr[:, 2], attr[:, 3], attr[:, 4])
        rows = self._rows.to(x.device)[cid]
        if (rows < 0).any():
            raise DreamlabError("a training item has an attribute combination outside the caption pool")
        k = torch.randint(self.config.captions_per_combo, (len(x),), device=x.device)
        states = self._pool.to(x.device)[rows, k]
        drop = torch.rand(len(x), device=x.device) < self.config.caption_dropout if self.training else None
        note, dur, mask = self.core.nll(x, self.prefix(states, drop))
        n = mask.sum().clamp(min=1)
        note_nll, dur_nll = note.sum() / n, dur.sum() / n
        return note_nll + dur_nll, {"note_nll": note_nll.detach(), "dur_nll": dur_nll.detach()}

    def configure_optimizers(self, tc: TrainConfig) -> list[torch.optim.Optimizer]:
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("clap.")]
        return [torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)]

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """NLL per event of `split`'s windows with a caption of their attributes and with the null text: the gap is
        what the text tells the model (nats per event); and how often the likeliest KEY and TS header tokens are the
        window's own, given its canonical prompt (key, meter, source, density) or the null text (teacher-forced)."""
        was = self.training
        self.eval()
        d = self.train_data(split)
        n = min(len(d["x"]), max_items or 512)
        x, attr = d["x"][:n].to(self.device), d["attr"][:n].numpy()
        rng = np.random.default_rng(0)
        caps = [T.caption(tuple(int(v) for v in row), rng) for row in attr]
        states = self.text_states(caps)
        res: dict[str, float] = {}
        for tag, pre in (("caption", lambda i, j: self.prefix(states[i:j])),
                         ("null", lambda i, j: self.null_prefix(j - i))):
            tot = cnt = 0.0
            for i in range(0, n, 64):
                j = min(i + 64, n)
                note, dur, mask = self.core.nll(x[i:j], pre(i, j))
                tot += float((note + dur).sum())
                cnt += float(mask.sum())
            res[f"{split}_nll_per_event_{tag}"] = tot / max(cnt, 1)
        prompts = [T.prompt_for(tuple(int(v) for v in row)) for row in attr]
        states = self.text_states(prompts)
        for tag, pre in (("prompt", lambda i, j: self.prefix(states[i:j])),
                         ("null", lambda i, j: self.null_prefix(j - i))):
            hits = torch.zeros(2)
            for i in range(0, n, 64):
                j = min(i + 64, n)
                xb = x[i:j, :2]  # START, KEY
                emb = torch.cat([pre(i, j), self.core.embed(xb)], 1)
                h, _ = self.core.hidden(emb)
                pred = self.core.note_head(h[:, -2:]).argmax(-1)  # after START: KEY; after KEY: TS
                hits += (pred == x[i:j, 1:3, 0]).float().sum(0).cpu()
            res[f"{split}_header_key_acc_{tag}"] = float(hits[0]) / max(n, 1)
            res[f"{split}_header_meter_acc_{tag}"] = float(hits[1]) / max(n, 1)
        self.train(was)
        return res

    # ---- sampling -------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], *, max_new_tokens: int | None = None,
                 guidance_scale: float | None = None, clap_guidance_candidates: int | None = None,
                 temperature: float | None = None, generator: torch.Generator | None = None,
                 num_samples: int = 1, progress: bool = False, bar_grammar: bool | None = None) -> Text2MusicOutput:
        prompts = T.validate_prompts(prompt)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise DreamlabError(f"num_samples={num_samples!r} must be a positive integer")
        prompts = [p for p in prompts for _ in range(num_samples)]
        tok, scores = self._generate(prompts, len(prompts), max_new_tokens, guidance_scale, clap_guidance_candidates,
                                     temperature, generator, bar_grammar)
        return Text2MusicOutput(pieces=samples_to_pieces(tok), tokens=tok, clap_scores=scores, prompts=prompts)

    def sample(self, n: int, *, generator: torch.Generator | None = None, prompt: str | list[str] | None = None,
               **kw: Any) -> torch.Tensor:
        """n pieces as float token ids (n, 1 + max_new_tokens, 2) for `prompt` (one, or a list of n); without a
        prompt, unconditional (the null text)."""
        if prompt is not None:
            prompts = T.validate_prompts(prompt)
            prompts = prompts * n if len(prompts) == 1 else prompts
            if len(prompts) != n:
                raise DreamlabError(f"got {len(prompts)} prompts for n={n} pieces; pass one prompt or exactly n")
        else:
            prompts = None
        tok, _ = self._generate(prompts, n, kw.get("max_new_tokens"), kw.get("guidance_scale"),
                                kw.get("clap_guidance_candidates"), kw.get("temperature"), generator,
                                kw.get("bar_grammar"))
        return tok.float()

    def save_samples(self, samples: torch.Tensor, path: str | Path) -> list[Path]:
        return write_token_samples(samples, path)

    @torch.no_grad()
    def _generate(self, prompts: list[str] | None, n: int, max_new: int | None, gs: float | None, k: int | None,
                  temperature: float | None, generator: torch.Generator | None,
                  bar_grammar: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        bars = c.bar_grammar if bar_grammar is None else bool(bar_grammar)
        max_new = c.max_new_tokens if max_new is None else int(max_new)
        gs = c.guidance_scale if gs is None else float(gs)
        k = c.clap_guidance_candidates if k is None else int(k)
        temperature = c.temperature if temperature is None else float(temperature)
        if max_new < 1 or k < 1:
            raise DreamlabError(f"max_new_tokens={max_new} and clap_guidance_candidates={k} must be at least 1")
        if gs < 0 or temperature < 0:
            raise DreamlabError(f"guidance_scale={gs} and temperature={temperature} must be >= 0")
        was = self.training
        self.eval()
        dev = self.device
        if prompts is None:
            gs, k = 1.0, 1
            pre = self.null_prefix(n)
        else:
            pre = self.prefix(self.text_states(prompts)).repeat_interleave(k, 0)
        b = len(pre)
        start = torch.tensor([[[M.START, M.DUR_ZERO]]], device=dev).expand(b, 1, 2).contiguous()
        tok = sample_tokens(self.core, start, max_new, temperature=temperature, generator=generator, prefix=pre,
                            null_prefix=self.null_prefix(b), guidance_scale=gs, bars=bars,
                            min_new=min(c.min_new_tokens, max_new - 1))
        if prompts is not None:
            scores = self.clap.score(tok, [p for p in prompts for _ in range(k)]).view(n, k)
            best = scores.argmax(1)
            tok = tok.view(n, k, *tok.shape[1:])[torch.arange(n, device=dev), best]
            scores = scores[torch.arange(n, device=dev), best]
        else:
            scores = torch.full((n,), float("nan"), device=dev)
        self.train(was)
        return tok, scores.cpu()

    # ---- run folder -----------------------------------------------------------------------
    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        files = []
        p = plot_curves(read_metrics(run_dir), ["loss", "note_nll", "dur_nll"], run_dir / "curves.png",
                        title="text-to-music (nats per event)")
        files += [p] if p else []
        g = torch.Generator().manual_seed(0)
        out = self(list(EXAMPLE_PROMPTS), generator=g)
        files += out.save(run_dir / "samples.mid")
        return files


def load_pipeline(run: str | Path = DEFAULT_RUN, device: str = "auto") -> Text2MusicPipeline:
    """A trained pipeline from a run folder (its model/ or last checkpoint) or a saved pipeline folder."""
    run = Path(run)
    if not run.exists():
        raise DreamlabError(
            f"no trained text-to-music model at {run}; train one with: dreamlab multimodal train-clap && "
            f"dreamlab multimodal train-text2music --out {run}   (or pass --run FOLDER)")
    from generators.trainer import load_run

    for d in (run, run / "model"):
        if (d / "config.json").exists() and (d / "model.safetensors").exists():
            meta = load_json(d / "config.json")
            if meta.get("name") != "text2music":
                raise DreamlabError(f"{d} holds a {meta.get('name')!r} model, not a text2music pipeline")
            return Text2MusicPipeline.from_pretrained(d, device=device)
    m = load_run(run, device=device)
    if not isinstance(m, Text2MusicPipeline):
        raise DreamlabError(f"{run} holds a {m.name!r} model, not a text2music pipeline")
    return m


__all__ = ["Text2MusicPipeline", "Text2MusicConfig", "Text2MusicOutput", "load_pipeline"]
