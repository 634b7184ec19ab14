"""Music a person can hear and see: MIDI files (mido), WAV audio (the General MIDI soundfont shipped inside
pretty_midi, rendered offline by tinysoundfont), piano-roll PNGs (matplotlib) and MusicXML scores (music21).

Every file is written atomically (`dreamlab.io`). `write_music(pieces, "song.mid")` writes the set a person wants:
`song.mid` and `song.wav` (all pieces one after another, two seconds apart), `song.png` (one piano roll per
piece) and, when there are several pieces, `song_01.mid`, ... one per piece; for a one-voice piece also
`song.musicxml` (a score MuseScore or any notation program opens).

MIDI files carry their bar lines as marker events named "bar", so `read_midi(write_midi(p))` gives back the
same notes, bars, key, meter and tempo band (`dreamlab.music.encode` of both is equal).
"""
from __future__ import annotations

import importlib.util
import io
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dreamlab import music as M
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_bytes

PPQ = 480  # MIDI ticks per quarter note (20 per grid tick of dreamlab.music)
SCALE = PPQ // M.TPQ
SAMPLE_RATE = 22050
GAP_SECONDS = 2.0
TAIL_SECONDS = 1.0
#: mido's key-signature names for the 24 keys (index = dreamlab.music key)
MIDI_KEYS = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B",
             "Cm", "C#m", "Dm", "Ebm", "Em", "Fm", "F#m", "Gm", "G#m", "Am", "Bbm", "Bm")
PROGRAMS = {"piano": 0, "organ": 19, "violin": 40, "choir": 52, "flute": 73}
TRACK_NAMES = ("soprano", "alto", "tenor", "bass")


def _mido():
    try:
        import mido
    except ImportError as e:
        raise DreamlabError("MIDI output needs mido; install it with: pip install 'dreamlab[music]'") from e
    return mido


# ----------------------------------------------------------------------------- MIDI


def midi_bytes(p: M.Piece, *, program: int = 0, tracks_by_voice: bool = False) -> bytes:
    """A type-1 MIDI file of `p`: tempo, time and key signature and bar markers on track 0, the notes on track 1
    (or one track per voice with `tracks_by_voice`, e.g. MuseGAN's four parts)."""
    mido = _mido()
    mf = mido.MidiFile(type=1, ticks_per_beat=PPQ)
    meta = mido.MidiTrack()
    num, den = (int(x) for x in M.METERS[p.meter].split("/"))
    tempo = mido.bpm2tempo(M.quarter_bpm(p))
    events: list[tuple[int, int, object]] = [
        (0, 0, mido.MetaMessage("set_tempo", tempo=tempo, time=0)),
        (0, 0, mido.MetaMessage("time_signature", numerator=num, denominator=den, time=0)),
        (0, 0, mido.MetaMessage("key_signature", key=MIDI_KEYS[p.key], time=0)),
    ]
    events += [(int(b) * SCALE, 1, mido.MetaMessage("marker", text="bar", time=0)) for b in p.bars]
    meta.extend(_delta(events))
    meta.append(mido.MetaMessage("end_of_track", time=0))
    mf.tracks.append(meta)
    voices = sorted(set(p.notes[:, 3].tolist())) if tracks_by_voice and len(p.notes) else [None]
    for ti, v in enumerate(voices):
        tr = mido.MidiTrack()
        ch = ti % 16 if ti < 9 else ti + 1  # skip channel 9 (drums)
        if v is not None:
            tr.append(mido.MetaMessage("track_name", name=TRACK_NAMES[v] if v < 4 else f"voice {v}", time=0))
        tr.append(mido.Message("program_change", channel=ch, program=program, time=0))
        ev = []
        sel = p.notes if v is None else p.notes[p.notes[:, 3] == v]
        for on, du, q, _ in sel.tolist():
            ev.append((on * SCALE, 1, mido.Message("note_on", channel=ch, note=q, velocity=80, time=0)))
            ev.append(((on + du) * SCALE, 0, mido.Message("note_off", channel=ch, note=q, velocity=0, time=0)))
        tr.extend(_delta(ev))
        tr.append(mido.MetaMessage("end_of_track", time=0))
        mf.tracks.append(tr)
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()


def _delta(events: list[tuple[int, int, object]]) -> list:
    """(absolute tick, order, message) -> messages with delta times; note-offs sort before note-ons at a tick."""
    out, now = [], 0
    for t, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        out.append(msg.copy(time=t - now))
        now = t
    return out


def write_midi(p: M.Piece, path: str | Path, **kw) -> Path:
    return atomic_write_bytes(path, midi_bytes(p, **kw))


