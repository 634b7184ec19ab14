"""GAN training speed: each model through dreamlab's trainer beside a plain PyTorch loop of the same nets.

    python bench/gan_bench.py                          # every GAN, quick-preset nets, CPU, one thread
    python bench/gan_bench.py --device cuda --threads 0 # on a GPU (bf16 autocast on both sides)
    python bench/gan_bench.py --models dcgan stylegan2 --steps 8 --rounds 1

dreamlab side: `generators.trainer.train` itself (batches, `train_step`, the step hook, metric sums, log lines),
with progress frames, the final evaluation and pictures switched off; a step's time is the gap between two calls
of the trainer's step hook. Plain side: the same `G`/`D` modules (same initial weights), batches drawn by
`randperm` from the same tensors, the same losses written inline, Adam. Both run `--rounds` times, alternating,
after `--warmup` steps; the table gives the median step of the better round of each side, as steps per second of
wall time and per CPU-second of this process (the per-core rate, which other jobs on a shared machine disturb far
less than the wall clock). Ratio = dreamlab / plain: the goal is >= 0.9.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreamlab.device import autocast, resolve_device  # noqa: E402
from generators.base import TrainConfig, get_model_class, make_model, split_overrides  # noqa: E402
from generators.gan import ema_beta, ema_update  # noqa: E402
from generators.trainer import train  # noqa: E402

MODELS = ["dcgan", "wgan_gp", "cgan", "progan", "stylegan2"]


def build(name: str, device: torch.device, amp: bool, steps: int, batch: int | None):
    cls = get_model_class(name)
    over = {**cls.presets["quick"], "snapshots": 0}
    if name == "progan":
        over["phase_steps"] = 1  # at the final 64x64 level after 6 steps, like the plain loop
    if batch:
        over["batch_size"] = batch
    mo, to = split_overrides(cls, over)
    torch.manual_seed(0)
    model = make_model(name, **mo)
    tc = TrainConfig(**{**to, "device": str(device), "amp": amp, "steps": steps, "log_every": steps,
                        "ckpt_every": steps})
    return model, tc


# ----------------------------------------------------------------------------- plain loops


def gp_inline(critic, real, fake):
    a = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x = (a * real + (1 - a) * fake).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return (torch.sqrt(g.float().flatten(1).pow(2).sum(1) + 1e-12) - 1).pow(2).mean()


def plain_step_fn(name: str, m, tc: TrainConfig):
    """A step written as a plain PyTorch loop would, on m.G / m.D (and m.G_ema), with its own Adam optimisers."""
    cfg, dev = m.config, m.device
    G, D = m.G, m.D
    if name == "stylegan2":
        c = cfg.r1_every / (cfg.r1_every + 1)
        og = torch.optim.Adam(G.parameters(), lr=tc.lr, betas=tuple(tc.betas))
        od = torch.optim.Adam(D.parameters(), lr=tc.lr * c, betas=(tc.betas[0] ** c, tc.betas[1] ** c))
    else:
        og = torch.optim.Adam(G.parameters(), lr=tc.lr, betas=tuple(tc.betas))
        od = torch.optim.Adam(D.parameters(), lr=tc.lr, betas=tuple(tc.betas))
    amp = lambda: autocast(dev, tc.amp)  # noqa: E731

    def to_net(x):
        x = x * 2 - 1
        p = (m.size - m.image_size) // 2
        return F.pad(x, (p,) * 4, value=-1.0) if p else x

    if name == "dcgan":
        def step(b, i):
            real = to_net(b["x"])
            z = torch.randn(len(real), cfg.z_dim, device=dev)
            with amp():
                fake = G(z)
                dr, df = D(real).float(), D(fake.detach()).float()
                ld = (F.binary_cross_entropy_with_logits(dr, torch.full_like(dr, cfg.real_label))
                      + F.binary_cross_entropy_with_logits(df, torch.zeros_like(df)))
            od.zero_grad()
            ld.backward()
            od.step()
            with amp():
                go = D(fake).float()
                lg = F.binary_cross_entropy_with_logits(go, torch.ones_like(go))
            og.zero_grad()
            lg.backward()
            og.step()
        return step

    if name in ("wgan_gp", "cgan"):
        from generators.gan import one_hot

        def with_labels(b):
            if name == "wgan_gp":
                return (lambda z: G(z)), (lambda x: D(x))
            oh = one_hot(torch.stack([b[k] for k in m.label_keys], 1), m.label_sizes).to(dev)

            def gen(z):
                return G(torch.cat([z, oh], 1))

            def crit(x):
                return D(torch.cat([x, oh[:, :, None, None].expand(-1, -1, *x.shape[-2:])], 1))
            return gen, crit

        def step(b, i):
            real = to_net(b["x"])
            gen, crit = with_labels(b)
            for _ in range(cfg.n_critic):
                with amp():
                    with torch.no_grad():
                        fake = gen(torch.randn(len(real), cfg.z_dim, device=dev))
                    gp = gp_inline(crit, real, fake)
                    ld = crit(fake).float().mean() - crit(real).float().mean() + cfg.gp_weight * gp
                od.zero_grad()
                ld.backward()
                od.step()
            with amp():
                lg = -crit(gen(torch.randn(len(real), cfg.z_dim, device=dev))).float().mean()
            og.zero_grad()
            lg.backward()
            og.step()
        return step

    if name == "progan":
        lv = m.levels - 1

        def step(b, i):
            real = to_net(b["x"])
            with amp():
                with torch.no_grad():
                    fake = G(torch.randn(len(real), cfg.z_dim, device=dev), lv, 1.0)
                dr = D(real, lv, 1.0).float()
                ld = (D(fake, lv, 1.0).float().mean() - dr.mean() + cfg.drift * dr.pow(2).mean()
                      + cfg.gp_weight * gp_inline(lambda x: D(x, lv, 1.0), real, fake))
            od.zero_grad()
            ld.backward()
            od.step()
            with amp():
                lg = -D(G(torch.randn(len(real), cfg.z_dim, device=dev), lv, 1.0), lv, 1.0).float().mean()
            og.zero_grad()
            lg.backward()
            og.step()
            ema_update(m.G_ema, G, ema_beta(len(real), (i + 1) * len(real), cfg.ema_kimg))
        return step

    if name == "stylegan2":
        nws = G.num_ws

        def ws(n):
            w = G.mapping(torch.randn(n, cfg.z_dim, device=dev))
            w2 = G.mapping(torch.randn(n, cfg.z_dim, device=dev))
            cut = torch.randint(1, nws, (n, 1), device=dev)
            cut = torch.where(torch.rand(n, 1, device=dev) < cfg.style_mixing, cut, torch.full_like(cut, nws))
            with torch.no_grad():
                G.w_avg.lerp_(w.detach().float().mean(0), 1 - cfg.w_avg_beta)
            return torch.where((torch.arange(nws, device=dev)[None] < cut)[:, :, None], w[:, None], w2[:, None])

        def step(b, i):
            real = to_net(b["x"])
            with amp():
                with torch.no_grad():
                    fake = G.synthesize(ws(len(real)))
                ld = F.softplus(D(fake).float()).mean() + F.softplus(-D(real).float()).mean()
            od.zero_grad()
            ld.backward()
            if i % cfg.r1_every == 0:
                x = real.detach().requires_grad_(True)
                with amp():
                    (g,) = torch.autograd.grad(D(x).float().sum(), x, create_graph=True)
                (g.float().flatten(1).pow(2).sum(1).mean() * cfg.r1_gamma / 2 * cfg.r1_every).backward()
            od.step()
            with amp():
                lg = F.softplus(-D(G.synthesize(ws(len(real)))).float()).mean()
            og.zero_grad()
            lg.backward()
            og.step()
            ema_update(m.G_ema, G, ema_beta(len(real), (i + 1) * len(real), cfg.ema_kimg))
        return step
    raise ValueError(name)


# ----------------------------------------------------------------------------- timing


def time_trainer(name: str, device: torch.device, amp: bool, steps: int, warmup: int, batch: int | None):
    model, tc = build(name, device, amp, steps + warmup, batch)
    marks: list[tuple[float, float]] = []
    hook = model.on_step_end

    def on_step_end(step, tc_, run_dir):
        hook(step, tc_, run_dir)
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), time.process_time()))

    model.on_step_end = on_step_end
    model.evaluate = lambda *a, **k: {}
    model.write_artifacts = lambda run_dir: []
    with tempfile.TemporaryDirectory() as d:
        train(model, tc, Path(d) / "run", progress=False)
    return _per_step(marks[warmup - 1:])


def time_plain(name: str, device: torch.device, amp: bool, steps: int, warmup: int, batch: int | None):
    model, tc = build(name, device, amp, steps + warmup, batch)
    model.to(device).train()
    data = model.train_data("train")
    n = len(data["x"])
    g = torch.Generator().manual_seed(0)
    step = plain_step_fn(name, model, tc)
    marks = []
    for i in range(steps + warmup):
        idx = torch.randint(0, n, (tc.batch_size,), generator=g)
        step({k: v[idx].to(device) for k, v in data.items() if torch.is_tensor(v)}, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), time.process_time()))
    return _per_step(marks[warmup - 1:]), tc.batch_size


def _per_step(marks: list[tuple[float, float]]) -> tuple[float, float]:
    wall = statistics.median(b[0] - a[0] for a, b in zip(marks[:-1], marks[1:]))
    cpu = statistics.median(b[1] - a[1] for a, b in zip(marks[:-1], marks[1:]))
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (ProGAN reaches 64x64 at step 6)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="batch size (0 = each quick preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = device.type == "cuda"
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ', bf16 autocast)' if amp else ''}, "
          f"{torch.get_num_threads()} thread(s), {args.steps} timed steps x {args.rounds} rounds after {args.warmup}")
    print()
    print("| model | batch | dreamlab steps/s | plain steps/s | ratio | dreamlab steps/CPU-s | plain steps/CPU-s "
          "| ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        ours, plain = [], []
        for _ in range(args.rounds):
            ours.append(time_trainer(name, device, amp, args.steps, args.warmup, args.batch or None))
            p, bs = time_plain(name, device, amp, args.steps, args.warmup, args.batch or None)
            plain.append(p)
        ow, oc = min(o[0] for o in ours), min(o[1] for o in ours)
        pw, pc = min(p[0] for p in plain), min(p[1] for p in plain)
        print(f"| {name} | {bs} | {1 / ow:.2f} | {1 / pw:.2f} | {pw / ow:.2f} | {1 / oc:.2f} | {1 / pc:.2f} | "
              f"{pc / oc:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
