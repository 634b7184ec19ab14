"""Symbolic music from music21's corpus: parsed once, cached as arrays, tokenised, rolled and read back.

Sources (`SOURCES`): the Bach chorales (four voices) and five folk collections of one melodic line: German and
Chinese tunes of the Essen collection, O'Neill's Music of Ireland (1850), Aird's Airs (Scotland) and Ryan's Mammoth
Collection (America). music21 parses each corpus file once (its beaming pass, useless here, is skipped: 5x faster);
each piece becomes integer rows (its attributes, its notes on a grid of `TPQ` ticks per quarter note, its bar
starts), cached per corpus file with `dreamlab.io.cached_array`, so a later run loads in a second.

A piece's attributes are read with music21 from its notes: key and mode (music21's Krumhansl-Schmuckler
`analyze('key')`), meter (the score's one time signature; 2/2 is kept as 4/4, pieces with other or changing meters
are left out), tempo (the score's metronome mark where it has one; most of the corpus has none, so a tempo band is
drawn per piece from its id and `Piece.tempo_from_score` says which), pitch range, note density (note onsets per
quarter note, in three bands) and the number of voices. The splits are by piece, from a hash of its corpus path:
10% test, 10% val, the rest train, the same whatever subset is loaded.

Two encodings:
- **tokens** (the music transformer, text-to-music, CLAP): two parallel streams, a *note* token and a *duration*
  token per event, as in the book. The score is cut into slices at every note start, note end and barline; a slice
  is written top voice first, one NOTE_p (a note starting) or HOLD_p (a note carried on, a tie) token per sounding
  pitch, or one REST; the last token of a slice carries the slice's duration and the ones before it duration 0
  ("the chord goes on"). A melody is therefore exactly the book's notes + durations. The sequence starts with
  START, KEY_k, TS_m, TEMPO_t, puts BAR at each barline and ends with END. Durations come from `DURATIONS`; a longer
  or odd slice is written as several slices joined by HOLD. Tokens -> `Piece` -> tokens is exact.
- **piano rolls** (MuseGAN, as in the book): the four chorale voices on a sixteenth-note grid, two bars of 4/4,
  84 pitches from C1: (N, 4 tracks, 2 bars, 16 steps, 84) one-hot, rests all zero.

Only numpy, the standard library and (inside functions) music21 are imported here; `dreamlab.data` registers the
sets by name.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dreamlab.config import parse_names
from dreamlab.errors import DreamlabError
from dreamlab.io import cached_array

VERSION = "v1"  # bump when the parsing changes: cache keys include it
TPQ = 24  # ticks per quarter note: sixteenth-note triplets and thirty-second notes lie on the grid

METERS = ("2/4", "3/4", "4/4", "6/8")
METER_ALIASES = {"2/2": "4/4", "C": "4/4", "C|": "4/4"}  # cut time has bars of four quarters: kept as 4/4
METER_BAR_TICKS = {"2/4": 2 * TPQ, "3/4": 3 * TPQ, "4/4": 4 * TPQ, "6/8": 3 * TPQ}
MODES = ("major", "minor")
TONICS_MAJOR = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
TONICS_MINOR = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")
TEMPO_BANDS = ("slow", "moderate", "fast")
TEMPO_BEAT_BPM = (60, 90, 126)  # the tempo written for each band, in beats per minute (6/8: dotted quarters)
TEMPO_EDGES = (75, 108)  # beat bpm below 75: slow, below 108: moderate, else fast
DENSITY_BANDS = ("sparse", "moderate", "busy")
#: onsets per quarter note: below the first edge sparse, below the second moderate, else busy (the tertiles of the
#: 2,705 train pieces of the six sources' first 600 pieces each, measured once and fixed here so that the bands
#: never move with the subset a model loads)
DENSITY_EDGES = (1.54, 1.89)
VOICES = (1, 4)

PITCH_LO, PITCH_HI = 36, 96  # C2..C7, inclusive: token pitches
N_PITCHES = PITCH_HI - PITCH_LO + 1

# ----------------------------------------------------------------------------- sources

ESSEN_GERMAN = ("erk10", "boehme10", "fink0", "erk20", "erk30", "boehme20", "zuccal0", "dva0", "kinder0", "erk5")
ESSEN_CHINESE = ("han1", "han2")


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    description: str
    voices: int


SOURCES: dict[str, Source] = {
    "chorales": Source("chorales", "J. S. Bach's four-part chorales", 4),
    "german": Source("german", "German folk songs (Essen collection)", 1),
    "chinese": Source("chinese", "Chinese Han folk songs (Essen collection)", 1),
    "irish": Source("irish", "O'Neill's Music of Ireland, 1850 tunes", 1),
    "scottish": Source("scottish", "Aird's Airs (Scotland, 1782-1803)", 1),
    "american": Source("american", "Ryan's Mammoth Collection (Boston, 1883)", 1),
}
SOURCE_NAMES = tuple(SOURCES)
CHORALES_PER_UNIT = 8
RYAN_PER_UNIT = 60


def parse_sources(spec: str) -> list[str]:
    return parse_names(spec, SOURCE_NAMES, "source")


def _music21():
    try:
        import music21
    except ImportError as e:
        raise DreamlabError("music data needs music21; install it with: pip install 'dreamlab[music]' "
                            "(or pip install music21)") from e
    return music21


def _units(source: str) -> list[tuple[str, list[str]]]:
    """The corpus files of `source` in a fixed order, grouped into cache units: (unit name, corpus paths)."""
    m21 = _music21()
    corpus = m21.corpus
    if source == "chorales":
        files = list(corpus.chorales.Iterator(returnType="filename"))
        return [(f"c{i // CHORALES_PER_UNIT:03d}", files[i:i + CHORALES_PER_UNIT])
                for i in range(0, len(files), CHORALES_PER_UNIT)]
    if source in ("german", "chinese"):
        return [(n, [f"essenFolksong/{n}"]) for n in (ESSEN_GERMAN if source == "german" else ESSEN_CHINESE)]
    root = Path(corpus.__file__).parent
    if source == "irish":
        return [(p.stem, [f"oneills1850/{p.stem}"]) for p in sorted((root / "oneills1850").glob("*.abc"))]
    if source == "scottish":
        return [(p.stem, [f"airdsAirs/{p.stem}"]) for p in sorted((root / "airdsAirs").glob("*.abc"))]
    files = [f"ryansMammoth/{p.stem}" for p in sorted((root / "ryansMammoth").glob("*.abc"))]
    return [(f"r{i // RYAN_PER_UNIT:03d}", files[i:i + RYAN_PER_UNIT]) for i in range(0, len(files), RYAN_PER_UNIT)]


# ----------------------------------------------------------------------------- a piece


@dataclasses.dataclass
class Piece:
    """One piece: notes (n, 4) int32 rows [onset, duration, midi pitch, voice] in ticks (`TPQ` per quarter), bar
    starts in ticks, its end, and its attributes (value indices into the tables above)."""

    notes: np.ndarray
    bars: np.ndarray
    end: int
    tonic: int = 0
    mode: int = 0
    meter: int = 2
    tempo_band: int = 1
    tempo_from_score: bool = False
    n_voices: int = 1
    source: int = -1
    uid: int = 0
    name: str = ""

    @property
    def key(self) -> int:
        """0..23: major keys C..B, then minor keys c..b."""
        return self.tonic + 12 * self.mode

    @property
    def split(self) -> str:
        return split_of(self.uid)

    def quarters(self) -> float:
        return self.end / TPQ

    def density(self) -> float:
        """Note onsets (distinct onset times) per quarter note."""
        return len(np.unique(self.notes[:, 0])) / max(self.end / TPQ, 1e-9) if len(self.notes) else 0.0

    def density_band(self) -> int:
        return density_band(self.density())

    def pitch_range(self) -> int:
        return int(self.notes[:, 2].max() - self.notes[:, 2].min()) if len(self.notes) else 0

    def attributes(self) -> dict[str, object]:
        """The caption attributes of this piece, as words."""
        return {"key": key_name(self.key), "tonic": self.tonic, "mode": MODES[self.mode], "meter": METERS[self.meter],
                "tempo": TEMPO_BANDS[self.tempo_band], "tempo_from_score": self.tempo_from_score,
                "density": DENSITY_BANDS[self.density_band()], "voices": self.n_voices,
                "source": SOURCE_NAMES[self.source] if self.source >= 0 else "generated",
                "pitch_range": self.pitch_range(), "notes": len(self.notes)}

    def transposed(self, semitones: int) -> Piece:
        n = self.notes.copy()
        n[:, 2] += semitones
        return dataclasses.replace(self, notes=n, tonic=(self.tonic + semitones) % 12)


def key_name(key: int) -> str:
    tonic, mode = key % 12, key // 12
    return f"{(TONICS_MINOR if mode else TONICS_MAJOR)[tonic]} {MODES[mode]}"


def density_band(d: float) -> int:
    return int(np.searchsorted(DENSITY_EDGES, d, side="right"))


def tempo_band(beat_bpm: float) -> int:
    return int(np.searchsorted(TEMPO_EDGES, beat_bpm, side="right"))


def beat_quarters(meter: int) -> float:
    """Quarter notes per beat: 1, or 1.5 in 6/8 (its beat is a dotted quarter)."""
    return 1.5 if METERS[meter] == "6/8" else 1.0


def quarter_bpm(p: Piece) -> float:
    return TEMPO_BEAT_BPM[p.tempo_band] * beat_quarters(p.meter)


def split_of(uid: int) -> str:
    r = uid % 20
    return "test" if r < 2 else "val" if r < 4 else "train"


def _uid(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- parsing (music21)

_SKIP = {"no notes": 1, "meter": 2, "range": 3, "error": 4}
ROW = 10  # int32 columns of a cached row: [kind, piece index, ...]


@functools.lru_cache(maxsize=1)
def _key_analyzer():
    return _music21().analysis.discrete.KrumhanslSchmuckler()


def analyze_key(notes: np.ndarray) -> tuple[int, int]:
    """(tonic pitch class, mode index) of notes (n, >=3) rows [onset, duration, pitch]: music21's Krumhansl-Schmuckler
    key analysis (`Stream.analyze('key')`, pitch classes weighted by duration)."""
    m21 = _music21()
    s = m21.stream.Stream()
    for onset, dur, pitch in notes[:, :3]:
        s.insert(onset / TPQ, m21.note.Note(int(pitch), quarterLength=dur / TPQ))
    if not len(notes):
        return 0, 0
    k = _key_analyzer().getSolution(s)
    return int(k.tonic.pitchClass), MODES.index(k.mode) if k.mode in MODES else 0


def _score_rows(score, idx: int, source: int, uid: int) -> np.ndarray:
    """Rows of one parsed music21 score: a piece row, its note rows and bar rows (or one skip row)."""
    m21 = _music21()

    def skip(reason: str) -> np.ndarray:
        r = np.zeros((1, ROW), np.int32)
        r[0, :3] = (3, idx, _SKIP[reason])
        return r

    tss = {ts.ratioString for ts in score.recurse().getElementsByClass(m21.meter.TimeSignature)}
    tss = {METER_ALIASES.get(t, t) for t in tss}
    if len(tss) != 1 or next(iter(tss)) not in METERS:
        return skip("meter")
    meter = METERS.index(next(iter(tss)))
    parts = list(score.parts) or [score]
    rows: list[tuple[int, int, int, int]] = []
    for vi, part in enumerate(parts):
        open_notes: dict[int, int] = {}  # pitch -> index in rows of the note a tie may continue
        for el in part.flatten().notes:
            ql = float(el.duration.quarterLength)
            if ql <= 0:
                continue  # grace notes
            on, dur = round(float(el.offset) * TPQ), max(1, round(ql * TPQ))
            for p in el.pitches:
                midi = int(p.midi)
                tie = el.tie if not hasattr(el, "notes") else None
                j = open_notes.get(midi)
                if tie is not None and tie.type in ("stop", "continue") and j is not None and \
                        rows[j][0] + rows[j][1] == on:
                    rows[j] = (rows[j][0], rows[j][1] + dur, midi, vi)
                else:
                    rows.append((on, dur, midi, vi))
                    j = len(rows) - 1
                open_notes[midi] = j
    if not rows:
        return skip("no notes")
    notes = np.array(sorted(rows), np.int32)
    if notes[:, 2].min() < PITCH_LO or notes[:, 2].max() > PITCH_HI:
        return skip("range")
    measures = list(parts[0].getElementsByClass(m21.stream.Measure))
    bars = sorted({round(float(m.offset) * TPQ) for m in measures}) or [0]
    end = int(max(notes[:, 0] + notes[:, 1]))
    bars = [b for b in bars if b < end]
    tempo = 0
    for mm in score.recurse().getElementsByClass(m21.tempo.MetronomeMark):
        bpm = mm.getQuarterBPM()
        if bpm:
            tempo = int(round(bpm))
            break
    tonic, mode = analyze_key(notes)
    head = np.zeros((1, ROW), np.int32)
    head[0] = (0, idx, uid, source, tonic, mode, meter, tempo, len(parts), end)
    note_rows = np.zeros((len(notes), ROW), np.int32)
    note_rows[:, 0], note_rows[:, 1], note_rows[:, 2:6] = 1, idx, notes
    bar_rows = np.zeros((len(bars), ROW), np.int32)
    bar_rows[:, 0], bar_rows[:, 1], bar_rows[:, 2] = 2, idx, bars
    return np.concatenate([head, note_rows, bar_rows])


def _parse_unit(source: str, paths: list[str]) -> np.ndarray:
    """Parse the corpus files of one cache unit into rows (see `_score_rows`)."""
    from unittest import mock

    m21 = _music21()
    out = []
    idx = 0
    # the abc reader beams every measure (a third of its time); beams mean nothing here
    with mock.patch.object(m21.stream.Stream, "makeBeams", lambda self, *a, **k: None):
        for path in paths:
            full = m21.corpus.getWork(path)
            if isinstance(full, list):  # a chorale may exist as .mxl and .krn: take the MusicXML one
                full = next((f for f in full if str(f).endswith(".mxl")), full[0])
            parsed = m21.converter.parse(full, forceSource=True, storePickle=False)
            scores = list(parsed.scores) if isinstance(parsed, m21.stream.Opus) else [parsed]
            for si, score in enumerate(scores):
                uid = _uid(f"{source}:{path}:{si}")
                try:
                    out.append(_score_rows(score, idx, SOURCE_NAMES.index(source), uid))
                except Exception:  # noqa: BLE001 - a malformed tune in a corpus of thousands is skipped and counted
                    r = np.zeros((1, ROW), np.int32)
                    r[0, :3] = (3, idx, _SKIP["error"])
                    out.append(r)
                idx += 1
    return np.concatenate(out) if out else np.zeros((0, ROW), np.int32)


def _rows_to_pieces(rows: np.ndarray, unit: str) -> tuple[list[Piece], Counter]:
    pieces: list[Piece] = []
    skipped: Counter = Counter()
    if not len(rows):
        return pieces, skipped
    order = np.argsort(rows[:, 1], kind="stable")
    rows = rows[order]
    cuts = np.flatnonzero(np.diff(rows[:, 1])) + 1
    for grp in np.split(rows, cuts):
        kinds = grp[:, 0]
        if (kinds == 3).any():
            skipped[next(k for k, v in _SKIP.items() if v == grp[kinds == 3][0, 2])] += 1
            continue
        h = grp[kinds == 0][0]
        _, idx, uid, source, tonic, mode, meter, tempo, voices, end = (int(v) for v in h)
        notes = grp[kinds == 1][:, 2:6].copy()
        bars = grp[kinds == 2][:, 2].copy()
        if tempo > 0:
            band, from_score = tempo_band(tempo / beat_quarters(meter)), True
        else:  # no tempo in the score: a band drawn from the piece's id (stated by tempo_from_score=False)
            band, from_score = int(np.random.default_rng(uid).integers(len(TEMPO_BANDS))), False
        pieces.append(Piece(notes=notes, bars=bars, end=end, tonic=tonic, mode=mode, meter=meter, tempo_band=band,
                            tempo_from_score=from_score, n_voices=voices, source=source, uid=uid,
                            name=f"{SOURCE_NAMES[source]}/{unit}#{idx}"))
    return pieces, skipped


def _music21_version() -> str:
    try:
        return importlib.metadata.version("music21").replace(".", "_")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def load_source(source: str, max_pieces: int = 0, progress: bool = True) -> tuple[list[Piece], Counter]:
    """The pieces of one source (the first `max_pieces` kept ones, whole cache units; 0 = all) and skip counts."""
    from tqdm.auto import tqdm

    if source not in SOURCES:
        raise DreamlabError(f"unknown music source {source!r}; choose from {', '.join(SOURCE_NAMES)}")
    units = _units(source)
    pieces: list[Piece] = []
    skipped: Counter = Counter()
    ver = _music21_version()
    bar = tqdm(units, desc=f"music21 corpus: {source}", unit="file", disable=not progress, leave=False)
    for name, paths in bar:
        rows = cached_array(f"music_{VERSION}_m21_{ver}_{source}_{name}", lambda p=paths: _parse_unit(source, p))
        got, sk = _rows_to_pieces(rows, name)
        pieces += got
        skipped += sk
        if max_pieces and len(pieces) >= max_pieces:
            break
    bar.close()
    return (pieces[:max_pieces] if max_pieces else pieces), skipped


@functools.lru_cache(maxsize=8)
def load_pieces(sources: str = ",".join(SOURCE_NAMES), max_pieces: int = 0, progress: bool = True) -> tuple[Piece, ...]:
    """Every kept piece of the comma-separated `sources` (each capped at `max_pieces`; 0 = all), all splits."""
    out: list[Piece] = []
    for s in parse_sources(sources):
        out += load_source(s, max_pieces, progress)[0]
    if not out:
        raise DreamlabError(f"no piece of sources={sources!r} could be read")
    return tuple(out)


def pieces_for_split(pieces: Iterable[Piece], split: str) -> list[Piece]:
    if split not in ("train", "val", "test"):
        raise DreamlabError(f"unknown split {split!r}; choose train, val or test")
    out = [p for p in pieces if p.split == split]
    if not out:  # a tiny subset may have no piece in a held-out split: never train on nothing
        out = [p for p in pieces if p.split == "train"][:1] or list(pieces)[:1]
    return out


# ----------------------------------------------------------------------------- tokens

SPECIALS = ("PAD", "START", "END", "BAR", "REST")
PAD, START, END, BAR, REST = range(5)
KEY0 = len(SPECIALS)
TS0 = KEY0 + 24
TEMPO0 = TS0 + len(METERS)
NOTE0 = TEMPO0 + len(TEMPO_BANDS)
HOLD0 = NOTE0 + N_PITCHES
NOTE_VOCAB = HOLD0 + N_PITCHES
#: slice durations in ticks (1/24 quarter): 1/24 .. 4 quarters; any multiple of a tick is a sum of these
DURATIONS = (1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 36, 48, 72, 96)
DUR_PAD, DUR_ZERO = 0, 1  # duration tokens: 0 padding, 1 "no time passes", then one per entry of DURATIONS
DUR_VOCAB = 2 + len(DURATIONS)
_DUR_TOKEN = {d: i + 2 for i, d in enumerate(DURATIONS)}
HEADER = 4  # START, KEY, TS, TEMPO


def note_token_name(t: int) -> str:
    if t < KEY0:
        return SPECIALS[t]
    if t < TS0:
        return "KEY_" + key_name(t - KEY0).replace(" ", "_")
    if t < TEMPO0:
        return "TS_" + METERS[t - TS0]
    if t < NOTE0:
        return "TEMPO_" + TEMPO_BANDS[t - TEMPO0]
    if t < HOLD0:
        return f"NOTE_{t - NOTE0 + PITCH_LO}"
    return f"HOLD_{t - HOLD0 + PITCH_LO}"


def dur_token_ticks(t: int) -> int:
    return DURATIONS[t - 2] if t >= 2 else 0


def split_ticks(ticks: int) -> list[int]:
    """A duration in ticks as a sum of `DURATIONS`, largest first (exact: 1 tick is one of them)."""
    out = []
    for d in reversed(DURATIONS):
        while ticks >= d:
            out.append(d)
            ticks -= d
    return out


def encode(p: Piece, *, header: bool = True, end: bool = True) -> np.ndarray:
    """A piece as (T, 2) int64 tokens: column 0 note tokens, column 1 duration tokens (see the module doc)."""
    notes = p.notes
    on, off, pitch = notes[:, 0], notes[:, 0] + notes[:, 1], notes[:, 2]
    bars = set(int(b) for b in p.bars)
    cuts = sorted({0, p.end, *on.tolist(), *off.tolist(), *bars} - {t for t in bars if t >= p.end})
    cuts = [c for c in cuts if 0 <= c <= p.end]
    toks: list[tuple[int, int]] = []
    if header:
        toks += [(START, DUR_ZERO), (KEY0 + p.key, DUR_ZERO), (TS0 + p.meter, DUR_ZERO),
                 (TEMPO0 + p.tempo_band, DUR_ZERO)]
    order = np.argsort(on, kind="stable")
    on_s, off_s, pitch_s = on[order], off[order], pitch[order]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a in bars:
            toks.append((BAR, DUR_ZERO))
        live = (on_s <= a) & (off_s > a)
        sounding: dict[int, bool] = {}  # pitch -> starts here (a unison of two voices is one token)
        for q, o in zip(pitch_s[live].tolist(), on_s[live].tolist()):
            sounding[q] = sounding.get(q, False) or o == a
        ps = sorted(sounding, reverse=True)
        for ci, chunk in enumerate(split_ticks(b - a)):
            if not ps:
                toks.append((REST, _DUR_TOKEN[chunk]))
                continue
            for j, q in enumerate(ps):
                t = (NOTE0 if sounding[q] and ci == 0 else HOLD0) + q - PITCH_LO
                toks.append((t, _DUR_TOKEN[chunk] if j == len(ps) - 1 else DUR_ZERO))
    if end:
        toks.append((END, DUR_ZERO))
    return np.array(toks, np.int64).reshape(-1, 2)


def decode(tokens: np.ndarray | Sequence[Sequence[int]], *, default: Piece | None = None) -> Piece:
    """(T, 2) tokens -> a Piece (robust to any token sequence a model may write: stray tokens are skipped, notes of an
    unfinished slice are dropped). Header tokens set the key/meter/tempo; `default` gives them when absent."""
    tok = np.asarray(tokens, np.int64).reshape(-1, 2)
    d = default or Piece(notes=np.zeros((0, 4), np.int32), bars=np.zeros(0, np.int32), end=0)
    key, meter, tempo = d.key, d.meter, d.tempo_band
    t = 0
    pending: list[tuple[int, bool]] = []
    notes: list[list[int]] = []
    last: dict[int, int] = {}  # pitch -> index of the note that ended most recently at its end time
    bars: list[int] = []
    for n, du in tok.tolist():
        if n == PAD:
            continue
        if n == END:
            break
        if KEY0 <= n < TS0:
            key = n - KEY0
        elif TS0 <= n < TEMPO0:
            meter = n - TS0
        elif TEMPO0 <= n < NOTE0:
            tempo = n - TEMPO0
        elif n == BAR:
            pending = []
            if not bars or bars[-1] != t:
                bars.append(t)
        elif n == REST or n >= NOTE0:
            if n != REST:
                q = (n - NOTE0 if n < HOLD0 else n - HOLD0) + PITCH_LO
                pending.append((q, n >= HOLD0))
            dt = dur_token_ticks(du)
            if dt == 0:
                continue
            for q, hold in pending:
                j = last.get(q)
                if hold and j is not None and notes[j][0] + notes[j][1] == t:
                    notes[j][1] += dt
                else:
                    notes.append([t, dt, q, 0])
                    j = len(notes) - 1
                last[q] = j
            pending = []
            t += dt
    arr = np.array(notes, np.int32).reshape(-1, 4)
    if len(arr):  # voices of a chord, top down (the order the tokens were written in)
        arr = arr[np.lexsort((-arr[:, 2], arr[:, 0]))]
    return Piece(notes=arr, bars=np.array(bars, np.int32), end=t, tonic=key % 12, mode=key // 12, meter=meter,
                 tempo_band=tempo, n_voices=max(1, polyphony_mode(arr)), source=-1, uid=0, name="decoded")


def windows(seqs: list[np.ndarray], length: int, stride: int) -> np.ndarray:
    """(N, length) token windows (…, 2) from sequences, PAD-filled at the end; every sequence gives at least one."""
    out = []
    for s in seqs:
        starts = range(0, max(len(s) - length, 0) + 1, stride)
        for a in starts:
            w = s[a:a + length]
            if len(w) < length:
                w = np.concatenate([w, np.zeros((length - len(w), 2), w.dtype)])
            out.append(w)
        if len(s) > length and (len(s) - length) % stride:
            out.append(s[-length:])
    return np.stack(out) if out else np.zeros((0, length, 2), np.int64)


def transpose_tokens(tok: np.ndarray, semitones: int) -> np.ndarray:
    """Shift note/hold tokens and the KEY token by `semitones` (callers keep pitches in range: see `shift_range`)."""
    out = tok.copy()
    n = out[..., 0]
    pitched = n >= NOTE0
    n[pitched] += semitones
    keys = (n >= KEY0) & (n < TS0)
    k = n[keys] - KEY0
    n[keys] = KEY0 + (k % 12 + semitones) % 12 + 12 * (k // 12)
    return out


def pitch_bounds(tok: np.ndarray) -> tuple[int, int]:
    """Lowest and highest midi pitch among note/hold tokens (PITCH_HI, PITCH_LO when none)."""
    n = tok[..., 0]
    q = np.where(n >= HOLD0, n - HOLD0, n - NOTE0)[n >= NOTE0] + PITCH_LO
    return (int(q.min()), int(q.max())) if q.size else (PITCH_HI, PITCH_LO)


# ----------------------------------------------------------------------------- read back (music21)


def polyphony_mode(notes: np.ndarray) -> int:
    """The number of notes sounding together for the longest total time (0 for no notes)."""
    if not len(notes):
        return 0
    ev = np.concatenate([np.stack([notes[:, 0], np.ones(len(notes))], 1),
                         np.stack([notes[:, 0] + notes[:, 1], -np.ones(len(notes))], 1)])
    ev = ev[np.lexsort((ev[:, 1], ev[:, 0]))]
    count, prev, total = 0, ev[0, 0], Counter()
    for t, d in ev:
        if t > prev and count > 0:
            total[count] += t - prev
        count += int(d)
        prev = t
    return int(max(total, key=total.get)) if total else 1


@functools.lru_cache(maxsize=1)
def _beat_ticks() -> dict[str, list[int]]:
    """Beat offsets (ticks) of a 3/4 and a 6/8 bar, from music21's meters (`TimeSignature.getBeatOffsets`)."""
    m21 = _music21()
    return {m: [round(o * TPQ) for o in m21.meter.TimeSignature(m).getBeatOffsets()] + [3 * TPQ]
            for m in ("3/4", "6/8")}