def read_midi(path: str | Path | bytes) -> M.Piece:
    """A MIDI file -> Piece: notes (voice = track order), bars from "bar" markers (else from the time signature),
    key, meter and tempo band from the meta events (a meter or key missing there defaults to 4/4 and C major)."""
    mido = _mido()
    try:
        mf = mido.MidiFile(file=io.BytesIO(path)) if isinstance(path, bytes) else mido.MidiFile(str(path))
    except (OSError, EOFError, ValueError) as e:
        raise DreamlabError(f"{path if not isinstance(path, bytes) else 'the MIDI data'} is not a readable MIDI file "
                            f"({e})") from e
    scale = mf.ticks_per_beat / M.TPQ
    notes, bars = [], []
    key, meter, bpm = 0, M.METERS.index("4/4"), None
    voice = 0
    for tr in mf.tracks:
        now = 0
        open_: dict[tuple[int, int], list[int]] = {}
        has_notes = False
        for msg in tr:
            now += msg.time
            t = round(now / scale)
            if msg.type == "marker" and msg.text == "bar":
                bars.append(t)
            elif msg.type == "time_signature":
                ts = M.METER_ALIASES.get(f"{msg.numerator}/{msg.denominator}", f"{msg.numerator}/{msg.denominator}")
                if ts in M.METERS:
                    meter = M.METERS.index(ts)
            elif msg.type == "key_signature" and msg.key in MIDI_KEYS:
                key = MIDI_KEYS.index(msg.key)
            elif msg.type == "set_tempo" and bpm is None:
                bpm = mido.tempo2bpm(msg.tempo)
            elif msg.type == "note_on" and msg.velocity > 0:
                open_.setdefault((msg.channel, msg.note), []).append(t)
                has_notes = True
            elif msg.type in ("note_off", "note_on"):
                starts = open_.get((msg.channel, msg.note))
                if starts:
                    s = starts.pop(0)
                    if t > s:
                        notes.append([s, t - s, msg.note, voice])
        voice += int(has_notes)
    arr = np.array(sorted(notes), np.int32).reshape(-1, 4)
    end = int((arr[:, 0] + arr[:, 1]).max()) if len(arr) else 0
    if not bars:
        bars = list(range(0, max(end, 1), M.METER_BAR_TICKS[M.METERS[meter]]))
    p = M.Piece(notes=arr, bars=np.array(sorted(set(bars)), np.int32), end=end, tonic=key % 12, mode=key // 12,
                meter=meter, n_voices=max(1, M.polyphony_mode(arr)),
                name="midi" if isinstance(path, bytes) else Path(path).name)
    if bpm is not None:
        p.tempo_band = M.tempo_band(bpm / M.beat_quarters(meter))
        p.tempo_from_score = True
    return p


# ----------------------------------------------------------------------------- audio


def soundfont_path() -> Path:
    """The General MIDI soundfont that ships inside the pretty_midi wheel (TimGM6mb.sf2, 6 MB)."""
    spec = importlib.util.find_spec("pretty_midi")
    if spec is None or spec.origin is None:
        raise DreamlabError("WAV rendering uses the soundfont inside pretty_midi; install it with: "
                            "pip install 'dreamlab[music]'")
    sf = Path(spec.origin).parent / "TimGM6mb.sf2"
    if not sf.exists():
        raise DreamlabError(f"{sf} is missing; reinstall pretty_midi: pip install --force-reinstall pretty_midi")
    return sf


def _note_events(pieces: Sequence[M.Piece], gap: float) -> tuple[list[tuple[float, int, int, int]], float]:
    """(seconds, on/off, channel, pitch) of all pieces played one after another; total seconds."""
    ev, offset = [], 0.0
    for i, p in enumerate(pieces):
        spq = 60.0 / M.quarter_bpm(p) / M.TPQ  # seconds per tick
        for on, du, q, v in p.notes.tolist():
            ch = v % 9
            ev.append((offset + on * spq, 1, ch, q))
            ev.append((offset + (on + du) * spq, 0, ch, q))
        offset += p.end * spq + (gap if i < len(pieces) - 1 else 0.0)
    ev.sort(key=lambda e: (e[0], e[1]))
    return ev, offset


