"""Latent text-to-image: the sampler against an exact model, tiny end-to-end runs (text and prior paths), save -> load,
the shipped default weights (offline, 64x64, autoencoder round trip), the CLI."""
from __future__ import annotations

import pytest
import torch

from dreamlab import procedural as P
from dreamlab.errors import DreamlabError

pytestmark = pytest.mark.usefixtures("offline_small_procedural")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import multimodal.latent  # noqa: F401  (registers kl_autoencoder and latent_text2img)
    from generators.trainer import train_from_name

    root = tmp_path_factory.mktemp("latent")
    _, ae_res, ae_dir = train_from_name("kl_autoencoder", preset="tiny", out=root / "ae", progress=False)
    out = {"ae": (ae_res, ae_dir)}
    for cond in ("text", "prior"):
        m, res, d = train_from_name("latent_text2img", preset="tiny", out=root / cond, progress=False,
                                    overrides={"conditioning": cond, "autoencoder_dir": str(ae_dir)})
        out[cond] = (m, res, d)
    return out


def _gen(pipe, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(["a smiling face with red hair", "a serious face with glasses"], generator=g, num_images_per_prompt=2,
                **kw).images


def test_oracle_model_makes_the_sampler_reproduce_the_image_exactly():
    """With the exact noise predictor of a one-image data set, DPM-Solver and DDIM (trailing spacing, t = 999 first)
    must land on that image: what the UNet is trained towards, the sampler turns into a clean image."""
    from multimodal.latent import LatentDiffusionConfig, sampling_scheduler, train_scheduler

    cfg = LatentDiffusionConfig(sets="faces")
    target = torch.rand(1, 4, 8, 8) * 4 - 2
    a = train_scheduler(cfg).alphas_cumprod
    assert float(a[-1]) < 1e-8  # the cosine schedule ends at pure noise, so starting from N(0, I) is exact
    for sampler, steps in (("dpm", 10), ("ddim", 10), ("dpm", 3)):
        sched = sampling_scheduler(cfg, sampler)
        sched.set_timesteps(steps)
        assert int(sched.timesteps[0]) == 999
        z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        for t in sched.timesteps:
            ab = a[int(t)]
            eps = (z - ab.sqrt() * target) / (1 - ab).sqrt()
            v = ab.sqrt() * eps - (1 - ab).sqrt() * target  # the v-prediction of the exact model
            z = sched.step(v, t, z).prev_sample
        assert (z - target).abs().max() < 1e-3, (sampler, steps, float((z - target).abs().max()))


def test_a_model_trained_to_convergence_on_one_image_reproduces_it():
    """The whole loop, training loss -> sampler -> decoder: a tiny UNet fitted to a one-latent data set (every caption
    dropped, so the condition is the null prompt's) must sample that latent back, so the decoded image matches."""
    from multimodal.latent import LatentText2Img

    torch.manual_seed(0)
    m = LatentText2Img(make_config(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8,
                                   caption_dropout=1.0))
    target = torch.randn(1, *m.ae.latent_shape, generator=torch.Generator().manual_seed(3))
    batch = {"mean": target.expand(16, -1, -1, -1), "std": torch.zeros(16, *m.ae.latent_shape),
             "c": torch.zeros(16, dtype=torch.long)}
    opt = torch.optim.AdamW(m.unet.parameters(), lr=5e-3)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=300)
    for _ in range(300):
        loss, _ = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
    z = m._generate(None, 4, 20, 1.0, 0.0, torch.Generator().manual_seed(0), None, False, output_type="latent")
    rmse = ((z - target) ** 2).mean((1, 2, 3)).sqrt()
    assert (rmse < 0.25).all(), rmse  # an unrelated N(0, I) latent is ~1.4 away; pure noise left over would be ~1


def make_config(**kw):
    from multimodal.latent import LatentDiffusionConfig

    return LatentDiffusionConfig(sets="faces", captions_per_class=2, **kw)