def analyze_meter(notes: np.ndarray, bars: np.ndarray, end: int) -> int:
    """The meter (index into METERS) the notes are written in, or -1: the most common bar length (from the bar
    lines the music is laid out in) gives 2, 3 or 4 quarters. A bar of three quarters is 3/4 or 6/8, whichever has
    fewer syncopations (notes that start off its beats, by music21's beat offsets, and sound across the next one);
    a tie goes to 6/8 when more than half as many notes start on its second beat (1.5 quarters in) as on the 3/4
    beats 2 and 3. On the 1,455 German and chorale pieces in 3/4 or 6/8 this reads 97% right."""
    b = np.asarray(sorted(set(int(x) for x in bars) | {int(end)}))
    lengths = np.diff(b)
    if len(lengths) > 2:  # drop a pickup bar and the last (often short) one
        lengths = lengths[1:-1]
    lengths = lengths[lengths > 0]
    if not len(lengths) or not len(notes):
        return -1
    bar = Counter(lengths.tolist()).most_common(1)[0][0]
    if bar == 2 * TPQ:
        return METERS.index("2/4")
    if bar == 4 * TPQ:
        return METERS.index("4/4")
    if bar != 3 * TPQ:
        return -1
    starts = b[:-1]
    idx = np.searchsorted(starts, notes[:, 0], side="right") - 1
    ok = idx >= 0
    pos = notes[ok, 0] - starts[idx[ok]]
    stop = pos + notes[ok, 1]
    sync = {}
    for m, beats in _beat_ticks().items():
        crosses = np.zeros(len(pos), bool)
        for bt in beats[1:]:
            crosses |= (pos < bt) & (stop > bt)
        sync[m] = int((~np.isin(pos, beats) & crosses).sum())
    if sync["3/4"] != sync["6/8"]:
        return METERS.index("3/4" if sync["3/4"] < sync["6/8"] else "6/8")
    second = int((pos == 3 * TPQ // 2).sum())
    beats34 = int(np.isin(pos, [TPQ, 2 * TPQ]).sum())
    return METERS.index("6/8" if second > beats34 / 2 else "3/4")


def readback(p: Piece) -> dict[str, int]:
    """Attributes of a (generated) piece read from its notes and bars alone: key (0..23), mode, meter (-1 when no
    meter fits), density band, voices (the usual number of notes sounding together). Never reads the header tokens."""
    if not len(p.notes):
        return {"key": -1, "mode": -1, "meter": -1, "density": -1, "voices": 0}
    tonic, mode = analyze_key(p.notes)
    return {"key": tonic + 12 * mode, "mode": mode, "meter": analyze_meter(p.notes, p.bars, p.end),
            "density": p.density_band(), "voices": polyphony_mode(p.notes)}


def pitch_class_histogram(pieces: Iterable[Piece]) -> np.ndarray:
    """Duration-weighted pitch-class distribution (12,) over pieces."""
    h = np.zeros(12)
    for p in pieces:
        if len(p.notes):
            np.add.at(h, p.notes[:, 2] % 12, p.notes[:, 1])
    return h / max(h.sum(), 1e-12)


def degree_histogram(pieces: Iterable[Piece], analyze: bool = False) -> np.ndarray:
    """Duration-weighted pitch classes relative to each piece's tonic (12,): its scale-degree profile, comparable
    across keys. The tonic is the piece's key attribute, or with `analyze` music21's key analysis of its notes."""
    h = np.zeros(12)
    for p in pieces:
        if len(p.notes):
            tonic = analyze_key(p.notes)[0] if analyze else p.tonic
            np.add.at(h, (p.notes[:, 2] - tonic) % 12, p.notes[:, 1])
    return h / max(h.sum(), 1e-12)


def duration_histogram(pieces: Iterable[Piece]) -> np.ndarray:
    """Distribution of note durations over `DURATIONS` (each note counted at its nearest listed duration)."""
    d = np.array(DURATIONS)
    h = np.zeros(len(d))
    for p in pieces:
        if len(p.notes):
            np.add.at(h, np.abs(p.notes[:, 1:2] - d[None]).argmin(1), 1)
    return h / max(h.sum(), 1e-12)


# ----------------------------------------------------------------------------- MuseGAN piano rolls

ROLL_TRACKS, ROLL_BARS, ROLL_STEPS, ROLL_PITCHES, ROLL_LO = 4, 2, 16, 84, 24  # 84 pitches from C1
STEP_TICKS = TPQ // 4  # a sixteenth note


def roll_windows(pieces: Iterable[Piece], hop_bars: int = 1) -> np.ndarray:
    """Two-bar windows of the four voices of 4/4 chorales on a sixteenth grid: (N, 4, 32) uint8 pitch indices
    (midi - ROLL_LO), 255 for a rest (the pitch sounding at the start of each step, as the book's data)."""
    out = []
    steps = ROLL_BARS * ROLL_STEPS
    for p in pieces:
        if p.n_voices != ROLL_TRACKS or METERS[p.meter] != "4/4" or not len(p.notes):
            continue
        n_steps = p.end // STEP_TICKS + 1
        grid = np.full((ROLL_TRACKS, n_steps), 255, np.uint8)
        for on, du, q, v in p.notes.tolist():
            a, b = -(-on // STEP_TICKS), -(-(on + du) // STEP_TICKS)  # steps whose start lies in [on, on + du)
            grid[v, a:b] = min(max(q - ROLL_LO, 0), ROLL_PITCHES - 1)
        full = [int(b) for b in p.bars if int(b) % STEP_TICKS == 0]
        starts = [b for b in full[::hop_bars] if b + steps * STEP_TICKS <= p.end]
        for s in starts:
            w = grid[:, s // STEP_TICKS:s // STEP_TICKS + steps]
            if (w != 255).any(axis=1).all():  # every voice sings somewhere in the window
                out.append(w)
    return np.stack(out) if out else np.zeros((0, ROLL_TRACKS, steps), np.uint8)


def roll_onehot(w: np.ndarray) -> np.ndarray:
    """(N, 4, 32) pitch indices -> (N, 4, 2, 16, 84) int8 one-hot (rests all zero)."""
    n = len(w)
    out = np.zeros((n, ROLL_TRACKS, ROLL_BARS * ROLL_STEPS, ROLL_PITCHES), np.int8)
    i, t, s = np.nonzero(w != 255)
    out[i, t, s, w[i, t, s]] = 1
    return out.reshape(n, ROLL_TRACKS, ROLL_BARS, ROLL_STEPS, ROLL_PITCHES)


def roll_to_piece(roll: np.ndarray, tempo_band: int = 1) -> Piece:
    """A binary roll (4, 2, 16, 84) or (4, 32, 84) -> a Piece (one voice per track; repeated pitches of a track
    joined into one note, as the book's MIDI export does)."""
    r = np.asarray(roll).reshape(ROLL_TRACKS, -1, ROLL_PITCHES)
    notes = []
    for v in range(ROLL_TRACKS):
        active = r[v].max(1) > 0
        pitch = np.where(active, r[v].argmax(1), -1)
        t = 0
        while t < len(pitch):
            if pitch[t] < 0:
                t += 1
                continue
            u = t
            while u + 1 < len(pitch) and pitch[u + 1] == pitch[t]:
                u += 1
            notes.append([t * STEP_TICKS, (u - t + 1) * STEP_TICKS, int(pitch[t]) + ROLL_LO, v])
            t = u + 1
    arr = np.array(notes, np.int32).reshape(-1, 4)
    end = r.shape[1] * STEP_TICKS
    bars = np.arange(0, end, ROLL_STEPS * STEP_TICKS, dtype=np.int32)
    tonic, mode = analyze_key(arr) if len(arr) else (0, 0)
    return Piece(notes=arr, bars=bars, end=end, tonic=tonic, mode=mode, meter=METERS.index("4/4"),
                 tempo_band=tempo_band, n_voices=ROLL_TRACKS, name="roll")


def load_rolls(split: str, max_pieces: int = 0, progress: bool = True) -> np.ndarray:
    """MuseGAN windows of the chorales of `split`: (N, 4, 32) uint8 (see `roll_windows`)."""
    return roll_windows(pieces_for_split(load_pieces("chorales", max_pieces, progress), split))


# ----------------------------------------------------------------------------- MuseGAN's metrics

#: tonal centroid (Harte, Sandler & Gasser 2006): pitch class l -> 6-d point on the circles of fifths (r=1),
#: minor thirds (r=1) and major thirds (r=0.5)
_TONNETZ = np.array([[r * f(pc * a) for pc in range(12)]
                     for r, a in ((1.0, 7 * np.pi / 6), (1.0, 3 * np.pi / 2), (0.5, 2 * np.pi / 3))
                     for f in (np.sin, np.cos)])


_ROLL_PC = np.eye(12)[(np.arange(ROLL_PITCHES) + ROLL_LO) % 12]  # roll pitch index -> pitch class


def tonal_centroid(chroma: np.ndarray) -> np.ndarray:
    """(..., 12) pitch-class weights -> (..., 6) tonal centroid (the chroma normalised to sum 1 first)."""
    s = chroma.sum(-1, keepdims=True)
    return (chroma / np.where(s > 0, s, 1)) @ _TONNETZ.T


def roll_metrics(rolls: np.ndarray) -> dict[str, float]:
    """MuseGAN's evaluation (Dong et al. 2018) of binary rolls (N, 4, 2, 16, 84) or (N, 4, 32, 84):

    - `empty_bar_rate`: fraction of (track, bar) pairs with no note (counted here per bar: muspy's
      `empty_measure_rate` only counts bars up to a track's last note, so a silent last bar would be missed);
    - `used_pitch_classes`: pitch classes per non-empty (track, bar), muspy's `n_pitch_classes_used`;
    - `polyphony`: pitches sounding per step with any sound (muspy `polyphony`, all four tracks together);
    - `in_scale_rate`: muspy `scale_consistency`, the largest fraction of notes inside one major/minor scale;
    - `tonal_distance`: mean distance of the tonal centroids of each pair of tracks, per bar (written here; muspy
      has none): lower means the voices sound more in the same harmony.
    Values are means over pieces (NaN ones, e.g. an empty piece, skipped)."""
    try:
        import muspy
    except ImportError as e:
        raise DreamlabError("MuseGAN metrics need muspy; install it with: pip install 'dreamlab[music]'") from e
    r = np.asarray(rolls).reshape(len(rolls), ROLL_TRACKS, ROLL_BARS, ROLL_STEPS, ROLL_PITCHES) > 0
    empty = ~r.any(axis=(3, 4))  # (N, tracks, bars)
    res: dict[str, list[float]] = {k: [] for k in ("used_pitch_classes", "polyphony", "in_scale_rate",
                                                   "tonal_distance")}

    def music_of(x: np.ndarray) -> muspy.Music:  # (tracks, steps, 84) -> Music at 4 steps per quarter note
        tracks = []
        for t in x:
            full = np.zeros((len(t), 128), bool)
            full[:, ROLL_LO:ROLL_LO + ROLL_PITCHES] = t
            tracks += muspy.from_pianoroll_representation(full, resolution=4, encode_velocity=False).tracks
        return muspy.Music(resolution=4, tracks=tracks)

    for n in range(len(r)):
        for t in range(ROLL_TRACKS):
            for b in range(ROLL_BARS):
                if not empty[n, t, b]:
                    res["used_pitch_classes"].append(muspy.n_pitch_classes_used(music_of(r[n, t:t + 1, b])))
        whole = music_of(r[n].reshape(ROLL_TRACKS, -1, ROLL_PITCHES))
        res["polyphony"].append(muspy.polyphony(whole))
        res["in_scale_rate"].append(muspy.scale_consistency(whole))
        chroma = r[n].sum(axis=2) @ _ROLL_PC  # (tracks, bars, 12)
        tc = tonal_centroid(chroma)  # (tracks, bars, 6)
        for i in range(ROLL_TRACKS):
            for j in range(i + 1, ROLL_TRACKS):
                ok = ~empty[n, i] & ~empty[n, j]
                if ok.any():
                    res["tonal_distance"].append(float(np.linalg.norm(tc[i, ok] - tc[j, ok], axis=-1).mean()))
    out = {"empty_bar_rate": float(empty.mean())}
    for k, v in res.items():
        v = [x for x in v if x == x]
        out[k] = float(np.mean(v)) if v else float("nan")
    return out