def render_audio(pieces: M.Piece | Sequence[M.Piece], *, program: int = 0, sample_rate: int = SAMPLE_RATE,
                 gap: float = GAP_SECONDS) -> np.ndarray:
    """Pieces played one after another -> (samples, 2) float32 stereo in [-1, 1], rendered offline with the General
    MIDI soundfont of pretty_midi by tinysoundfont (or, without tinysoundfont, pretty_midi's sine-wave synthesis)."""
    pieces = [pieces] if isinstance(pieces, M.Piece) else list(pieces)
    ev, total = _note_events(pieces, gap)
    n_total = int((total + TAIL_SECONDS) * sample_rate)
    try:
        import tinysoundfont
    except ImportError:
        return _render_sine(ev, n_total, sample_rate)
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(str(soundfont_path()))
    for ch in range(9):
        synth.program_select(ch, sfid, 0, program)
    chunks, done = [], 0
    for t, kind, ch, q in ev:
        n = int(t * sample_rate)
        if n > done:
            chunks.append(np.frombuffer(synth.generate(n - done), np.float32).copy())
            done = n
        if kind:
            synth.noteon(ch, q, 80)
        else:
            synth.noteoff(ch, q)
    if n_total > done:
        chunks.append(np.frombuffer(synth.generate(n_total - done), np.float32).copy())
    audio = np.concatenate(chunks).reshape(-1, 2) if chunks else np.zeros((n_total, 2), np.float32)
    return _normalise(audio)


