"""Training speed of the text models: dreamlab's trainer beside plain PyTorch loops over the same net, in one run.

    python bench/text_bench.py [--models lstm_text gpt] [--steps 30] [--reps 3] [--threads 1] [--device cpu]
    python bench/text_bench.py --models lstm_text:cell=gru lstm_text:layers=2 gpt@fortunes --trainer-only

A model is NAME[@PRESET][:KEY=VALUE,...] (default preset quick), e.g. `gpt@fortunes` or `lstm_text:cell=gru`.

For each model at its `quick` size (lstm_text: the book's LSTM; gpt: the book's 1 block / 2 heads / 256 dims as a
transformers `GPT2LMHeadModel`), on the recipe windows, batch 32, AdamW, gradient clipping 1.0, the same initial
weights and the same number of steps:

* `trainer`: `generators.trainer.train` (progress bar off, artifacts off). steps/s is the trainer's own figure for
  its loop (metrics.jsonl); the CPU seconds cover the whole call (data, loop, checkpoint, final save and a 32-window
  evaluation).
* `plain, model.loss`: a for-loop calling the same `model.loss(batch)`: what the trainer adds, alone.
* `plain, textbook`: a for-loop with the textbook forward: all positions through the output layer, then
  `F.cross_entropy(..., ignore_index=PAD)` (gpt: `GPT2LMHeadModel(input_ids, labels=...)`, pads as -100). Beside it,
  the trainer's ratio also shows what dreamlab's loss (output layer on real tokens only) saves.

Variants alternate within each repetition (medians are printed), so load from other jobs hits them alike. Prints a
markdown table of steps/s (wall) and CPU seconds per step, with ratios trainer / plain.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse(spec: str) -> tuple[str, str, dict[str, str]]:
    """NAME[@PRESET][:KEY=VALUE,...] -> (name, preset, overrides)."""
    head, _, sets = spec.partition(":")
    name, _, preset = head.partition("@")
    return name, preset or "quick", dict(kv.split("=", 1) for kv in sets.split(",") if kv)


def build(spec: str, seed: int = 0):
    from dreamlab.config import apply_overrides
    from dreamlab.device import seeded
    from generators.base import TrainConfig, get_model_class, split_overrides
    from generators.trainer import resolve_preset

    name, preset, extra = parse(spec)
    cls = get_model_class(name)
    mo, to = split_overrides(cls, {**resolve_preset(cls, preset), **extra})
    with seeded(seed):
        model = cls(apply_overrides(cls.config_class(), mo))
    keep = ("lr", "weight_decay", "grad_clip", "batch_size")
    return model, apply_overrides(TrainConfig(), {k: v for k, v in to.items() if k in keep})


def run_trainer(name: str, steps: int, device: str) -> tuple[float, float]:
    import json
    from dataclasses import replace

    from generators.trainer import train

    model, tc = build(name)
    model.write_artifacts = lambda run_dir: []  # pictures are not training speed
    tc = replace(tc, steps=steps, log_every=steps, ckpt_every=steps, eval_every=0, eval_items=32, device=device)
    with tempfile.TemporaryDirectory() as d:
        c0 = time.process_time()
        train(model, tc, Path(d) / "run", progress=False)
        cpu = time.process_time() - c0
        rows = [json.loads(ln) for ln in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    return next(r["steps_per_s"] for r in rows if "steps_per_s" in r), cpu / steps


def run_plain(name: str, steps: int, device: str, textbook: bool) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from dreamlab import text as T

    model, tc = build(name)
    dev = torch.device(device)
    model.to(dev).train()
    x_all = model.train_data("train")["x"]
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x_all), generator=g)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        if not textbook:
            return model.loss({"x": x})[0]
        inp, tgt = x[:, :-1], x[:, 1:]
        if parse(name)[0] == "gpt":
            labels = x.masked_fill(x == T.PAD, -100)
            # GPT2 shifts the labels itself; right padding under a causal mask needs no attention mask (all ones)
            return model.gpt(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss
        logits = model.logits(inp)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=T.PAD)

    if parse(name)[0] == "gpt" and textbook and x_all.shape[1] > model.config.max_len:
        x_all = x_all[:, : model.config.max_len]  # GPT2 reads the whole window (its context): one token fewer
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        x = x_all[perm[i * tc.batch_size:(i + 1) * tc.batch_size]].to(dev)
        loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        float(loss.detach())  # one host read per step, as a loop that prints would do
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return steps / wall, cpu / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lstm_text", "gpt"], help="NAME[@PRESET][:KEY=VALUE,...]")
    ap.add_argument("--trainer-only", action="store_true", help="only the trainer's rate (no plain loops)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} steps={args.steps} reps={args.reps} "
          f"(preset sizes, batch 32)")
    print("| model | loop | steps/s (wall) | CPU s/step | trainer ratio, wall | trainer ratio, CPU |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models:
        res: dict[str, list[tuple[float, float]]] = {"trainer": [], "plain, model.loss": [], "plain, textbook": []}
        if parse(name)[0] not in ("lstm_text", "gpt"):
            raise SystemExit(f"{name}: this benchmark knows lstm_text and gpt")
        run_plain(name, 2, args.device, False)  # warm-up: imports, data cache, first-call allocations
        for _ in range(args.reps):
            res["trainer"].append(run_trainer(name, args.steps, args.device))
            if not args.trainer_only:
                res["plain, model.loss"].append(run_plain(name, args.steps, args.device, False))
                res["plain, textbook"].append(run_plain(name, args.steps, args.device, True))
        res = {k: v for k, v in res.items() if v}
        med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in res.items()}
        tr = med["trainer"]
        for k, (sps, cps) in med.items():
            ratio = "" if k == "trainer" else f"{tr[0] / sps:.2f}x | {cps / tr[1]:.2f}x"
            print(f"| {name} | {k} | {sps:.3f} | {cps:.3f} | {ratio or '1.00x | 1.00x'} |")


if __name__ == "__main__":
    main()
