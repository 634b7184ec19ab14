"""Likelihood models (issue 59): training steps/s through dreamlab's trainer beside a plain PyTorch loop of the same
net, and sampling images/s (PixelCNN naive vs cropped, the EBM's Langevin chains), all measured in one process.

    python bench/likelihood_bench.py [--steps 20] [--reps 3] [--models pixelcnn glow ...] [--threads 1]

"ours" is `generators.trainer.train` on the model's quick preset (evaluation and pictures switched off), its
rate read from the trainer's own second log window (steady state: data batching, the model's train_step,
metric accumulation, the progress bar off). "plain" is a hand-written loop over the same tensors: randperm
batches, forward, loss, backward, AdamW step, the way one would write it without dreamlab. Repetitions
alternate ours / plain so load on a shared machine hits both alike; the table gives medians and the median
of the per-repetition ratios.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dreamlab.config import apply_overrides  # noqa: E402
from generators.base import TrainConfig, get_model_class, split_overrides  # noqa: E402
from generators.trainer import read_metrics, train  # noqa: E402

MODELS = ("pixelcnn", "pixelcnn_mixture", "realnvp", "glow", "ebm")


def build(name: str):
    cls = get_model_class(name)
    mo, to = split_overrides(cls, cls.presets["quick"])
    torch.manual_seed(0)
    model = cls(apply_overrides(cls.config_class(), mo))
    return model, apply_overrides(TrainConfig(), {**to, "device": "cpu"})


def ours(name: str, steps: int) -> float:
    """Steps/s of dreamlab's trainer: the second of two log windows."""
    model, tc = build(name)
    model.evaluate = lambda *a, **k: {}  # type: ignore[method-assign]  # timing the loop, not the test set
    model.write_artifacts = lambda *a, **k: []  # type: ignore[method-assign]
    tc = apply_overrides(tc, {"steps": 2 * steps, "log_every": steps, "ckpt_every": 10 * steps})
    with tempfile.TemporaryDirectory() as d:
        train(model, tc, Path(d) / "run", progress=False)
        return float(read_metrics(Path(d) / "run")[1]["steps_per_s"])


def plain(name: str, steps: int) -> float:
    """Steps/s of a hand-written loop over the same net and data."""
    model, tc = build(name)
    data = model.train_data("train")["x"]
    bs = tc.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    model.train()
    step_fn = PLAIN_STEPS[name](model)

    def run(n: int) -> None:
        perm = torch.randperm(len(data))
        for i in range(n):
            x = data[perm[i * bs:(i + 1) * bs]]
            loss = step_fn(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()

    run(steps)  # warm-up, as the trainer's first window
    t = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - t)


def _pixelcnn_step(m):
    def f(x):
        lev = x.long()
        logits = m.net(lev.float() * (2 / (m.config.levels - 1)) - 1)
        return F.cross_entropy(logits, lev[:, 0]) / math.log(2)
    return f


def _mixture_step(m):
    from generators.pixelcnn import discretized_logistic_mixture_log_probs

    def f(x):
        v = x.float() * (2 / 255) - 1
        params = m.net(v).permute(0, 2, 3, 1)
        return -discretized_logistic_mixture_log_probs(params, v[:, 0]).mean() / math.log(2)
    return f


def _realnvp_step(m):
    def f(x):
        logdet = torch.zeros(len(x))
        for layer in m.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return -(logdet - 0.5 * (x ** 2).sum(1) - math.log(2 * math.pi)).mean()
    return f


def _glow_step(m):
    def f(x):
        y = ((x * 255).round() + torch.rand_like(x)) / 256 - 0.5
        d = y[0].numel()
        return -(m.log_prob_continuous(y) - d * math.log(256)).mean() / (d * math.log(2))
    return f


def _ebm_step(m):
    """The book's loop written out: a list of past samples, 5 % fresh noise, Langevin, contrastive divergence."""
    c = m.config
    buffer: list[torch.Tensor] = []

    def f(x):
        real = (x + c.data_noise * torch.randn_like(x)).clamp(-1, 1)
        n = len(x)
        if buffer:
            idx = torch.randint(0, len(buffer), (n,))
            start = torch.stack([buffer[int(i)] for i in idx])
            fresh = torch.rand(n) < c.fresh
            start[fresh] = torch.rand(int(fresh.sum()), 1, 32, 32) * 2 - 1
        else:
            start = torch.rand(n, 1, 32, 32) * 2 - 1
        fake = start
        for _ in range(c.langevin_steps):
            fake = fake.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(m.net(fake).sum(), fake)
            fake = (fake.detach() - c.step_size * g + math.sqrt(2 * c.step_size) * torch.randn_like(fake)).clamp(-1, 1)
        buffer[:0] = list(fake.detach())
        del buffer[c.buffer_size:]
        e_real, e_fake = m.net(real), m.net(fake.detach())
        return e_real.mean() - e_fake.mean() + c.alpha * (e_real ** 2 + e_fake ** 2).mean()
    return f


PLAIN_STEPS = {"pixelcnn": _pixelcnn_step, "pixelcnn_mixture": _mixture_step, "realnvp": _realnvp_step,
               "glow": _glow_step, "ebm": _ebm_step}


def sampling_rates(n: int, ebm_steps: int) -> list[tuple[str, float, float]]:
    """(what, images/s, ratio to the row's baseline)."""
    rows = []
    for name in ("pixelcnn", "pixelcnn_mixture"):
        model, _ = build(name)
        model.eval()
        rates = {}
        for sampler in ("naive", "crop"):
            t = time.perf_counter()
            model.sample(n, generator=torch.Generator().manual_seed(0), sampler=sampler, progress=False)
            rates[sampler] = n / (time.perf_counter() - t)
        rows.append((f"{name} sample, naive (whole image per pixel), {n} images at once", rates["naive"], 1.0))
        rows.append((f"{name} sample, cropped to the receptive field", rates["crop"], rates["crop"] / rates["naive"]))
    model, _ = build("ebm")
    t = time.perf_counter()
    model.sample(n, generator=torch.Generator().manual_seed(0), steps=ebm_steps, progress=False)
    rate = n / (time.perf_counter() - t)
    rows.append((f"ebm sample, {ebm_steps} Langevin steps from noise, {n} images at once", rate, float("nan")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per timed window")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample-n", type=int, default=16)
    ap.add_argument("--ebm-steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"training steps/s on the quick presets, CPU, {args.threads} thread(s), {args.steps} steps per window, "
          f"median of {args.reps} alternating repetitions\n")
    print("| model | ours (dreamlab trainer) steps/s | plain PyTorch loop steps/s | ours / plain |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        o, p, r = [], [], []
        for _ in range(args.reps):
            o.append(ours(name, args.steps))
            p.append(plain(name, args.steps))
            r.append(o[-1] / p[-1])
        print(f"| {name} | {statistics.median(o):.3f} | {statistics.median(p):.3f} | {statistics.median(r):.2f} |",
              flush=True)
    print("\n| sampling | images/s | × naive |")
    print("|---|---:|---:|")
    for what, rate, ratio in sampling_rates(args.sample_n, args.ebm_steps):
        print(f"| {what} | {rate:.3f} | {'' if math.isnan(ratio) else f'{ratio:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
