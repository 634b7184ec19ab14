"""Evaluation of text-to-music on attribute combinations held out of training, read back from the notes.

Prompts: one per held-out (key, meter, source) triple whose (meter, source) pair the model's training data has,
each with a density band drawn per prompt; once in training wording and once paraphrased in words no training
caption uses (`music_text`). For each guidance setting (none, classifier-free, CLAP candidates, both) we generate
`n_per_prompt` pieces per prompt with fixed seeds and read their attributes back from the notes alone
(`dreamlab.music.readback`: music21's key analysis, the meter of the bar lines the notes fill, onsets per quarter
note, notes sounding together), never from the header tokens the model wrote:

- `mode`, `key` (of 24), `meter` (of 4), `density` (band of 3), `voices` (1 or 4) accuracy, and `all` (every one);
- the CLAP score, 100 * max(cos(CLAP_music, CLAP_text(prompt)), 0), 0-100 (our CLAP, the one CLAP guidance uses:
  optimistic by construction under CLAP guidance);
- scale-degree and duration histograms against the training pieces' (total variation distance, 0 = identical).

Two reference rows: the same read-back on real held-out pieces (cropped to the same length) against their own
attributes (the ceiling the read-back allows), and unconditional samples (the null text) against the prompts
(chance for this model). Writes `eval_text2music.json`/`.md` and, per setting, the pieces of the first prompts as
MIDI + WAV + PNG in the run folder.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamlab import music as M
from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, save_json
from multimodal import music_text as T
from multimodal.clap import music_pair_count

ATTR_KEYS = ("mode", "key", "meter", "density", "voices")


def default_settings(guidance_scale: float, candidates: int) -> list[tuple[str, float, int, bool]]:
    """(name, CFG scale, CLAP candidates, bar grammar): each guidance under the bar grammar (the default), and the
    strongest one once more with free bars, the book's sampling, to show what the grammar does."""
    return [("no guidance", 1.0, 1, True), ("classifier-free", guidance_scale, 1, True),
            ("CLAP candidates", 1.0, candidates, True), ("classifier-free + CLAP", guidance_scale, candidates, True),
            ("classifier-free + CLAP, free bars", guidance_scale, candidates, False)]


