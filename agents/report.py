"""RUN/report.md: one page a person reads first after a world-model run (GitHub, VS Code and most viewers render it).

It is built from what the run folder holds, so it fits a whole `worldmodel run`, a run built stage by stage, or a
half-finished one: the real-env scores beside the random policy's, the stages with their times and key figures,
the iterative rounds, and V's, M's and C's pictures and videos (linked by relative path). `run_pipeline` writes it
at the end, `dreamlab worldmodel evaluate` refreshes it, and `dreamlab worldmodel report RUN` rebuilds it.
Only the standard library and dreamlab.io are used: no torch import, so it is instant.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_text, load_json

_EVAL = re.compile(r"^(controller|random)_seed\d+_n\d+(_.+)?\.json$")


def _load(p: Path) -> Any:
    try:
        return load_json(p) if p.is_file() else None
    except DreamlabError:  # a damaged file is reported as missing, never fatal: the report is a view
        return None


def _f(x: Any, nd: int = 1) -> str:
    return f"{x:,.{nd}f}" if isinstance(x, (int, float)) else "—"


def _seeds(seeds: list[int]) -> str:
    if not seeds:
        return "—"
    return (
        f"{seeds[0]}..{seeds[-1]}"
        if seeds == list(range(seeds[0], seeds[0] + len(seeds)))
        else ", ".join(map(str, seeds))
    )


def _evaluations(run: Path) -> list[dict[str, Any]]:
    """Every controller score file in RUN/eval, newest first, each beside the random policy's on the same episodes
    (same env, episode length and env seeds) when one was measured."""
    folder = run / "eval"
    if not folder.is_dir():
        return []
    loaded = [(p, _load(p)) for p in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)]
    scored = [(p, d) for p, d in loaded if _EVAL.match(p.name) and isinstance(d, dict) and "mean" in d]

    def key(d: dict[str, Any]) -> tuple[Any, ...]:
        return d.get("env_id"), d.get("max_steps"), tuple(d.get("seeds", []))

    randoms = {key(d): d for p, d in reversed(scored) if p.name.startswith("random_")}  # the newest wins
    return [
        {"file": p.name, "scores": d, "random": randoms.get(key(d))}
        for p, d in scored
        if p.name.startswith("controller_")
    ]


def _controller_text(t: dict[str, Any]) -> str:
    txt = (f"{t.get('generations', '—')} generations; best dream fitness {_f(t.get('best_dream_fitness'))} "
           f"(generation {t.get('best_generation', '—')})")
    if t.get("best_real_check") is not None:
        txt += f"; best real check {_f(t.get('best_real_check'))} (generation {t.get('best_real_generation', '—')})"
    po = t.get("playoff")
    if isinstance(po, dict) and po.get("chosen_playoff_mean") is not None:
        txt += (f"; playoff kept generation {po.get('chosen_generation')} ({_f(po.get('chosen_playoff_mean'))} "
                f"over {len(po.get('seeds', []))} episodes)")
    return txt


# summary.json key, row label, the row's text from that stage's entry
_STAGES: tuple[tuple[str, str, Any], ...] = (
    (
        "collect",
        "collect",
        lambda c: (
            f"{c.get('episodes', '—')} episodes, {_f(c.get('steps'), 0)} env steps, {_f(c.get('env_steps_per_s'), 0)} "
            "env-steps/s"
        ),
    ),
    (
        "train_vae",
        "V (ConvVAE)",
        lambda v: (
            f"{v.get('step', '—')} steps; test loss {_f(v.get('test_loss'), 2)} per frame "
            f"(reconstruction {_f(v.get('test_recon'), 2)} + KL {_f(v.get('test_kl'), 2)})"
        ),
    ),
    ("encode", "encode", lambda e: f"{_f(e.get('encoded_frames'), 0)} frames to (mu, logvar)"),
    (
        "train_mdn",
        "M (MDN-RNN)",
        lambda m: (
            f"{m.get('step', '—')} steps; held-out NLL {_f(m.get('test_nll_per_step'), 2)} nats per step, "
            f"reward MSE {_f(m.get('test_reward_mse'), 3)}"
        ),
    ),
    ("train_controller", "C (CMA-ES in the dream)", _controller_text),
)


def _stage_rows(s: dict[str, Any]) -> list[tuple[str, Any, str]]:
    times = (s.get("pipeline") or {}).get("stage_seconds", {})
    rounds = [k for k in s if re.fullmatch(r"round_\d+", k)]
    rows: list[tuple[str, Any, str]] = []
    for key, label, text in _STAGES:
        d = s.get(key)
        if isinstance(d, dict):
            if key == "train_controller" and rounds:
                label = "C (CMA-ES in the dream, round 1)"
            rows.append((label, times.get(key, d.get("seconds")), text(d)))
    if rounds or "iterate" in times:
        rows.append(
            ("iterative rounds", times.get("iterate"), f"rounds 2..{len(rounds)}: below" if len(rounds) > 1 else "—")
        )
    if "dream_video" in times:
        rows.append(("dream video", times["dream_video"], "the kept controller driving in M's dream, decoded by V"))
    ev = s.get("evaluate")
    if isinstance(ev, dict) and isinstance(ev.get("controller"), dict):
        rows.append(
            (
                "evaluate",
                times.get("evaluate", ev.get("seconds")),
                f"{ev['controller'].get('episodes')} real episodes (below)",
            )
        )
    return rows


def _pictures(run: Path) -> list[str]:
    lines = []
    for title, folder, names in (
        (
            "V: reconstructions (top: real frames, bottom: V's) and samples",
            "vae",
            ("reconstructions.png", "samples.png", "loss_curves.png"),
        ),
        ("M: training curves", "mdn", ("loss_curves.png",)),
        ("C: fitness in the dream and in the real env, per generation", "controller", ("fitness.png",)),
    ):
        have = [n for n in names if (run / folder / n).is_file()]
        if have:
            lines += [f"**{title}**", "", " ".join(f"![{folder}/{n}]({folder}/{n})" for n in have), ""]
    return lines


# what a world-model run folder holds (agents.pipeline); a folder holding only these may become one
PARTS = {"config.json", "rollouts", "vae", "latents", "mdn", "controller", "eval", "summary.json", "report.md",
         "rounds.json", "dream.mp4", "dream.gif", "ray"}


def not_a_world_model_run(run_dir: str | Path) -> str | None:
    """None if RUN is a world-model run folder (or an empty or new one, or one holding only its parts, with no
    config.json yet: a stage may start it); else a sentence saying what the folder is, for the one-line error of a
    world-model command pointed at it (a model's run folder, a PPO run, ...)."""
    run = Path(run_dir)
    p = run / "config.json"
    if not p.is_file():
        if not run.is_dir():
            return None
        other = sorted(x.name for x in run.iterdir() if x.name not in PARTS and not x.name.startswith("."))
        if not other:
            return None
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        return (f"{run} is not a world-model run: it has no config.json and holds other files ({shown}); give a new "
                "or empty folder")
    try:
        d = load_json(p)
    except DreamlabError:
        return None  # damaged: the stage that reads it says so, naming the file
    if isinstance(d, dict) and isinstance(d.get("config"), dict) and "name" not in d:
        return None
    if isinstance(d, dict) and isinstance(d.get("name"), str):
        what = f"a {d['name']!r} model's run folder (dreamlab train)"
        if run.name in ("vae", "mdn") and (run.parent / "config.json").is_file():
            what += f"; the world-model run is probably {run.parent}"
    elif isinstance(d, dict) and isinstance(d.get("kind"), str):
        what = f"a {d['kind']!r} run folder"
    else:
        what = "not a world-model run"
    return (f"{run} is {what}, not a world-model run ({p} has no world-model settings); world-model commands take a "
            "folder made by: dreamlab worldmodel run --out RUN")


def render_report(run_dir: str | Path) -> str:
    run = Path(run_dir)
    if not run.is_dir():
        raise DreamlabError(f"run folder {run} does not exist")
    why = not_a_world_model_run(run)
    if why is None and not (run / "config.json").is_file() and not any(run.iterdir()):
        why = f"{run} is empty: no world-model run to report on; start one with: dreamlab worldmodel run --out {run}"
    if why:  # the page would be empty, and another kind of run's report.md overwritten with it
        raise DreamlabError(why)
    cfgd = _load(run / "config.json") or {}
    cfg = cfgd.get("config", {}) if isinstance(cfgd, dict) else {}
    s = _load(run / "summary.json") or {}
    lines = [f"# World-model run `{run.name}`", ""]
    bits = [f"preset **{cfgd.get('preset') or 'custom'}**" if isinstance(cfgd, dict) else "no config.json"]
    if cfg:
        c = cfg.get("collect", cfg)  # the stage layout, or the flat one of earlier releases
        bits.append(f"{c.get('episodes')} episodes × {c.get('max_steps')} steps of `{c.get('env_id')}` "
                    f"(policy `{c.get('policy')}`)")
        bits.append(f"seed {cfg.get('seed')}")
    total = (s.get("pipeline") or {}).get("seconds_total")
    if total is not None:
        bits.append(f"whole pipeline {_f(total)} s ({_f(total / 60)} min)")
    lines += ["; ".join(bits) + f". Written {time.strftime('%Y-%m-%d %H:%M %Z')} from the files in this folder "
              "(`dreamlab worldmodel report RUN` rebuilds it).", ""]

    lines += ["## Real-env scores", ""]
    evals = _evaluations(run)
    if evals:
        lines += [
            "| controller | env | episodes (env seeds) | mean ± std | min / max | random policy, same seeds | score "
            "file |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in evals:
            d, r = e["scores"], e["random"]
            ctrl = Path(str(d.get("controller", ""))).name or "—"
            rnd = f"{_f(r['mean'])} ± {_f(r['std'])}" if r else "—"
            lines.append(
                f"| {ctrl} | `{d.get('env_id', '—')}`, {d.get('max_steps', '—')} steps | {d.get('episodes')} "
                f"({_seeds(d.get('seeds', []))}) | "
                f"**{_f(d['mean'])} ± {_f(d['std'])}** | {_f(d.get('min'))} / {_f(d.get('max'))} | {rnd} | "
                f"[{e['file']}](eval/{e['file']}) |"
            )
        lines.append("")
        lines.append(
            "World Models (Ha & Schmidhuber 2018) scored 906 ± 21 over 100 episodes with C trained in the real env; "
            "CarRacing counts a track 'solved' at 900."
        )
    else:
        lines.append(f"No evaluation yet: `dreamlab worldmodel evaluate {run} --episodes 100 --seed 1000`.")
    lines.append("")

    rows = _stage_rows(s)
    if rows:
        lines += ["## Stages", "", "| stage | seconds | result |", "|---|---:|---|"]
        lines += [f"| {name} | {_f(sec)} | {txt} |" for name, sec, txt in rows]
        lines.append("")

    rj = _load(run / "rounds.json")
    if isinstance(rj, dict) and (rj.get("rounds") or rj.get("round_1")):
        lines += [
            "## Iterative rounds",
            "",
            "Each round collects episodes with the kept and the dream-best controller, continues M and searches C "
            "again; "
            "a full-length real check compares the rounds' controllers and the best is kept.",
            "",
            "| round | episodes in M's data | M held-out NLL / step | best dream fitness | real check (episodes) | "
            "kept |",
            "|---|---:|---:|---:|---|---|",
        ]
        rs = ([rj["round_1"]] if rj.get("round_1") else []) + list(rj.get("rounds", []))
        kept = next((r["kept_round"] for r in reversed(rs) if r.get("kept_round") is not None), None)
        for r in rs:
            lines.append(
                f"| {r.get('round')} | {r.get('episodes_total', '—')} | {_f(r.get('mdn_test_nll_per_step'), 2)} | "
                f"{_f(r.get('dream_best'))} | "
                f"{_f(r.get('real_mean'))} ± {_f(r.get('real_std'))} ({len(r.get('real_seeds', []))}) | "
                f"{'**kept**' if r.get('round') == kept else ''} |"
            )
        lines.append("")

    pics = _pictures(run)
    videos = [p for p in [run / "dream.mp4", run / "dream.gif"] if p.is_file()]
    videos += sorted((run / "eval").glob("side_by_side*")) if (run / "eval").is_dir() else []
    if pics or videos:
        lines += ["## Pictures and videos", ""] + pics
        for v in videos:
            what = (
                "the kept controller driving in the dream (M stepping, V decoding)"
                if v.name.startswith("dream")
                else "real frame | V's reconstruction | M dreaming from the first frame, driven by the same actions"
            )
            lines.append(f"* [{v.relative_to(run)}]({v.relative_to(run)}): {what}")
        lines.append("")
    lines += [
        "## Files",
        "",
        "`config.json` (every setting), `summary.json` (every stage's figures), `rollouts/` (episodes + manifest), "
        "`vae/`, `mdn/` (trainer run folders: metrics.jsonl, TensorBoard `tb/`, model/), `latents/`, "
        "`controller/` (best.safetensors, CMA state, fitness.jsonl, every checked controller), `eval/` (per-episode "
        "CSV + JSON).",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Render and write RUN/report.md atomically; returns its path."""
    return atomic_write_text(Path(run_dir) / "report.md", render_report(run_dir))


__all__ = ["render_report", "write_report"]
