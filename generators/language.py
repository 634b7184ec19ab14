"""What every word-level language model of dreamlab shares (the LSTM of ch. 5, GPT of ch. 9): the corpus and its
tokenizer (`dreamlab.text`), the loss and perplexity per token, `log_prob`, samples as text, and the run folder's
text pages (samples at three temperatures, the temperature sweep, the book's top-k next-word table).

A subclass defines `logits(ids) -> (B, T, V)` (causal: position t sees tokens <= t) and `sample`. Its config has
`corpus`, `vocab_size` and `max_len`: models with the same three read the same tokens and the same splits, so their
perplexities compare. The tokenizer is trained on the corpus's train split (cached), saved in every model folder as
`tokenizer.json` and read back from there, so a run folder samples on a machine without the corpus.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from dreamlab import text as T
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, save_tensors
from generators.base import Batch, Generator, Metrics, iterate_eval

#: the prompt `sample` starts from when none is given, per corpus ("" = from [BOS] alone)
DEFAULT_PROMPTS = {"recipes": "recipe for", "fortunes": ""}
#: prompts of the next-word tables (the first is the book's own)
TABLE_PROMPTS = {
    "recipes": ("recipe for roasted vegetables | chop 1 /", "recipe for chocolate ice cream |",
                "recipe for beef stew | 2 pounds beef ; 1 cup"),
    "fortunes": ("", "a man who", "love is"),
}
#: temperatures of the run folder's samples.md, and of its sweep
SAMPLE_TEMPERATURES = (0.2, 0.5, 1.0)
SWEEP_TEMPERATURES = (0.2, 0.5, 0.8, 1.0, 1.2, 1.5)
#: sizes of the run folder's pages: samples per temperature and new tokens, in samples.md and in the sweep
PAGE_SAMPLES, PAGE_TOKENS = 5, 120
SWEEP_SAMPLES, SWEEP_TOKENS = 32, 100


def check_corpus(cfg: Any) -> None:
    """Shared `__post_init__` checks of a text config (corpus, vocabulary, window)."""
    if cfg.corpus not in T.CORPORA:
        raise DreamlabError(f"corpus={cfg.corpus!r} is not a text corpus; choose one of {', '.join(T.CORPORA)}")
    if cfg.vocab_size <= len(T.SPECIALS):
        raise DreamlabError(f"vocab_size={cfg.vocab_size} must be more than the {len(T.SPECIALS)} special tokens")
    if cfg.max_len < 2:
        raise DreamlabError(f"max_len={cfg.max_len} must be at least 2 tokens")


class TokenizerMixin:
    """A model that reads text: its tokenizer comes from its model folder when loaded (`tokenizer.json`), else it is
    the corpus's own, trained on the train split and cached. Its config has `vocab_size` (and `corpus`)."""

    _tokenizer: T.WordTokenizer | None = None

    @property
    def tokenizer(self) -> T.WordTokenizer:
        if self._tokenizer is None:
            self._tokenizer = T.get_tokenizer(getattr(self.config, "corpus", "recipes"), self.config.vocab_size)
        return self._tokenizer

    def save_extra(self, directory: Path) -> None:
        self.tokenizer.save(Path(directory) / "tokenizer.json")

    def load_extra(self, directory: Path) -> None:
        tok = T.WordTokenizer.from_file(Path(directory) / "tokenizer.json")
        if tok.vocab_size != self.config.vocab_size:
            raise DreamlabError(f"{directory}/tokenizer.json has {tok.vocab_size} tokens but config.json says "
                                f"vocab_size={self.config.vocab_size}; the folder is inconsistent: re-save the model")
        self._tokenizer = tok


