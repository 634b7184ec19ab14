"""GPT (book ch. 9): a `transformers` `GPT2LMHeadModel` built from a `GPT2Config` and trained from scratch here.

The book's GPT is one transformer block with 2 attention heads, 256-wide embeddings and a 256-wide feed-forward layer
(`quick`); `full` is larger. It reads the same corpus, tokenizer, windows and splits as `lstm_text`
(`generators.language`), so the two perplexities per token compare; the book's wine reviews do not exist offline, so
the second preset, `fortunes`, trains it on the Debian fortunes instead (`sudo apt-get install -y fortunes`).

* `sample(n, prompt=..., temperature, top_k, top_p, max_new_tokens)` runs `GPT2LMHeadModel.generate` (KV cache,
  top-k / nucleus filtering), seeded from the `generator` passed in.
* `attention(prompt)` gives every layer's and head's attention weights over a prompt; the run folder shows them as
  `attention.png` (the book's per-head analysis) beside `next_token.png` (the next-word distribution at temperatures
  1.0 and 0.5).
* The causal mask is GPT2's own: logits at position t never depend on a later token (checked by the tests).

transformers is imported when a model is built (its import takes seconds), not when this module is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dreamlab import text as T
from dreamlab.config import check_ranges
from dreamlab.errors import DreamlabError
from generators.base import register
from generators.language import TextLM, check_corpus

#: the prompt of attention.png, per corpus
ATTENTION_PROMPTS = {"recipes": "recipe for chocolate cake | 2 cups flour ; 1 cup sugar | mix the flour and the",
                     "fortunes": "a man who loves his work will never have to work a day in his"}


@dataclass
class GPTConfig:
    corpus: str = "recipes"          # recipes | fortunes (dreamlab.text)
    vocab_size: int = 5000           # the same tokenizer as lstm_text at the same value
    max_len: int = 200               # context (GPT2's n_positions) = the training window
    n_embd: int = 256                # the book's key/embedding size
    n_layer: int = 1                 # transformer blocks
    n_head: int = 2
    n_inner: int = 256               # feed-forward width (the book's 256; GPT-2 uses 4 x n_embd)
    dropout: float = 0.1             # GPT2's residual, embedding and attention dropout

    def __post_init__(self) -> None:
        check_ranges(self, positive=("vocab_size", "max_len", "n_embd", "n_layer", "n_head", "n_inner"),
                     fraction=("dropout",))
        check_corpus(self)
        if self.n_embd % self.n_head:
            raise DreamlabError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")


@register
class GPT(TextLM):
    """GPT-2 (transformers) trained from scratch on recipes or fortunes (book ch. 9); perplexity, attention maps."""

    name = "gpt"
    config_class = GPTConfig
    example_condition = {"prompt": "recipe for", "temperature": 1.0, "max_new_tokens": 6}
    table_temperatures = (1.0, 0.5)
    presets = {
        "tiny": {"n_embd": 16, "n_head": 2, "n_inner": 16, "steps": 2, "batch_size": 8, "eval_items": 16},
        # the book's GPT; the same steps, batch and windows as lstm_text's quick, so both see the same tokens
        "quick": {"steps": 600, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0,
                  "log_every": 20, "eval_every": 200, "ckpt_every": 200},
        "full": {"n_embd": 512, "n_layer": 6, "n_head": 8, "n_inner": 2048, "steps": 10000, "batch_size": 64,
                 "lr": 5e-4, "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 500},
        # the second corpus: the book's GPT on Debian fortunes (10k words: fortunes use many more than recipes)
        "fortunes": {"corpus": "fortunes", "vocab_size": 10000, "max_len": 128, "steps": 600, "batch_size": 32,
                     "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0, "log_every": 20, "eval_every": 200,
                     "ckpt_every": 200},
    }

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        from transformers import GPT2Config, GPT2LMHeadModel

        c = config
        gpt_config = GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.max_len, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            n_inner=c.n_inner, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=T.BOS, eos_token_id=T.EOS, pad_token_id=T.PAD, tie_word_embeddings=True)
        self.gpt: nn.Module = GPT2LMHeadModel(gpt_config)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.config.max_len:
            raise DreamlabError(f"{ids.shape[1]} tokens exceed the context of {self.config.max_len} (max_len)")
        # padding is only on the right and attention is causal, so no real token ever sees a [PAD]: an all-ones mask
        # is exact (and tells transformers not to guess a mask from the pad id)
        return self.gpt.transformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.gpt.lm_head(h)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, prompt: str | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int | None = None,
               max_tokens: int | None = None, **_: Any) -> torch.Tensor:
        """`n` texts continuing `prompt` through `generate`: token ids (n, L), [BOS] + prompt + new tokens, stopping at
        [EOS], right-padded with [PAD] (`decode` reads them). Temperature 0 is greedy; `top_k` 0 and `top_p` 1 are off.
        `max_new_tokens` (alias `max_tokens`, default 100) is capped by the context (max_len)."""
        new = max_new_tokens if max_new_tokens is not None else max_tokens if max_tokens is not None else 100
        self.check_sampling(temperature, new, top_k, top_p)
        ids = self.encode_prompt(prompt)
        if len(ids) >= self.config.max_len:
            raise DreamlabError(f"the prompt has {len(ids)} tokens; the context holds {self.config.max_len}: "
                                "shorten it")
        new = min(new, self.config.max_len - len(ids))
        was = self.training
        self.eval()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # generate draws from the global RNG: seed it from `generator`
            torch.manual_seed(seed)
            out = self.gpt.generate(
                torch.tensor([ids] * n, device=self.device), attention_mask=torch.ones(n, len(ids), dtype=torch.long,
                                                                                       device=self.device),
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_k=top_k if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
                # finished rows are filled with [EOS], never [PAD]: each row is cut after its first [EOS] below, and
                # transformers warns whenever the pad id shows up in inputs it is given no mask for
                max_new_tokens=new, eos_token_id=T.EOS, pad_token_id=T.EOS)
        self.train(was)
        seqs = []
        for row in out.tolist():
            gen = row[len(ids):]
            cut = gen.index(T.EOS) + 1 if T.EOS in gen else len(gen)
            seqs.append(ids + gen[:cut])
        return self._finish(seqs, {"prompt": self.tokenizer.decode(ids), "temperature": temperature,
                                   "top_k": top_k or None, "top_p": top_p if top_p < 1 else None,
                                   "max_new_tokens": new})

    @torch.no_grad()
    def attention(self, prompt: str) -> tuple[list[str], torch.Tensor]:
        """The prompt's tokens and its attention weights (layers, heads, T, T): row t is where token t looks."""
        ids = torch.tensor([self.encode_prompt(prompt)], device=self.device)
        was = self.training
        self.eval()
        impl = self.gpt.config._attn_implementation
        self.gpt.set_attn_implementation("eager")  # sdpa returns no weights
        try:
            att = self.gpt(ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions
        finally:
            self.gpt.set_attn_implementation(impl)
        self.train(was)
        return self.tokenizer.tokens(ids[0].tolist()), torch.stack([a[0].float().cpu() for a in att])

    def write_artifacts(self, run_dir: Path) -> list[Path]:
        return [*super().write_artifacts(run_dir), self.plot_attention(Path(run_dir) / "attention.png")]

    def plot_attention(self, path: Path) -> Path:
        """attention.png: one heat map per layer and head over the corpus's attention prompt (the book's analysis)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dreamlab.images import save_figure

        words, att = self.attention(ATTENTION_PROMPTS[self.config.corpus])
        layers, heads, n, _ = att.shape
        fig, axes = plt.subplots(layers, heads, figsize=(4.2 * heads, 4.2 * layers), squeeze=False)
        for li in range(layers):
            for hi in range(heads):
                ax = axes[li][hi]
                ax.imshow(att[li, hi].numpy(), cmap="viridis", vmin=0, vmax=1)
                ax.set_xticks(range(n), words, rotation=90, fontsize=6)
                ax.set_yticks(range(n), words, fontsize=6)
                ax.set_title(f"layer {li + 1}, head {hi + 1}", fontsize=9)
        fig.suptitle(f"{self.name}: attention weights (row = the token attending; causal: upper triangle is 0)")
        fig.tight_layout()
        return save_figure(fig, path)

