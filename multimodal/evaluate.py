"""Evaluation of a text-to-image pipeline on prompts whose attribute combinations were held out of training.

For each set (faces, flowers, bricks), each prompt kind (the held-out combinations' canonical prompts, and for faces
the same combinations in paraphrase: words no training caption uses) and each guidance setting, we generate
`n_per_prompt` images per prompt with fixed seeds and report:

- **attribute accuracy** judged by a separately trained attribute classifier (`multimodal.attributes`, never the
  guidance CLIP): `attr_acc` over (image, attribute) pairs, `all_attrs_acc` = every attribute right, per attribute;
- **CLIP score** = 100 * max(cos(CLIP_image(x), CLIP_text(prompt)), 0), averaged (the torchmetrics scale, 0-100).
  It uses the pipeline's own CLIP, the one CLIP guidance follows, so it is optimistic under CLIP guidance;
- for faces, the **Frechet distance** between the judge's penultimate features of the generated images and of real
  test faces of the same combinations, beside its **floor** (the same distance between two real samples of that
  size: what a perfect generator would score);
- **images/s** of the setting on this machine.

The settings: no guidance (CFG scale 1), classifier-free guidance, and where the pipeline has them: the prior path
(unCLIP), CLIP guidance, Imagen's dynamic thresholding (pixel-space v1 only: latents have no fixed range).
Writes `eval_text2img.json`, `eval_text2img.md` and one grid per (set, setting) into the output folder.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from dreamlab import procedural as P
from dreamlab.images import save_grid
from dreamlab.io import atomic_write_text, cache_dir, load_json, save_json


def clip_score(clip, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per-image CLIP score, 100 * max(cos, 0)."""
    with torch.no_grad():
        img = clip.encode_image(images.to(clip.device))
        txt = clip.encode_text(prompts)
    return 100 * (img * txt).sum(-1).clamp(min=0).cpu()


def default_settings(guidance_scale: float, clip_guidance_scale: float) -> list[tuple[str, float, float]]:
    """v1's four settings (name, CFG scale, CLIP-guidance scale)."""
    return [("no guidance", 1.0, 0.0), ("classifier-free", guidance_scale, 0.0),
            ("CLIP", 1.0, clip_guidance_scale), ("classifier-free + CLIP", guidance_scale, clip_guidance_scale)]


def pipeline_settings(pipe, guidance_scale: float | None = None, clip_guidance_scale: float | None = None,
                      fast: bool = False) -> list[dict[str, Any]]:
    """The guidance settings worth measuring for this pipeline: name, call kwargs, config overrides."""
    gs = guidance_scale if guidance_scale is not None else pipe.config.guidance_scale
    cgs = clip_guidance_scale if clip_guidance_scale is not None else 10.0
    prior = getattr(pipe.config, "conditioning", "") == "prior"
    tag = "prior" if prior else "text"
    rows = [{"setting": f"{tag}, no guidance", "guidance_scale": 1.0, "clip_guidance_scale": 0.0},
            {"setting": f"{tag}, classifier-free", "guidance_scale": gs, "clip_guidance_scale": 0.0}]
    if fast:
        return rows
    rows.append({"setting": f"{tag}, classifier-free + CLIP", "guidance_scale": gs, "clip_guidance_scale": cgs})
    if hasattr(pipe.config, "x0_limit"):  # v1, pixel space: its sampler as first shipped, beside the fixed one
        other = "clip" if pipe.config.x0_limit == "dynamic" else "dynamic"
        rows.append({"setting": f"{tag}, classifier-free, {other} x0" + (", leading" if other == "clip" else ""),
                     "guidance_scale": gs, "clip_guidance_scale": 0.0,
                     "config": {"x0_limit": other, **({"timestep_spacing": "leading"} if other == "clip" else {})}})
    return rows