def attribute_hits(pieces: list[M.Piece], targets: list[dict[str, int]]) -> dict[str, np.ndarray]:
    """Per piece, whether each read-back attribute matches its target (key 0..23, meter, density band, voices)."""
    hits: dict[str, list[bool]] = {k: [] for k in ATTR_KEYS}
    for p, t in zip(pieces, targets):
        r = M.readback(p)
        hits["mode"].append(r["mode"] == t["key"] // 12)
        hits["key"].append(r["key"] == t["key"])
        hits["meter"].append(r["meter"] == t["meter"])
        hits["density"].append(r["density"] == t["density"])
        hits["voices"].append(r["voices"] == t["voices"])
    out = {k: np.array(v, bool) for k, v in hits.items()}
    out["all"] = np.all([out[k] for k in ATTR_KEYS], axis=0) if pieces else np.zeros(0, bool)
    return out


def _row(name: str, pieces: list[M.Piece], targets: list[dict[str, int]], train: list[M.Piece],
         scores: torch.Tensor | None, seconds: float | None, **extra: Any) -> dict[str, Any]:
    hits = attribute_hits(pieces, targets)
    row: dict[str, Any] = {"setting": name, **extra}
    row.update({f"{k}_acc": float(v.mean()) if len(v) else float("nan") for k, v in hits.items()})
    row["clap_score"] = float(scores.mean()) if scores is not None and len(scores) else float("nan")
    played = [p for p in pieces if len(p.notes)]
    row["degree_tv"] = 0.5 * float(np.abs(M.degree_histogram(played, analyze=True) - M.degree_histogram(train)).sum())
    row["duration_tv"] = 0.5 * float(np.abs(M.duration_histogram(played) - M.duration_histogram(train)).sum())
    row["pieces"] = len(pieces)
    if seconds is not None:
        row["pieces_per_s"] = len(pieces) / max(seconds, 1e-9)
    return row


def evaluate_text2music(pipe, run_dir: str | Path, *, n_per_prompt: int = 4, max_new_tokens: int | None = None,
                        guidance_scale: float = 1.5, candidates: int = 8, temperature: float | None = None,
                        seed: int = 0, max_prompts: int = 0, settings: list[tuple[str, float, int, bool]] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from dreamlab.music_io import write_music

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train = pipe.pieces("train")
    pairs = music_pair_count(train, minimum=5 if len(train) >= 100 else 1)  # a tiny subset: any pair it has
    held = {t for t in pipe.held_out() if (t[1], t[2]) in pairs}
    if not held:
        raise DreamlabError("none of the held-out (key, meter, source) prompts fits the meters and sources this model "
                            "was trained on")
    prompt_sets = {"held-out": T.eval_prompts(held, seed=seed), "paraphrase": T.eval_prompts(held, seed=seed,
                                                                                               paraphrased=True)}
    if max_prompts:
        prompt_sets = {k: v[:max_prompts] for k, v in prompt_sets.items()}
    max_new = max_new_tokens or pipe.config.max_new_tokens
    rows: list[dict[str, Any]] = []

    # reference 1: real held-out pieces, cropped to about the generated length, against their own attributes
    test = pipe.pieces("test")
    real = [M.decode(M.encode(p)[:max_new + 1]) for p in test]
    real_targets = [{"key": p.key, "meter": p.meter, "density": r.density_band(), "voices": p.n_voices}
                    for p, r in zip(test, real)]
    rows.append(_row("real held-out pieces (read-back ceiling)", real, real_targets, train, None, None,
                     prompts="test split", guidance_scale=float("nan"), candidates=0))
    base = prompt_sets["held-out"]
    targets = [t for t in base for _ in range(n_per_prompt)]
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    unc = [M.decode(s.long().numpy()) for s in pipe.sample(len(targets), generator=g, max_new_tokens=max_new,
                                                           bar_grammar=True)]
    rows.append(_row("no text (null prompt)", unc, targets, train, None, time.perf_counter() - t0,
                     prompts="held-out", guidance_scale=1.0, candidates=1))
    todo = [(pset, s) for pset in prompt_sets for s in (settings or default_settings(guidance_scale, candidates))]
    for pset, (name, gs, k, bars) in tqdm(todo, desc="text2music evaluation", disable=not progress):
        plist = prompt_sets[pset]
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        out = pipe([p["prompt"] for p in plist], num_samples=n_per_prompt, max_new_tokens=max_new, guidance_scale=gs,
                   clap_guidance_candidates=k, temperature=temperature, generator=g, bar_grammar=bars)
        dt = time.perf_counter() - t0
        tg = [p for p in plist for _ in range(n_per_prompt)]
        rows.append(_row(name, out.pieces, tg, train, out.clap_scores, dt, prompts=pset, guidance_scale=gs,
                         candidates=k, bar_grammar=bars))
        if pset == "held-out":
            slug = name.replace(" ", "").replace("+", "_").replace("-", "").lower()
            shown = min(3, len(plist)) * n_per_prompt
            titles = [f"{p[:50]} (CLAP {s:.0f})" for p, s in zip(out.prompts[:shown], out.clap_scores.tolist())]
            files = write_music(out.pieces[:shown], run_dir / f"eval_{slug}.mid", titles=titles)
            rows[-1]["files"] = [f.name for f in files if f.suffix in (".wav", ".png")]
    res = {"n_per_prompt": n_per_prompt, "max_new_tokens": max_new, "held_out_triples": len(held),
           "prompts": {k: [p["prompt"] for p in v] for k, v in prompt_sets.items()}, "rows": rows,
           "chance": {"mode": 0.5, "key": 1 / 24, "meter": 1 / len(M.METERS), "density": 1 / 3},
           "clap_score_scale": "100 * max(cosine, 0), 0-100, our CLAP (the one CLAP guidance uses)"}
    save_json(run_dir / "eval_text2music.json", res)
    atomic_write_text(run_dir / "eval_text2music.md", markdown_table(res))
    return res


def markdown_table(res: dict[str, Any]) -> str:
    head = ["setting", "prompts", "CFG", "k", *[f"{a} acc" for a in (*ATTR_KEYS, "all")], "CLAP score",
            "degree TV", "dur TV", "pieces/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "-" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)

    for r in res["rows"]:
        vals = [r["setting"], r.get("prompts", ""), f(r.get("guidance_scale"), "{:g}"), str(r.get("candidates", "")),
                *[f(r[f"{a}_acc"]) for a in (*ATTR_KEYS, "all")], f(r["clap_score"], "{:.1f}"), f(r["degree_tv"]),
                f(r["duration_tv"]), f(r.get("pieces_per_s"), "{:.2f}")]
        lines.append("| " + " | ".join(vals) + " |")
    ex = "\n".join(f"- {p}" for p in res["prompts"]["held-out"][:3])
    pa = "\n".join(f"- {p}" for p in res["prompts"]["paraphrase"][:3])
    return (f"{res['held_out_triples']} held-out (key, meter, source) prompts, {res['n_per_prompt']} pieces each, "
            f"{res['max_new_tokens']} events. Chance: mode 0.5, key 1/24, meter 1/4, density 1/3. "
            f"CLAP score: {res['clap_score_scale']}.\n\n" + "\n".join(lines) +
            f"\n\nFirst prompts (training wording):\n{ex}\n\nTheir paraphrases:\n{pa}\n")
