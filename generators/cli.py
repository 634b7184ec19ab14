"""`dreamlab generators list`, `dreamlab train NAME`, `dreamlab sample RUN`, `dreamlab eval RUN`: every registered
model through the one shared trainer. Only the standard library is imported at module level (`dreamlab --help`
stays fast); torch and the models are imported inside the handlers."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dreamlab.errors import DreamlabError


def _generators_list(args: argparse.Namespace) -> int:
    from generators.base import get_model_class, list_models

    rows = []
    for name in list_models():
        cls = get_model_class(name)
        lp = getattr(cls, "log_prob_kind", None)
        rows.append((name, cls.kind, ",".join(sorted(cls.presets)) or "-", lp or "-",
                     (cls.__doc__ or "").strip().splitlines()[0]))
    header = ("name", "kind", "presets", "log_prob", "description")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def _train(args: argparse.Namespace) -> int:
    from dreamlab.config import parse_set_args
    from generators.trainer import train_from_name

    overrides = parse_set_args(args.set)
    if args.device:
        overrides["device"] = args.device
    # --resume continues with the run's own settings: no --preset means the run's preset, not quick
    preset = args.preset if args.resume else (args.preset or "quick")
    out = args.out or f"runs/{args.name}-{args.preset or 'quick'}"
    _, res, run_dir = train_from_name(args.name, preset=preset, overrides=overrides, out=out,
                                      resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process reports
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
        print(f"run folder: {run_dir}")
        print(" ".join(f"{k}={v}" for k, v in shown.items()))
    return 0 if res.get("status") == "finished" else 130


def _sample(args: argparse.Namespace) -> int:
    import torch

    from dreamlab.config import parse_set_args
    from generators.base import Generator
    from generators.trainer import load_run

    if args.n < 1:
        raise DreamlabError(f"-n {args.n} must be at least 1")
    out = Path(args.out)
    model = load_run(args.run_dir, device=args.device or "auto")
    if not isinstance(model, Generator):
        raise DreamlabError(f"{args.run_dir} holds a {model.kind} ({model.name}); only generators can sample")
    if out.suffix not in model.sample_formats:
        raise DreamlabError(f"--out {out}: {model.name} writes samples as {', '.join(model.sample_formats)}")
    # the named flags are the usual conditions; --cond passes any other keyword of the model's sample()
    named = {"prompt": args.prompt, "labels": args.label, "truncation": args.truncation,
             "temperature": args.temperature, "num_inference_steps": args.steps}
    cond = {k: _literal(v) for k, v in parse_set_args(args.cond).items()}
    cond.update({k: v for k, v in named.items() if v is not None})
    if not cond:
        cond = dict(type(model).example_condition)
    g = torch.Generator(device=model.device).manual_seed(args.seed)
    x = model.sample(args.n, generator=g, **cond)
    files = model.save_samples(x, out)
    print(f"wrote {args.n} samples to {', '.join(map(str, files))}")
    return 0


def _literal(v: str) -> object:
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def _eval(args: argparse.Namespace) -> int:
    from dreamlab.io import save_json
    from generators.trainer import load_run

    model = load_run(args.run_dir, device=args.device or "auto")
    res = model.evaluate(args.split, max_items=args.max_items or None)
    save_json(Path(args.run_dir) / f"eval_{args.split}.json", res)
    for k, v in res.items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    return 0



def register_cli(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generators", help="list registered models")
    gs = g.add_subparsers(dest="sub", required=True, metavar="SUB")
    gs.add_parser("list", help="list every registered model with its presets").set_defaults(func=_generators_list)

    t = sub.add_parser("train", help="train a registered model into a run folder")
    t.add_argument("name", help="a registered model name (see: dreamlab generators list)")
    t.add_argument("--preset", help="tiny (seconds), quick (minutes on a CPU) or full (a GPU) (default: quick; "
                   "with --resume: the run's own)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model or trainer setting (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/NAME-PRESET)")
    t.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out exactly, with the run's own settings (more --set steps=N)")
    t.add_argument("--device", help="auto (default), cpu or cuda")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample a trained generator into an image grid")
    s.add_argument("run_dir")
    s.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", default="samples.png",
                   help="a .png grid (images), .safetensors (any samples) or the model's own format (e.g. .mid, .md)")
    s.add_argument("--prompt", help="text prompt (text-conditioned and language models)")
    s.add_argument("--label", help="class or attribute label(s) of a conditional model, e.g. 3 or 'hair=blonde'")
    s.add_argument("--truncation", type=float, help="truncation psi of a style-based GAN (1 = none)")
    s.add_argument("--temperature", type=float, help="sampling temperature")
    s.add_argument("--steps", type=int, help="sampling steps (diffusion: num_inference_steps)")
    s.add_argument("--cond", action="append", metavar="KEY=VALUE",
                   help="any other keyword of the model's sample(), e.g. --cond top_k=50 (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device")
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="evaluate a trained model on held-out data")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--max-items", type=int, default=0, help="evaluate on the first N items only (default: all)")
    e.add_argument("--device")
    e.set_defaults(func=_eval)
