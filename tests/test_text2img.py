"""Text-to-image pipeline: tiny end-to-end training, save/load reproducibility, guidance, CLI, evaluation."""
from __future__ import annotations

import pytest
import torch

from dreamlab import procedural as P
from dreamlab.errors import DreamlabError

pytestmark = pytest.mark.usefixtures("offline_small_procedural")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import multimodal.text2img  # noqa: F401
    from generators.trainer import train_from_name

    out = tmp_path_factory.mktemp("t2i") / "run"
    model, res, run_dir = train_from_name("text2img", preset="tiny", out=out, progress=False)
    return model, res, run_dir


def _gen(pipe, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(["a smiling face with red hair", "a serious face with glasses"], generator=g, num_images_per_prompt=2,
                **kw).images


def test_tiny_end_to_end(run):
    model, res, run_dir = run
    assert res["status"] == "finished" and res["step"] == 2
    assert torch.isfinite(torch.tensor(res["test_loss"]))
    for f in ("config.json", "metrics.jsonl", "eval.json", "samples_heldout_prompts.png", "model/model.safetensors",
              "model/model_index.json", "model/unet/config.json", "model/scheduler/scheduler_config.json"):
        assert (run_dir / f).exists(), f
    x = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert x.shape == (3, 3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    y = model.sample(2, prompt="a face with blonde hair", generator=torch.Generator().manual_seed(1))
    assert y.shape == (2, 3, 16, 16)


def test_save_load_gives_identical_images(run, tmp_path):
    from multimodal.text2img import Text2ImgPipeline, load_pipeline

    model, _, run_dir = run
    a = _gen(model, guidance_scale=2.0, clip_guidance_scale=50.0)
    model.save_pretrained(tmp_path / "pipe")
    b = _gen(Text2ImgPipeline.from_pretrained(tmp_path / "pipe", device="cpu"), guidance_scale=2.0,
             clip_guidance_scale=50.0)
    c = _gen(load_pipeline(run_dir, device="cpu"), guidance_scale=2.0, clip_guidance_scale=50.0)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, _gen(model, seed=1, guidance_scale=2.0, clip_guidance_scale=50.0))


def test_diffusers_can_load_the_unet_and_scheduler(run, tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    model, _, _ = run
    model.save_pretrained(tmp_path / "pipe")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet")
    for k, v in model.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    sched = DDIMScheduler.from_pretrained(tmp_path / "pipe" / "scheduler")
    assert sched.config.num_train_timesteps == model.config.num_train_timesteps


def test_guidance_changes_the_images(run):
    model, _, _ = run
    base = _gen(model, guidance_scale=1.0, clip_guidance_scale=0.0)
    assert not torch.equal(base, _gen(model, guidance_scale=4.0, clip_guidance_scale=0.0))
    assert not torch.equal(base, _gen(model, guidance_scale=1.0, clip_guidance_scale=200.0))
    # the CLIP guidance direction raises the CLIP similarity of the predicted clean image
    torch.manual_seed(0)
    x, eps = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    a = torch.tensor(0.5)
    text = model.clip.encode_text(["a smiling face with red hair"] * 4)
    g = model._clip_grad(x, eps, a, text)
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)

    def sim(z):
        with torch.no_grad():
            return (model.clip.encode_image((z.clamp(-1, 1) + 1) / 2) * text).sum(-1)

    assert (sim(x0 + 1e-2 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)) > sim(x0)).all()


@pytest.mark.parametrize("bad,match", [("", "empty"), (7, "must be a string"), ("y" * 1000, "shorten"),
                                       ([], "non-empty")])
def test_prompt_validation(run, bad, match):
    model, _, _ = run
    with pytest.raises(DreamlabError, match=match):
        model(bad)


