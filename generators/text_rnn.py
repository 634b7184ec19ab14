"""Recurrent text models (book ch. 5): an LSTM (or GRU) language model that writes recipes word by word, and a
bidirectional recurrent encoder that reads a recipe and names its kind.

* `TextRNN` ("lstm_text"): the book's Embedding(100) -> LSTM(128) -> Dense(vocab) on the Wikibooks recipes
  (`dreamlab.text`), trained to predict every next word. Options: `cell=lstm|gru`, `layers=N` (stacked cells).
  `sample(n, prompt="recipe for", temperature=..., max_tokens=...)` feeds the prompt, then one drawn word at a
  time, carrying the cell state. `log_prob` is exact: the product of the next-word probabilities.
* `bidirectional` is refused there, on purpose: a bidirectional layer's output at word t also reads words t+1, t+2,
  ... (its backward cell runs right to left), so trained to predict word t+1 it would simply look at it, and when
  generating, the words to the right do not exist yet. Bidirectional cells belong in encoders that see the whole
  text at once:
* `RecipeClassifier` ("recipe_classifier"): the same embedding and cell, bidirectional by default, reading a
  recipe's ingredients and steps (not its title) and predicting its coarse Wikibooks category
  (`dreamlab.text.GROUP_NAMES`: drink, sauce, sweet, soup, meat, grain, vegetable). Its accuracy beside the same
  encoder run one way (`--set bidirectional=false`) and the majority class shows what the backward cell adds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamlab import text as T
from dreamlab.config import check_ranges
from dreamlab.errors import DreamlabError
from generators.base import Batch, Metrics, Model, register
from generators.language import TextLM, TokenizerMixin, check_corpus, sample_loop


class RNNEncoder(nn.Module):
    """Word embedding then a (stacked) LSTM or GRU, batch first, left to right."""

    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, cell: str, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb, padding_idx=T.PAD)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(emb, hidden, num_layers=layers, batch_first=True,
                       dropout=dropout if layers > 1 else 0.0)  # torch applies dropout between stacked layers only
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.rnn(self.drop(self.embed(ids)), state)
        return self.drop(out), state


class BiRNNEncoder(nn.Module):
    """Word embedding then stacked LSTM/GRU layers, each with a forward cell and (bidirectional) a backward cell whose
    outputs are concatenated, as `nn.LSTM(bidirectional=True)` stacks them, for right-padded batches.

    The backward cell reads each recipe from its own last word: every row's real words are reversed in place (the
    padding stays on the right), so both cells run unpacked, which on a CPU is several times faster than a packed
    bidirectional `nn.LSTM`, with the same result."""

    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, cell: str, dropout: float,
                 bidirectional: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb, padding_idx=T.PAD)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        width = 2 * hidden if bidirectional else hidden
        self.fwd = nn.ModuleList(rnn(emb if i == 0 else width, hidden, batch_first=True) for i in range(layers))
        self.bwd = nn.ModuleList(rnn(emb if i == 0 else width, hidden, batch_first=True)
                                 for i in range(layers)) if bidirectional else None
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids -> (B, hidden x directions): the forward cell's output at each row's last word,
        beside the backward cell's at its first word (it has read the row from the end)."""
        lengths = (ids != T.PAD).sum(1).clamp_min(1)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        # a permutation of each row that reverses its real words and leaves its padding where it is (its own inverse)
        rev = torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)
        last = (lengths - 1)[:, None, None]
        x = self.drop(self.embed(ids))
        for i, f in enumerate(self.fwd):
            out = f(x)[0]
            if self.bwd is not None:
                flip = rev[:, :, None].expand(-1, -1, x.shape[2])
                back = self.bwd[i](x.gather(1, flip))[0]
                out = torch.cat([out, back.gather(1, rev[:, :, None].expand(-1, -1, back.shape[2]))], 2)
            x = self.drop(out)
        h = x.gather(1, last.expand(-1, 1, x.shape[2]))[:, 0]  # each row's state after its last word
        if self.bwd is None:
            return h
        half = x.shape[2] // 2
        return torch.cat([h[:, :half], x[:, 0, half:]], 1)  # the backward half is complete at the first word


