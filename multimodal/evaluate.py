"""Evaluation of the text-to-image pipeline on prompts whose attribute combinations were held out of training.

For each guidance setting (none, classifier-free, CLIP, both) and each held-out combination's prompt, we
generate `n_per_prompt` images with fixed seeds and report:

- **CLIP score** = 100 * max(cos(CLIP_image(x), CLIP_text(prompt)), 0), averaged (the torchmetrics
  scale: 0-100; higher is better). It uses our own CLIP, which is also the one CLIP guidance follows,
  so under CLIP guidance it is optimistic by construction.
- **attribute accuracy**: the set's shipped, separately trained attribute classifier (`generators.features.judge`,
  the same judge every generator of the set is scored by; never the guidance CLIP) judges each image; `attr_acc`
  is the fraction of (image, attribute) pairs that match the prompt, `all_attrs_acc` the fraction of images with
  every attribute right.

Writes `eval_text2img.json`, `eval_text2img.md` and one grid per setting (a row per prompt) in the run folder.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dreamlab import procedural as P
from dreamlab.images import save_grid
from dreamlab.io import atomic_write_text, save_json


def clip_score(clip, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per-image CLIP score, 100 * max(cos, 0)."""
    with torch.no_grad():
        img = clip.encode_image(images.to(clip.device))
        txt = clip.encode_text(prompts)
    return 100 * (img * txt).sum(-1).clamp(min=0).cpu()


def default_settings(guidance_scale: float, clip_guidance_scale: float) -> list[tuple[str, float, float]]:
    return [("no guidance", 1.0, 0.0), ("classifier-free", guidance_scale, 0.0),
            ("CLIP", 1.0, clip_guidance_scale), ("classifier-free + CLIP", guidance_scale, clip_guidance_scale)]


def evaluate_text2img(pipe, run_dir: str | Path, *, kind: str | None = None, n_per_prompt: int = 8,
                      num_inference_steps: int | None = None, guidance_scale: float = 3.0,
                      clip_guidance_scale: float = 10.0, seed: int = 0,
                      settings: list[tuple[str, float, float]] | None = None, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from generators.features import judge as shipped_judge

    run_dir = Path(run_dir)
    kind = kind or pipe.sets[0]
    judge = shipped_judge(kind)
    # its accuracy on the test split's held-out combinations, measured when the asset was built (its README)
    judge_acc = {k[len("heldout_acc_"):]: v for k, v in judge.reported.items() if k.startswith("heldout_acc_")}
    combos = list(P.HELD_OUT[kind])
    prompts = [P.prompt_for(kind, c) for c in combos]
    targets = torch.tensor([P.combo_indices(kind, c) for c in combos])
    rows = []
    settings = settings or default_settings(guidance_scale, clip_guidance_scale)
    for name, gs, cgs in tqdm(settings, desc="guidance settings", disable=not progress):
        g = torch.Generator(device="cpu").manual_seed(seed)
        t0 = time.perf_counter()
        imgs = pipe(prompts, num_images_per_prompt=n_per_prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=gs, clip_guidance_scale=cgs, generator=g).images
        dt = time.perf_counter() - t0
        flat_prompts = [p for p in prompts for _ in range(n_per_prompt)]
        cs = clip_score(pipe.clip, imgs, flat_prompts)
        pred = judge.predict(imgs)
        tgt = targets.repeat_interleave(n_per_prompt, 0)
        per_attr = (pred == tgt).float().mean(0)
        slug = name.replace(" ", "").replace("+", "_").replace("-", "").lower()
        save_grid(imgs, run_dir / f"eval_grid_{slug}.png", nrow=n_per_prompt, scale=3)
        right = pred == tgt
        rows.append({"setting": name, "guidance_scale": gs, "clip_guidance_scale": cgs, "clip_score": float(cs.mean()),
                     "attr_acc": float(right.float().mean()), "all_attrs_acc": float(right.all(1).float().mean()),
                     **{f"acc_{a}": float(v) for a, v in zip(P.attribute_names(kind), per_attr)},
                     "images_per_s": len(imgs) / dt, "grid": f"eval_grid_{slug}.png"})
    res = {"kind": kind, "prompts": prompts, "n_per_prompt": n_per_prompt,
           "num_inference_steps": num_inference_steps or pipe.config.num_inference_steps, "judge": judge_acc,
           "judge_asset": str(judge.directory.relative_to(judge.directory.parents[2])), "rows": rows,
           "clip_score_scale": "100 * max(cosine, 0), 0-100, computed with the guidance CLIP"}
    save_json(run_dir / "eval_text2img.json", res)
    atomic_write_text(run_dir / "eval_text2img.md", markdown_table(res))
    return res


def markdown_table(res: dict[str, Any]) -> str:
    attrs = [k for k in res["rows"][0] if k.startswith("acc_")]
    head = ["setting", "CFG scale", "CLIP-guid. scale", "CLIP score", "attr acc", "all attrs"]
    head += [a[4:] for a in attrs] + ["images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        vals = [r["setting"], f"{r['guidance_scale']:g}", f"{r['clip_guidance_scale']:g}", f"{r['clip_score']:.1f}",
                f"{r['attr_acc']:.3f}", f"{r['all_attrs_acc']:.3f}"]
        vals += [f"{r[a]:.3f}" for a in attrs] + [f"{r['images_per_s']:.2f}"]
        lines.append("| " + " | ".join(vals) + " |")
    j = ", ".join(f"{k}={v:.3f}" for k, v in res["judge"].items()) or "not recorded"
    prompts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(res["prompts"]))
    return (f"Held-out {res['kind']} prompts ({res['n_per_prompt']} images each, "
            f"{res['num_inference_steps']} DDIM steps); "
            f"judge `{res.get('judge_asset', 'generators.features')}`, its accuracy on the test split's held-out "
            f"combinations: {j}\n\n" + "\n".join(lines) + f"\n\nPrompts (grid rows):\n{prompts}\n")
