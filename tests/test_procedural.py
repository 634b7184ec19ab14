"""Procedural captioned datasets: determinism, held-out combinations, captions, paraphrase vocabulary."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dreamlab import procedural as P
from dreamlab.data import list_datasets, load_dataset
from dreamlab.errors import DreamlabError


@pytest.fixture(autouse=True, scope="module")
def small_splits(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(P, "SPLIT_SIZES", {"train": 300, "val": 60, "test": 400})
        yield


@pytest.mark.parametrize("kind", P.KINDS)
def test_generate_is_deterministic_and_seed_dependent(kind):
    x1, y1 = P.generate(kind, 12, seed=3)
    x2, y2 = P.generate(kind, 12, seed=3)
    x3, _ = P.generate(kind, 12, seed=4)
    assert x1.shape == (12, 64, 64, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert (y1 >= 0).all() and (y1 < np.array(P.num_values(kind))).all()
    assert x1.std() > 10  # not blank


@pytest.mark.parametrize("kind", P.KINDS)
def test_every_attribute_changes_the_picture(kind):
    base = np.zeros((1, len(P.ATTRIBUTES[kind])), np.int64)
    ref, _ = P.generate(kind, 1, seed=9, labels=base)
    for j, name in enumerate(P.ATTRIBUTES[kind]):
        lab = base.copy()
        lab[0, j] = 1
        other, _ = P.generate(kind, 1, seed=9, labels=lab)
        diff = np.abs(other.astype(int) - ref.astype(int)).sum(-1)
        assert (diff > 30).sum() >= 4, f"{kind}.{name} value 1 looks the same as value 0"


@pytest.mark.parametrize("kind", P.KINDS)
def test_held_out_combos_only_outside_train(kind):
    tr = P.load_procedural(kind, "train")
    te = P.load_procedural(kind, "test")
    assert not P.is_held_out(kind, tr["attrs"]).any()
    held = P.load_procedural(kind, "test", held_out_only=True)
    assert len(held["x"]) > 0 and P.is_held_out(kind, held["attrs"]).all()
    assert len(held["x"]) == int(P.is_held_out(kind, te["attrs"]).sum())
    # every single attribute value still occurs in training (only the combinations are new)
    for j, vals in enumerate(P.ATTRIBUTES[kind].values()):
        assert set(tr["attrs"][:, j].tolist()) == set(range(len(vals)))
    assert tr["x"].dtype == torch.float32 and tr["x"].shape[1:] == (3, 64, 64)
    assert 0.0 <= float(tr["x"].min()) and float(tr["x"].max()) <= 1.0


def test_registered_datasets_load_through_the_registry():
    names = {d.name for d in list_datasets()}
    assert {"faces", "flowers", "bricks"} <= names
    d = load_dataset("faces", "val")
    assert d["x"].shape == (60, 3, 64, 64)
    assert set(d) >= {"x", "y", "attrs", "hair", "skin", "smiling", "glasses"}
    with pytest.raises(DreamlabError, match="unknown procedural set"):
        P.load_procedural("cats", "train")


def test_captions_name_the_attributes_in_varied_wording():
    lab = np.array([[P.ATTRIBUTES["faces"]["hair"].index("red"), 0, 1, 1]] * 40)
    caps = [c[0] for c in P.captions("faces", lab, seed=0)]
    assert len(set(caps)) >= 10
    for c in caps:
        assert (
            re.search(r"\b(red|ginger)\b", c) and re.search(r"glasses", c) and not re.search(r"without|no glasses", c)
        )
    assert P.captions("faces", lab, seed=5) == P.captions("faces", lab, seed=5)
    fl = np.array([[2, 1, 0]])  # five yellow petals, yellow centre
    for c in P.captions("flowers", fl, seed=1, per_image=10)[0]:
        assert "five" in c and "yellow" in c
    for c in P.captions("bricks", np.array([[2, 3]]), seed=1, per_image=10)[0]:
        assert ("2x4" in c or "long" in c) and "green" in c


def test_paraphrase_words_never_occur_in_training_captions():
    vocab = P.training_vocabulary()
    para = set()
    for combo in P.all_combos("faces"):
        words = set(re.findall(r"[a-z0-9]+", P.paraphrase_for("faces", combo)))
        para |= {w for w in words}
    attr_words = {
        w for d in P.PARAPHRASE_WORDS["faces"].values() for v in d.values() for w in re.findall(r"[a-z0-9]+", v)
    }
    attr_words |= {w for p in P.PARAPHRASE_WORDS["fashion_mnist"] for w in re.findall(r"[a-z0-9]+", p)}
    attr_words -= {"a", "in"}
    assert not (attr_words & vocab)
    # and empirically: thousands of sampled training captions never contain them
    rng = np.random.default_rng(0)
    text = " ".join(c[0] for k in P.KINDS for c in P.captions(k, P.sample_labels(k, 700, rng, False), seed=2))
    text += " " + " ".join(c[0] for c in P.fmnist_captions(np.arange(10).repeat(50), seed=3))
    seen = set(re.findall(r"[a-z0-9]+", text.lower()))
    assert seen <= vocab, f"training_vocabulary misses {sorted(seen - vocab)[:5]}"
    assert not (attr_words & seen)


def test_fmnist_captions_use_class_words():
    caps = P.fmnist_captions(np.arange(10), seed=0, per_image=5)
    for y, row in enumerate(caps):
        for c in row:
            assert any(w in c for w in P.FMNIST_WORDS[y])
