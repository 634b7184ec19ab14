"""The shared trainer on a shared CPU (issue 62, item 5): two tables, every number measured in this run.

1. Under load: `dreamlab train vae` (quick preset's model and batch of 128) in steps/s, alone and beside a second
   busy process (a pure-Python spin loop holding one core), for three thread settings:
   - torch's defaults (one OpenMP thread per core, the OpenMP runtime's default wait policy: spin, then sleep);
   - dreamlab's default (one thread per core, `OMP_WAIT_POLICY=PASSIVE`, see dreamlab/runtime.py);
   - `--set threads=1` (what the presets' docs recommended as a workaround).
2. Overhead: the shared trainer against a plain PyTorch loop of the same VAE (same batches, AdamW, one thread),
   interleaved repetitions; the plain loop with glibc's default malloc and with dreamlab's `keep_freed_memory`.

Each measurement is its own process (OpenMP reads its wait policy once, when torch loads it). The rate is timed from
the start of step `--warmup` to the start of the last step, so data loading, evaluation and pictures are left out
and everything the trainer does between steps is in.

    python bench/trainer_bench.py                          # about 5 minutes on 2 idle cores
    python bench/trainer_bench.py --steps 30 --warmup 5 --reps 2   # what docs/scale.md shows (a loaded machine)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, sys, time
mode, steps, warmup, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
import torch  # first: OpenMP reads OMP_WAIT_POLICY now (the baseline must not get dreamlab's default)
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
import dreamlab.runtime
from generators.base import TrainConfig
from generators.vae import VAE, VAEConfig
import resource
stamps, faults = [], []

class TimedVAE(VAE):
    def train_step(self, *a, **k):
        stamps.append(time.perf_counter())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        return super().train_step(*a, **k)
    def evaluate(self, split, max_items=None):
        return {}
    def write_artifacts(self, run_dir):
        return []

torch.manual_seed(0)
model = TimedVAE(VAEConfig())
if mode == "trainer":
    from generators.trainer import train
    tc = TrainConfig(steps=steps, batch_size=128, lr=1e-3, device="cpu", log_every=50, ckpt_every=10**6,
                     threads=int(os.environ.get("BENCH_THREADS", "0")))
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        train(model, tc, d + "/run", progress=False)
else:  # the plain loop: what a PyTorch user writes
    if mode == "plain+heap":
        dreamlab.runtime.keep_freed_memory()
    data = model.train_data("train")
    x = data["x"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    for i in range(steps):
        stamps.append(time.perf_counter())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        batch = {"x": x[perm[i * 128:(i + 1) * 128]]}
        loss, _ = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    stamps.append(time.perf_counter())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
rate = (len(stamps) - 1 - warmup) / (stamps[-1] - stamps[warmup])
fps = (faults[-1] - faults[warmup]) / (len(faults) - 1 - warmup)  # minor page faults per step
cpu = time.process_time()
json.dump({"rate": rate, "faults": fps, "threads": torch.get_num_threads(),
           "omp": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "cpu_s": cpu}, open(out, "w"))
'''


def measure(mode: str, steps: int, warmup: int, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
        for k in [k for k, v in env.items() if v is None]:
            full.pop(k, None)
        subprocess.run([sys.executable, "-c", CHILD, mode, str(steps), str(warmup), str(out)], env=full, check=True,
                       cwd=ROOT)
        return json.loads(out.read_text())


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


SETTINGS = {  # name -> environment of the measured process (None: removed)
    "torch defaults (2 threads, OpenMP's wait policy)": {"OMP_WAIT_POLICY": None, "BENCH_THREADS": None},
    "dreamlab default (2 threads, OMP_WAIT_POLICY=PASSIVE)": {"OMP_WAIT_POLICY": "PASSIVE", "BENCH_THREADS": None},
    "threads=1": {"OMP_WAIT_POLICY": "PASSIVE", "BENCH_THREADS": "1"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120, help="steps per measurement (default 120)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the overhead table (default 3)")
    ap.add_argument("--only", choices=["load", "overhead"], help="one table")
    args = ap.parse_args()
    t0 = time.time()
    print(f"machine: {os.cpu_count()} CPU cores; torch threads default to the core count; "
          "wall times include whatever else runs on the machine\n")
    if args.only != "overhead":
        print("| setting | alone (steps/s) | beside a busy process (steps/s) | ratio | load average |")
        print("|---|---:|---:|---:|---:|")
        for name, env in SETTINGS.items():
            alone = measure("trainer", args.steps, args.warmup, env)["rate"]
            b = busy()
            try:  # the measured process's own start-up (importing torch) gives the busy loop time to spin up
                loaded = measure("trainer", args.steps, args.warmup, env)["rate"]
            finally:
                b.kill()
                b.wait()
            print(f"| {name} | {alone:.2f} | {loaded:.2f} | {loaded / alone:.2f} | {os.getloadavg()[0]:.1f} |",
                  flush=True)
        print()
    if args.only != "load":
        rates: dict[str, list[float]] = {"trainer": [], "plain": [], "plain+heap": []}
        flts: dict[str, list[float]] = {m: [] for m in rates}
        env = {"OMP_WAIT_POLICY": "PASSIVE", "BENCH_THREADS": "1"}
        for _ in range(args.reps):
            for mode in rates:
                r = measure(mode, args.steps, args.warmup, env)
                rates[mode].append(r["rate"])
                flts[mode].append(r["faults"])
        best = {m: max(r) for m, r in rates.items()}
        print(f"load average {os.getloadavg()[0]:.1f}\n")
        print("| loop (1 thread, VAE batch 128) | steps/s, each repetition | best | trainer / this "
              "| page faults/step |")
        print("|---|---|---:|---:|---:|")
        names = {"trainer": "shared trainer (`generators.trainer.train`)", "plain": "plain PyTorch loop",
                 "plain+heap": "plain loop + keep_freed_memory()"}
        for m, r in rates.items():
            print(f"| {names[m]} | {', '.join(f'{v:.2f}' for v in r)} | {best[m]:.2f} | "
                  f"{best['trainer'] / best[m]:.2f} | {sum(flts[m]) / len(flts[m]):,.0f} |")
    print(f"\n({time.time() - t0:.0f} s wall)")


if __name__ == "__main__":
    main()
