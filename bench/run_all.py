"""Every benchmark in bench/, one after another, each printing its own table (`make bench`).

    python bench/run_all.py                 # every script in BENCHES below
    python bench/run_all.py --only envs wm  # a subset
    python bench/run_all.py --quick         # fewer repetitions (a smoke run, not figures to quote)

Each script is run as its own process (so one's threads and imports do not disturb the next) with the repo on
PYTHONPATH; their markdown tables go to stdout and, with `--out FILE`, into one file. fid_fmnist needs trained
run folders (`dreamlab train vae --preset quick --out runs/vae-quick` and the autoencoder's); it is skipped, with a
note saying so, when none exists. Figures worth keeping go into bench/RESULTS.md by hand, with the machine's name.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dreamlab.io import atomic_write_text  # noqa: E402

BENCHES = {
    "envs": "bench/envs_bench.py",
    "wm": "bench/worldmodel_bench.py",
    "t2i": "bench/text2img_bench.py",
    "fid": "bench/fid_fmnist.py",
    "scale": "bench/scale_bench.py",
    "text": "bench/text_bench.py",
    "trainer": "bench/trainer_bench.py",
    "likelihood": "bench/likelihood_bench.py",
    "ddpm": "bench/ddpm_bench.py",
}
QUICK = {  # smoke sizes: the scripts' own defaults are the figures' sizes
    "envs": ["--reps", "1", "--steps", "60", "--vec-steps", "30", "--vec-reps", "1"],
    "wm": ["--steps", "60", "--workers", "1"],
    "t2i": ["--n", "2", "--steps", "2"],
    "fid": [],
    "scale": ["--reps", "1", "--max-steps", "100", "--episodes-per-worker", "2", "--policy", "brownian"],
    "text": ["--steps", "3", "--reps", "1"],
    "trainer": ["--steps", "30", "--warmup", "5", "--reps", "1"],
    "likelihood": ["--steps", "2", "--reps", "1", "--sample-n", "2", "--ebm-steps", "2"],
    "ddpm": ["--preset", "tiny", "--steps", "5", "--reps", "1", "--n", "2", "--sample-steps", "2", "--ddpm-steps", "5"],
}
FID_RUNS = ["runs/vae-quick", "runs/autoencoder-quick"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES), help="benchmarks to run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the scripts run (not for RESULTS.md)")
    ap.add_argument("--out", type=Path, default=None, help="also write every table into this file")
    args = ap.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("SDL_VIDEODRIVER", "dummy")
    env.setdefault("MPLBACKEND", "Agg")
    report: list[str] = []
    failed: list[str] = []
    for name in args.only:
        cmd = [sys.executable, BENCHES[name], *(QUICK[name] if args.quick else [])]
        if name == "fid":
            runs = [r for r in FID_RUNS if (ROOT / r).is_dir()]
            if not runs:
                note = (f"fid: skipped, no run folder among {FID_RUNS} "
                        "(train them with `dreamlab train vae --preset quick`)")
                print(note, flush=True)
                report.append(note)
                continue
            cmd += runs
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        took = time.perf_counter() - t0
        print(proc.stdout, end="", flush=True)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"== {name}: {status} in {took:.0f} s\n", flush=True)
        report.append(f"## {name} ({' '.join(cmd[1:])}; {status}, {took:.0f} s)\n\n{proc.stdout}")
        if proc.returncode != 0:
            failed.append(name)
    if args.out is not None:
        atomic_write_text(args.out, "\n".join(report))
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
