"""`dreamlab multimodal ...` and `dreamlab text2img PROMPT`. Standard library only at module level.

    dreamlab text2img "a smiling face with blonde hair and glasses" -n 4 --out out.png [--model RUN]
    dreamlab multimodal train-clip        [--preset quick] [--out runs/clip] [--set KEY=VALUE] [--resume]
    dreamlab multimodal train-autoencoder [--preset quick] [--out runs/autoencoder]
    dreamlab multimodal train-latent      [--preset quick] [--clip runs/clip] [--autoencoder runs/autoencoder]
                                          [--conditioning text|prior] [--out runs/latent]
    dreamlab multimodal train-text2img    [--preset quick] [--clip runs/clip] [--out runs/text2img]   (v1, pixel space)
    dreamlab multimodal evaluate          [--model RUN] [--n-per-prompt 8]
    dreamlab multimodal export-default    --model RUN [--out multimodal/assets/text2img_default]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dreamlab.errors import DreamlabError

DEFAULT_CLIP = "runs/clip"
DEFAULT_RUN = "runs/text2img"
DEFAULT_AE = "runs/autoencoder"
DEFAULT_LATENT = "runs/latent"


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
    """Train a registered model (the registry loads every model module) and print its run folder and results."""
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


def _train_autoencoder(args: argparse.Namespace) -> int:
    import multimodal.autoencoder  # noqa: F401  (registers kl_autoencoder)

    return _train("kl_autoencoder", args)


def _train_latent(args: argparse.Namespace) -> int:
    import multimodal.latent  # noqa: F401  (registers latent_text2img)

    extra = {}
    if not args.resume:
        clip, ae = Path(args.clip), Path(args.autoencoder)
        if not ((clip / "open_clip_config.json").exists() or (clip / "model" / "open_clip_config.json").exists()):
            raise DreamlabError(f"no trained CLIP at {clip}; train one first with: "
                                f"dreamlab multimodal train-clip --out {clip}")
        if not ((ae / "config.json").exists() and ((ae / "model").exists() or (ae / "model.safetensors").exists())):
            raise DreamlabError(f"no trained autoencoder at {ae}; train one first with: "
                                f"dreamlab multimodal train-autoencoder --out {ae}")
        extra = {"clip_dir": str(clip), "autoencoder_dir": str(ae), "conditioning": args.conditioning}
    return _train("latent_text2img", args, extra)


def _evaluate(args: argparse.Namespace) -> int:
    from multimodal.evaluate import evaluate_text2img, markdown_table
    from multimodal.latent import DEFAULT_WEIGHTS, load_text2img

    pipe = load_text2img(args.model, device=args.device or "auto")
    out = Path(args.out or args.model or "runs/eval-default")
    if args.model is None and args.out is None:
        print(f"evaluating the shipped default weights ({DEFAULT_WEIGHTS}); results go to {out}")
    kinds = [args.kind] if args.kind else None
    res = evaluate_text2img(pipe, out, kinds=kinds, n_per_prompt=args.n_per_prompt, num_inference_steps=args.steps,
                            guidance_scale=args.guidance_scale, clip_guidance_scale=args.clip_guidance_scale,
                            progress=not args.no_progress, fast=args.fast)
    print(markdown_table(res))
    print(f"wrote {out / 'eval_text2img.json'}, {out / 'eval_text2img.md'} and grids eval_grid_*.png")
    return 0


def _export_default(args: argparse.Namespace) -> int:
    import json

    import torch

    from dreamlab.io import load_json
    from multimodal.latent import DEFAULT_WEIGHTS, LatentText2Img, load_text2img

    pipe = load_text2img(args.model, device="cpu")
    if not isinstance(pipe, LatentText2Img):
        raise DreamlabError(f"{args.model} holds a v1 pixel-space pipeline; export-default ships a latent_text2img "
                            "model")
    out = Path(args.out) if args.out else DEFAULT_WEIGHTS
    ev = Path(args.model) / "eval_text2img.json"
    metrics = {"source": str(args.model), "eval_text2img": load_json(ev) if ev.exists() else None}
    for name in ("config.json", "eval.json"):
        f = Path(args.model) / name
        if f.exists():
            metrics[f"run_{name[:-5]}"] = load_json(f)
    pipe.export_pretrained(out, dtype=torch.float16, metrics=metrics)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, fp16): " + json.dumps(sorted(p.name for p in out.iterdir())))
    return 0


def _text2img(args: argparse.Namespace) -> int:
    import torch

    from dreamlab.images import save_grid
    from multimodal.clip import validate_prompt
    from multimodal.latent import LatentText2Img, load_text2img

    # cheap checks first: a bad prompt or --out must not wait for the model to load and sample
    validate_prompt(args.prompt)
    path = Path(args.out)
    if path.suffix.lower() != ".png":
        raise DreamlabError(f"--out {args.out} must end in .png")
    pipe = load_text2img(args.model, device=args.device or "auto")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    kw = {"sampler": args.sampler} if isinstance(pipe, LatentText2Img) else {}
    out = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
               clip_guidance_scale=args.clip_guidance_scale, generator=g, num_images_per_prompt=args.n,
               progress=not args.no_progress, **kw)
    save_grid(out.images, path, scale=2 if out.images.shape[-1] >= 64 else 4)
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
    p.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="sampling steps (default: the model's: 20 DPM-Solver steps, v1 50 DDIM steps)")
    p.add_argument("--guidance-scale", type=_nonneg_float("--guidance-scale"), default=None,
                   help="classifier-free guidance scale; 1 = off (default: the model's, 3)")
    p.add_argument("--clip-guidance-scale", type=_nonneg_float("--clip-guidance-scale"), default=None,
                   help="CLIP guidance scale; 0 = off (default: the model's, 0)")
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
    a = ms.add_parser("train-autoencoder",
                      help="train the KL autoencoder of latent diffusion on faces, flowers, bricks")
    _common_train(a, DEFAULT_AE)
    a.set_defaults(func=_train_autoencoder)
    la = ms.add_parser("train-latent", help="train latent text-to-image (UNet on the autoencoder's latents)")
    _common_train(la, DEFAULT_LATENT)
    la.add_argument("--clip", default=DEFAULT_CLIP, help=f"trained CLIP folder (default: {DEFAULT_CLIP})")
    la.add_argument("--autoencoder", default=DEFAULT_AE, help=f"trained autoencoder folder (default: {DEFAULT_AE})")
    la.add_argument("--conditioning", choices=["text", "prior"], default="text",
                    help="text: cross-attention on the text tower's token states (default); prior: DALL-E 2's unCLIP")
    la.set_defaults(func=_train_latent)
    e = ms.add_parser("evaluate", help="judged attribute accuracy (held-out and paraphrased prompts), CLIP score, "
                                       "Frechet distance, images/s, per guidance setting")
    e.add_argument("--model", "--run", dest="model", default=None,
                   help="text-to-image run or pipeline folder (default: the shipped default weights)")
    e.add_argument("--out", default=None, help="where results go (default: the --model folder, or runs/eval-default)")
    e.add_argument("--kind", choices=["faces", "flowers", "bricks"],
                   help="prompt set (default: every set of the model)")
    e.add_argument("--n-per-prompt", type=_positive_int("--n-per-prompt"), default=8)
    e.add_argument("--fast", action="store_true",
                   help="only CFG off and on (no CLIP guidance, no thresholding rows)")
    _sampling_args(e)
    e.set_defaults(func=_evaluate)
    for act in e._actions:
        if act.dest == "clip_guidance_scale":
            act.help = "CLIP guidance scale of the CLIP rows (default 10)"
        if act.dest == "guidance_scale":
            act.help = "classifier-free guidance scale of the CFG rows (default: the model's, 3)"
    x = ms.add_parser("export-default", help="write a trained latent model as the package's default weights (fp16)")
    x.add_argument("--model", required=True, help="trained latent_text2img run folder")
    x.add_argument("--out", default=None,
                   help="target folder (default: the package's multimodal/assets/text2img_default)")
    x.set_defaults(func=_export_default)

    g = subparsers.add_parser("text2img",
                              help="generate 64x64 images from a text prompt (default: the shipped weights)")
    g.add_argument("prompt", help="what to draw, e.g. 'a smiling face with blonde hair and glasses'")
    g.add_argument("-n", type=_positive_int("-n"), default=4, help="number of images (default 4)")
    g.add_argument("--out", default="text2img.png", help="output PNG grid (default text2img.png)")
    g.add_argument("--model", "--run", dest="model", default=None,
                   help="trained run or pipeline folder (default: the default weights shipped with dreamlab)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", choices=["dpm", "ddim"], default=None,
                   help="latent models: DPM-Solver++ (default) or DDIM")
    _sampling_args(g)
    g.set_defaults(func=_text2img)
