"""Text-to-image sampling speed: images/s for N DDIM steps, with and without classifier-free and CLIP guidance.

    python bench/text2img_bench.py [--run runs/text2img] [--n 16] [--steps 25] [--device auto] [--threads 0]

Uses the trained pipeline in --run when it exists; with only its model/config.json present (e.g. copied to a
GPU machine without the 100 MB of weights), the same architecture with random weights; else the quick-preset
architecture with a fresh CLIP. Speed does not depend on the weights. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/text2img")
    ap.add_argument("--n", type=int, default=16, help="images per measurement")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()

    import torch

    from dreamlab.device import resolve_device
    from multimodal.text2img import Text2ImgConfig, Text2ImgPipeline, load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cfg_only = Path(args.run) / "model" / "config.json"
    if (Path(args.run) / "model" / "model.safetensors").exists() or (Path(args.run) / "checkpoint").exists():
        pipe, src = load_pipeline(args.run, device=str(dev)), args.run
    elif cfg_only.exists():
        from dreamlab.config import from_dict
        from dreamlab.io import load_json

        meta = load_json(cfg_only)
        pipe = Text2ImgPipeline(from_dict(Text2ImgConfig, meta["config"], what="text2img config")).to(dev).eval()
        src = f"{args.run} architecture, random weights"
    else:
        from dreamlab.config import apply_overrides

        cfg = apply_overrides(Text2ImgConfig(), {"clip_dir": ""})
        pipe, src = Text2ImgPipeline(cfg).to(dev).eval(), "quick architecture, fresh weights"
    c = pipe.config
    print(f"device={dev} threads={torch.get_num_threads()} model={src} size={c.sample_size} patch={c.patch_size} "
          f"unet={sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M params, n={args.n}, steps={args.steps}")
    prompt = "a smiling face with blonde hair and light skin, with glasses"
    pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up
    print("| setting | CFG scale | CLIP-guidance scale | images/s | s/image |")
    print("|---|---|---|---|---|")
    for name, gs, cgs in [("no guidance", 1.0, 0.0), ("classifier-free", 3.0, 0.0), ("CLIP guidance", 1.0, 10.0),
                          ("classifier-free + CLIP", 3.0, 10.0)]:
        g = torch.Generator().manual_seed(0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=gs, clip_guidance_scale=cgs, generator=g,
             num_images_per_prompt=args.n)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"| {name} | {gs:g} | {cgs:g} | {args.n / dt:.2f} | {dt / args.n:.3f} |")


if __name__ == "__main__":
    main()