def test_bad_sampling_values(run):
    model, _, _ = run
    with pytest.raises(DreamlabError, match="num_images_per_prompt"):
        model("a face", num_images_per_prompt=0)
    with pytest.raises(DreamlabError, match="num_inference_steps"):
        model("a face", num_inference_steps=0)
    with pytest.raises(DreamlabError, match="guidance_scale"):
        model("a face", guidance_scale=-1.0)
    with pytest.raises(DreamlabError, match="prompts for n=3"):
        model.sample(3, prompt=["a", "b"])


def test_cli_text2img(run, tmp_path, capsys):
    from dreamlab.cli import main

    _, _, run_dir = run
    out = tmp_path / "out.png"
    assert main(["text2img", "a smiling face with blonde hair and glasses", "-n", "2", "--out", str(out),
                 "--run", str(run_dir),
                 "--steps", "2", "--no-progress"]) == 0
    assert out.exists() and out.stat().st_size > 100
    assert main(["text2img", "a face", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no trained text-to-image model" in err and "dreamlab multimodal train-latent" in err
    assert main(["text2img", "", "--run", str(run_dir)]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    # the cheap checks come before the model: a bad prompt or --out is reported even where no model exists
    assert main(["text2img", " ", "--run", str(tmp_path / "missing")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["text2img", "a face", "--out", str(tmp_path / "o.jpg"), "--run", str(tmp_path / "missing")]) == 2
    assert "must end in .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["text2img", "a face", "-n", "zero"])
    assert main(["multimodal", "train-text2img", "--clip", str(tmp_path / "noclip"), "--out", str(tmp_path / "r")]) == 2
    assert "train-clip" in capsys.readouterr().err


def test_evaluation_tables_and_grids(run):
    from multimodal.evaluate import evaluate_text2img

    model, _, run_dir = run
    res = evaluate_text2img(model, run_dir, n_per_prompt=1, num_inference_steps=2, judge_steps=5,
                            judge_images=200, progress=False)
    settings = ["text, no guidance", "text, classifier-free", "text, classifier-free + CLIP",
                "text, classifier-free, clip x0, leading"]
    assert [r["setting"] for r in res["rows"]] == settings * 2  # held-out prompts, then paraphrases
    assert [r["prompts"] for r in res["rows"]] == ["held-out"] * 4 + ["paraphrase"] * 4
    for r in res["rows"]:
        assert 0 <= r["clip_score"] <= 100 and 0 <= r["attr_acc"] <= 1 and (run_dir / r["grid"]).exists()
    assert len(res["prompts"]["faces"]) == len(P.HELD_OUT["faces"])
    assert (run_dir / "eval_text2img.md").read_text().count("|") > 20
    # the judge is the shipped one (generators/assets/featnet_faces): nothing is trained at evaluation time
    assert set(res["judge"]["faces"]) == {*P.attribute_names("faces"), "all"} and res["judge"]["faces"]["all"] > 0.9
    # the v1-sampler row restored the model's own settings
    assert model.config.x0_limit == "dynamic" and model.config.timestep_spacing == "trailing"


def test_sampler_starts_at_pure_noise_and_offers_imagen_thresholding(run):
    model, _, _ = run
    s = model.scheduler()
    s.set_timesteps(25)
    assert int(s.timesteps[0]) == model.config.num_train_timesteps - 1  # "trailing": x_T ~ N(0, I) is exact
    assert float(s.alphas_cumprod[-1]) < 1e-8
    d = model.scheduler(x0_limit="dynamic")
    assert d.config.thresholding and not d.config.clip_sample and d.config.sample_max_value > 1
    assert model.config.x0_limit == "dynamic"  # the default: it measured best (docs/text2img.md)
    dyn = _gen(model, guidance_scale=4.0, clip_guidance_scale=0.0)
    model.config.x0_limit = "clip"
    try:
        base = _gen(model, guidance_scale=4.0, clip_guidance_scale=0.0)
    finally:
        model.config.x0_limit = "dynamic"
    assert not torch.equal(base, dyn) and 0 <= float(dyn.min()) and float(dyn.max()) <= 1
