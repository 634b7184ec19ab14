"""Music data, tokens, MIDI/WAV/PNG output, read-back, MuseGAN metrics and the two chapter-11 models through the CLI.

Only the first cache unit of the chorales (8 files) is ever parsed here; the folk collections are never touched."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamlab import music as M
from dreamlab import music_io as IO
from dreamlab.errors import DreamlabError

Q = M.TPQ


@pytest.fixture(scope="module")
def chorales():
    pieces, skipped = M.load_source("chorales", max_pieces=8, progress=False)
    assert pieces and sum(skipped.values()) < 8
    return pieces


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    torch.set_num_threads(1)


def melody() -> M.Piece:
    """A one-voice 3/4 tune with a pickup, a tie across a bar line, a triplet and a rest."""
    notes = [(0, Q, 67), (Q, Q, 72), (2 * Q, Q // 3, 74), (2 * Q + Q // 3, Q // 3, 76),
             (2 * Q + 2 * Q // 3, Q // 3, 74), (3 * Q, 3 * Q, 72),  # ties over the next bar line
             (7 * Q, Q, 71), (8 * Q, Q // 2, 69), (8 * Q + Q // 2, Q // 2, 67), (9 * Q, 2 * Q, 72)]
    arr = np.array([(a, b, c, 0) for a, b, c in notes], np.int32)
    return M.Piece(notes=arr, bars=np.array([0, Q, 4 * Q, 7 * Q, 10 * Q], np.int32), end=11 * Q, tonic=0, mode=0,
                   meter=M.METERS.index("3/4"), tempo_band=1, n_voices=1, name="test melody")


def test_tokens_midi_tokens_round_trips_a_chorale(chorales, tmp_path: Path) -> None:
    p = next(c for c in chorales if c.n_voices == 4)
    tok = M.encode(p)
    assert tok[0, 0] == M.START and tok[1, 0] == M.KEY0 + p.key and tok[-1, 0] == M.END
    back = M.decode(tok)
    assert np.array_equal(M.encode(back), tok)
    path = IO.write_midi(back, tmp_path / "chorale.mid")
    again = IO.read_midi(path)
    assert np.array_equal(M.encode(again), tok)
    assert (again.key, again.meter, again.tempo_band) == (p.key, p.meter, p.tempo_band)
    # the same notes sound in the MIDI file as in the parsed score (unisons of two voices become one note)
    sounding = {(int(a), int(b), int(c)) for a, b, c, _ in p.notes}
    assert {(int(a), int(b), int(c)) for a, b, c, _ in again.notes} <= sounding


def test_encode_decode_keeps_ties_triplets_rests_and_the_pickup() -> None:
    p = melody()
    tok = M.encode(p)
    names = [M.note_token_name(int(t)) for t in tok[:, 0]]
    assert "HOLD_72" in names and "REST" in names and names.count("BAR") == 5
    q = M.decode(tok)
    assert np.array_equal(q.notes[:, :3], p.notes[:, :3]) and np.array_equal(q.bars, p.bars) and q.end == p.end
    assert set(np.unique(tok[:, 1])) <= set(range(M.DUR_VOCAB))


def test_split_ticks_is_exact_and_uses_listed_durations() -> None:
    for t in range(1, 400):
        parts = M.split_ticks(t)
        assert sum(parts) == t and all(d in M.DURATIONS for d in parts)


def test_wav_has_the_expected_length_and_is_not_silent(tmp_path: Path) -> None:
    p = melody()
    seconds = IO.duration_seconds(p)
    assert seconds == pytest.approx(11 * 60 / M.TEMPO_BEAT_BPM[1])  # 11 quarter notes at the moderate tempo
    path = IO.write_wav(p, tmp_path / "m.wav")
    audio, sr = IO.read_wav(path)
    assert sr == IO.SAMPLE_RATE and audio.shape[1] == 2
    assert len(audio) == int((seconds + IO.TAIL_SECONDS) * sr)
    rms = float(np.sqrt((audio[: int(seconds * sr)] ** 2).mean()))
    assert rms > 0.02, rms
    assert float(np.abs(audio[-sr // 10:]).max()) < float(np.abs(audio).max())  # the tail decays


def test_write_music_writes_midi_wav_png_and_a_score_for_one_voice(chorales, tmp_path: Path) -> None:
    files = IO.write_music(melody(), tmp_path / "song.mid")
    assert {f.name for f in files} == {"song.mid", "song.wav", "song.png", "song.musicxml"}
    assert b"<score-partwise" in (tmp_path / "song.musicxml").read_bytes()
    files = IO.write_music(chorales[:2], tmp_path / "two.wav")
    names = {f.name for f in files}
    assert {"two.mid", "two_1.mid", "two_2.mid", "two.wav", "two.png"} <= names and "two.musicxml" not in names
    from PIL import Image

    assert Image.open(tmp_path / "two.png").size[1] > 200


def test_readback_agrees_with_the_parsed_attributes(chorales) -> None:
    for p in chorales:
        r = M.readback(p)
        assert r["key"] == p.key and r["mode"] == p.mode  # the same music21 analysis
        assert r["meter"] == p.meter
        assert r["density"] == p.density_band()
        if p.n_voices == 4:
            assert r["voices"] == 4


def test_meter_readback_tells_6_8_from_3_4() -> None:
    def piece(pattern: list[tuple[int, int]]) -> M.Piece:
        notes, t = [], 0
        for _ in range(6):
            for d, q in pattern:
                notes.append((t, d, q, 0))
                t += d
        return M.Piece(notes=np.array(notes, np.int32), bars=np.arange(0, t, 3 * Q, dtype=np.int32), end=t)

    jig = piece([(Q, 67), (Q // 2, 69), (Q, 71), (Q // 2, 72)])       # quarter-eighth, quarter-eighth
    waltz = piece([(Q, 60), (Q, 64), (Q, 67)])                        # three quarters
    assert M.METERS[M.analyze_meter(jig.notes, jig.bars, jig.end)] == "6/8"
    assert M.METERS[M.analyze_meter(waltz.notes, waltz.bars, waltz.end)] == "3/4"


def test_transposition_moves_notes_and_key_together() -> None:
    from generators.music import transpose_batch

    tok = torch.from_numpy(M.encode(melody()))[None].repeat(16, 1, 1)
    out, s = transpose_batch(tok)
    for row, shift, orig in zip(out.numpy(), s.tolist(), tok.numpy()):
        p, q = M.decode(row), M.decode(orig)
        assert np.array_equal(p.notes[:, 2], q.notes[:, 2] + shift)
        assert p.key == (q.tonic + shift) % 12 + 12 * q.mode
    allowed = torch.zeros(16, 12, dtype=torch.bool)
    allowed[:, 8] = True  # only +2 semitones
    assert set(transpose_batch(tok, allowed=allowed)[1].tolist()) == {2}


def test_prompt_notes_parse_and_reject_bad_notes() -> None:
    from generators.music import parse_prompt_notes

    t = parse_prompt_notes("C4:1 Eb4:0.5 r:0.5 G4")
    assert [M.note_token_name(int(x)) for x in t[:, 0]] == ["NOTE_60", "NOTE_63", "REST", "NOTE_67"]
    assert [M.dur_token_ticks(int(x)) for x in t[:, 1]] == [Q, Q // 2, Q // 2, Q]
    for bad, needle in (("H4", "not a note"), ("C9", "outside"), ("C4:x", "not a number"), ("C4:0", "at least")):
        with pytest.raises(DreamlabError, match=needle):
            parse_prompt_notes(bad)


def test_piano_roll_windows_round_trip_and_metrics(chorales) -> None:
    w = M.roll_windows(chorales)
    assert w.ndim == 3 and w.shape[1:] == (4, 32) and len(w) > 10
    rolls = M.roll_onehot(w[:8])
    assert rolls.shape == (8, 4, 2, 16, 84) and rolls.sum(-1).max() == 1
    p = M.roll_to_piece(rolls[0])
    assert M.polyphony_mode(p.notes) == 4 and p.end == 32 * M.STEP_TICKS
    m = M.roll_metrics(rolls)
    assert m["empty_bar_rate"] == 0 and 1 <= m["used_pitch_classes"] <= 7 and 3 <= m["polyphony"] <= 4
    assert 0.7 < m["in_scale_rate"] <= 1 and m["tonal_distance"] > 0
    same = rolls.copy()
    same[:, 1:] = same[:, :1]  # four identical voices: no tonal distance between them
    assert M.roll_metrics(same)["tonal_distance"] == pytest.approx(0, abs=1e-9)
    silent = rolls.copy()
    silent[:, 3] = 0  # the bass rests in both bars: a quarter of the (track, bar) pairs are empty
    assert M.roll_metrics(silent)["empty_bar_rate"] == pytest.approx(0.25)


def test_music_transformer_and_musegan_through_the_cli(chorales, tmp_path: Path, no_network) -> None:
    from dreamlab.cli import main

    for name in ("music_transformer", "musegan"):
        run = tmp_path / name
        assert main(["train", name, "--preset", "tiny", "--out", str(run), "--no-progress", "--device", "cpu"]) == 0
        for f in ("model/model.safetensors", "eval.json", "report.md", "samples.mid", "samples.wav", "samples.png",
                  "curves.png"):
            assert (run / f).exists(), (name, f)
        assert "samples.wav" in (run / "report.md").read_text()
        assert main(["sample", str(run), "-n", "2", "--out", str(tmp_path / f"{name}.mid"), "--device", "cpu"]) == 0
        for suffix in (".mid", ".wav", ".png"):
            assert (tmp_path / f"{name}{suffix}").exists()
        assert main(["eval", str(run), "--device", "cpu"]) == 0
    import json

    ev = json.loads((tmp_path / "music_transformer" / "eval.json").read_text())
    assert ev["test_nll_per_event"] == pytest.approx(ev["test_note_nll"] + ev["test_dur_nll"])
    ev = json.loads((tmp_path / "musegan" / "eval.json").read_text())
    assert {"samples_tonal_distance", "train_tonal_distance", "samples_in_scale_rate"} <= set(ev)
    assert main(["sample", str(tmp_path / "musegan"), "--out", str(tmp_path / "x.jpg")]) == 2


def test_bar_grammar_fills_every_bar_to_the_time_signature() -> None:
    """Sampled under the bar grammar, every bar of an untrained model lasts exactly its time signature (3/4 here);
    sampled freely, the same model writes bars of any length (so the check below can fail)."""
    from generators.music import TokenTransformer, sample_tokens

    torch.manual_seed(0)
    core = TokenTransformer(d_model=32, n_layers=1, n_heads=2, max_len=96, dropout=0.0).eval()
    with torch.no_grad():  # no header tokens after the header, bar lines common: the grammar's work is visible
        core.note_head.bias[M.KEY0:M.NOTE0] = -30.0
        core.note_head.bias[M.BAR] = 2.0
        core.note_head.bias[M.END] = -30.0
    header = [[M.START, M.DUR_ZERO], [M.KEY0, M.DUR_ZERO], [M.TS0 + M.METERS.index("3/4"), M.DUR_ZERO],
              [M.TEMPO0, M.DUR_ZERO], [M.BAR, M.DUR_ZERO]]
    start = torch.tensor(header).expand(16, -1, -1).contiguous()

    def bar_lengths(bars: bool) -> set[int]:
        tok = sample_tokens(core, start, 80, generator=torch.Generator().manual_seed(1), bars=bars)
        lengths: set[int] = set()
        for row in tok:
            p = M.decode(row.numpy())
            assert M.METERS[p.meter] == "3/4"
            lengths |= set(np.diff(p.bars).tolist())  # complete bars only: the last one may be cut by max_new
        return lengths

    assert bar_lengths(bars=True) == {3 * Q}
    assert len(bar_lengths(bars=False) - {3 * Q}) > 3


def test_guidance_never_picks_a_token_the_prompted_model_rules_out() -> None:
    """Mixing raw logits, a token both models rule out wins when the null text rules it out harder; guided_logits
    mixes log-probabilities over the prompted model's plausible tokens only."""
    from generators.music import guided_logits

    cond = torch.tensor([[0.7, 0.3 - 1e-4, 1e-4]]).log()
    null = torch.tensor([[0.5, 0.5 - 1e-12, 1e-12]]).log()
    assert int((null + 3 * (cond - null)).argmax()) == 2  # the failure guided_logits prevents
    g = guided_logits(cond, null, 3.0)
    assert torch.isinf(g[0, 2]) and int(g.argmax()) == 0
    assert torch.allclose(guided_logits(cond, null, 1.0).softmax(-1)[0, :2], torch.tensor([0.7, 0.3]), atol=1e-3)


def test_min_new_keeps_a_piece_from_ending_early() -> None:
    from generators.music import TokenTransformer, sample_tokens

    torch.manual_seed(0)
    core = TokenTransformer(d_model=32, n_layers=1, n_heads=2, max_len=64, dropout=0.0).eval()
    with torch.no_grad():
        core.note_head.bias[M.END] = 6.0  # an untrained model that wants to stop at once
    start = torch.tensor([[[M.START, M.DUR_ZERO]]]).expand(8, 1, 2).contiguous()

    def ends(min_new: int) -> list[int]:
        tok = sample_tokens(core, start, 30, generator=torch.Generator().manual_seed(0), min_new=min_new)
        return [int((row[:, 0] == M.END).nonzero()[0]) if (row[:, 0] == M.END).any() else 99 for row in tok]

    assert min(ends(0)) < 5
    assert min(ends(20)) >= 21  # END at position 1 + 20 at the earliest (position 0 is START)
