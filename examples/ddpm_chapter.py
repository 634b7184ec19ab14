"""The DDPM chapter's analysis (book ch. 8), measured on the procedural flowers.

    python examples/ddpm_chapter.py --out runs/ddpm-chapter [--n 500] [--docs docs/images]

1. trains `ddpm --preset quick` once per noise schedule (linear, cosine, offset_cosine: same seed, same steps, same
   data) into OUT/<schedule>; a finished run is kept, an interrupted one resumed;
2. draws n samples from each run with DDIM 50 steps, and from the book's schedule (offset_cosine) with DDIM 10, 20,
   50, 100 and 250 steps and with DDPM's 1000 ancestral steps, all from the same seeded initial noises, into
   OUT/samples/<schedule>_<sampler><steps>.safetensors (uint8) with the seconds each took (OUT/samples/timings.json);
3. measures each set's Fréchet distance to the flowers test split on the flowers feature network
   (`generators.features`), beside the floor (n training images at the model's resolution vs the same test split),
   and writes OUT/table.md and labelled sample grids (one row per setting, the same noises in every row) into --docs.

Every stage skips what is already on disk, so the script can be stopped and run again. One process, one thread
(`threads=1`), as dreamlab's shared 2-core machine asks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEDULES = ("linear", "cosine", "offset_cosine")
BOOK = "offset_cosine"
DDIM_STEPS = (10, 20, 50, 100, 250)


def settings(schedules: tuple[str, ...] = SCHEDULES, sweep: str | None = BOOK) -> list[tuple[str, str, int]]:
    """(schedule, sampler, steps) of every sample set in the order they are drawn: the schedule comparison (DDIM 50),
    then the sampler sweep on the `sweep` schedule's run, DDIM up to 100 steps, DDPM's 1000 (the reference) and DDIM
    250 last (so a run stopped early on a busy machine leaves the most telling rows measured). `sweep=None`: the
    schedule comparison alone."""
    out = [(s, "ddim", 50) for s in schedules]
    if sweep is None:
        return out
    out += [(sweep, "ddim", k) for k in DDIM_STEPS if k <= 100 and (sweep, "ddim", k) not in out]
    return out + [(sweep, "ddpm", 1000)] + [(sweep, "ddim", k) for k in DDIM_STEPS if k > 100]


def table_order(todo: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The schedule comparison's rows (DDIM 50) first when there are several, then the sweep: DDIM by step count,
    then DDPM."""
    head = [r for r in todo if r[1:] == ("ddim", 50)]
    head = head if len(head) > 1 else []
    return head + sorted((r for r in todo if r not in head), key=lambda r: (r[1] != "ddim", r[2]))


