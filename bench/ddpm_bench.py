"""DDPM speed: training steps/s through dreamlab's trainer beside a plain PyTorch loop with the same UNet, and
sampling images/s per sampler and step count beside diffusers' own DDIMPipeline / DDPMPipeline.

    python bench/ddpm_bench.py [--preset quick] [--steps 30] [--reps 3] [--n 16] [--device auto] [--threads 1]

Training: `generators.trainer.train` (data batching, the train step, the EMA update, metric accumulation, logging)
on the preset's model, against a hand-written loop over the same tensors with the same diffusers UNet2DModel,
AdamW, DDPMScheduler.add_noise, MSE, gradient clipping and torch EMA update. Each rate is ΔN / Δt between a short
and a long run (so start-up, the final save and the data loading cancel out), median over --reps alternating
repetitions; wall-clock and CPU-time ratios are both printed (CPU time is the fairer one on a loaded machine).
Sampling: `DDPM.sample` against diffusers' pipelines on the same UNet and scheduler, same batch, same seed.
Weights are random (speed does not depend on them). Prints markdown tables.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _timed(fn) -> tuple[float, float]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--steps", type=int, default=30, help="steps of the long run (the short one is a fifth)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=16, help="images per sampling measurement")
    ap.add_argument("--sample-steps", default="10,20,50,100,250", help="DDIM step counts")
    ap.add_argument("--ddpm-steps", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from dreamlab.config import apply_overrides
    from dreamlab.device import resolve_device, seeded
    from generators.base import TrainConfig, get_model_class, split_overrides
    from generators.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cls = get_model_class("ddpm")
    mo, to = split_overrides(cls, cls.presets[args.preset])
    mo = {**mo, "eval_samples": 0, "eval_bound_items": 0}
    long_n, short_n = args.steps, max(1, args.steps // 5)
    tc0 = apply_overrides(TrainConfig(), to)

    def make():
        with seeded(0):
            return cls(apply_overrides(cls.config_class(), mo)).to(dev)

    probe = make()
    data = probe.train_data("train")
    c = probe.config
    print(f"device={dev} threads={torch.get_num_threads()} preset={args.preset} image={c.image_size}px "
          f"unet={sum(p.numel() for p in probe.unet.parameters()) / 1e6:.2f}M params batch={tc0.batch_size} "
          f"load={os.getloadavg()[0]:.1f}")

    def ours(n: int) -> tuple[float, float]:
        m = make()
        m.evaluate = lambda *a, **k: {}          # the bench times training, not the end-of-run evaluation
        m.write_artifacts = lambda *a, **k: []   # nor the pictures
        tc = apply_overrides(TrainConfig(), {**to, "steps": n, "device": str(dev), "log_every": max(n, 1),
                                             "ckpt_every": 10**6, "threads": args.threads})
        with tempfile.TemporaryDirectory() as d:
            return _timed(lambda: train(m, tc, Path(d) / "run", progress=False))

    def plain(n: int) -> tuple[float, float]:
        m = make()
        unet, sched = m.unet, m.noise_scheduler
        ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay), use_buffers=True)
        opt = torch.optim.AdamW(unet.parameters(), lr=tc0.lr, betas=tuple(tc0.betas), weight_decay=tc0.weight_decay)
        x_all = data["x"]
        bs = tc0.batch_size
        g = torch.Generator().manual_seed(0)

        def loop() -> None:
            perm = torch.randperm(len(x_all), generator=g)
            for i in range(n):
                x0 = x_all[perm[i * bs:(i + 1) * bs]].to(dev) * 2 - 1
                t = torch.randint(0, c.num_train_timesteps, (len(x0),), device=dev)
                noise = torch.randn_like(x0)
                loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample.float(), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc0.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), tc0.grad_clip)
                opt.step()
                ema.update_parameters(unet)
            float(loss.detach())

        return _timed(loop)

    rates: dict[str, list[tuple[float, float]]] = {"dreamlab trainer": [], "plain loop": []}
    for _ in range(args.reps):
        for name, fn in (("dreamlab trainer", ours), ("plain loop", plain)):
            (w1, c1), (w2, c2) = fn(short_n), fn(long_n)
            rates[name].append(((long_n - short_n) / max(w2 - w1, 1e-9), (long_n - short_n) / max(c2 - c1, 1e-9)))
    print(f"\n### training ({short_n} vs {long_n} steps, median of {args.reps}, load {os.getloadavg()[0]:.1f})\n")
    print("| loop | steps/s (wall) | steps/s (CPU time) | images/s (wall) | ratio wall | ratio CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rates.items()}
    base = med["plain loop"]
    for k, (w, cpu) in med.items():
        print(f"| {k} | {w:.3f} | {cpu:.3f} | {w * tc0.batch_size:.1f} | {w / base[0]:.2f} | {cpu / base[1]:.2f} |")

    # ---- sampling
    from diffusers import DDIMPipeline, DDPMPipeline

    from generators.diffusion import make_scheduler

    m = make().eval()
    counts = [("ddim", int(s)) for s in args.sample_steps.split(",") if s] + [("ddpm", args.ddpm_steps)]
    print(f"\n### sampling ({args.n} images per call, load {os.getloadavg()[0]:.1f})\n")
    print("| sampler | steps | images/s (dreamlab) | images/s (diffusers pipeline) | ratio | UNet evals/s |")
    print("|---|---:|---:|---:|---:|---:|")
    m.sample(2, num_inference_steps=2)  # warm-up
    for kind, k in counts:
        w_ours, _ = _timed(functools.partial(m.sample, args.n, generator=torch.Generator().manual_seed(0),
                                             scheduler=kind, num_inference_steps=k))
        sched = make_scheduler(kind, c.schedule, c.num_train_timesteps, c.clip_sample)
        pipe = (DDIMPipeline if kind == "ddim" else DDPMPipeline)(unet=m.ema.module, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        extra = {"eta": 0.0} if kind == "ddim" else {}
        w_ref, _ = _timed(functools.partial(pipe, batch_size=args.n, num_inference_steps=k, output_type="np",
                                            generator=torch.Generator(device=dev).manual_seed(0), **extra))
        print(f"| {kind.upper()} | {k} | {args.n / w_ours:.2f} | {args.n / w_ref:.2f} | {w_ref / w_ours:.2f} | "
              f"{args.n * k / w_ours:.0f} |")


if __name__ == "__main__":
    main()