def test_tiny_runs_end_to_end(runs):
    ae_res, ae_dir = runs["ae"]
    assert ae_res["status"] == "finished" and 0 < ae_res["test_faces_mse"] < 1
    assert (ae_dir / "reconstructions.png").exists()
    for cond in ("text", "prior"):
        m, res, d = runs[cond]
        assert res["status"] == "finished" and torch.isfinite(torch.tensor(res["test_diffusion"]))
        for f in ("samples_heldout_prompts.png", "curves.png", "model/model.safetensors", "model/unet/config.json",
                  "model/vae/config.json", "model/scheduler/scheduler_config.json"):
            assert (d / f).exists(), f
        assert m.config.latent_scale > 0
        x = m.sample(3, generator=torch.Generator().manual_seed(1))
        assert x.shape == (3, 3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert "prior_cos" in runs["prior"][1] or "test_prior_cos" in runs["prior"][1]


def test_frozen_minilm_is_not_stored(runs):
    from safetensors import safe_open

    _, _, d = runs["text"]
    with safe_open(str(d / "model" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("clip.visual.") for k in keys)
    assert not any(k.startswith("clip.text.transformer.") for k in keys)


@pytest.mark.parametrize("cond", ["text", "prior"])
def test_save_load_gives_identical_images(runs, cond, tmp_path):
    from multimodal.latent import LatentText2Img, load_text2img

    m, _, d = runs[cond]
    a = _gen(m, guidance_scale=2.0)
    m.save_pretrained(tmp_path / "pipe")
    b = _gen(LatentText2Img.from_pretrained(tmp_path / "pipe", device="cpu"), guidance_scale=2.0)
    c = _gen(load_text2img(d, device="cpu"), guidance_scale=2.0)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, _gen(m, seed=1, guidance_scale=2.0))
    assert not torch.equal(a, _gen(m, guidance_scale=1.0))
    # the fp16 export is the shipped form: same images up to half precision
    m.export_pretrained(tmp_path / "half")
    h = _gen(LatentText2Img.from_pretrained(tmp_path / "half", device="cpu"), guidance_scale=2.0)
    assert (h - a).abs().max() < 0.05


def test_ddim_and_clip_guidance_run(runs):
    m, _, _ = runs["text"]
    base = _gen(m, guidance_scale=2.0)
    assert not torch.equal(base, _gen(m, guidance_scale=2.0, sampler="ddim"))
    assert not torch.equal(base, _gen(m, guidance_scale=2.0, clip_guidance_scale=50.0))


@pytest.mark.parametrize("bad,match", [("", "empty"), (7, "must be a string"), ("y" * 1000, "shorten"),
                                       ([], "non-empty")])
def test_prompt_validation(runs, bad, match):
    m, _, _ = runs["text"]
    with pytest.raises(DreamlabError, match=match):
        m(bad)


def test_bad_values(runs):
    from multimodal.latent import LatentDiffusionConfig

    m, _, _ = runs["text"]
    with pytest.raises(DreamlabError, match="num_images_per_prompt"):
        m("a face", num_images_per_prompt=0)
    with pytest.raises(DreamlabError, match="sampler"):
        m("a face", sampler="euler")
    with pytest.raises(DreamlabError, match="conditioning"):
        LatentDiffusionConfig(conditioning="image")
    with pytest.raises(DreamlabError, match="unknown set"):
        LatentDiffusionConfig(sets="cats")


# ---- the weights that ship with the package ---------------------------------------------------------------------

def _default():
    from multimodal.latent import DEFAULT_WEIGHTS, load_text2img

    if not (DEFAULT_WEIGHTS / "model.safetensors").exists():
        pytest.fail(f"the shipped default weights are missing from {DEFAULT_WEIGHTS}")
    return load_text2img(None, device="cpu")


def test_shipped_weights_are_small_fp16_and_load_offline():
    from safetensors import safe_open

    from multimodal.latent import DEFAULT_WEIGHTS

    pipe = _default()
    size = sum(f.stat().st_size for f in DEFAULT_WEIGHTS.iterdir())
    assert size <= 25 * 2**20, size
    with safe_open(str(DEFAULT_WEIGHTS / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}
    x = pipe("a smiling face with blonde hair and glasses", num_images_per_prompt=2, num_inference_steps=4,
             generator=torch.Generator().manual_seed(0)).images
    assert x.shape == (2, 3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.05


def test_shipped_autoencoder_round_trip_on_held_out_images():
    """Fresh images of the held-out combinations (never in the autoencoder's training split): the reconstruction
    error must be under half that of the best constant image (the batch's own mean image)."""
    pipe = _default()
    for kind in P.KINDS:
        labels = torch.tensor([P.combo_indices(kind, c) for c in P.HELD_OUT[kind]]).repeat(16, 1)[:16].numpy()
        x, _ = P.generate(kind, 16, seed=99, labels=labels)
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        mse = float(((pipe.ae.reconstruct(x) - x) ** 2).mean())
        constant = float(((x.mean(0, keepdim=True) - x) ** 2).mean())
        assert mse < 0.5 * constant, (kind, mse, constant)


def test_cli_default_weights_and_model_flag(runs, tmp_path, capsys):
    from PIL import Image

    from dreamlab.cli import main

    _default()
    out = tmp_path / "out.png"
    assert main(["text2img", "a smiling face with blonde hair and glasses", "-n", "1", "--out", str(out),
                 "--steps", "2", "--no-progress"]) == 0
    w, h = Image.open(out).size
    assert w == h and w >= 64  # one 64x64 image, scaled up in the grid
    _, _, d = runs["text"]
    assert main(["text2img", "a face", "-n", "2", "--model", str(d), "--out", str(tmp_path / "t.png"), "--steps", "2",
                 "--no-progress"]) == 0
    assert main(["text2img", "a face", "--model", str(tmp_path / "missing")]) == 2
    assert "no trained text-to-image model" in capsys.readouterr().err
    assert main(["multimodal", "export-default", "--model", str(d), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.safetensors").exists() and (tmp_path / "exp" / "metrics.json").exists()
    assert main(["multimodal", "train-latent", "--autoencoder", str(tmp_path / "noae"), "--clip", str(tmp_path),
                 "--out", str(tmp_path / "r")]) == 2
    assert "train-clip" in capsys.readouterr().err


def test_evaluation_rows(runs, tmp_path):
    from multimodal.evaluate import evaluate_text2img

    m, _, _ = runs["prior"]
    res = evaluate_text2img(m, tmp_path, n_per_prompt=1, num_inference_steps=2, judge_steps=5, judge_images=200,
                            fast=True, progress=False)
    names = {(r["prompts"], r["setting"]) for r in res["rows"]}
    settings = ("prior, no guidance", "prior, classifier-free")
    assert names == {(p, s) for p in ("held-out", "paraphrase") for s in settings}
    for r in res["rows"]:
        assert 0 <= r["clip_score"] <= 100 and 0 <= r["attr_acc"] <= 1 and r["images_per_s"] > 0
        assert (tmp_path / r["grid"]).exists()
    held = [r for r in res["rows"] if r["prompts"] == "held-out"]
    assert all(r["frechet"] >= 0 and r["frechet_floor"] >= 0 for r in held)
    assert (tmp_path / "eval_text2img.md").read_text().count("|") > 20
