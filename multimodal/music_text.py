"""Words for music: captions from a piece's attributes, paraphrases in words no caption uses, held-out combinations,
and the frozen MiniLM features of the caption pool (computed once, cached).

A training item (a window of a piece, transposed) has five caption attributes (`ATTRS`): key (24), meter (4),
source (6; the number of voices follows from it: four for the chorales, one otherwise), tempo band (3) and note
density band (3). `caption` describes them in varied wording, each caption naming a random subset (the key or only
its mode, the meter or a dance that implies it, the collection, ...). The pool holds `per_combo` captions for every
attribute combination the training data can reach; `combo_id` indexes it.

Held out of training: for every (meter, source) pair of the data, two keys (`held_out_triples`): no training item
in that key, meter and source is ever shown. The evaluation prompts (`eval_prompts`) ask for exactly those, in
training wording and in paraphrase (`paraphrase`), whose content words never occur in a training caption (checked by
`training_vocabulary`): the same attributes in other words ("Aeolian", "six quavers per measure", "Caledonian").
"""
from __future__ import annotations

import hashlib
import itertools
import re
from typing import Any

import numpy as np

from dreamlab import music as M
from dreamlab.errors import DreamlabError
from dreamlab.io import cached_array
from multimodal.prompts import MAX_PROMPT_CHARS, check_prompt, check_prompts

ATTRS = ("key", "meter", "source", "tempo", "density")
SIZES = (24, len(M.METERS), len(M.SOURCE_NAMES), len(M.TEMPO_BANDS), len(M.DENSITY_BANDS))
N_COMBOS = int(np.prod(SIZES))
PROMPT_EXAMPLE = "a lively jig in D major"


def validate_prompt(prompt: Any, *, what: str = "prompt") -> str:
    """A prompt must be a non-empty string of plain text of at most MAX_PROMPT_CHARS characters."""
    return check_prompt(prompt, example=PROMPT_EXAMPLE, what=what, max_chars=MAX_PROMPT_CHARS)


def validate_prompts(prompt: Any) -> list[str]:
    return check_prompts(prompt, example=PROMPT_EXAMPLE, max_chars=MAX_PROMPT_CHARS)


def combo_id(key: Any, meter: Any, source: Any, tempo: Any, density: Any) -> Any:
    """Index of an attribute combination (numpy arrays or torch tensors work elementwise)."""
    return (((key * SIZES[1] + meter) * SIZES[2] + source) * SIZES[3] + tempo) * SIZES[4] + density


def combo_values(cid: int) -> tuple[int, int, int, int, int]:
    out = []
    for s in reversed(SIZES):
        out.append(cid % s)
        cid //= s
    return tuple(reversed(out))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- training wording

SHARP_FLAT = {"#": [" sharp", "#"], "b": [" flat", "b"]}
MODE_WORDS = {0: ["major"], 1: ["minor"]}
MOOD_WORDS = {0: ["cheerful", "bright", "happy"], 1: ["sad", "melancholy", "dark"]}
METER_WORDS = {"2/4": ["in 2/4", "in 2/4 time", "with two beats to the bar"],
               "3/4": ["in 3/4", "in 3/4 time", "with three beats to the bar"],
               "4/4": ["in 4/4", "in 4/4 time", "with four beats to the bar"],
               "6/8": ["in 6/8", "in 6/8 time", "with a 6/8 lilt"]}
DANCE_WORDS = {"2/4": ["march", "polka"], "3/4": ["waltz"], "4/4": ["reel"], "6/8": ["jig"]}
TEMPO_WORDS = {0: ["slow", "calm"], 1: ["moderate", "steady"], 2: ["fast", "lively", "quick"]}
DENSITY_WORDS = {0: ["sparse", "simple"], 1: ["flowing"], 2: ["busy", "dense", "ornamented"]}
SOURCE_WORDS = {
    "chorales": ["Bach chorale", "four-part chorale", "chorale for four voices", "four-voice hymn"],
    "german": ["German folk song", "folk song from Germany"],
    "chinese": ["Chinese folk song", "folk melody from China"],
    "irish": ["Irish tune", "Irish folk tune", "tune from Ireland"],
    "scottish": ["Scottish air", "Scottish tune", "tune from Scotland"],
    "american": ["American fiddle tune", "fiddle tune from America"],
}
COUNTRY = {"german": "Germany", "chinese": "China", "irish": "Ireland", "scottish": "Scotland",
           "american": "America"}