@dataclass
class TextRNNConfig:
    corpus: str = "recipes"          # recipes | fortunes (dreamlab.text)
    vocab_size: int = 5000           # words kept (the rest are [UNK]); the same for every model that is compared
    max_len: int = 200               # tokens per training window (the book's 200)
    embedding_dim: int = 100
    hidden: int = 128
    layers: int = 1                  # stacked cells
    cell: Literal["lstm", "gru"] = "lstm"
    dropout: float = 0.0
    bidirectional: bool = False      # refused: see the module docstring

    def __post_init__(self) -> None:
        check_ranges(self, positive=("vocab_size", "max_len", "embedding_dim", "hidden", "layers"),
                     fraction=("dropout",))
        check_corpus(self)
        if self.bidirectional:
            raise DreamlabError(
                "bidirectional=true cannot generate: its backward cell reads the words to the right of the one it "
                "predicts, which do not exist yet when writing left to right; train recipe_classifier (bidirectional "
                "by default) to see a bidirectional encoder")


@register
class TextRNN(TextLM):
    """Word-level LSTM/GRU language model on recipes (book ch. 5); perplexity per token, temperature sampling."""

    name = "lstm_text"
    config_class = TextRNNConfig
    presets = {
        "tiny": {"embedding_dim": 8, "hidden": 16, "steps": 2, "batch_size": 8, "eval_items": 16},
        # the book's sizes (embedding 100, LSTM 128); about 5 epochs of the 3.5k train windows
        "quick": {"steps": 600, "batch_size": 32, "lr": 3e-3, "grad_clip": 1.0, "log_every": 20, "eval_every": 200,
                  "ckpt_every": 200},
        "full": {"embedding_dim": 256, "hidden": 512, "layers": 2, "dropout": 0.3, "steps": 8000, "batch_size": 64,
                 "lr": 2e-3, "grad_clip": 1.0, "eval_every": 500},
    }

    def __init__(self, config: TextRNNConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = RNNEncoder(c.vocab_size, c.embedding_dim, c.hidden, c.layers, c.cell, c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids)[0]

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def _step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        out, state = self.encoder(ids, state)
        return self.head(out[:, -1]), state

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, prompt: str | None = None,
               temperature: float = 1.0, max_tokens: int = 100, top_k: int = 0, **_: Any) -> torch.Tensor:
        """`n` texts continuing `prompt` (default "recipe for"): token ids (n, L) from [BOS] through the prompt to
        [EOS] or `max_tokens` new words, right-padded with [PAD]; read them with `decode`. Temperature 0 is greedy."""
        self.check_sampling(temperature, max_tokens, top_k)
        was = self.training
        self.eval()
        ids = self.encode_prompt(prompt)
        seqs = sample_loop(self._step, None, ids, n, generator=generator, temperature=temperature,
                           max_tokens=max_tokens, top_k=top_k, device=self.device)
        self.train(was)
        return self._finish(seqs, {"prompt": self.tokenizer.decode(ids), "temperature": temperature,
                                   "max_tokens": max_tokens, "top_k": top_k or None})


# ----------------------------------------------------------------------------- the bidirectional encoder


@dataclass
class RecipeClassifierConfig:
    vocab_size: int = 5000           # the recipes tokenizer of lstm_text
    max_len: int = 200               # the first max_len tokens of the ingredients and steps
    embedding_dim: int = 100
    hidden: int = 128
    layers: int = 1
    cell: Literal["lstm", "gru"] = "lstm"
    dropout: float = 0.3
    bidirectional: bool = True

    def __post_init__(self) -> None:
        check_ranges(self, positive=("vocab_size", "max_len", "embedding_dim", "hidden", "layers"),
                     fraction=("dropout",))
        if self.vocab_size <= len(T.SPECIALS):
            raise DreamlabError(f"vocab_size={self.vocab_size} must be more than the {len(T.SPECIALS)} special tokens")


