"""World Models throughput beside the reference scripts in ../shared/bench, measured in one call.

    python bench/worldmodel_bench.py [--steps 400] [--episodes-per-worker 3] [--workers 1,2] [--skip-collect]

(DREAMLAB_REF_BENCH=DIR points at a copy of the reference scripts, e.g. on a machine without ../shared.)

Rows (ours | reference | ratio ours/ref):
  collector env-steps/s at W workers  (worlds.collect, episode files written)   vs carracing_bench.py (steps only)
      both sides step K x steps per worker, start-up included (spawn, imports, env creation): with K = 1 the
      fixed cost of a worker (importing torch, ~1.5 s) is not amortised and dominates short runs
  V training images/s                  (WorldVAE.loss on uint8 frames, paper width 32)  vs wm_core_bench.py VAE
  M training steps/s                   (MDNRNN.loss, LSTM 256, 5 mixtures)               vs wm_core_bench.py MDN-RNN
  dream steps/s, P64 x R16             (DreamSimulator: controller + LSTM + mixture draw + reward/done)
                                       vs wm_core_bench.py dream
On CUDA the same sizes as the reference's GPU rows are used (bf16 autocast, CUDA-graph dream, T=1000).
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
REF = ROOT.parent / "shared" / "bench"
sys.path.insert(0, str(ROOT))


def _ref(script: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(os.environ.get("DREAMLAB_REF_BENCH", REF)) / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "SDL_VIDEODRIVER": "dummy"},
        timeout=3600,
    )
    if out.returncode != 0:
        raise SystemExit(f"reference {script} failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timeit(fn, n: int, dev, warm: int = 2) -> float:
    import torch

    for _ in range(warm):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def ours_vae(dev, bs: int, amp: bool) -> float:
    import torch

    from dreamlab.device import autocast
    from worlds.models import WorldVAE, WorldVAEConfig

    m = WorldVAE(WorldVAEConfig(width=32)).to(dev)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.randint(0, 256, (bs, 3, 64, 64), dtype=torch.uint8, device=dev)

    def step() -> None:
        with autocast(dev, amp):
            loss, _ = m.loss({"x": x})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return bs / _timeit(step, 20 if dev.type == "cuda" else 3, dev)


def ours_mdn(dev, bs: int, t: int, amp: bool) -> float:
    import torch

    from dreamlab.device import autocast
    from worlds.models import MDNRNN, MDNRNNConfig

    m = MDNRNN(MDNRNNConfig(hidden=256, mixtures=5, seq_len=t)).to(dev)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    b = {
        "x": torch.randn(bs, t + 1, 35, device=dev).half(),
        "logvar": torch.full((bs, t + 1, 32), -2.0, device=dev).half(),
        "reward": torch.randn(bs, t, device=dev),
        "done": torch.zeros(bs, t, device=dev),
        "mask": torch.ones(bs, t, device=dev),
    }

    def step() -> None:
        with autocast(dev, amp):
            loss, _ = m.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return bs * t / _timeit(step, 10 if dev.type == "cuda" else 2, dev)


def ours_dream(dev, p: int, r: int, t: int, graph: bool, amp: bool = True) -> float:
    import torch

    from worlds.dream import DreamConfig, DreamSimulator
    from worlds.models import MDNRNN, MDNRNNConfig

    torch.manual_seed(0)
    mdn = MDNRNN(MDNRNNConfig(hidden=256, mixtures=5)).to(dev).eval()
    with torch.no_grad():
        mdn.head.bias[-1] = -20.0  # never done: every dream runs the full horizon, as in the reference
    sim = DreamSimulator(mdn, torch.randn(64, 32), torch.full((64, 32), -2.0), DreamConfig(horizon=t),
                         cuda_graph=graph, amp=amp)
    thetas = torch.randn(p, sim.n_params, device=dev) * 0.1
    sim.rollout(thetas, r, seed=0, horizon=5)  # warm-up (captures the graph on CUDA)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sim.rollout(thetas, r, seed=1, horizon=t)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return sec


def ours_collect(workers: int, steps: int, env_id: str, per_worker: int = 1) -> float:
    from envs import register_all
    from worlds.collect import CollectConfig, collect

    with tempfile.TemporaryDirectory() as d:
        res = collect(CollectConfig(episodes=workers * per_worker, max_steps=steps, env_id=env_id), d, workers=workers,
                      progress=False, env_setup=register_all)
    return res["env_steps_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="env steps per worker for the collector rows")
    ap.add_argument("--episodes-per-worker", type=int, default=3,
                    help="episodes each collector worker runs (the reference steps as many env steps in one loop)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--skip-collect", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    name = (
        torch.cuda.get_device_name()
        if dev.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    )
    rows: list[tuple[str, float, float | None]] = []

    def add(k: str, ours: float, refv: float | None) -> None:  # printed as measured: a cut-off run keeps its rows
        rows.append((k, ours, refv))
        print(f"row: {k}: ours {ours:.4g}, reference {refv if refv is None else f'{refv:.4g}'}", flush=True)

    if not args.skip_collect:
        ws = [int(w) for w in args.workers.split(",")]
        k = args.episodes_per_worker
        if k < 1 or args.steps < 1:
            raise SystemExit(f"--episodes-per-worker ({k}) and --steps ({args.steps}) must be at least 1")
        ref = _ref("carracing_bench.py", str(args.steps * k), args.workers)
        for w in ws:
            add(
                f"collect CarRacing-v3 env-steps/s, {w} workers x {k} episodes",
                ours_collect(w, args.steps, "CarRacing-v3", k),
                ref[str(w)]["total_steps_per_s"],
            )
        for w in ws:
            add(f"collect dreamlab/CarRacing64-v3 env-steps/s, {w} workers x {k} episodes",
                ours_collect(w, args.steps, "dreamlab/CarRacing64-v3", k), ref[str(w)]["total_steps_per_s"])
    ref = _ref("wm_core_bench.py")
    big = dev.type == "cuda"
    for bs, amp in ([(256, False), (256, True), (1024, True)] if big else [(64, False)]):
        add(
            f"V train images/s bs{bs} amp{int(amp)}",
            ours_vae(dev, bs, amp),
            ref.get(f"vae_img_per_s bs{bs} amp{int(amp)}"),
        )
    for bs, t, amp in ([(100, 999, False), (100, 999, True), (512, 999, True)] if big else [(16, 200, False)]):
        add(
            f"M train steps/s bs{bs} T{t} amp{int(amp)}",
            ours_mdn(dev, bs, t, amp),
            ref.get(f"mdnrnn_steps_per_s bs{bs} T{t} amp{int(amp)}"),
        )
    t = 1000 if big else 100
    # on CUDA the dream runs with and without bf16 autocast (DreamSimulator(amp=...)); the reference is fp32 (TF32 on)
    dreams = [
        (64, 16, False, True),
        (64, 16, True, True),
        (64, 16, True, False),
        (1024, 16, True, True),
        (1024, 16, True, False),
    ]
    for p, r, graph, amp in (dreams if big else [(64, 16, False, False)]):
        sec = ours_dream(dev, p, r, t, graph, amp)
        tag = f" amp{int(amp)}" if big else ""
        rk = f"dream P{p}xR{r} T{t} graph{int(graph)} sec"
        add(f"dream P{p}xR{r} T{t} graph{int(graph)}{tag} seconds (lower is better)", sec, ref.get(rk))
        add(f"dream P{p}xR{r} graph{int(graph)}{tag} dream-steps/s", p * r * t / sec,
            ref.get(f"dream P{p}xR{r} graph{int(graph)} dream_steps_per_s"))
    print(f"device: {name}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"| {'measure':<62} | {'ours':>12} | {'reference':>12} | {'ours/ref':>8} |")
    print(f"|{'-' * 64}|{'-' * 14}|{'-' * 14}|{'-' * 10}|")
    for k, ours, refv in rows:
        ratio = f"{ours / refv:.2f}" if refv else "-"
        print(f"| {k:<62} | {ours:12.2f} | {(refv if refv is not None else float('nan')):12.2f} | {ratio:>8} |")
    print(json.dumps({k: [o, r] for k, o, r in rows}))


if __name__ == "__main__":
    main()