GENERIC_NOUNS = ["piece", "tune", "melody", "piece of music"]
SOLO_WORDS = ["for a single voice", "as a solo melody", "one melodic line"]
PREFIXES = ["", "", "", "music:", "a recording of"]


def tonic_words(key: int) -> list[str]:
    name = (M.TONICS_MINOR if key >= 12 else M.TONICS_MAJOR)[key % 12]
    if len(name) == 1:
        return [name]
    return [name[0] + w for w in SHARP_FLAT[name[1]]]


def key_words(key: int, rng: np.random.Generator) -> str:
    t = _pick(tonic_words(key), rng)
    return f"{t} {_pick(MODE_WORDS[key // 12], rng)}"


def _pick(opts: list[str], rng: np.random.Generator) -> str:
    return opts[int(rng.integers(len(opts)))]


def caption(values: tuple[int, int, int, int, int], rng: np.random.Generator) -> str:
    """One caption for an attribute combination (key, meter, source, tempo, density) in random training wording."""
    key, meter, source, tempo, density = (int(v) for v in values)
    mname, sname = M.METERS[meter], M.SOURCE_NAMES[source]
    folk = sname != "chorales"
    adjs: list[str] = []
    if rng.random() < 0.5:
        adjs.append(_pick(TEMPO_WORDS[tempo], rng))
    if rng.random() < 0.4:
        adjs.append(_pick(DENSITY_WORDS[density], rng))
    r = rng.random()
    key_phrase = ""
    if r < 0.75:
        key_phrase = _pick(["in {}", "in the key of {}", "in {}"], rng).format(key_words(key, rng))
    elif r < 0.9:
        key_phrase = f"in a {MODE_WORDS[key // 12][0]} key"
    if rng.random() < 0.3:
        adjs.insert(0, _pick(MOOD_WORDS[key // 12], rng))
    if rng.random() < 0.75:
        noun = _pick(SOURCE_WORDS[sname], rng)
    else:
        noun = _pick(GENERIC_NOUNS, rng)
    meter_phrase = ""
    if folk and rng.random() < 0.25:
        noun = _pick(DANCE_WORDS[mname], rng) + (f" from {COUNTRY[sname]}" if rng.random() < 0.5 else "")
    elif rng.random() < 0.8:
        meter_phrase = _pick(METER_WORDS[mname], rng)
    extra = _pick(SOLO_WORDS, rng) if folk and rng.random() < 0.15 else ""
    parts = [key_phrase, meter_phrase, extra]
    parts = [p for p in parts if p]
    order = rng.permutation(len(parts))
    tail = " ".join(parts[i] for i in order)
    head = " ".join(adjs + [noun])
    article = "an" if head[0].lower() in "aeiou" else "a"
    text = f"{_pick(PREFIXES, rng)} {article} {head} {tail}"
    return re.sub(r"\s+", " ", text).strip()


def prompt_for(values: tuple[int, int, int, int, int]) -> str:
    """The canonical (training-wording) prompt of a combination: key, meter, source, density (tempo left free)."""
    key, meter, source, _, density = (int(v) for v in values)
    noun = SOURCE_WORDS[M.SOURCE_NAMES[source]][0]
    return f"a {DENSITY_WORDS[density][0]} {noun} in {key_words(key, np.random.default_rng(0))} " \
           f"{METER_WORDS[M.METERS[meter]][1]}"


# ----------------------------------------------------------------------------- paraphrases (no training word)

PARA_MODE = {0: "Ionian", 1: "Aeolian"}
PARA_METER = {"2/4": "a duple crotchet pulse", "3/4": "a triple crotchet pulse",
              "4/4": "a quadruple crotchet pulse", "6/8": "a compound duple quaver pulse"}
PARA_DENSITY = {0: "airy", 1: "evenly paced", 2: "crowded"}
PARA_SOURCE = {"chorales": "Lutheran harmonisation for SATB choir", "german": "Teutonic ditty",
               "chinese": "Han ditty", "irish": "Hibernian ditty", "scottish": "Caledonian ditty",
               "american": "Yankee ditty"}
PARA_TEMPLATE = "{density} {source} centred on {tonic} {mode}, with {meter}"
STOPWORDS = {"a", "an", "the", "in", "of", "on", "for", "with", "and", "to", "from", "as", "one"}


def paraphrase(values: tuple[int, int, int, int, int]) -> str:
    key, meter, source, _, density = (int(v) for v in values)
    tonic = (M.TONICS_MINOR if key >= 12 else M.TONICS_MAJOR)[key % 12]
    return PARA_TEMPLATE.format(density=PARA_DENSITY[density], source=PARA_SOURCE[M.SOURCE_NAMES[source]],
                                tonic=tonic, mode=PARA_MODE[key // 12], meter=PARA_METER[M.METERS[meter]])


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9/#-]+", text.lower()))


def training_vocabulary() -> set[str]:
    """Every word a training caption can contain (enumerated from the wording tables and templates)."""
    out: set[str] = set()
    tables = [MODE_WORDS, MOOD_WORDS, METER_WORDS, DANCE_WORDS, TEMPO_WORDS, DENSITY_WORDS, SOURCE_WORDS]
    for t in tables:
        for opts in t.values():
            for o in opts:
                out |= words(o)
    for lst in (GENERIC_NOUNS, SOLO_WORDS, PREFIXES, list(COUNTRY.values()),
                ["in the key of a an from", "sharp flat"]):
        for o in lst:
            out |= words(o)
    for k in range(24):
        for t in tonic_words(k):
            out |= words(t)
    return out


def tonic_names() -> set[str]:
    return {n.lower() for n in M.TONICS_MAJOR + M.TONICS_MINOR}


# ----------------------------------------------------------------------------- held-out combinations


def held_out_triples(pairs: set[tuple[int, int]], per_pair: int = 2, seed: int = 61) -> set[tuple[int, int, int]]:
    """(key, meter, source) triples held out of training: `per_pair` keys for each (meter, source) pair, drawn so
    that over the pairs every key and both modes come up."""
    rng = np.random.default_rng(seed)
    out = set()
    order = rng.permutation(24).tolist()
    i = 0
    for meter, source in sorted(pairs):
        for _ in range(per_pair):
            out.add((order[i % 24], meter, source))
            i += 1
    return out


def combo_allowed(held: set[tuple[int, int, int]]) -> np.ndarray:
    """(N_COMBOS,) bool: combinations a training item may have (its key, meter and source not held out)."""
    ok = np.ones(N_COMBOS, bool)
    for key, meter, source in held:
        for tempo, density in itertools.product(range(SIZES[3]), range(SIZES[4])):
            ok[combo_id(key, meter, source, tempo, density)] = False
    return ok


def eval_prompts(held: set[tuple[int, int, int]], seed: int = 0, paraphrased: bool = False) -> list[dict[str, Any]]:
    """One prompt per held-out triple with a density band drawn per prompt: [{prompt, key, meter, source, density}]."""
    rng = np.random.default_rng(seed)
    out = []
    for key, meter, source in sorted(held):
        density = int(rng.integers(SIZES[4]))
        v = (key, meter, source, 1, density)
        out.append({"prompt": paraphrase(v) if paraphrased else prompt_for(v), "key": key, "meter": meter,
                    "source": source, "density": density, "voices": M.SOURCES[M.SOURCE_NAMES[source]].voices})
    return out


# ----------------------------------------------------------------------------- the caption pool


def caption_pool(combos: np.ndarray, per_combo: int, seed: int) -> list[str]:
    """`per_combo` captions for each combination id in `combos` (row-major: combo 0's captions first)."""
    out = []
    for cid in combos.tolist():
        rng = np.random.default_rng([seed, cid])
        out += [caption(combo_values(cid), rng) for _ in range(per_combo)]
    return out


def cached_text_features(texts: list[str], encode, tag: str, dtype: Any = np.float32) -> np.ndarray:
    """Features of `texts` from `encode(list) -> array`, cached under a hash of the texts and `tag` (the text tower's
    identity and output): the frozen MiniLM runs once per caption pool and machine."""
    h = hashlib.sha1(("\n".join(texts) + "|" + tag).encode()).hexdigest()[:16]
    return cached_array(f"music_text_features_{tag}_{h}", lambda: np.asarray(encode(texts), dtype))


# ----------------------------------------------------------------------------- captioned windows of pieces

N_SHIFTS = 12  # transpositions -6..+5 semitones: every key from any key


def window_density(tok: np.ndarray) -> np.ndarray:
    """Density band of each token window (N, T, 2): distinct note onsets per quarter note, as `decode(w).density()`
    counts them (a note held into the window's first slice starts there; an unfinished last slice is left out)."""
    n, d = tok[..., 0], tok[..., 1]
    ticks = np.array([0, 0, *M.DURATIONS])[d]
    event = (n >= M.NOTE0) | (n == M.REST)
    closes = event & (ticks > 0)
    out = np.zeros(len(tok), np.int64)
    for i in range(len(tok)):
        group = np.concatenate([[0], np.cumsum(closes[i])[:-1]])  # slice index of every token
        first = group[event[i]].min() if event[i].any() else 0
        onset = (n[i] >= M.NOTE0) & ((n[i] < M.HOLD0) | (group == first))
        starts = np.unique(group[onset & (group < closes[i].sum())])
        total = ticks[i][closes[i]].sum()
        out[i] = M.density_band(len(starts) / max(total / M.TPQ, 1e-9)) if total else 0
    return out


def captioned_windows(pieces: list[M.Piece], length: int, stride_bars: int, held: set[tuple[int, int, int]],
                      transpose: bool) -> dict[str, np.ndarray]:
    """Training items of the text models: windows of `length` events, each the piece's header (START KEY TS TEMPO)
    followed by the events from a bar line on (every `stride_bars` bars), PAD-filled; their attributes (key, meter,
    source, tempo band, the window's own density band) and which of the 12 transpositions -6..+5 keep every pitch in
    range and the (key, meter, source) triple out of `held` (rows with none are dropped)."""
    ok_combo = combo_allowed(held)
    toks, attrs = [], []
    for p in pieces:
        seq = M.encode(p, end=True)
        head, body = seq[:M.HEADER], seq[M.HEADER:]
        bars = np.flatnonzero(body[:, 0] == M.BAR)
        for b in (bars[::stride_bars] if len(bars) else [0]):
            w = np.concatenate([head, body[b:b + length - M.HEADER]])
            if len(w) < length:
                w = np.concatenate([w, np.zeros((length - len(w), 2), w.dtype)])
            toks.append(w)
            attrs.append((p.key, p.meter, p.source, p.tempo_band))
    if not toks:
        raise DreamlabError("no music windows: the chosen sources gave no piece")
    tok = np.stack(toks)
    a = np.array(attrs, np.int64)
    dens = window_density(tok)
    attr = np.concatenate([a, dens[:, None]], 1)
    lo, hi = [], []
    for w in tok:
        q = M.pitch_bounds(w)
        lo.append(q[0])
        hi.append(q[1])
    lo_a, hi_a = np.array(lo), np.array(hi)
    shifts = np.arange(-N_SHIFTS // 2, N_SHIFTS // 2)
    if not transpose:
        shifts_ok = shifts[None] == 0
    else:
        shifts_ok = (lo_a[:, None] + shifts >= M.PITCH_LO) & (hi_a[:, None] + shifts <= M.PITCH_HI)
    keys = (attr[:, :1] % 12 + shifts) % 12 + 12 * (attr[:, :1] // 12)
    cids = combo_id(keys, attr[:, 1:2], attr[:, 2:3], attr[:, 3:4], attr[:, 4:5])
    allow = shifts_ok & ok_combo[cids]
    keep = allow.any(1)
    # the caption pool covers every combination the pieces reach in any key of their mode and any density band, so
    # models on the same pieces (CLAP, text-to-music) share one pool (and its cached features) whatever their windows
    pk = np.array([(p.key, p.meter, p.source, p.tempo_band) for p in pieces], np.int64)
    tonics = np.arange(12)[None, :, None]
    dens = np.arange(SIZES[4])[None, None, :]
    reach = combo_id((tonics + 12 * (pk[:, :1, None] // 12)), pk[:, 1:2, None], pk[:, 2:3, None], pk[:, 3:4, None],
                     dens).ravel()
    combos = np.unique(reach[ok_combo[reach]])
    return {"x": tok[keep], "attr": attr[keep], "allowed": allow[keep], "combos": combos}