@register
class RecipeClassifier(TokenizerMixin, Model):
    """Bidirectional LSTM naming a recipe's kind from its ingredients and steps (ch. 5, bidirectional cells)."""

    name = "recipe_classifier"
    kind = "classifier"
    config_class = RecipeClassifierConfig
    presets = {
        "tiny": {"embedding_dim": 8, "hidden": 8, "steps": 2, "batch_size": 8},
        # about 13 epochs of the 614 labelled train recipes
        "quick": {"steps": 250, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.01, "grad_clip": 1.0, "log_every": 10,
                  "eval_every": 50, "ckpt_every": 250},
        "full": {"embedding_dim": 128, "hidden": 256, "layers": 2, "steps": 1500, "batch_size": 32, "lr": 2e-3,
                 "weight_decay": 0.01, "grad_clip": 1.0, "eval_every": 100},
    }

    def __init__(self, config: RecipeClassifierConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = BiRNNEncoder(c.vocab_size, c.embedding_dim, c.hidden, c.layers, c.cell, c.dropout,
                                    c.bidirectional)
        self.head = nn.Linear(c.hidden * (2 if c.bidirectional else 1), len(T.GROUP_NAMES))

    def train_data(self, split: str) -> dict[str, torch.Tensor]:
        x, y = T.recipe_categories(split, self.config.vocab_size, self.config.max_len)
        return {"x": torch.from_numpy(x.astype(np.int64)), "y": torch.from_numpy(y.astype(np.int64))}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Class logits from the final states: the forward cell's after the last real word and, when bidirectional,
        the backward cell's after the first (it has read the recipe from the end). Padding never reaches either."""
        return self.head(self.encoder(ids))

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        logits = self.logits(batch["x"]).float()
        loss = F.cross_entropy(logits, batch["y"])
        return loss, {"accuracy": (logits.argmax(1) == batch["y"]).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_items: int | None = None) -> dict[str, float]:
        res = super().evaluate(split, max_items)
        y = self.train_data(split)["y"][: max_items or None]
        majority = int(torch.bincount(self.train_data("train")["y"]).argmax())
        res[f"{split}_majority_accuracy"] = float((y == majority).float().mean())
        res[f"{split}_items"] = len(y)
        return res

    @torch.no_grad()
    def predict(self, texts: list[str]) -> list[str]:
        """The group of each recipe body (ingredients and steps as text)."""
        self.eval()
        ids = [i[: self.config.max_len] or [T.UNK] for i in self.tokenizer.encode_batch(texts, bos=False, eos=False)]
        x = torch.full((len(ids), max(map(len, ids))), T.PAD, dtype=torch.long)
        for r, i in enumerate(ids):
            x[r, :len(i)] = torch.tensor(i)
        return [T.GROUP_NAMES[int(k)] for k in self.logits(x.to(self.device)).argmax(1)]

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import plot_curves, save_figure
        from generators.trainer import read_metrics

        self.eval()
        d = self.train_data("test")
        with torch.no_grad():
            pred = torch.cat([self.logits(b.to(self.device)).argmax(1).cpu() for b in d["x"].split(256)])
        k = len(T.GROUP_NAMES)
        cm = torch.zeros(k, k, dtype=torch.long)
        cm.index_put_((d["y"], pred), torch.ones_like(pred), accumulate=True)
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.imshow(cm.numpy(), cmap="Blues")
        ax.set_xticks(range(k), T.GROUP_NAMES, rotation=60, fontsize=8)
        ax.set_yticks(range(k), T.GROUP_NAMES, fontsize=8)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        way = "bidirectional" if self.config.bidirectional else "one-way"
        ax.set_title(f"{way} {self.config.cell}: test accuracy {float((pred == d['y']).float().mean()):.3f}")
        out = [save_figure(fig, Path(run_dir) / "confusion_matrix.png")]
        p = plot_curves(read_metrics(Path(run_dir)), ["loss", "accuracy", "val_accuracy"],
                        Path(run_dir) / "loss_curves.png", self.name)
        return out + ([p] if p else [])
