"""Text-to-music: captions, paraphrases, held-out combinations, CLAP, guidance, prompt validation, the CLI end to end.

Tiny configs on the first 8 chorales only; the network is refused throughout."""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamlab import music as M
from dreamlab.errors import DreamlabError
from multimodal import music_text as T


@pytest.fixture(scope="module", autouse=True)
def offline():
    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pieces():
    return list(M.load_pieces("chorales", 4, progress=False))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny CLAP and text-to-music pipeline trained through the CLI."""
    from dreamlab.cli import main

    root = tmp_path_factory.mktemp("t2m")
    clap, run = root / "clap", root / "t2m"
    assert main(["multimodal", "train-clap", "--preset", "tiny", "--out", str(clap), "--no-progress",
                 "--device", "cpu"]) == 0
    assert main(["multimodal", "train-text2music", "--preset", "tiny", "--clap", str(clap), "--out", str(run),
                 "--no-progress", "--device", "cpu"]) == 0
    return root, clap, run


def _mentions(text: str, table: dict, value) -> tuple[bool, bool]:
    """(mentions the value's words, mentions another value's words) in a caption."""
    def hit(words: list[str]) -> bool:
        return any(re.search(rf"(?<![\w/-]){re.escape(w.lower())}(?![\w/-])", text.lower()) for w in words)

    own = hit(table[value])
    other = any(hit([w for w in ws if w not in table[value]]) for v, ws in table.items() if v != value)
    return own, other


def test_a_captions_attributes_match_the_piece(pieces) -> None:
    rng = np.random.default_rng(0)
    p = pieces[0]
    values = (p.key, p.meter, p.source, p.tempo_band, p.density_band())
    seen_key = 0
    for cid in [T.combo_id(*values)] + rng.integers(0, T.N_COMBOS, 60).tolist():
        v = T.combo_values(int(cid))
        key, meter, source, tempo, density = v
        for _ in range(5):
            cap = T.caption(v, rng)
            assert T.words(cap) <= T.training_vocabulary() | T.tonic_names(), cap
            tonic = re.search(r"\b([A-G])( sharp| flat|#|b)? (major|minor)\b", cap)
            if tonic:  # a named key is the combination's key
                seen_key += 1
                assert f"{tonic.group(1)}{tonic.group(2) or ''} {tonic.group(3)}".replace(" sharp", "#").replace(
                    " flat", "b") == M.key_name(key), cap
            elif "major key" in cap or "minor key" in cap:
                assert ("minor key" in cap) == (key >= 12), cap
            mw = re.findall(r"\b([2346]/[48])\b", cap)
            assert all(m == M.METERS[meter] for m in mw), cap
            for table, val in ((T.TEMPO_WORDS, tempo), (T.DENSITY_WORDS, density), (T.MOOD_WORDS, key // 12),
                               (T.DANCE_WORDS, M.METERS[meter])):
                assert not _mentions(cap, table, val)[1], (cap, table[val])
            others = [w for s, ws in T.SOURCE_WORDS.items() if s != M.SOURCE_NAMES[source] for w in ws]
            assert not any(w.lower() in cap.lower() for w in others), cap
    assert seen_key > 100


def test_paraphrase_words_never_occur_in_training_captions() -> None:
    vocab = T.training_vocabulary()
    para = set()
    for cid in range(0, T.N_COMBOS, 5):
        para |= T.words(T.paraphrase(T.combo_values(cid)))
    content = para - T.STOPWORDS - T.tonic_names()
    assert content and not (content & vocab), sorted(content & vocab)
    rng = np.random.default_rng(1)
    sample = set()
    for cid in rng.integers(0, T.N_COMBOS, 300).tolist():
        sample |= T.words(T.caption(T.combo_values(cid), rng))
    assert not (content & sample)


def test_captioned_windows_carry_the_pieces_attributes_and_never_a_held_out_combination(pieces) -> None:
    held = T.held_out_triples({(m, s) for m in range(4) for s in range(6)})
    assert len(held) == 48 and {k // 12 for k, _, _ in held} == {0, 1}
    p0 = pieces[0]
    held |= {(p0.key, p0.meter, p0.source)}  # the first piece's own key is held out: it may only be transposed
    d = T.captioned_windows(pieces, 24, 2, held, transpose=True)
    by_key = {(p.key, p.meter, p.source) for p in pieces}
    for x, a, allowed in zip(d["x"], d["attr"], d["allowed"]):
        assert (int(a[0]), int(a[1]), int(a[2])) in by_key
        w = M.decode(x)
        assert w.key == a[0] and w.meter == a[1] and w.density_band() == a[4]
        for j in np.flatnonzero(allowed):
            key = (a[0] % 12 + j - 6) % 12 + 12 * (a[0] // 12)
            assert (int(key), int(a[1]), int(a[2])) not in held
    assert not d["allowed"][:, 6][d["attr"][:, 0] == p0.key].any()  # untransposed: held out
    allowed_ids = T.combo_allowed(held)
    assert allowed_ids[d["combos"]].all()


def test_prompt_validation_everywhere(runs, capsys) -> None:
    from dreamlab.cli import main
    from multimodal.text2music import load_pipeline

    _, _, run = runs
    pipe = load_pipeline(run, device="cpu")
    for bad, needle in (("", "prompt is empty"), ("   ", "prompt is empty"), (3, "must be a string"),
                        ("x" * 301, "301 characters"), ([], "non-empty list"), (["ok", ""], "prompt\\[1\\] is empty"),
                        ("a jig\x1b[2J", "control character"), ("a jig \udcff", "not UTF-8")):
        with pytest.raises(DreamlabError, match=needle):
            pipe(bad)
    with pytest.raises(DreamlabError, match="num_samples"):
        pipe("a jig", num_samples=0)
    assert main(["text2music", "", "--run", str(run)]) == 2
    assert "prompt is empty; pass text such as 'a lively jig in D major'" in capsys.readouterr().err
    assert main(["text2music", "a jig", "--out", "x.txt", "--run", str(run)]) == 2
    assert main(["text2music", "a jig", "--run", str(run / "nothing")]) == 2
    assert "train one with: dreamlab multimodal train-clap" in capsys.readouterr().err


def test_tiny_text_to_music_end_to_end(runs, tmp_path: Path) -> None:
    from dreamlab.cli import main
    from multimodal.clap import load_clap
    from multimodal.text2music import load_pipeline

    root, clap_dir, run = runs
    for f in ("clap_config.json", "text_config.json", "tokenizer.json", "model.safetensors"):
        assert (clap_dir / "model" / f).exists(), f
    ev = json.loads((clap_dir / "eval.json").read_text())
    assert "test_clap_score_matched" in ev and "test_zeroshot_key_acc" in ev
    for f in ("samples.mid", "samples.wav", "samples.png", "samples.txt", "report.md", "model/model.safetensors"):
        assert (run / f).exists(), f
    ev = json.loads((run / "eval.json").read_text())
    assert np.isfinite(ev["test_nll_per_event_caption"]) and np.isfinite(ev["test_nll_per_event_null"])
    # the pipeline carries its CLAP: equal to the trained one
    pipe = load_pipeline(run, device="cpu")
    clap = load_clap(clap_dir, device="cpu")
    for k, v in clap.state_dict().items():
        assert torch.equal(pipe.clap.state_dict()[k], v), k
    out = tmp_path / "jig.mid"
    assert main(["text2music", "a lively jig in D major", "-n", "2", "--out", str(out), "--run", str(run),
                 "--max-new-tokens", "12", "--candidates", "2"]) == 0
    for suffix in (".mid", ".wav", ".png", ".txt"):
        assert out.with_suffix(suffix).exists(), suffix
    assert (tmp_path / "jig_1.mid").exists() and (tmp_path / "jig_2.mid").exists()
    assert main(["multimodal", "evaluate-music", "--run", str(run), "--max-prompts", "1", "--n-per-prompt", "1",
                 "--candidates", "2", "--max-new-tokens", "12", "--no-progress"]) == 0
    res = json.loads((run / "eval_text2music.json").read_text())
    names = [(r["setting"], r.get("prompts")) for r in res["rows"]]
    assert ("classifier-free + CLAP", "paraphrase") in names and names[0][0].startswith("real held-out")
    for r in res["rows"]:
        assert 0 <= r["key_acc"] <= 1 and 0 <= r["all_acc"] <= r["mode_acc"]
    assert any((run / f).exists() for f in ("eval_classifierfree.wav", "eval_classifierfree.png"))


def test_clap_guidance_keeps_the_best_candidate_and_seeds_repeat(runs, monkeypatch) -> None:
    import multimodal.text2music as t2m
    from multimodal.text2music import load_pipeline

    _, _, run = runs
    pipe = load_pipeline(run, device="cpu")
    seen = []
    real = t2m.sample_tokens

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out)
        return out

    monkeypatch.setattr(t2m, "sample_tokens", spy)
    prompts = ["a slow four-part chorale in a minor key", "a busy Bach chorale in G major"]
    out = pipe(prompts, num_samples=2, clap_guidance_candidates=3, max_new_tokens=12,
               generator=torch.Generator().manual_seed(0))
    cands = seen[-1].view(4, 3, *seen[-1].shape[1:])
    flat = [p for p in prompts for _ in range(2) for _ in range(3)]
    scores = pipe.clap.score(seen[-1], flat).view(4, 3)
    assert torch.equal(out.tokens, cands[torch.arange(4), scores.argmax(1)])
    assert torch.allclose(out.clap_scores, scores.max(1).values)
    again = pipe(prompts, num_samples=2, clap_guidance_candidates=3, max_new_tokens=12,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, again.tokens)
    plain = pipe(prompts, num_samples=2, guidance_scale=1.0, clap_guidance_candidates=1, max_new_tokens=12,
                 generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out.tokens, plain.tokens)