def _render_sine(ev: list[tuple[float, int, int, int]], n_total: int, sr: int) -> np.ndarray:
    """A plain fallback synth (sines with a decay) when tinysoundfont is not installed."""
    out = np.zeros(n_total, np.float32)
    starts: dict[tuple[int, int], float] = {}
    for t, kind, ch, q in ev:
        if kind:
            starts[(ch, q)] = t
        elif (ch, q) in starts:
            s = starts.pop((ch, q))
            a, b = int(s * sr), min(int(t * sr) + sr // 20, n_total)
            tt = np.arange(b - a) / sr
            out[a:b] += 0.2 * np.sin(2 * np.pi * 440.0 * 2 ** ((q - 69) / 12) * tt) * np.exp(-3 * tt)
    return _normalise(np.stack([out, out], 1))


def _normalise(audio: np.ndarray) -> np.ndarray:
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return (audio * (0.9 / peak) if peak > 1e-6 else audio).astype(np.float32)  # peak-normalised to 0.9


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """(samples, channels) float in [-1, 1] -> 16-bit PCM WAV bytes (the standard library's wave module)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[1] if pcm.ndim == 2 else 1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def write_wav(pieces: M.Piece | Sequence[M.Piece], path: str | Path, **kw) -> Path:
    sr = kw.get("sample_rate", SAMPLE_RATE)
    return atomic_write_bytes(path, wav_bytes(render_audio(pieces, **kw), sr))


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the sample rate of a 16-bit WAV file."""
    with wave.open(str(path), "rb") as w:
        sr, ch, n = w.getframerate(), w.getnchannels(), w.getnframes()
        data = np.frombuffer(w.readframes(n), "<i2").astype(np.float32) / 32767
    return data.reshape(-1, ch), sr


def duration_seconds(pieces: M.Piece | Sequence[M.Piece], gap: float = GAP_SECONDS) -> float:
    """Seconds of music (without the release tail) that `render_audio` plays."""
    return _note_events([pieces] if isinstance(pieces, M.Piece) else list(pieces), gap)[1]


# ----------------------------------------------------------------------------- pictures and scores

VOICE_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def write_pianoroll(pieces: M.Piece | Sequence[M.Piece], path: str | Path, *, titles: Sequence[str] | None = None,
                    max_panels: int = 16) -> Path:
    """One piano roll per piece (time in quarter notes, bar lines grey, one colour per voice) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dreamlab.images import save_figure

    pieces = [pieces] if isinstance(pieces, M.Piece) else list(pieces)
    shown = pieces[:max_panels]
    cols = 1 if len(shown) < 4 else 2
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 2.2 * rows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(shown):
            ax.axis("off")
            continue
        p = shown[i]
        for b in p.bars:
            ax.axvline(b / M.TPQ, color="0.85", lw=0.8, zorder=0)
        for on, du, q, v in p.notes.tolist():
            ax.add_patch(plt.Rectangle((on / M.TPQ, q - 0.4), du / M.TPQ, 0.8, color=VOICE_COLOURS[v % 6], lw=0))
        lo, hi = (int(p.notes[:, 2].min()), int(p.notes[:, 2].max())) if len(p.notes) else (60, 72)
        ax.set_xlim(0, max(p.end / M.TPQ, 1))
        ax.set_ylim(lo - 2, hi + 2)
        ax.set_yticks([c for c in range(lo - 2, hi + 3) if c % 12 == 0])
        ax.set_yticklabels([f"C{c // 12 - 1}" for c in range(lo - 2, hi + 3) if c % 12 == 0])
        head = titles[i] if titles and i < len(titles) else \
            f"{M.key_name(p.key)}, {M.METERS[p.meter]}, {M.TEMPO_BANDS[p.tempo_band]}, {len(p.notes)} notes"
        ax.set_title(f"{i + 1}. {head}", fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("quarter notes")
    if len(pieces) > len(shown):
        fig.suptitle(f"first {len(shown)} of {len(pieces)} pieces", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def score_stream(p: M.Piece):
    """A music21 Score of a piece (key, meter, tempo, measures, ties made by music21's notation pass)."""
    import music21 as m21

    part = m21.stream.Part()
    num = M.METERS[p.meter]
    part.insert(0, m21.meter.TimeSignature(num))
    part.insert(0, m21.key.Key(m21.pitch.Pitch(p.tonic).name, M.MODES[p.mode]))
    part.insert(0, m21.tempo.MetronomeMark(number=M.TEMPO_BEAT_BPM[p.tempo_band],
                                           referent=1.5 if num == "6/8" else 1.0))
    bar = M.METER_BAR_TICKS[num]
    pickup = int(p.bars[1] - p.bars[0]) if len(p.bars) > 1 and p.bars[0] == 0 else bar
    shift = (bar - pickup) % bar  # music21 lays bars from 0: a pickup bar becomes the end of a first full bar
    for on, du, q, _ in p.notes.tolist():
        part.insert((on + shift) / M.TPQ, m21.note.Note(q, quarterLength=du / M.TPQ))
    part.makeRests(fillGaps=True, inPlace=True)
    measures = part.makeMeasures()
    sc = m21.stream.Score()
    sc.insert(0, m21.metadata.Metadata(title=f"{M.key_name(p.key)}, {num}"))
    sc.append(measures)
    return sc.makeNotation()


def write_score(p: M.Piece, path: str | Path) -> Path | None:
    """MusicXML score of a one-voice piece (music21 writes it); None for polyphonic pieces or when music21 fails."""
    if M.polyphony_mode(p.notes) != 1:
        return None
    import warnings

    try:
        from music21.musicxml.m21ToXml import GeneralObjectExporter

        with warnings.catch_warnings():  # music21's notation pass warns about bars it splits; the score is still right
            warnings.simplefilter("ignore")
            data = GeneralObjectExporter(score_stream(p)).parse()
    except Exception:  # noqa: BLE001 - a score is a bonus beside the MIDI/WAV/PNG; music21 rejects some odd rhythms
        return None
    return atomic_write_bytes(path, data)


def write_music(pieces: M.Piece | Sequence[M.Piece], path: str | Path, *, program: int = 0,
                tracks_by_voice: bool = False, titles: Sequence[str] | None = None) -> list[Path]:
    """The files a person wants for `pieces`, named after `path` (.mid/.wav/.png/.musicxml): see the module doc."""
    pieces = [pieces] if isinstance(pieces, M.Piece) else list(pieces)
    if not pieces:
        raise DreamlabError("no pieces to write")
    base = Path(path).with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    files = []
    if len(pieces) == 1:
        files.append(write_midi(pieces[0], base.with_suffix(".mid"), program=program, tracks_by_voice=tracks_by_voice))
    else:
        files.append(write_midi(concat(pieces), base.with_suffix(".mid"), program=program,
                                tracks_by_voice=tracks_by_voice))
        width = len(str(len(pieces)))
        for i, p in enumerate(pieces):
            files.append(write_midi(p, base.with_name(f"{base.name}_{i + 1:0{width}d}.mid"), program=program,
                                    tracks_by_voice=tracks_by_voice))
    files.append(write_wav(pieces, base.with_suffix(".wav"), program=program))
    files.append(write_pianoroll(pieces, base.with_suffix(".png"), titles=titles))
    score = write_score(pieces[0], base.with_suffix(".musicxml"))
    if score is not None:
        files.append(score)
    return files


def concat(pieces: Sequence[M.Piece], gap_bars: int = 1) -> M.Piece:
    """Pieces one after another in one Piece (a bar of rest between them; key/meter/tempo of the first)."""
    notes, bars, t = [], [], 0
    for p in pieces:
        n = p.notes.copy()
        n[:, 0] += t
        notes.append(n)
        bars += (p.bars + t).tolist()
        bar = M.METER_BAR_TICKS[M.METERS[p.meter]]
        t += -(-p.end // bar) * bar + gap_bars * bar
        bars.append(t - gap_bars * bar)
    first = pieces[0]
    return M.Piece(notes=np.concatenate(notes), bars=np.array(sorted(set(bars)), np.int32), end=t, tonic=first.tonic,
                   mode=first.mode, meter=first.meter, tempo_band=first.tempo_band, n_voices=first.n_voices,
                   name="concatenated")
