"""Procedural captioned image sets: faces, flowers and bricks (64x64 RGB), plus Fashion-MNIST captions.

Everything is deterministic from a seed and drawn with vectorised numpy (soft-edged masks over a
pixel grid, a chunk of images at a time), so thousands of images take seconds; the splits are cached
as uint8 .npy through `dreamlab.io.cached_array`.

Each set has categorical attributes (`ATTRIBUTES[kind]`: name -> tuple of values). An image's labels
are the value indices; its captions are generated from them in varied wording (synonyms, prefixes,
phrase order, two sentence styles) by `caption`. A few attribute combinations (`HELD_OUT[kind]`)
never appear in the train split: the val/test splits are drawn from every combination, and
`split_combos`/`load_procedural(..., held_out_only=True)` select the held-out ones for evaluation.
`PARAPHRASE_WORDS` holds wording that appears in *no* training caption (checked by the tests), for
zero-shot prompts with unseen words.

Only numpy, torch and the standard library are imported here; `dreamlab.data` registers these sets by name.
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import torch

from dreamlab.errors import DreamlabError
from dreamlab.io import cached_array

KINDS = ("faces", "flowers", "bricks")
SIZE = 64
VERSION = "v1"  # bump when the drawing changes: cache keys include it
SPLIT_SIZES = {"train": 12000, "val": 1000, "test": 2000}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}

ATTRIBUTES: dict[str, dict[str, tuple]] = {
    "faces": {
        "hair": ("black", "brown", "blonde", "red", "grey"),
        "skin": ("light", "medium", "dark"),
        "smiling": (False, True),
        "glasses": (False, True),
    },
    "flowers": {
        "petals": (3, 4, 5, 6),
        "colour": ("red", "yellow", "blue", "purple", "white", "orange"),
        "centre": ("yellow", "brown"),
    },
    "bricks": {
        "size": ("1x2", "2x2", "2x4"),
        "colour": ("red", "blue", "yellow", "green", "black", "white"),
    },
}

#: attribute combinations (value tuples in ATTRIBUTES order) that never occur in a train split
HELD_OUT: dict[str, tuple[tuple, ...]] = {
    "faces": (
        ("blonde", "dark", True, True),
        ("red", "light", True, True),
        ("black", "light", False, True),
        ("grey", "medium", True, False),
        ("brown", "dark", False, True),
        ("blonde", "medium", False, False),
    ),
    "flowers": (
        (5, "blue", "yellow"),
        (3, "purple", "brown"),
        (6, "red", "brown"),
        (4, "white", "yellow"),
    ),
    "bricks": (
        ("2x4", "green"),
        ("1x2", "yellow"),
        ("2x2", "white"),
    ),
}

# ----------------------------------------------------------------------------- wording

#: training wording: attribute value -> phrases (every training caption uses only these)
_FACE_WORDS = {
    "hair": {"black": ["black"], "brown": ["brown"], "blonde": ["blonde", "blond", "yellow"],
             "red": ["red", "ginger"], "grey": ["grey", "gray", "silver"]},
    "skin": {"light": ["light skin", "pale skin"], "medium": ["medium skin", "olive skin"],
             "dark": ["dark skin", "darker skin"]},
    "smiling": {True: ["smiling", "with a smile", "happy"], False: ["not smiling", "with a neutral face", "serious"]},
    "glasses": {True: ["with glasses", "wearing glasses"], False: ["without glasses", "with no glasses"]},
}
_FLOWER_WORDS = {
    "petals": {3: ["three"], 4: ["four"], 5: ["five"], 6: ["six"]},
    "colour": {c: [c] for c in ATTRIBUTES["flowers"]["colour"]},
    "centre": {"yellow": ["a yellow centre", "a yellow center"], "brown": ["a brown centre", "a brown center"]},
}
_BRICK_WORDS = {
    "size": {"1x2": ["1x2", "small"], "2x2": ["2x2", "square"], "2x4": ["2x4", "long"]},
    "colour": {c: [c] for c in ATTRIBUTES["bricks"]["colour"]},
}
_PREFIXES = ["", "a photo of", "a picture of", "an image of", "a drawing of", "a low resolution image of"]

#: Fashion-MNIST class names as captions use them, with training synonyms
FMNIST_WORDS = (
    ["t-shirt", "top", "tee"], ["pair of trousers", "trousers"], ["pullover"], ["dress"], ["coat"],
    ["sandal"], ["shirt"], ["sneaker"], ["bag"], ["ankle boot", "boot"],
)
FMNIST_TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "a black and white photo of a {}.", "a {}, an item of clothing.",
    "a low resolution image of a {}.", "a grey image of a {}.", "a {}.",
)

#: wording absent from every training caption (faces, flowers, bricks, Fashion-MNIST), for paraphrase prompts
PARAPHRASE_WORDS = {
    "faces": {
        "hair": {"black": "raven", "brown": "chestnut", "blonde": "golden", "red": "auburn", "grey": "ashen"},
        "skin": {"light": "a fair complexion", "medium": "a tan complexion", "dark": "a deep complexion"},
        "smiling": {True: "grinning", False: "expressionless"},
        "glasses": {True: "in spectacles", False: "minus spectacles"},
    },
    "fashion_mnist": ("jersey", "slacks", "sweater", "gown", "overcoat", "flip-flop", "blouse", "trainer",
                      "handbag", "bootie"),
}
PARAPHRASE_TEMPLATES = {
    "faces": "portrait of somebody {smiling}, {hair}-haired, {glasses}, having {skin}",
    "fashion_mnist": "snapshot showing one {}",
}


def attribute_names(kind: str) -> list[str]:
    _check_kind(kind)
    return list(ATTRIBUTES[kind])


def num_values(kind: str) -> list[int]:
    return [len(v) for v in ATTRIBUTES[kind].values()]


def all_combos(kind: str) -> list[tuple]:
    """Every attribute combination, as value tuples in ATTRIBUTES order."""
    return list(itertools.product(*ATTRIBUTES[kind].values()))


def combo_indices(kind: str, combo: tuple) -> list[int]:
    return [vals.index(v) for vals, v in zip(ATTRIBUTES[kind].values(), combo)]


def _check_kind(kind: str) -> None:
    if kind not in ATTRIBUTES:
        raise DreamlabError(f"unknown procedural set {kind!r}; choose one of {', '.join(KINDS)}")


def caption(kind: str, labels: np.ndarray | list[int], rng: np.random.Generator) -> str:
    """A caption for one image from its attribute indices, in randomly varied wording."""
    _check_kind(kind)
    vals = [ATTRIBUTES[kind][a][int(i)] for a, i in zip(ATTRIBUTES[kind], labels)]
    pick = lambda opts: opts[int(rng.integers(len(opts)))]  # noqa: E731
    prefix = pick(_PREFIXES)
    if kind == "faces":
        hair, skin, smile, glasses = vals
        w = _FACE_WORDS
        hw, sw, mw, gw = (
            pick(w["hair"][hair]),
            pick(w["skin"][skin]),
            pick(w["smiling"][smile]),
            pick(w["glasses"][glasses]),
        )
        noun = pick(["face", "person", "man or woman"])
        with_part = [f"{hw} hair", sw]
        rng.shuffle(with_part)
        extras = [mw, gw]
        rng.shuffle(extras)
        style = int(rng.integers(3))
        if style == 0:
            text = f"a {noun} with {with_part[0]} and {with_part[1]}, {extras[0]} and {extras[1]}"
        elif style == 1:
            text = f"a {hw}-haired person with {sw}, {extras[0]}, {extras[1]}"
        elif mw in ("smiling", "happy", "serious"):
            text = f"a {mw} {noun} with {with_part[0]} and {with_part[1]} {gw}"
        else:
            text = f"a {noun} {gw}, {mw}, with {with_part[0]} and {with_part[1]}"
    elif kind == "flowers":
        petals, colour, centre = vals
        w = _FLOWER_WORDS
        pw, cw, ctw = pick(w["petals"][petals]), pick(w["colour"][colour]), pick(w["centre"][centre])
        if rng.random() < 0.5:
            text = f"a {cw} flower with {pw} petals and {ctw}"
        else:
            text = pick([f"a flower with {pw} {cw} petals and {ctw}", f"{pw} {cw} petals around {ctw}"])
    else:
        size, colour = vals
        w = _BRICK_WORDS
        sw_, cw = pick(w["size"][size]), pick(w["colour"][colour])
        text = pick([f"a {cw} {sw_} brick", f"a {sw_} {cw} toy brick", f"a {sw_} building block in {cw}",
                     f"one {cw} lego-like {sw_} brick"])
    text = re.sub(r"\s+", " ", f"{prefix} {text}".strip())
    return text


def captions(kind: str, labels: np.ndarray | torch.Tensor, seed: int = 0, per_image: int = 1) -> list[list[str]]:
    """`per_image` captions for each row of `labels` (N, n_attributes), deterministic from `seed`."""
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    rng = np.random.default_rng(seed)
    return [[caption(kind, row, rng) for _ in range(per_image)] for row in labels]


def prompt_for(kind: str, combo: tuple) -> str:
    """The canonical (training-vocabulary) prompt for one attribute combination."""
    vals = dict(zip(ATTRIBUTES[kind], combo))
    if kind == "faces":
        smile = "smiling" if vals["smiling"] else "serious"
        glasses = "with glasses" if vals["glasses"] else "without glasses"
        return f"a {smile} face with {vals['hair']} hair and {vals['skin']} skin, {glasses}"
    if kind == "flowers":
        petals = _FLOWER_WORDS["petals"][vals["petals"]][0]
        return f"a {vals['colour']} flower with {petals} petals and a {vals['centre']} centre"
    return f"a {vals['colour']} {vals['size']} brick"


def paraphrase_for(kind: str, combo: tuple) -> str:
    """A prompt for `combo` in words that no training caption uses (faces only)."""
    if kind != "faces":
        raise DreamlabError(f"paraphrase prompts exist for faces and fashion_mnist, not {kind!r}")
    w = PARAPHRASE_WORDS["faces"]
    vals = dict(zip(ATTRIBUTES[kind], combo))
    return PARAPHRASE_TEMPLATES["faces"].format(
        smiling=w["smiling"][vals["smiling"]], hair=w["hair"][vals["hair"]],
        glasses=w["glasses"][vals["glasses"]], skin=w["skin"][vals["skin"]])


def fmnist_caption(label: int, rng: np.random.Generator) -> str:
    t = FMNIST_TEMPLATES[int(rng.integers(len(FMNIST_TEMPLATES)))]
    words = FMNIST_WORDS[int(label)]
    return t.format(words[int(rng.integers(len(words)))])


def fmnist_captions(labels: np.ndarray | torch.Tensor, seed: int = 0, per_image: int = 1) -> list[list[str]]:
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    rng = np.random.default_rng(seed)
    return [[fmnist_caption(int(y), rng) for _ in range(per_image)] for y in labels]


def training_vocabulary() -> set[str]:
    """Every word any training caption can contain (enumerated from the wording tables)."""
    words: set[str] = set()

    def add(s: str) -> None:
        words.update(re.findall(r"[a-z0-9]+", s.lower()))

    for p in _PREFIXES:
        add(p)
    for table in (_FACE_WORDS, _FLOWER_WORDS, _BRICK_WORDS):
        for d in table.values():
            for opts in d.values():
                for o in opts:
                    add(o)
    for opts in FMNIST_WORDS:
        for o in opts:
            add(o)
    for t in FMNIST_TEMPLATES:
        add(t.replace("{}", ""))
    for s in ("face person man or woman with and hair -haired a", "flower with petals and around",
              "brick toy building block in one lego-like"):
        add(s)
    return words


# ----------------------------------------------------------------------------- drawing

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return c[None, None, :], c[None, :, None]  # x (1,1,W), y (1,H,1)


def _soft(d: np.ndarray, size: int) -> np.ndarray:
    """Soft inside-mask from a signed distance (positive inside), one pixel of anti-aliasing."""
    return np.clip(0.5 + d * (size / 2.0), 0.0, 1.0)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """img (n,H,W,3) <- mask (n,H,W) blend of colour (n,3)."""
    m = mask[..., None]
    img *= 1 - m
    img += m * colour[:, None, None, :]


def _ellipse(x, y, cx, cy, rx, ry, size):
    d = 1 - np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _soft(d * np.minimum(rx, ry), size)


_HAIR_RGB = np.array(
    [[0.08, 0.07, 0.07], [0.42, 0.25, 0.12], [0.95, 0.82, 0.42], [0.80, 0.28, 0.10], [0.70, 0.70, 0.72]], np.float32
)
_SKIN_RGB = np.array([[0.98, 0.84, 0.73], [0.80, 0.59, 0.42], [0.42, 0.28, 0.18]], np.float32)
_COLOURS = {"red": (0.85, 0.12, 0.12), "yellow": (0.97, 0.85, 0.15), "blue": (0.15, 0.30, 0.85),
            "purple": (0.55, 0.20, 0.70), "white": (0.96, 0.96, 0.96), "orange": (0.98, 0.55, 0.10),
            "green": (0.15, 0.62, 0.20), "black": (0.10, 0.10, 0.10), "brown": (0.45, 0.28, 0.12)}


def _rgb(names: tuple, idx: np.ndarray) -> np.ndarray:
    return np.array([_COLOURS[n] for n in names], np.float32)[idx]


def _draw_faces(lab: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    n = len(lab)
    x, y = _grid(size)
    col = lambda a: a.reshape(n, 1, 1).astype(np.float32)  # noqa: E731
    bg = rng.uniform(0.25, 0.85, (n, 3)).astype(np.float32)
    img = np.broadcast_to(bg[:, None, None, :], (n, size, size, 3)).copy()
    img *= (1 - 0.15 * (y[..., None] + 1) / 2)  # soft vertical light gradient
    cx, cy = col(rng.uniform(-0.08, 0.08, n)), col(rng.uniform(0.0, 0.12, n))
    rx, ry = col(rng.uniform(0.42, 0.50, n)), col(rng.uniform(0.52, 0.60, n))
    jitter = lambda base, s: np.clip(base + rng.normal(0, s, base.shape), 0, 1).astype(np.float32)  # noqa: E731
    hair_c, skin_c = jitter(_HAIR_RGB[lab[:, 0]], 0.03), jitter(_SKIN_RGB[lab[:, 1]], 0.03)
    # hair: a larger ellipse behind the head, reaching to the jaw on the sides
    hair = _ellipse(x, y, cx, cy - 0.08, rx + 0.12, ry + 0.12, size) * _soft(cy + 0.25 - y, size)
    _paint(img, hair, hair_c)
    _paint(img, _ellipse(x, y, cx, cy, rx, ry, size), skin_c)
    # fringe over the forehead
    fringe = _ellipse(x, y, cx, cy - 0.08, rx + 0.12, ry + 0.12, size) * _soft(
        cy - 0.62 * ry - y + 0.05 * np.cos(9 * x), size
    )
    _paint(img, fringe, hair_c)
    ex, ey = col(rng.uniform(0.17, 0.22, n)), cy - col(rng.uniform(0.06, 0.12, n))
    eye_c = np.tile(np.array([[0.08, 0.06, 0.05]], np.float32), (n, 1))
    for s in (-1, 1):
        _paint(img, _ellipse(x, y, cx + s * ex, ey, 0.055, 0.065, size), eye_c)
    # mouth: a smiling arc or a straight line
    my = cy + 0.27
    d_arc = np.sqrt((x - cx) ** 2 + (y - (my - 0.18)) ** 2)
    arc = _soft(0.035 - np.abs(d_arc - 0.2), size) * _soft(y - (my - 0.06), size) * _soft(0.24 - np.abs(x - cx), size)
    line = _soft(0.03 - np.abs(y - (my + 0.02)), size) * _soft(0.15 - np.abs(x - cx), size)
    smiling = col(lab[:, 2]) > 0
    mouth = np.where(smiling, arc, line)
    _paint(img, mouth, np.tile(np.array([[0.55, 0.10, 0.12]], np.float32), (n, 1)))
    # glasses: two rings around the eyes and a bridge
    ring = np.zeros((n, size, size), np.float32)
    for s in (-1, 1):
        d = np.sqrt((x - (cx + s * ex)) ** 2 + (y - ey) ** 2)
        ring = np.maximum(ring, _soft(0.025 - np.abs(d - 0.13), size))
    bridge = _soft(0.02 - np.abs(y - ey), size) * _soft(ex - 0.12 - np.abs(x - cx), size)
    glasses = np.maximum(ring, bridge) * (col(lab[:, 3]) > 0)
    _paint(img, glasses, np.tile(np.array([[0.05, 0.05, 0.08]], np.float32), (n, 1)))
    return img


def _draw_flowers(lab: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    n = len(lab)
    x, y = _grid(size)
    col = lambda a: a.reshape(n, 1, 1).astype(np.float32)  # noqa: E731
    sky = np.stack([rng.uniform(0.55, 0.8, n), rng.uniform(0.75, 0.95, n), rng.uniform(0.55, 0.75, n)], 1).astype(
        np.float32
    )
    img = np.broadcast_to(sky[:, None, None, :], (n, size, size, 3)).copy()
    cx, cy = col(rng.uniform(-0.12, 0.12, n)), col(rng.uniform(-0.15, 0.05, n))
    stem = _soft(0.035 - np.abs(x - cx), size) * _soft(y - cy, size)
    _paint(img, stem, np.tile(np.array([[0.12, 0.45, 0.12]], np.float32), (n, 1)))
    k = col(np.array(ATTRIBUTES["flowers"]["petals"])[lab[:, 0]])
    R = col(rng.uniform(0.55, 0.72, n))
    phase = col(rng.uniform(0, 2 * np.pi, n))
    rho = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    theta = np.arctan2(y - cy, x - cx)
    petal_r = R * (0.25 + 0.75 * np.abs(np.cos(k * theta / 2 + phase)) ** 1.5)
    petal_c = np.clip(_rgb(ATTRIBUTES["flowers"]["colour"], lab[:, 1]) + rng.normal(0, 0.03, (n, 3)), 0, 1).astype(
        np.float32
    )
    petals = _soft(petal_r - rho, size)
    # darker petal edges give the shape some relief
    _paint(img, petals, petal_c * 0.8)
    _paint(img, _soft(petal_r * 0.85 - rho, size), petal_c)
    centre_c = _rgb(("yellow", "brown"), lab[:, 2])
    _paint(img, _soft(0.2 * R - rho, size), centre_c)
    return img


def _draw_bricks(lab: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    n = len(lab)
    x, y = _grid(size)
    col = lambda a: a.reshape(n, 1, 1).astype(np.float32)  # noqa: E731
    grey = rng.uniform(0.55, 0.9, n).astype(np.float32)
    bg = (
        np.stack([grey, grey * rng.uniform(0.95, 1.05, n), grey * rng.uniform(0.9, 1.1, n)], 1)
        .clip(0, 1)
        .astype(np.float32)
    )
    img = np.broadcast_to(bg[:, None, None, :], (n, size, size, 3)).copy()
    studs_w = col(np.array([2, 2, 4])[lab[:, 0]])  # studs along the front edge
    studs_d = col(np.array([1, 2, 2])[lab[:, 0]])  # studs along the depth
    unit = col(rng.uniform(0.30, 0.35, n))
    w, d, h = studs_w * unit, studs_d * unit * 0.7, unit * 1.2  # front width, depth (foreshortened), height
    x0 = -(w + d * 0.8) / 2 + col(rng.uniform(-0.08, 0.08, n))
    y0 = (h - d) / 2 + col(rng.uniform(-0.05, 0.1, n))  # top edge of the front face
    sk = 0.8  # the top and side faces lean right by sk per unit of depth
    c = np.clip(_rgb(ATTRIBUTES["bricks"]["colour"], lab[:, 1]) + rng.normal(0, 0.02, (n, 3)), 0, 1).astype(np.float32)
    light = lambda f: np.clip(c * f + (0.12 if f > 1 else 0.0), 0, 1).astype(np.float32)  # noqa: E731
    front = _soft(np.minimum(np.minimum(x - x0, x0 + w - x), np.minimum(y - y0, y0 + h - y)), size)
    _paint(img, front, light(1.0))
    # top: y0 - d <= y <= y0 and x0 + sk*(y0-y) <= x <= x0 + w + sk*(y0-y)
    t = y0 - y
    top = _soft(np.minimum(np.minimum(t, d - t), np.minimum(x - x0 - sk * t, x0 + w + sk * t - x)), size)
    _paint(img, top, light(1.25))
    # side: x0+w <= x <= x0+w+sk*d, shifted up with x
    s = (x - x0 - w) / sk
    side = _soft(np.minimum(np.minimum(s, d - s), np.minimum(y - (y0 - s), y0 - s + h - y)), size)
    _paint(img, side, light(0.7))
    # studs: small ellipses on the top face, in a studs_w x studs_d grid
    studs = np.zeros((n, size, size), np.float32)
    for i in range(4):
        for j in range(2):
            on = (i < studs_w) & (j < studs_d)
            tj = (j + 0.5) * d / studs_d
            sx = x0 + (i + 0.5) * w / studs_w + sk * tj
            sy = y0 - tj
            studs = np.maximum(studs, _ellipse(x, y, sx, sy, unit * 0.3, unit * 0.18, size) * on)
    _paint(img, studs, light(1.45))
    return img


_DRAW = {"faces": _draw_faces, "flowers": _draw_flowers, "bricks": _draw_bricks}


def sample_labels(kind: str, n: int, rng: np.random.Generator, exclude_held_out: bool) -> np.ndarray:
    """(n, n_attributes) uniform labels; with `exclude_held_out` the held-out combinations are redrawn."""
    nv = num_values(kind)
    lab = np.stack([rng.integers(0, v, n) for v in nv], 1)
    if exclude_held_out:
        held = np.array([combo_indices(kind, c) for c in HELD_OUT[kind]])
        while True:
            bad = (lab[:, None, :] == held[None]).all(-1).any(-1)
            if not bad.any():
                break
            lab[bad] = np.stack([rng.integers(0, v, int(bad.sum())) for v in nv], 1)
    return lab


def generate(kind: str, n: int, seed: int, *, exclude_held_out: bool = False, labels: np.ndarray | None = None,
             size: int = SIZE, chunk: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` images: returns (uint8 (n, size, size, 3), int64 labels (n, n_attributes)).

    `labels` fixes the attributes (e.g. one held-out combination repeated); otherwise they are drawn
    uniformly from `seed`. The drawing noise (position, jitter, background) also comes from `seed`.
    """
    _check_kind(kind)
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    lab = np.asarray(labels, np.int64) if labels is not None else sample_labels(kind, n, rng, exclude_held_out)
    if labels is not None and lab.shape != (n, len(ATTRIBUTES[kind])):
        raise DreamlabError(f"labels for {kind} must have shape ({n}, {len(ATTRIBUTES[kind])}), got {lab.shape}")
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(0, n, chunk):
        img = _DRAW[kind](lab[i:i + chunk], rng, size)
        out[i:i + chunk] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out, lab.astype(np.int64)


