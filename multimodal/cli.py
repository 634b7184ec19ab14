"""`dreamlab multimodal ...` and `dreamlab text2img PROMPT`. Standard library only at module level.

    dreamlab multimodal train-clip      [--preset quick] [--out runs/clip] [--set KEY=VALUE] [--resume]
    dreamlab multimodal train-text2img  [--preset quick] [--clip runs/clip] [--out runs/text2img] ...
    dreamlab multimodal evaluate        [--run runs/text2img] [--n-per-prompt 8]
    dreamlab text2img "a smiling face with blonde hair and glasses" -n 4 --out out.png [--run runs/text2img]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dreamlab.errors import DreamlabError

DEFAULT_CLIP = "runs/clip"
DEFAULT_RUN = "runs/text2img"


def _positive_int(what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {s!r} is not an integer") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{what} {v} must be at least 1")
        return v

    return parse


def _nonneg_float(what: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {s!r} is not a number") from None
        if not v >= 0 or v == float("inf"):  # NaN passed `v < 0` and wrote black images
            raise argparse.ArgumentTypeError(f"{what} {v} must be a finite number >= 0")
        return v

    return parse


def _train(name: str, args: argparse.Namespace, extra: dict[str, str] | None = None) -> int:
    import multimodal.text2img  # noqa: F401  (registers clip and text2img)
    from dreamlab.config import parse_set_args
    from generators.trainer import train_from_name

    overrides = {**(extra or {}), **parse_set_args(args.set)}
    if args.device:
        overrides["device"] = args.device
    preset = args.preset if args.resume else (args.preset or "quick")  # --resume: the run's own preset
    _, res, run_dir = train_from_name(name, preset=preset, overrides=overrides, out=args.out, resume=args.resume,
                                      progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process reports
        print(f"run folder: {run_dir}")
        print(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in res.items()))
    return 0 if res.get("status") == "finished" else 130


def _train_clip(args: argparse.Namespace) -> int:
    return _train("clip", args)


def _train_text2img(args: argparse.Namespace) -> int:
    extra = {}
    if not args.resume:
        clip = Path(args.clip)
        if not ((clip / "open_clip_config.json").exists() or (clip / "model" / "open_clip_config.json").exists()):
            raise DreamlabError(f"no trained CLIP at {clip}; train one first with: "
                                f"dreamlab multimodal train-clip --out {clip}")
        extra["clip_dir"] = str(clip)
    return _train("text2img", args, extra)


def _evaluate(args: argparse.Namespace) -> int:
    from multimodal.evaluate import evaluate_text2img, markdown_table
    from multimodal.text2img import load_pipeline

    pipe = load_pipeline(args.run, device=args.device or "auto")
    res = evaluate_text2img(pipe, args.run, kind=args.kind, n_per_prompt=args.n_per_prompt,
                            num_inference_steps=args.steps,
                            guidance_scale=args.guidance_scale, clip_guidance_scale=args.clip_guidance_scale,
                            progress=not args.no_progress)
    print(markdown_table(res))
    print(f"wrote {Path(args.run) / 'eval_text2img.json'} and grids eval_grid_*.png")
    return 0


def _text2img(args: argparse.Namespace) -> int:
    import torch

    from dreamlab.images import save_grid
    from multimodal.clip import validate_prompt
    from multimodal.text2img import load_pipeline

    # cheap checks first: a bad prompt or --out must not wait for the model to load and sample
    validate_prompt(args.prompt)
    path = Path(args.out)
    if path.suffix.lower() != ".png":
        raise DreamlabError(f"--out {args.out} must end in .png")
    pipe = load_pipeline(args.run, device=args.device or "auto")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    out = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
               clip_guidance_scale=args.clip_guidance_scale, generator=g, num_images_per_prompt=args.n,
               progress=not args.no_progress)
    save_grid(out.images, path, scale=4)
    print(f"wrote {args.n} image(s) for {args.prompt!r} to {path}")
    return 0


def _common_train(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--preset", choices=["tiny", "quick", "full"],
                   help="size preset (default: quick; with --resume: the run's own)")
    p.add_argument("--out", default=default_out, help=f"run folder (default: {default_out})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model or trainer setting (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int("--steps"), default=None, help="DDIM steps (default: the model's, 50)")
    p.add_argument("--guidance-scale", type=_nonneg_float("--guidance-scale"), default=3.0,
                   help="classifier-free guidance scale; 1 = off (default 3)")
    p.add_argument("--clip-guidance-scale", type=_nonneg_float("--clip-guidance-scale"), default=0.0,
                   help="CLIP guidance scale; 0 = off (default 0)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")


def register_cli(subparsers) -> None:
    m = subparsers.add_parser("multimodal", help="CLIP and text-to-image: train, evaluate")
    ms = m.add_subparsers(dest="sub", required=True, metavar="SUB")
    c = ms.add_parser("train-clip", help="train CLIP (open_clip, pretrained MiniLM text tower) on captioned data")
    _common_train(c, DEFAULT_CLIP)
    c.set_defaults(func=_train_clip)
    t = ms.add_parser("train-text2img", help="train the text-to-image diffusion model on a trained CLIP")
    _common_train(t, DEFAULT_RUN)
    t.add_argument("--clip", default=DEFAULT_CLIP, help=f"trained CLIP folder (default: {DEFAULT_CLIP})")
    t.set_defaults(func=_train_text2img)
    e = ms.add_parser("evaluate", help="CLIP score and held-out attribute accuracy with and without guidance")
    e.add_argument("--run", default=DEFAULT_RUN, help=f"text2img run folder (default: {DEFAULT_RUN})")
    e.add_argument("--kind", choices=["faces", "flowers", "bricks"], help="prompt set (default: the model's first set)")
    e.add_argument("--n-per-prompt", type=_positive_int("--n-per-prompt"), default=8)
    _sampling_args(e)
    e.set_defaults(func=_evaluate, clip_guidance_scale=10.0)
    for a in e._actions:
        if a.dest == "clip_guidance_scale":
            a.help = "CLIP guidance scale of the CLIP rows (default 10)"

    g = subparsers.add_parser("text2img", help="generate images from a text prompt with a trained pipeline")
    g.add_argument("prompt", help="what to draw, e.g. 'a smiling face with blonde hair and glasses'")
    g.add_argument("-n", type=_positive_int("-n"), default=4, help="number of images (default 4)")
    g.add_argument("--out", default="text2img.png", help="output PNG grid (default text2img.png)")
    g.add_argument("--run", default=DEFAULT_RUN, help=f"trained run or pipeline folder (default: {DEFAULT_RUN})")
    g.add_argument("--seed", type=int, default=0)
    _sampling_args(g)
    g.set_defaults(func=_text2img)