class TextLM(TokenizerMixin, Generator):
    """Base of the word-level language models (not registered itself)."""

    log_prob_kind = "exact"
    sample_range = None
    sample_dtype = torch.long
    sample_formats = (".md", ".txt", ".safetensors")
    example_condition: ClassVar[dict[str, Any]] = {"prompt": "recipe for", "temperature": 1.0, "max_tokens": 6}
    #: the two temperatures of the next-word table and picture (the book's LSTM uses 1.0 and 0.2, its GPT 1.0 and 0.5)
    table_temperatures: ClassVar[tuple[float, float]] = (1.0, 0.2)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._last_sample: dict[str, Any] = {}

    def decode(self, ids: torch.Tensor, spaced: bool = False) -> list[str]:
        """Texts of sampled (or any) token ids, one per row; specials dropped, stops at [EOS]."""
        rows = ids.tolist() if ids.ndim == 2 else [ids.tolist()]
        return [self.tokenizer.decode(r, spaced=spaced) for r in rows]

    def encode_prompt(self, prompt: str | None) -> list[int]:
        if prompt is None:
            prompt = DEFAULT_PROMPTS[self.config.corpus]
        if not isinstance(prompt, str):
            raise DreamlabError(f"prompt={prompt!r} must be text, e.g. --prompt 'recipe for'")
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    # ---- data, loss, likelihood ------------------------------------------------------------------------------------
    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        c = self.config
        return {"x": torch.from_numpy(T.lm_windows(c.corpus, split, c.vocab_size, c.max_len).astype(np.int64))}

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) hidden states; position t sees only tokens <= t."""
        raise NotImplementedError

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., H) -> next-token logits (..., vocab)."""
        raise NotImplementedError

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) next-token logits."""
        return self.output(self.features(ids))

    def token_nll(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target negative log-likelihood (nats) of windows `x` (B, L+1) and the mask of real (non-[PAD]) targets.

        Padding is only ever on the right, and the models are causal, so trailing all-[PAD] columns are cut off and
        the output layer (the costliest part: hidden x vocab per token) runs on real targets only: same numbers,
        a third less work on the recipes and far less on the short fortunes."""
        x = x.long()
        mask = x[:, 1:] != T.PAD
        used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        x, mask = x[:, :used + 1], mask[:, :used]
        tgt = x[:, 1:]
        h = self.features(x[:, :-1])
        logits = self.output(h[mask]).float()
        nll = torch.zeros(tgt.shape, dtype=logits.dtype, device=x.device)
        nll[mask] = F.cross_entropy(logits, tgt[mask], reduction="none")
        return nll, mask

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        nll, mask = self.token_nll(batch["x"])
        loss = nll.sum() / mask.sum().clamp_min(1)
        return loss, {"ppl": loss.detach().exp()}

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-likelihood (nats) of each row of token windows (B, L+1), given its first token ([BOS] for a document's
        first window): the sum over its non-[PAD] tokens of log p(token | the tokens before it)."""
        nll, _ = self.token_nll(x.to(self.device))
        return -nll.sum(1)

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        """Mean NLL per token (nats) over every target token of the split's windows, and its perplexity."""
        was = self.training
        self.eval()
        tot, n = 0.0, 0
        for batch in iterate_eval(self, split, batch_size=64, max_items=max_items):
            nll, mask = self.token_nll(batch["x"])
            tot += float(nll.sum())
            n += int(mask.sum())
        self.train(was)
        loss = tot / max(n, 1)
        return {f"{split}_loss": loss, f"{split}_ppl": math.exp(loss), f"{split}_bits_per_token": loss / math.log(2),
                f"{split}_tokens": n}

    # ---- sampling ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def next_token_probs(self, prompt: str | None, temperature: float = 1.0) -> torch.Tensor:
        """p(next token | prompt) at `temperature` (the book's temperature-scaled softmax), shape (vocab,)."""
        ids = torch.tensor([self.encode_prompt(prompt)], device=self.device)
        logits = self.logits(ids)[0, -1].float()
        return torch.softmax(logits / max(temperature, 1e-6), -1).cpu()

    def _finish(self, seqs: list[list[int]], settings: dict[str, Any]) -> torch.Tensor:
        """Right-pad sampled sequences with [PAD] into one (n, L) long tensor on the model's device; keep the settings
        for save_samples."""
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), T.PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        self._last_sample = settings
        return out.to(self.device)  # beside the model, as image generators return theirs

    @staticmethod
    def check_sampling(temperature: float, max_tokens: int, top_k: int = 0, top_p: float = 1.0) -> None:
        if not temperature >= 0:
            raise DreamlabError(f"temperature={temperature} must be >= 0 (0 = always the most likely word)")
        if max_tokens < 1:
            raise DreamlabError(f"max_tokens={max_tokens} must be at least 1")
        if top_k < 0:
            raise DreamlabError(f"top_k={top_k} must be >= 0 (0 = off)")
        if not 0 < top_p <= 1:
            raise DreamlabError(f"top_p={top_p} must be in (0, 1] (1 = off)")

    # ---- samples as text ------------------------------------------------------------------------------------------
    def save_samples(self, samples: torch.Tensor, path: str | Path) -> list[Path]:
        """`.md` (numbered texts under the settings used), `.txt` (one text a line) or `.safetensors` (the ids)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            return [save_tensors(path, {"samples": samples})]
        texts = self.decode(samples)
        if path.suffix == ".txt":
            return [atomic_write_text(path, "".join(t + "\n" for t in texts))]
        if path.suffix != ".md":
            raise DreamlabError(f"{self.name} writes samples as {', '.join(self.sample_formats)}, not {path.name}")
        s = self._last_sample
        head = ", ".join(f"{k} `{v}`" if k == "prompt" else f"{k} {v}" for k, v in s.items() if v is not None)
        lines = [f"# `{self.name}` samples", "", f"{len(texts)} samples" + (f"; {head}." if head else "."), ""]
        lines += [f"{i + 1}. {_md(t)}" for i, t in enumerate(texts)]
        return [atomic_write_text(path, "\n".join(lines) + "\n")]

    # ---- the run folder ---------------------------------------------------------------------------------------------
    def default_prompt(self) -> str:
        return DEFAULT_PROMPTS[self.config.corpus]

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        from generators.trainer import read_metrics

        run_dir = Path(run_dir)
        self.eval()
        out: list[Path] = []
        p = self.plot_curves(read_metrics(run_dir), run_dir / "loss_curves.png")
        if p:
            out.append(p)
        out.append(self.write_samples_page(run_dir / "samples.md"))
        out.append(self.write_sweep_page(run_dir / "temperature_sweep.md"))
        out.append(self.plot_next_token(run_dir / "next_token.png"))
        return out

    def plot_curves(self, rows: list[dict[str, float]], path: Path) -> Path | None:
        """loss_curves.png: nats per token on the train batches, the val split and the test split on one axis, and the
        held-out perplexity beside it."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import save_figure

        def pts(key: str) -> tuple[list[float], list[float]]:
            got = [(r["step"], r[key]) for r in rows if key in r]
            return [a for a, _ in got], [b for _, b in got]

        if not pts("loss")[0]:
            return None
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax.plot(*pts("loss"), label="train batches")
        for key, style, colour, label in (("val", "o-", "C1", "val split"), ("test", "*", "C2", "test split")):
            for axis, what in ((ax, "loss"), (bx, "ppl")):
                axis.plot(*pts(f"{key}_{what}"), style, color=colour, ms=9 if key == "test" else 5, label=label)
        ax.set(title="nats per token", xlabel="step")
        bx.set(title="held-out perplexity per token", xlabel="step")
        for a in (ax, bx):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(f"{self.name} ({self.config.corpus})")
        fig.tight_layout()
        return save_figure(fig, path)

    def write_samples_page(self, path: Path, n: int | None = None, max_tokens: int | None = None) -> Path:
        """samples.md: `n` samples from the default prompt at each of three temperatures (seeded)."""
        prompt = self.default_prompt()
        n, max_tokens = n or PAGE_SAMPLES, max_tokens or PAGE_TOKENS
        lines = [f"# `{self.name}` samples ({self.config.corpus})", "",
                 f"Prompt `{prompt or '(none: from [BOS])'}`, up to {max_tokens} new tokens, seed 0. "
                 f"More: `dreamlab sample RUN --prompt \"...\" --temperature T --out samples.md`.", ""]
        for t in SAMPLE_TEMPERATURES:
            g = torch.Generator().manual_seed(0)
            ids = self.sample(n, generator=g, prompt=prompt, temperature=t, max_tokens=max_tokens)
            lines += [f"## temperature {t}", ""] + [f"{i + 1}. {_md(s)}" for i, s in enumerate(self.decode(ids))] + [""]
        return atomic_write_text(path, "\n".join(lines))

    @torch.no_grad()
    def sweep(self, temperatures: tuple[float, ...] | None = None, n: int | None = None,
              max_tokens: int | None = None) -> list[dict[str, float]]:
        """What temperature does to samples, measured: per temperature, `n` samples from the default prompt; their mean
        length, how many end by themselves ([EOS]), distinct bigrams / all bigrams, [UNK] rate, and the model's own
        NLL of the sampled words at temperature 1 (low: safe and repetitive; high: unlikely words)."""
        rows = []
        temperatures, n, max_tokens = temperatures or SWEEP_TEMPERATURES, n or SWEEP_SAMPLES, max_tokens or SWEEP_TOKENS
        plen = len(self.encode_prompt(self.default_prompt()))
        for t in temperatures:
            ids = self.sample(n, generator=torch.Generator().manual_seed(0), prompt=self.default_prompt(),
                              temperature=t, max_tokens=max_tokens)
            gen = ids[:, plen:]
            real = gen != T.PAD
            lengths = real.sum(1)
            ended = (gen == T.EOS).any(1)
            bigrams: list[tuple[int, int]] = []
            for row, ln in zip(gen.tolist(), lengths.tolist()):
                bigrams += list(zip(row[:ln - 1], row[1:ln]))
            win = torch.cat([ids, torch.full((n, 1), T.PAD, dtype=torch.long)], 1).to(self.device)
            nll, mask = self.token_nll(win)
            keep = mask.clone()
            keep[:, :plen - 1] = False  # score only the sampled tokens, not the prompt
            rows.append({"temperature": t, "mean_tokens": float(lengths.float().mean()),
                         "ended": float(ended.float().mean()),
                         "distinct_bigrams": len(set(bigrams)) / max(len(bigrams), 1),
                         "unk_rate": float(((gen == T.UNK) & real).sum() / real.sum().clamp_min(1)),
                         "nll": float(nll[keep].sum() / keep.sum().clamp_min(1))})
        return rows

    def next_word_table(self, prompt: str, k: int = 10) -> list[str]:
        """The book's table: the k most likely next words after `prompt` at the two `table_temperatures`."""
        t1, t2 = self.table_temperatures
        p1, p2 = self.next_token_probs(prompt, t1), self.next_token_probs(prompt, t2)
        top1, top2 = p1.topk(k), p2.topk(k)
        tok = self.tokenizer.tokens
        w1, w2 = tok(top1.indices.tolist()), tok(top2.indices.tolist())
        lines = [f"`{prompt or '[BOS]'}` …", "",
                 f"| rank | word (temperature {t1}) | p | word (temperature {t2}) | p |", "|---:|---|---:|---|---:|"]
        lines += [f"| {i + 1} | `{_md(w1[i])}` | {float(top1.values[i]):.2%} | `{_md(w2[i])}` | "
                  f"{float(top2.values[i]):.2%} |" for i in range(k)]
        return lines + [""]

    def write_sweep_page(self, path: Path) -> Path:
        test_loss = None
        try:
            from dreamlab.io import load_json

            test_loss = load_json(path.parent / "eval.json").get("test_loss")
        except DreamlabError:
            pass
        rows = self.sweep()
        where = f" (its test-split NLL is {test_loss:.3f}: samples near it read like the data to the model)"
        lines = [f"# `{self.name}`: temperature sweep and next-word tables ({self.config.corpus})", "",
                 f"{SWEEP_SAMPLES} samples per temperature from `{self.default_prompt() or '[BOS]'}` (seed 0, up to "
                 f"{SWEEP_TOKENS} new tokens). `ended`: share that produced [EOS] by themselves; `distinct bigrams`: "
                 f"distinct word pairs / all word pairs over the {SWEEP_SAMPLES} (low = repetitive); `NLL`: the "
                 "model's own nats per sampled word at temperature 1" + (where if test_loss else "") + ".", "",
                 "| temperature | mean new tokens | ended | distinct bigrams | [UNK] rate | NLL (nats/token) |",
                 "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['temperature']} | {r['mean_tokens']:.1f} | {r['ended']:.0%} | {r['distinct_bigrams']:.2f} | "
                  f"{r['unk_rate']:.2%} | {r['nll']:.3f} |" for r in rows]
        lines += ["", "## Next-word tables (the book's: top 10 at two temperatures)", ""]
        for prompt in TABLE_PROMPTS[self.config.corpus]:
            lines += self.next_word_table(prompt)
        return atomic_write_text(path, "\n".join(lines))

    def plot_next_token(self, path: Path, k: int = 15) -> Path:
        """next_token.png: the next-token distribution after the first table prompt at the two table temperatures."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import save_figure

        prompt = TABLE_PROMPTS[self.config.corpus][0]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, t in zip(axes, self.table_temperatures):
            p = self.next_token_probs(prompt, t)
            top = p.topk(k)
            ax.barh(range(k)[::-1], top.values.numpy())
            ax.set_yticks(range(k)[::-1], self.tokenizer.tokens(top.indices.tolist()), fontsize=8)
            ax.set_xlabel("probability")
            ax.set_title(f"temperature {t}")
        fig.suptitle(f"{self.name}: next word after '{prompt or '[BOS]'}'")
        return save_figure(fig, path)


def _md(s: str) -> str:
    """Text safe inside a markdown list item or table cell."""
    return s.replace("|", "\\|").replace("\n", " ") or "(empty)"


def sample_loop(step: Any, state: Any, prompt: list[int], n: int, *, generator: torch.Generator | None,
                temperature: float, max_tokens: int, top_k: int, device: torch.device) -> list[list[int]]:
    """Autoregressive sampling for a model with a recurrent state: `step(ids (n, t), state) -> (logits (n, V), state)`
    is fed the prompt once, then one token at a time; each row stops at [EOS] (kept) or after `max_tokens`."""
    ids = torch.tensor([prompt] * n, device=device)
    logits, state = step(ids, state)
    new = torch.full((n, max_tokens), T.PAD, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(max_tokens):
        nxt = pick(logits.float(), temperature, top_k, generator).masked_fill(done, T.PAD)
        new[:, t] = nxt
        done |= nxt == T.EOS
        if bool(done.all()):
            break
        logits, state = step(nxt.view(n, 1), state)
    return [list(prompt) + [int(i) for i in row if i != T.PAD] for row in new.tolist()]


def pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / temperature) (top-k when > 0),
    on the generator's device so a seeded CPU generator works for a CUDA model."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    dev = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(dev), 1, generator=generator).view(-1).to(logits.device)