def _split_arrays(kind: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    n = SPLIT_SIZES[split]
    key = f"procedural_{kind}_{split}_{n}_{VERSION}"
    cache: dict[str, np.ndarray] = {}

    def build_x() -> np.ndarray:
        x, y = generate(kind, n, seed=SPLIT_SEEDS[split], exclude_held_out=(split == "train"))
        cache["y"] = y
        return x

    x = cached_array(key + "_x", build_x)
    y = cached_array(key + "_y", lambda: cache["y"] if "y" in cache else generate(
        kind, n, seed=SPLIT_SEEDS[split], exclude_held_out=(split == "train"))[1])
    return x, y


def load_procedural(kind: str, split: str = "train", *, held_out_only: bool = False,
                    max_items: int | None = None) -> dict[str, torch.Tensor]:
    """{"x": float (N,3,64,64) in [0,1], "y": combination index (N,), "attrs": (N, n_attr), one tensor per attribute}.

    `held_out_only` keeps the images whose combination is held out of training; `max_items` keeps the first N.
    """
    _check_kind(kind)
    if split not in SPLIT_SIZES:
        raise DreamlabError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SIZES)}")
    x, lab = _split_arrays(kind, split)
    if held_out_only:
        held = np.array([combo_indices(kind, c) for c in HELD_OUT[kind]])
        keep = (lab[:, None, :] == held[None]).all(-1).any(-1)
        x, lab = x[keep], lab[keep]
    if max_items:
        x, lab = x[:max_items], lab[:max_items]
    nv = num_values(kind)
    combo = np.ravel_multi_index(tuple(lab.T), nv) if len(lab) else np.zeros(0, np.int64)
    out = {"x": torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0),
           "y": torch.from_numpy(np.asarray(combo, np.int64)),
           "attrs": torch.from_numpy(lab)}
    for j, name in enumerate(ATTRIBUTES[kind]):
        out[name] = torch.from_numpy(lab[:, j].copy())
    return out


def is_held_out(kind: str, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    lab = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    held = np.array([combo_indices(kind, c) for c in HELD_OUT[kind]])
    return (lab[:, None, :] == held[None]).all(-1).any(-1)


DESCRIPTIONS = {
    kind: f"procedural 64x64 RGB {what}; 12k train / 1k val / 2k test, held-out combos not in train"
    for kind, what in (("faces", "faces with hair colour, skin tone, smiling, glasses"),
                       ("flowers", "flowers with petal count, petal colour, centre colour"),
                       ("bricks", "toy bricks with size (studs) and colour"))
}

__all__ = ["ATTRIBUTES", "HELD_OUT", "KINDS", "caption", "captions", "generate", "load_procedural",
           "prompt_for", "paraphrase_for", "training_vocabulary", "fmnist_captions"]
