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


def settings() -> list[tuple[str, str, int]]:
    """(schedule, sampler, steps) of every sample set, the schedule comparison first."""
    out = [(s, "ddim", 50) for s in SCHEDULES]
    out += [(BOOK, "ddim", k) for k in DDIM_STEPS if k != 50]
    return out + [(BOOK, "ddpm", 1000)]


def train_all(out: Path, steps: int | None) -> None:
    from generators.trainer import train_from_name

    for s in SCHEDULES:
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


def sample_all(out: Path, n: int) -> None:
    import torch

    from dreamlab.io import load_json, save_json, save_tensors
    from generators.trainer import load_run

    torch.set_num_threads(1)
    d = out / "samples"
    d.mkdir(parents=True, exist_ok=True)
    tpath = d / "timings.json"
    timings = load_json(tpath) if tpath.exists() else {}
    for s, sampler, k in settings():
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


def measure(out: Path, n: int, docs: Path | None) -> str:
    from dreamlab.io import atomic_write_text, load_json, load_tensors
    from generators.diffusion import labelled_grid
    from generators.features import frechet_distance, reference_images
    from generators.trainer import load_run

    d = out / "samples"
    timings = load_json(d / "timings.json")
    sets = {name: load_tensors(d / f"{name}.safetensors")["samples"][:n].float() / 255
            for name in (f"{s}_{p}{k}" for s, p, k in settings())}
    size = next(iter(sets.values())).shape[-1]
    floor = load_run(out / BOOK, device="cpu").fd_floor(n)  # n random training images at the model's size
    evals = {s: load_json(out / s / "eval.json") for s in SCHEDULES}
    steps = load_json(out / BOOK / "config.json")["train"]["steps"]
    n_ref = len(reference_images("flowers", "test"))
    lines = [f"Flowers at {size}x{size}, `ddpm --preset quick` ({steps} steps of batch 32, EMA 0.999 after warm-up), "
             f"{n} samples per row, the same seeded initial noises in every row; Fréchet distance to the {n_ref} "
             "flowers test images of the train split's combinations on the flowers feature network "
             f"(`generators.features`, lower is better). Floor: {n} random training images at {size}x{size} vs the "
             f"same test images = **{floor:.3f}**. The bound is `test_nll_bound_bpd` of each run's eval.json.", "",
             "| schedule | sampler | steps | Fréchet distance | × floor | bound (bits/dim) | CPU s per image |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s, p, k in settings():
        name = f"{s}_{p}{k}"
        fd = frechet_distance("flowers", sets[name])
        t = timings[name]
        bpd = evals[s].get("test_nll_bound_bpd")
        shown = f"{bpd:.3f}" if bpd is not None and (p, k) == ("ddim", 50) else ""  # one bound per trained run
        lines.append(f"| {s} | {p.upper()} | {k} | {fd:.3f} | {fd / floor:.1f} | {shown} | {t['cpu_s'] / t['n']:.3f} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", table)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        k = 16
        rows = [sets[f"{s}_ddim50"][:k] for s in SCHEDULES]
        labelled_grid(rows, docs / "ddpm_schedules.png", row_labels=list(SCHEDULES),
                      title=f"DDIM 50 steps, the same noises; {steps} training steps per schedule")
        names = [f"{BOOK}_ddim{k_}" for k_ in DDIM_STEPS] + [f"{BOOK}_ddpm1000"]
        labelled_grid([sets[m][:k] for m in names], docs / "ddpm_samplers.png",
                      row_labels=[f"DDIM {k_}" for k_ in DDIM_STEPS] + ["DDPM 1000"],
                      title="offset-cosine schedule: the same initial noises through each sampler")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ddpm-chapter"))
    ap.add_argument("--n", type=int, default=500, help="samples per setting (default 500)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per schedule (default: the quick preset's)")
    ap.add_argument("--docs", type=Path, default=None, help="also write the sample grids into this folder")
    ap.add_argument("--stage", choices=["train", "sample", "measure", "all"], default="all")
    args = ap.parse_args(argv)
    if args.stage in ("train", "all"):
        train_all(args.out, args.steps or None)
    if args.stage in ("sample", "all"):
        sample_all(args.out, args.n)
    if args.stage in ("measure", "all"):
        print(measure(args.out, args.n, args.docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
