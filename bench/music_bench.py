"""Music: corpus parsing with and without music21's beaming pass, and transformer sampling with and without the
key/value cache. Prints a markdown table; ratios are measured in the same run.

    python bench/music_bench.py                  # erk5 (27 Essen tunes), 32 pieces x 128 events
    python bench/music_bench.py --n 8 --events 64 --reps 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_seconds(path: str, skip_beams: bool) -> tuple[float, int]:
    import music21 as m21

    full = m21.corpus.getWork(path)
    t0 = time.perf_counter()
    if skip_beams:
        with mock.patch.object(m21.stream.Stream, "makeBeams", lambda self, *a, **k: None):
            op = m21.converter.parse(full, forceSource=True, storePickle=False)
    else:
        op = m21.converter.parse(full, forceSource=True, storePickle=False)
    return time.perf_counter() - t0, len(op.scores)


def naive_sample(core, start, max_new, generator):
    """The same draws without the cache: the whole sequence through the blocks at every step."""
    import torch

    from generators.music import _draw

    seq = start
    for _ in range(max_new):
        h, _ = core.hidden(core.embed(seq))
        h = h[:, -1]
        note = _draw(core.note_head(h), 1.0, generator)
        dur = _draw(core.dur_logits(h, note), 1.0, generator)
        seq = torch.cat([seq, torch.stack([note, dur], -1)[:, None]], 1)
    return seq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="essenFolksong/erk5")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--events", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    from dreamlab import music as M
    from generators.music import MusicTransformer, MusicTransformerConfig, sample_tokens

    torch.set_num_threads(a.threads)
    rows = []
    parse_seconds(a.file, True)  # warm the imports
    slow = min(parse_seconds(a.file, False)[0] for _ in range(a.reps))
    fast, n = min((parse_seconds(a.file, True) for _ in range(a.reps)), key=lambda r: r[0])
    rows.append(("parse one abc file (music21)", f"{n} tunes", f"{n / slow:.1f} tunes/s", f"{n / fast:.1f} tunes/s",
                 f"{slow / fast:.2f}x"))
    m = MusicTransformer(MusicTransformerConfig(sources="chorales", seq_len=a.events, max_new_tokens=a.events,
                                                d_model=128, n_layers=3)).eval()
    start = torch.full((a.n, 1, 2), M.START, dtype=torch.long)
    start[..., 1] = M.DUR_ZERO
    with torch.no_grad():
        t0 = time.perf_counter()
        x = sample_tokens(m.core, start, a.events, generator=torch.Generator().manual_seed(0))
        cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        y = naive_sample(m.core, start, a.events, torch.Generator().manual_seed(0))
        naive = time.perf_counter() - t0
    same = bool(torch.equal(x[:, :y.shape[1]][(x[:, :y.shape[1], 0] != M.PAD)], y[(x[:, :y.shape[1], 0] != M.PAD)]))
    ev = a.n * a.events
    rows.append((f"sample {a.n} x {a.events} events (d=128, 3 layers)", "same draws" if same else "draws differ",
                 f"{ev / naive:.0f} events/s", f"{ev / cached:.0f} events/s", f"{naive / cached:.2f}x"))
    print(f"threads={a.threads}\n")
    print("| what | check | without (beams / no cache) | with dreamlab's path | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