def train_all(out: Path, steps: int | None, schedules: tuple[str, ...]) -> None:
    from generators.trainer import train_from_name

    for s in schedules:
        run = out / s
        if (run / "model" / "model.safetensors").exists():
            print(f"[train] {run}: done")
            continue
        resume = (run / "checkpoint" / "state.json").exists()
        over = {"schedule": s, "threads": 1, **({"steps": steps} if steps else {})}
        print(f"[train] {run}: {'resuming' if resume else 'training'} ddpm --preset quick {over}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        _, res, _ = train_from_name("ddpm", preset="quick", overrides=over, out=run, resume=resume)
        print(f"[train] {run}: {res} in {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)


def sample_all(out: Path, n: int, todo: list[tuple[str, str, int]]) -> None:
    import torch

    from dreamlab.io import load_json, save_json, save_tensors
    from generators.trainer import load_run

    torch.set_num_threads(1)
    d = out / "samples"
    d.mkdir(parents=True, exist_ok=True)
    tpath = d / "timings.json"
    timings = load_json(tpath) if tpath.exists() else {}
    for s, sampler, k in todo:
        name = f"{s}_{sampler}{k}"
        f = d / f"{name}.safetensors"
        if f.exists() and name in timings and timings[name]["n"] >= n:
            print(f"[sample] {name}: done")
            continue
        model = load_run(out / s, device="cpu")
        print(f"[sample] {name}: {n} samples", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        x = model.sample_many(n, seed=0, batch=250, progress=True, scheduler=sampler, num_inference_steps=k)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        save_tensors(f, {"samples": (x * 255).round().to(torch.uint8)})
        timings[name] = {"n": n, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load": os.getloadavg()[0]}
        save_json(tpath, timings)
        print(f"[sample] {name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)


def measure(out: Path, n: int, docs: Path | None, todo: list[tuple[str, str, int]], sweep: str | None) -> str:
    """The table (OUT/table.md, or OUT/table_schedules.md for the schedule comparison alone: `sweep=None`) of every
    sample set on disk among `todo`, and the grids."""
    from dreamlab.io import atomic_write_text, load_json, load_tensors
    from generators.diffusion import labelled_grid
    from generators.features import frechet_distance, reference_images
    from generators.trainer import load_run

    d = out / "samples"
    timings = load_json(d / "timings.json")
    have = [(s, p, k) for s, p, k in table_order(todo) if (d / f"{s}_{p}{k}.safetensors").exists()
            and timings.get(f"{s}_{p}{k}", {}).get("n", 0) >= n]
    if not have:
        raise SystemExit(f"no sample set of {n} images under {d}: run --stage sample first")
    sets = {f"{s}_{p}{k}": load_tensors(d / f"{s}_{p}{k}.safetensors")["samples"][:n].float() / 255
            for s, p, k in have}
    size = next(iter(sets.values())).shape[-1]
    ref = sweep or have[0][0]  # the run whose data gives the floor and the reference rows (all share the data)
    floor = load_run(out / ref, device="cpu").fd_floor(n)  # n random training images at the model's size
    evals = {s: load_json(out / s / "eval.json") for s, _, _ in have}
    steps = load_json(out / ref / "config.json")["train"]["steps"]
    n_ref = len(reference_images("flowers", "test"))
    lines = [f"Flowers at {size}x{size}, `ddpm --preset quick` ({steps} steps of batch 32, EMA 0.999 after warm-up), "
             f"{n} samples per row, the same seeded initial noises in every row; Fréchet distance to the {n_ref} "
             "flowers test images of the train split's combinations on the flowers feature network "
             f"(`generators.features`, lower is better). Floor: {n} random training images at {size}x{size} vs the "
             f"same test images = **{floor:.3f}**. The bound is `test_nll_bound_bpd` of each run's eval.json.", "",
             "| schedule | sampler | steps | Fréchet distance | × floor | bound (bits/dim) | CPU s per image |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s, p, k in have:
        name = f"{s}_{p}{k}"
        fd = frechet_distance("flowers", sets[name])
        t = timings[name]
        bpd = evals[s].get("test_nll_bound_bpd")
        shown = f"{bpd:.3f}" if bpd is not None and (p, k) == ("ddim", 50) else ""  # one bound per trained run
        lines.append(f"| {s} | {p.upper()} | {k} | {fd:.3f} | {fd / floor:.1f} | {shown} | {t['cpu_s'] / t['n']:.3f} |")
    lines += ["", *references(load_run(out / ref, device="cpu"), n)]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / ("table.md" if sweep else "table_schedules.md"), table)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        k = 16
        rows = [s for s, p, k_ in have if (p, k_) == ("ddim", 50)]
        if len(rows) > 1:
            labelled_grid([sets[f"{s}_ddim50"][:k] for s in rows], docs / "ddpm_schedules.png", row_labels=rows,
                          title=f"DDIM 50 steps, the same noises; {steps} training steps per schedule")
        names = [(f"{sweep}_{p}{k_}", f"{p.upper()} {k_}") for s, p, k_ in have if sweep and s == sweep]
        if names:
            labelled_grid([sets[m][:k] for m, _ in names], docs / "ddpm_samplers.png",
                          row_labels=[lab for _, lab in names],
                          title=f"{sweep} schedule: the same initial noises through each sampler")
    return table


def references(model, n: int) -> list[str]:
    """The scale to read the table against, at the same n and size: n training images (the floor), the same images
    with N(0, σ²) pixel noise (the grain a short-trained sampler leaves), blurred (σ = width/16) and uniform noise."""
    import torch

    from generators.features import frechet_distance, gaussian_blur

    x = model.train_data("train")["x"]
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]
    g = torch.Generator().manual_seed(1)
    rows = [("training images (the floor)", x)]
    rows += [(f"training images + N(0, {s}²) pixel noise", (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1))
             for s in (0.02, 0.05, 0.1)]
    rows += [("training images blurred (σ = width/16)", gaussian_blur(x, x.shape[-1] / 16).clamp(0, 1)),
             ("uniform noise", torch.rand(x.shape, generator=g))]
    out = ["| reference set (same n, same size) | Fréchet distance |", "|---|---:|"]
    return out + [f"| {name} | {frechet_distance('flowers', imgs):.3f} |" for name, imgs in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ddpm-chapter"))
    ap.add_argument("--n", type=int, default=500, help="samples per setting (default 500)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per schedule (default: the quick preset's)")
    ap.add_argument("--docs", type=Path, default=None, help="also write the sample grids into this folder")
    ap.add_argument("--stage", choices=["train", "sample", "measure", "all"], default="all")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="schedules to train and compare (default all)")
    ap.add_argument("--sweep", default=BOOK, help="the schedule whose run the sampler sweep uses (default the book's)")
    ap.add_argument("--no-sweep", action="store_true", help="the schedule comparison (DDIM 50) alone, no sampler sweep")
    args = ap.parse_args(argv)
    schedules = tuple(s for s in args.schedules.split(",") if s)
    bad = [s for s in (*schedules, args.sweep) if s not in SCHEDULES]
    if bad:
        ap.error(f"unknown schedule {bad[0]!r}; choose from {', '.join(SCHEDULES)}")
    sweep = None if args.no_sweep else args.sweep
    todo = settings(schedules, sweep)
    if args.stage in ("train", "all"):
        train_all(args.out, args.steps or None, tuple(dict.fromkeys((*schedules, *([sweep] if sweep else [])))))
    if args.stage in ("sample", "all"):
        sample_all(args.out, args.n, todo)
    if args.stage in ("measure", "all"):
        print(measure(args.out, args.n, args.docs, todo, sweep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
