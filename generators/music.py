"""Music transformer (ch. 11): the book's notes + durations model on music21's corpus.

Each event of a piece is two tokens (`dreamlab.music`): a note token (a pitch starting or held, a rest, a bar line,
the key/meter/tempo header) and a duration token. Two embeddings, one per stream, are concatenated (as in the book)
and run through a causal transformer: Hugging Face `GPT2Model` blocks fed with `inputs_embeds` (its learned position
embeddings, pre-LN blocks and key/value cache: sampling costs one block pass per new event, not a pass over the whole
sequence). Two heads predict the next note and the next duration.

One change from the book, and why: the book's two heads are independent given the past, so a sampled pair can be
"bar line" + "half note" or, worse, a melody note + the zero duration that means "a chord continues". Here the
duration head also sees the next note (teacher-forced in training, the sampled one when sampling):
p(note, duration | past) = p(note | past) p(duration | past, note), still exact, so `log_prob` is exact too.

Training windows are `seq_len + 1` events cut from the pieces of the train split (half-overlapping), transposed by a
random number of semitones per window (`transpose`, keeping every pitch in range) so all 24 keys are seen. Held-out
metric: negative log-likelihood per event (note + duration, nats) and per stream on the test split's windows,
untransposed. `sample(n, prompt_notes="C4:1 E4:0.5 G4", temperature=1.0)` continues a sampled key/meter/tempo
header and the given notes; `save_samples` writes MIDI + WAV + piano-roll PNG (+ MusicXML for one voice).
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab import music as M
from dreamlab.config import check_ranges
from dreamlab.device import rand
from dreamlab.errors import DreamlabError
from dreamlab.io import save_tensors
from generators.base import Generator, Metrics, register

PLAUSIBLE = 0.1  # classifier-free guided sampling keeps the tokens with p_cond >= PLAUSIBLE * max p_cond
MAX_SHIFT = 6  # transposition augmentation: -6..+5 semitones reaches every key from any key


# ----------------------------------------------------------------------------- the shared network


class TokenTransformer(nn.Module):
    """Note and duration embeddings -> GPT-2 blocks -> a note head and a duration head (given the next note).

    `prefix` (B, P, d_model) embeddings may precede the tokens (text-to-music puts its text condition there)."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.d_model, self.max_len = d_model, max_len
        self.note_emb = nn.Embedding(M.NOTE_VOCAB, d_model - d_model // 2)
        self.dur_emb = nn.Embedding(M.DUR_VOCAB, d_model // 2)
        cfg = GPT2Config(vocab_size=1, n_positions=max_len, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=None,
                         eos_token_id=None)
        self.gpt = GPT2Model(cfg)
        self.gpt.wte.weight.requires_grad_(False)  # tokens enter as inputs_embeds: GPT-2's own token table is unused
        self.note_head = nn.Linear(d_model, M.NOTE_VOCAB)
        self.next_note_emb = nn.Embedding(M.NOTE_VOCAB, d_model)
        self.dur_head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                      nn.Linear(d_model, M.DUR_VOCAB))

    def embed(self, tok: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.note_emb(tok[..., 0]), self.dur_emb(tok[..., 1])], -1)

    def hidden(self, emb: torch.Tensor, cache: Any = None, use_cache: bool = False,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        out = self.gpt(inputs_embeds=emb, cache=cache, use_cache=use_cache, attention_mask=attention_mask)
        return out.last_hidden_state, getattr(out, "cache", None)

    def dur_logits(self, h: torch.Tensor, next_note: torch.Tensor) -> torch.Tensor:
        return self.dur_head(h + self.next_note_emb(next_note))

    def nll(self, tok: torch.Tensor,
            prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-position NLL (B, T-1) of notes and durations of tok[:, 1:] given what precedes, and the mask of real
        (non-padding) targets."""
        emb = self.embed(tok[:, :-1])
        if prefix is not None:
            emb = torch.cat([prefix, emb], 1)
        h, _ = self.hidden(emb)
        h = h[:, h.shape[1] - (tok.shape[1] - 1):]
        tgt = tok[:, 1:]
        mask = tgt[..., 0] != M.PAD
        note_nll = F.cross_entropy(self.note_head(h).flatten(0, 1).float(), tgt[..., 0].flatten(), reduction="none")
        dur_nll = F.cross_entropy(self.dur_logits(h, tgt[..., 0]).flatten(0, 1).float(), tgt[..., 1].flatten(),
                                  reduction="none")
        return note_nll.view_as(mask) * mask, dur_nll.view_as(mask) * mask, mask


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row (inverse CDF on a uniform from `generator`, which may live on another device)."""
    if temperature <= 0:
        return logits.argmax(-1)
    p = torch.softmax(logits.float() / temperature, -1)
    u = rand((p.shape[0], 1), generator=generator, device=p.device)
    return (p.cumsum(-1) < u * p.sum(-1, keepdim=True)).sum(-1).clamp(max=p.shape[-1] - 1)


class BarGrammar:
    """The metric grammar of sampled events: once the header's time signature is written, the events of every bar
    fill exactly one bar of it. A duration that would run past the bar line is masked; when the bar is full the next
    note token is BAR (or END); BAR is masked inside a bar. Before the first bar line (a pickup) events may stop
    short. The model still chooses every token, and with it the meter (the TS token) and where the beats fall; the
    grammar only removes the impossible bar lengths the book's free sampling writes (3/4 bars of 3.5 quarters)."""

    def __init__(self, b: int, device: torch.device) -> None:
        self.bar_len = torch.tensor([M.METER_BAR_TICKS[m] for m in M.METERS], device=device)
        self.ticks = torch.tensor([M.dur_token_ticks(t) for t in range(M.DUR_VOCAB)], device=device)
        self.meter = torch.full((b,), -1, dtype=torch.long, device=device)
        self.pos = torch.zeros(b, dtype=torch.long, device=device)
        self.seen_bar = torch.zeros(b, dtype=torch.bool, device=device)

    def _left(self) -> tuple[torch.Tensor, torch.Tensor]:
        known = self.meter >= 0
        return known, self.bar_len[self.meter.clamp(min=0)] - self.pos

    def note_logits(self, lg: torch.Tensor) -> torch.Tensor:
        known, left = self._left()
        full = known & (left <= 0)
        mask = full[:, None].expand_as(lg).clone()
        mask[:, M.BAR] = known & ~full & self.seen_bar  # a full bar allows BAR (and END) only; inside one, no BAR
        mask[:, M.END] = False
        return lg.masked_fill(mask, float("-inf"))

    def dur_logits(self, lg: torch.Tensor, note: torch.Tensor) -> torch.Tensor:
        known, left = self._left()
        timed = known & ((note == M.REST) | (note >= M.NOTE0))
        too_long = self.ticks[None] > left.clamp(min=0)[:, None]
        return lg.masked_fill(timed[:, None] & too_long, float("-inf"))

    def update(self, events: torch.Tensor) -> None:
        """Advance over events (B, k, 2) as written (sampled or forced)."""
        for ev in events.unbind(1):
            note, dur = ev[:, 0], ev[:, 1]
            ts = (note >= M.TS0) & (note < M.TEMPO0)
            self.meter = torch.where(ts, note - M.TS0, self.meter)
            bar = note == M.BAR
            self.seen_bar |= bar
            timed = (note == M.REST) | (note >= M.NOTE0)
            self.pos = torch.where(bar, torch.zeros_like(self.pos), self.pos + torch.where(timed, self.ticks[dur], 0))


def guided_logits(cond: torch.Tensor, null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance for a categorical draw: log p_null + scale (log p_cond - log p_null), over the tokens
    the conditional model finds plausible (p_cond >= PLAUSIBLE * max p_cond, contrastive decoding's cut, Li et al.
    2022). Mixing raw logits instead lets a token both models rule out win whenever the null text rules it out
    harder: at scale 3 the text-to-music model skipped its header (START was followed by a note)."""
    cond, null = cond.float().log_softmax(-1), null.float().log_softmax(-1)
    keep = cond >= cond.amax(-1, keepdim=True) + math.log(PLAUSIBLE)
    return (null + scale * (cond - null)).masked_fill(~keep, float("-inf"))


@torch.no_grad()
def sample_tokens(core: TokenTransformer, start: torch.Tensor, max_new: int, *, temperature: float = 1.0,
                  generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
                  null_prefix: torch.Tensor | None = None, guidance_scale: float = 1.0,
                  forced: list[tuple[int, torch.Tensor]] | None = None, bars: bool = False,
                  min_new: int = 0) -> torch.Tensor:
    """Continue `start` (B, T0, 2) by `max_new` events; rows that wrote END continue with PAD.

    With `prefix` (B, P, d) the tokens are conditioned on it; with `null_prefix` too and `guidance_scale` != 1 the
    note and duration distributions are classifier-free guided (`guided_logits`). `forced` lists (step, tokens
    (B, k, 2)) to insert instead of sampling from that step on (a prompt after the header). `bars`: sample under
    `BarGrammar` (every bar as long as the written time signature says). `min_new`: END is masked before that many
    events (transformers' `min_new_tokens`): a piece of four notes is no answer to a prompt."""
    b, dev = start.shape[0], start.device
    cfg = null_prefix is not None and guidance_scale != 1.0
    pre = None
    if prefix is not None:
        pre = torch.cat([prefix, null_prefix]) if cfg else prefix
    p_len = 0 if pre is None else pre.shape[1]
    forced_at = dict(forced or [])
    extra = sum(t.shape[1] for t in forced_at.values())
    if p_len + start.shape[1] + max_new + extra > core.max_len + 1:
        room = core.max_len + 1 - p_len - start.shape[1] - extra
        raise DreamlabError(f"{start.shape[1]} start + {max_new} new events (+{p_len} prefix) exceed the model's "
                            f"context of {core.max_len}; ask for at most {room}")
    seq = start
    feed = torch.cat([start, start]) if cfg else start
    emb = core.embed(feed)
    if pre is not None:
        emb = torch.cat([pre, emb], 1)
    cache = None
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    grammar = BarGrammar(b, dev) if bars else None
    if grammar is not None:
        grammar.update(start)
    step = 0
    while step < max_new:
        h, cache = core.hidden(emb, cache=cache, use_cache=True)
        if step in forced_at:
            f = forced_at.pop(step).to(dev)
            if grammar is not None:
                grammar.update(f)
            seq = torch.cat([seq, f], 1)
            emb = core.embed(torch.cat([f, f]) if cfg else f)
            continue
        h = h[:, -1]

        def mix(lg: torch.Tensor) -> torch.Tensor:
            return guided_logits(lg[:b], lg[b:], guidance_scale) if cfg else lg

        note_lg = mix(core.note_head(h))
        if step < min_new:
            note_lg[:, M.END] = float("-inf")
        note = _draw(grammar.note_logits(note_lg) if grammar is not None else note_lg, temperature, generator)
        nn_ = torch.cat([note, note]) if cfg else note
        dur_lg = mix(core.dur_logits(h, nn_))
        dur = _draw(grammar.dur_logits(dur_lg, note) if grammar is not None else dur_lg, temperature, generator)
        note = torch.where(done, torch.full_like(note, M.PAD), note)
        dur = torch.where(done, torch.full_like(dur, M.DUR_PAD), dur)
        done |= note == M.END
        nxt = torch.stack([note, dur], -1)[:, None]
        if grammar is not None:
            grammar.update(nxt)
        seq = torch.cat([seq, nxt], 1)
        step += 1
        if bool(done.all()):
            pad = torch.zeros(b, max_new - step, 2, dtype=seq.dtype, device=dev)
            return torch.cat([seq, pad], 1)
        emb = core.embed(torch.cat([nxt, nxt]) if cfg else nxt)
    return seq


def transpose_batch(tok: torch.Tensor, max_shift: int = MAX_SHIFT, generator: torch.Generator | None = None,
                    allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Transpose each row of tokens (B, T, 2) by a random number of semitones in [-max_shift, max_shift - 1] that keeps
    its pitches in range (and, with `allowed` (B, 2 max_shift) booleans, is allowed); returns tokens and shifts."""
    n = tok[..., 0]
    pitched = n >= M.NOTE0
    q = torch.where(n >= M.HOLD0, n - M.HOLD0, n - M.NOTE0)
    big = torch.iinfo(q.dtype).max
    lo = torch.where(pitched, q, torch.full_like(q, big)).amin(1)
    hi = torch.where(pitched, q, torch.full_like(q, -1)).amax(1)
    shifts = torch.arange(-max_shift, max_shift, device=tok.device)
    ok = (lo[:, None] + shifts >= 0) & (hi[:, None] + shifts <= M.N_PITCHES - 1)
    ok |= ~pitched.any(1, keepdim=True)
    if allowed is not None:
        ok &= allowed
    ok[:, max_shift] |= ~ok.any(1)  # nothing fits: keep the row as it is
    u = rand((len(tok), 1), generator=generator, device=tok.device)
    w = ok.float()
    pick = (w.cumsum(1) < u * w.sum(1, keepdim=True)).sum(1).clamp(max=len(shifts) - 1)
    s = shifts[pick]
    out = tok.clone()
    nn_ = out[..., 0]
    nn_ += torch.where(pitched, s[:, None], torch.zeros_like(nn_))
    keys = (n >= M.KEY0) & (n < M.TS0)
    k = n - M.KEY0
    nn_[keys] = (M.KEY0 + (k % 12 + s[:, None]) % 12 + 12 * (k // 12))[keys]
    return out, s


def parse_prompt_notes(text: str | list | None) -> np.ndarray:
    """"C4:1 E4:0.5 G4" (name and octave, optional ':' quarter notes, default 1; 'r' is a rest) -> tokens (k, 2)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return np.zeros((0, 2), np.int64)
    items = text.split() if isinstance(text, str) else [str(x) for x in text]
    toks = []
    for it in items:
        name, _, ql = it.partition(":")
        try:
            ticks = round(float(ql or 1) * M.TPQ)
        except ValueError:
            raise DreamlabError(f"prompt note {it!r}: {ql!r} is not a number of quarter notes (e.g. C4:0.5)") from None
        if ticks < 1:
            raise DreamlabError(f"prompt note {it!r} lasts {ql} quarter notes; use at least {1 / M.TPQ:.3f}")
        if name.lower() in ("r", "rest"):
            q = None
        else:
            m = re.fullmatch(r"([A-Ga-g])([#b]?)(-?\d)", name)
            if not m:
                raise DreamlabError(f"prompt note {it!r} is not a note like C4, F#3 or Bb4 (or r for a rest)")
            pc = "C D EF G A B".index(m.group(1).upper()) + {"#": 1, "b": -1, "": 0}[m.group(2)]
            q = 12 * (int(m.group(3)) + 1) + pc
            if not M.PITCH_LO <= q <= M.PITCH_HI:
                raise DreamlabError(f"prompt note {it!r} is outside the model's range C2..C7")
        chunks = M.split_ticks(ticks)
        for ci, d in enumerate(chunks):
            t = M.REST if q is None else (M.NOTE0 if ci == 0 else M.HOLD0) + q - M.PITCH_LO
            toks.append((t, M.DURATIONS.index(d) + 2))
    return np.array(toks, np.int64).reshape(-1, 2)


def samples_to_pieces(samples: torch.Tensor) -> list[M.Piece]:
    return [M.decode(s.long().cpu().numpy()) for s in samples]


def write_token_samples(samples: torch.Tensor, path: str | Path, titles: list[str] | None = None) -> list[Path]:
    """MIDI + WAV + piano-roll PNG (+ MusicXML for one voice) of token samples (or .safetensors of the raw ids)."""
    from dreamlab.music_io import write_music

    path = Path(path)
    if path.suffix == ".safetensors":
        return [save_tensors(path, {"samples": samples})]
    pieces = samples_to_pieces(samples)
    empty = [i for i, p in enumerate(pieces) if not len(p.notes)]
    if len(empty) == len(pieces):
        raise DreamlabError("the samples hold no notes (an untrained model?); train longer or sample more events")
    return write_music([p for p in pieces if len(p.notes)], path, titles=titles)


# ----------------------------------------------------------------------------- the registered model


@dataclasses.dataclass
class MusicTransformerConfig:
    sources: str = "irish,german,scottish"   # dreamlab.music sources (comma-separated)
    max_pieces: int = 0                      # pieces per source (whole corpus files; 0 = all)
    seq_len: int = 128                       # events per training window (the context is seq_len + 1)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1
    transpose: bool = True                   # random transposition per window (all 24 keys)
    max_new_tokens: int = 128                # sampling defaults
    temperature: float = 1.0
    bar_grammar: bool = True                 # sample every bar to the written time signature's length (BarGrammar)
    eval_samples: int = 16                   # pieces sampled by evaluate() for the statistics against the train set

    def __post_init__(self) -> None:
        check_ranges(self, positive=("seq_len", "d_model", "n_layers", "n_heads", "max_new_tokens"),
                     nonneg=("max_pieces", "eval_samples"), fraction=("dropout",))
        M.parse_sources(self.sources)
        if self.d_model % self.n_heads:
            raise DreamlabError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.max_new_tokens > self.seq_len:
            raise DreamlabError(f"max_new_tokens={self.max_new_tokens} must be <= seq_len={self.seq_len} "
                                "(the context the model was trained on)")
        if self.temperature < 0:
            raise DreamlabError(f"temperature={self.temperature} must be >= 0 (0 = always the likeliest token)")


@register
class MusicTransformer(Generator):
    """Music transformer (ch. 11): notes + durations, two embeddings, GPT-2 blocks, MIDI/WAV/PNG samples."""

    name = "music_transformer"
    config_class = MusicTransformerConfig
    log_prob_kind = "exact"
    sample_range = None  # samples are token ids (n, events, 2) as floats: column 0 notes, column 1 durations
    sample_formats = (".mid", ".wav", ".png", ".musicxml", ".safetensors")
    example_condition = {"temperature": 1.0}
    presets = {
        "tiny": {"sources": "chorales", "max_pieces": 4, "seq_len": 32, "d_model": 32, "n_layers": 1, "n_heads": 2,
                 "max_new_tokens": 16, "eval_samples": 2, "steps": 3, "batch_size": 8, "log_every": 1,
                 "ckpt_every": 100},
        "quick": {"sources": "irish,german,scottish", "max_pieces": 600, "seq_len": 128, "d_model": 128,
                  "n_layers": 3, "n_heads": 4, "steps": 1200, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01,
                  "grad_clip": 1.0, "log_every": 25, "ckpt_every": 500},
        "full": {"sources": ",".join(M.SOURCE_NAMES), "max_pieces": 0, "seq_len": 256, "d_model": 256, "n_layers": 6,
                 "n_heads": 8, "max_new_tokens": 256, "steps": 30000, "batch_size": 64, "lr": 5e-4,
                 "weight_decay": 0.05, "grad_clip": 1.0, "ckpt_every": 2000},
    }

    def __init__(self, config: MusicTransformerConfig) -> None:
        super().__init__(config)
        c = config
        self.core = TokenTransformer(c.d_model, c.n_layers, c.n_heads, c.seq_len + 1, c.dropout)

    # ---- data -----------------------------------------------------------------------------
    def pieces(self, split: str) -> list[M.Piece]:
        return M.pieces_for_split(M.load_pieces(self.config.sources, self.config.max_pieces), split)

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        """Windows of seq_len + 1 events: {"x": (N, seq_len + 1, 2) int64}; training windows overlap by half."""
        L = self.config.seq_len + 1
        seqs = [M.encode(p) for p in self.pieces(split)]
        w = M.windows(seqs, L, max(L // 2, 1) if split == "train" else L)
        return {"x": torch.from_numpy(w)}

    # ---- training -------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        x = batch["x"]
        if self.training and self.config.transpose:
            x, _ = transpose_batch(x)
        note, dur, mask = self.core.nll(x)
        n = mask.sum().clamp(min=1)
        note_nll, dur_nll = note.sum() / n, dur.sum() / n
        return note_nll + dur_nll, {"note_nll": note_nll.detach(), "dur_nll": dur_nll.detach()}

    # ---- likelihood -----------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-likelihood (nats) of each token sequence (B, T, 2) after its first event."""
        note, dur, _ = self.core.nll(x.long().to(self.device))
        return -(note + dur).sum(1)

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """NLL per event (note + duration, nats) and per stream on `split`'s windows; statistics of samples and of the
        split's pieces against the train split's (total variation of pitch-class and duration histograms)."""
        was = self.training
        self.eval()
        x = self.train_data(split)["x"]
        if max_items:
            x = x[:max_items]
        tot_n = tot_d = count = 0.0
        for i in range(0, len(x), 64):
            note, dur, mask = self.core.nll(x[i:i + 64].to(self.device))
            tot_n += float(note.sum())
            tot_d += float(dur.sum())
            count += float(mask.sum())
        res = {f"{split}_nll_per_event": (tot_n + tot_d) / max(count, 1), f"{split}_note_nll": tot_n / max(count, 1),
               f"{split}_dur_nll": tot_d / max(count, 1), f"{split}_events": count}
        if self.config.eval_samples:
            res.update(sample_statistics(self, self.pieces("train"), self.pieces(split), split,
                                         self.config.eval_samples))
        self.train(was)
        return res

    # ---- sampling -------------------------------------------------------------------------
    def sample(self, n: int, *, generator: torch.Generator | None = None, prompt_notes: str | None = None,
               temperature: float | None = None, max_new_tokens: int | None = None, bar_grammar: bool | None = None,
               **_: Any) -> torch.Tensor:
        """n pieces as float token ids (n, 1 + max_new_tokens, 2): a sampled header, then `prompt_notes` (if any),
        then sampled events; after END the rows hold PAD (0). `bar_grammar` (default: the config's) keeps every
        bar as long as the sampled time signature says."""
        c = self.config
        bars = c.bar_grammar if bar_grammar is None else bool(bar_grammar)
        temperature = c.temperature if temperature is None else float(temperature)
        if temperature < 0:
            raise DreamlabError(f"temperature={temperature} must be >= 0")
        max_new = c.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if n < 1 or max_new < 1:
            raise DreamlabError(f"n={n} and max_new_tokens={max_new} must be at least 1")
        was = self.training
        self.eval()
        start = torch.full((n, 1, 2), M.START, dtype=torch.long, device=self.device)
        start[..., 1] = M.DUR_ZERO
        forced = None
        prompt = parse_prompt_notes(prompt_notes)
        if len(prompt):
            bar = np.array([[M.BAR, M.DUR_ZERO]])
            f = torch.from_numpy(np.concatenate([bar, prompt])).to(self.device)
            forced = [(M.HEADER - 1, f[None].expand(n, -1, -1))]
            max_new -= len(f)
            if max_new < M.HEADER:
                raise DreamlabError(f"prompt_notes has {len(prompt)} events; leave room for new ones "
                                    f"(max_new_tokens > {len(prompt) + M.HEADER})")
        out = sample_tokens(self.core, start, max_new, temperature=temperature, generator=generator, forced=forced,
                            bars=bars)
        self.train(was)
        return out.float()

    def save_samples(self, samples: torch.Tensor, path: str | Path) -> list[Path]:
        return write_token_samples(samples, path)

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from dreamlab.images import plot_curves
        from dreamlab.music_io import write_music
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        files = []
        p = plot_curves(read_metrics(run_dir), ["loss", "note_nll", "dur_nll"], run_dir / "curves.png",
                        title="music transformer (nats per event)")
        files += [p] if p else []
        g = torch.Generator().manual_seed(0)
        try:
            files += self.save_samples(self.sample(4, generator=g), run_dir / "samples.mid")
        except DreamlabError as e:  # an undertrained model may write no note at all: the run still finishes
            print(f"note: no samples.mid written ({e})")
        held = [crop(p, 16) for p in self.pieces("test")[:4]]
        files += write_music(held, run_dir / "heldout_pieces.mid")
        return files


def crop(p: M.Piece, quarters: int) -> M.Piece:
    """The first `quarters` quarter notes of a piece (whole notes only)."""
    end = quarters * M.TPQ
    keep = p.notes[:, 0] < end
    notes = p.notes[keep].copy()
    notes[:, 1] = np.minimum(notes[:, 1], end - notes[:, 0])
    return dataclasses.replace(p, notes=notes, bars=p.bars[p.bars < end], end=min(end, p.end))


def tv_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(0.5 * np.abs(a - b).sum())


def sample_statistics(model: MusicTransformer, train: list[M.Piece], held: list[M.Piece], split: str,
                      n: int) -> dict[str, float]:
    """Scale-degree (pitch class relative to the tonic) and duration histograms of `n` samples against the train
    split's (total variation distance: 0 = the same, 1 = disjoint); the held-out pieces against the train split's give
    the floor. A sample's tonic is read back with music21, a corpus piece's is its key attribute."""
    g = torch.Generator().manual_seed(1234)
    drawn = samples_to_pieces(model.sample(n, generator=g))
    pieces = [p for p in drawn if len(p.notes)]
    deg_train, du_train = M.degree_histogram(train), M.duration_histogram(train)
    return {
        "samples_degree_tv": tv_distance(M.degree_histogram(pieces, analyze=True), deg_train) if pieces else 1.0,
        "samples_dur_tv": tv_distance(M.duration_histogram(pieces), du_train) if pieces else 1.0,
        f"{split}_degree_tv": tv_distance(M.degree_histogram(held), deg_train),
        f"{split}_dur_tv": tv_distance(M.duration_histogram(held), du_train),
        "samples_with_notes": len(pieces) / max(len(drawn), 1),
    }
