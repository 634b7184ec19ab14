"""`dreamlab multimodal train-clap|train-text2music|evaluate-music` and `dreamlab text2music PROMPT`.

Standard library only at module level. This module is the entry point "multimodal_music" of the group "dreamlab.cli";
entry points load in name order, so the "multimodal" group (multimodal/cli.py) exists when it runs and its commands
are added there (without that group it makes its own).

    dreamlab multimodal train-clap        [--preset quick] [--out runs/clap] [--set KEY=VALUE] [--resume]
    dreamlab multimodal train-text2music  [--preset quick] [--clap runs/clap] [--out runs/text2music] ...
    dreamlab multimodal evaluate-music    [--run runs/text2music] [--n-per-prompt 4] [--candidates 8]
    dreamlab text2music "a lively jig in D major" -n 2 --out jig.mid [--run runs/text2music]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dreamlab.errors import DreamlabError
from multimodal.cli import _nonneg_float, _positive_int, _train

DEFAULT_CLAP = "runs/clap"
DEFAULT_RUN = "runs/text2music"
OUT_SUFFIXES = (".mid", ".wav", ".png")


def _train_clap(args: argparse.Namespace) -> int:
    return _train("clap", args)


def _train_text2music(args: argparse.Namespace) -> int:
    extra = {}
    clap = Path(args.clap)
    found = (clap / "clap_config.json").exists() or (clap / "model" / "clap_config.json").exists()
    if not args.resume and found:
        extra["clap_dir"] = str(clap)
    elif not args.resume and args.preset != "tiny":  # tiny may run on a fresh CLAP (pretrained MiniLM, no training)
        raise DreamlabError(f"no trained CLAP at {clap}; train one first with: dreamlab multimodal train-clap "
                            f"--out {clap}")
    return _train("text2music", args, extra)


def _evaluate(args: argparse.Namespace) -> int:
    from multimodal.music_eval import evaluate_text2music, markdown_table
    from multimodal.text2music import load_pipeline

    pipe = load_pipeline(args.run, device=args.device or "auto")
    res = evaluate_text2music(pipe, args.run, n_per_prompt=args.n_per_prompt, max_new_tokens=args.max_new_tokens,
                              guidance_scale=args.guidance_scale, candidates=args.candidates,
                              temperature=args.temperature, max_prompts=args.max_prompts,
                              progress=not args.no_progress)
    print(markdown_table(res))
    print(f"wrote {Path(args.run) / 'eval_text2music.json'}, eval_text2music.md and the eval_*.mid/.wav/.png pieces")
    return 0


def _text2music(args: argparse.Namespace) -> int:
    import torch

    from multimodal.music_text import validate_prompt
    from multimodal.text2music import load_pipeline

    # cheap checks first: a bad prompt or --out must not wait for the model to load and sample
    validate_prompt(args.prompt)
    path = Path(args.out)
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise DreamlabError(f"--out {args.out} must end in .mid, .wav or .png (all three are written)")
    pipe = load_pipeline(args.run, device=args.device or "auto")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    out = pipe(args.prompt, max_new_tokens=args.max_new_tokens, guidance_scale=args.guidance_scale,
               clap_guidance_candidates=args.candidates, temperature=args.temperature, generator=g,
               num_samples=args.n, bar_grammar=not args.free_bars)
    files = out.save(path)
    print(f"wrote {args.n} piece(s) for {args.prompt!r}: " + ", ".join(str(f) for f in files))
    for i, (s, p) in enumerate(zip(out.clap_scores.tolist(), out.pieces)):
        from multimodal.text2music import piece_summary

        print(f"  {i + 1}. CLAP score {s:.1f}; {piece_summary(p)}")
    return 0


def _common_train(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--preset", default="quick", choices=["tiny", "quick", "full"], help="size preset (default: quick)")
    p.add_argument("--out", default=default_out, help=f"run folder (default: {default_out})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model or trainer setting (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")


def _sampling_args(p: argparse.ArgumentParser, candidates_default: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=None,
                   help="events to write (default: the model's, 160)")
    p.add_argument("--guidance-scale", type=_nonneg_float("--guidance-scale"), default=1.5,
                   help="classifier-free guidance scale; 1 = off (default 1.5: the best measured with 8 candidates, "
                        "docs/music.md)")
    p.add_argument("--candidates", type=_positive_int("--candidates"), default=candidates_default,
                   help=f"CLAP guidance: candidates drawn per piece, the best kept; 1 = off "
                        f"(default {candidates_default})")
    p.add_argument("--temperature", type=_nonneg_float("--temperature"), default=None, help="sampling temperature")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")


def _group(subparsers, name: str, help_: str) -> argparse._SubParsersAction:
    """The sub-command table of an existing top-level group, or a new group."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help_)
        return parser.add_subparsers(dest="sub", required=True, metavar="SUB")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="sub", required=True, metavar="SUB")


def register_cli(subparsers) -> None:
    ms = _group(subparsers, "multimodal", "CLIP, CLAP, text-to-image and text-to-music: train, evaluate")
    c = ms.add_parser("train-clap", help="train our CLAP (MiniLM text tower + music-token encoder) on captioned music")
    _common_train(c, DEFAULT_CLAP)
    c.set_defaults(func=_train_clap)
    t = ms.add_parser("train-text2music", help="train the text-conditioned music transformer on a trained CLAP")
    _common_train(t, DEFAULT_RUN)
    t.add_argument("--clap", default=DEFAULT_CLAP, help=f"trained CLAP folder (default: {DEFAULT_CLAP})")
    t.set_defaults(func=_train_text2music)
    e = ms.add_parser("evaluate-music", help="text-to-music attribute accuracy (read back with music21) on held-out "
                                              "prompts and paraphrases, with and without each guidance")
    e.add_argument("--run", default=DEFAULT_RUN, help=f"text2music run folder (default: {DEFAULT_RUN})")
    e.add_argument("--n-per-prompt", type=_positive_int("--n-per-prompt"), default=4)
    e.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (default: all)")
    _sampling_args(e, 8)
    e.set_defaults(func=_evaluate)

    g = subparsers.add_parser("text2music", help="compose music from a text prompt with a trained pipeline "
                                                 "(MIDI + WAV + piano-roll PNG)")
    g.add_argument("prompt", help="what to play, e.g. 'a lively jig in D major'")
    g.add_argument("-n", type=_positive_int("-n"), default=1, help="number of pieces (default 1)")
    g.add_argument("--out", default="text2music.mid",
                   help="output .mid (also writes .wav, .png; default text2music.mid)")
    g.add_argument("--run", default=DEFAULT_RUN, help=f"trained run or pipeline folder (default: {DEFAULT_RUN})")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--free-bars", action="store_true",
                   help="sample without the bar grammar (bars of any length, as the book samples)")
    _sampling_args(g, 8)
    g.set_defaults(func=_text2music)