@contextlib.contextmanager
def _config(pipe, overrides: dict[str, Any] | None):
    old = {k: getattr(pipe.config, k) for k in overrides or {}}
    for k, v in (overrides or {}).items():
        setattr(pipe.config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(pipe.config, k, v)


class _TrainedJudge:
    """Fallback judge where the shipped feature nets are absent: `multimodal.attributes`' CNN, trained once per
    machine into the data cache. Same interface as `generators.features.Judge`: predict, features."""

    def __init__(self, kind: str, steps: int, images: int, size: int, progress: bool) -> None:
        from multimodal.attributes import AttributeClassifier, train_attribute_classifier

        d = cache_dir() / "judges" / f"{kind}_{size}_{steps}_{images}"
        if (d / "judge.json").exists():
            self.net, self.reported = AttributeClassifier.load(d), load_json(d / "judge_eval.json")
        else:
            self.net, self.reported = train_attribute_classifier(kind, d, n_train=images, steps=steps, size=size,
                                                                 progress=progress)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.predict(x)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net.eval()
        out = []
        for b in x.split(256):
            if b.shape[-1] != net.size:
                mode = "area" if b.shape[-1] > net.size else "bilinear"
                b = torch.nn.functional.interpolate(b, size=(net.size,) * 2, mode=mode)
            out.append(net.features(b * 2 - 1).cpu())
        return torch.cat(out)


def judge_for(kind: str, *, steps: int = 600, images: int = 8000, size: int = 32, progress: bool = True):
    """(judge, its own accuracy): the shipped feature net of `kind` (`generators.features`), else a trained CNN."""
    try:
        from generators.features import judge as shipped
    except ImportError:
        shipped = None
    if shipped is not None:
        j = shipped(kind)
        # its accuracy on the test split's held-out combinations, measured when the asset was built (its README)
        return j, {k[len("heldout_acc_"):]: v for k, v in j.reported.items() if k.startswith("heldout_acc_")}
    j = _TrainedJudge(kind, steps, images, size, progress)
    return j, j.reported


def frechet_with_floor(judge, kind: str, imgs: torch.Tensor, combos: list[tuple]) -> dict[str, float]:
    """Frechet distance (judge features) of generated images to real images of the same combinations, and the floor:
    the same distance for a second real sample of the same size. With 48 images both are biased upwards alike."""
    from dreamlab.metrics import frechet_distance_features

    n = len(imgs)
    per = -(-2 * n // len(combos))  # two disjoint real samples of n images each
    labels = torch.tensor([P.combo_indices(kind, c) for c in combos]).repeat_interleave(per, 0).numpy()
    x, _ = P.generate(kind, len(labels), seed=777, labels=labels)
    real = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    if real.shape[-1] != imgs.shape[-1]:  # a 32x32 model is measured against 32x32 real images
        real = torch.nn.functional.interpolate(real, size=imgs.shape[-2:], mode="area")
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    a, b = real[perm[:n]], real[perm[n:2 * n]]
    fa, fb, fg = judge.features(a), judge.features(b), judge.features(imgs)
    return {"frechet": frechet_distance_features(fg, fa), "frechet_floor": frechet_distance_features(fb, fa)}


def evaluate_text2img(pipe, out_dir: str | Path, *, kinds: list[str] | None = None, kind: str | None = None,
                      n_per_prompt: int = 8, num_inference_steps: int | None = None,
                      guidance_scale: float | None = None,
                      clip_guidance_scale: float | None = None, judge_steps: int = 600, judge_images: int = 8000,
                      seed: int = 0, settings: list[dict[str, Any]] | None = None, fast: bool = False,
                      progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = [kind] if kind else (kinds or list(pipe.sets))
    settings = settings or pipeline_settings(pipe, guidance_scale, clip_guidance_scale, fast)
    rows, judges = [], {}
    jobs = [(k, tag) for k in kinds for tag in (("held-out", "paraphrase") if k == "faces" else ("held-out",))]
    bar = tqdm(total=len(jobs) * len(settings), desc="evaluate", unit="setting", disable=not progress)
    for k, tag in jobs:
        if k not in judges:
            judges[k] = judge_for(k, steps=judge_steps, images=judge_images, progress=progress)
        judge, _ = judges[k]
        combos = list(P.HELD_OUT[k])
        prompts = [(P.paraphrase_for if tag == "paraphrase" else P.prompt_for)(k, c) for c in combos]
        targets = torch.tensor([P.combo_indices(k, c) for c in combos]).repeat_interleave(n_per_prompt, 0)
        flat = [p for p in prompts for _ in range(n_per_prompt)]
        for st in settings:
            g = torch.Generator(device="cpu").manual_seed(seed)
            t0 = time.perf_counter()
            with _config(pipe, st.get("config")):
                imgs = pipe(prompts, num_images_per_prompt=n_per_prompt, num_inference_steps=num_inference_steps,
                            guidance_scale=st["guidance_scale"], clip_guidance_scale=st["clip_guidance_scale"],
                            generator=g).images
            dt = time.perf_counter() - t0
            pred = judge.predict(imgs)
            per_attr = (pred == targets).float().mean(0)
            slug = f"{k}_{tag}_{st['setting']}".replace(" ", "").replace("+", "_").replace(",", "_").replace("-", "")
            save_grid(imgs, out_dir / f"eval_grid_{slug.lower()}.png", nrow=n_per_prompt, scale=2)
            row = {"kind": k, "prompts": tag, "setting": st["setting"], "guidance_scale": st["guidance_scale"],
                   "clip_guidance_scale": st["clip_guidance_scale"],
                   "clip_score": float(clip_score(pipe.clip, imgs, flat).mean()),
                   "attr_acc": float((pred == targets).float().mean()),
                   "all_attrs_acc": float((pred == targets).all(1).float().mean()),
                   **{f"acc_{a}": float(v) for a, v in zip(P.attribute_names(k), per_attr)},
                   "images_per_s": len(imgs) / dt, "image_size": int(imgs.shape[-1]),
                   "grid": f"eval_grid_{slug.lower()}.png"}
            if k == "faces" and tag == "held-out":
                row.update(frechet_with_floor(judge, k, imgs, combos))
            rows.append(row)
            bar.update(1)
    bar.close()
    res = {"kinds": kinds, "n_per_prompt": n_per_prompt, "pipeline": pipe.name,
           "num_inference_steps": num_inference_steps or pipe.config.num_inference_steps,
           "judge": {k: v[1] for k, v in judges.items()}, "rows": rows,
           "prompts": {k: [P.prompt_for(k, c) for c in P.HELD_OUT[k]] for k in kinds},
           "paraphrases": [P.paraphrase_for("faces", c) for c in P.HELD_OUT["faces"]] if "faces" in kinds else [],
           "clip_score_scale": "100 * max(cosine, 0), 0-100, computed with the pipeline's own CLIP",
           "frechet": "judge penultimate features, generated held-out faces vs real test faces of the same "
                      "combinations; floor = two real samples of the same size"}
    save_json(out_dir / "eval_text2img.json", res)
    atomic_write_text(out_dir / "eval_text2img.md", markdown_table(res))
    return res


def markdown_table(res: dict[str, Any]) -> str:
    lines = []
    for k in res["kinds"]:
        rows = [r for r in res["rows"] if r["kind"] == k]
        attrs = [a for a in rows[0] if a.startswith("acc_")]
        fd = any("frechet" in r for r in rows)
        head = ["prompts", "setting", "CFG", "CLIP-g.", "CLIP score", "attr acc", "all attrs"] + [a[4:] for a in attrs]
        head += (["Fréchet (floor)"] if fd else []) + ["images/s"]
        judge = ", ".join(f"{a}={v:.3f}" for a, v in res["judge"][k].items())
        lines += [f"**{k}** (judge on fresh images: {judge})",
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            vals = [r["prompts"], r["setting"], f"{r['guidance_scale']:g}", f"{r['clip_guidance_scale']:g}",
                    f"{r['clip_score']:.1f}", f"{r['attr_acc']:.3f}", f"{r['all_attrs_acc']:.3f}"]
            vals += [f"{r[a]:.3f}" for a in attrs]
            if fd:
                vals.append(f"{r['frechet']:.2f} ({r['frechet_floor']:.2f})" if "frechet" in r else "")
            vals.append(f"{r['images_per_s']:.2f}")
            lines.append("| " + " | ".join(vals) + " |")
        lines.append("")
    prompts = "\n".join(f"- {k}: " + "; ".join(ps) for k, ps in res["prompts"].items())
    para = ("\n- faces, paraphrased: " + "; ".join(res["paraphrases"])) if res.get("paraphrases") else ""
    return (f"Held-out prompts of {res['pipeline']} ({res['n_per_prompt']} images each, {res['num_inference_steps']} "
            f"steps); CLIP score: {res['clip_score_scale']}.\n\n" + "\n".join(lines)
            + f"\nPrompts (grid rows):\n{prompts}{para}\n")
