"""The Generator contract, checked for every registered generator on its `tiny` preset."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from generators.base import (
    Generator,
    TrainConfig,
    get_model_class,
    list_generators,
    list_models,
    make_model,
    split_overrides,
)
from generators.trainer import iterate_train


def _tiny(name: str):
    cls = get_model_class(name)
    assert "tiny" in cls.presets, f"{name} needs a 'tiny' preset for tests"
    mo, to = split_overrides(cls, cls.presets["tiny"])
    torch.manual_seed(0)
    model = make_model(name, **mo)
    tc = TrainConfig(**{**{"device": "cpu", "batch_size": 8}, **to})
    return model, tc


def _batch(model, tc):
    return next(iterate_train(model.train_data("train"), tc.batch_size, 0, 0, torch.device("cpu")))


ALL = list_models()


def test_registry_has_the_foundation_models() -> None:
    assert {"autoencoder", "vae", "conv_vae"} <= set(list_generators())
    assert {"mlp", "cnn"} <= set(ALL) - set(list_generators())


@pytest.mark.parametrize("name", ALL)
def test_every_registered_name_builds_with_its_defaults(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make_model(name)` needs no trained files: run from an empty folder, so no runs/ can help it."""
    monkeypatch.chdir(tmp_path)
    model = make_model(name)
    assert model.name == name and model.num_parameters() > 0


@pytest.mark.parametrize("name", ALL)
def test_train_step_gives_finite_loss_and_changes_weights(name: str) -> None:
    model, tc = _tiny(name)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    opts = model.configure_optimizers(tc)
    metrics = model.train_step(_batch(model, tc), opts, 0, tc)
    assert metrics and all(math.isfinite(float(v)) for v in metrics.values()), metrics
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(before[k], v)]
    assert changed, f"{name}: a train step changed no weights"


@pytest.mark.parametrize("name", list_generators())
def test_sample_shape_range_and_seed(name: str) -> None:
    model, _ = _tiny(name)
    model.eval()
    cond = type(model).example_condition

    def draw(seed: int) -> torch.Tensor:
        return model.sample(3, generator=torch.Generator().manual_seed(seed), **cond)

    a, b, c = draw(1), draw(1), draw(2)
    assert isinstance(a, torch.Tensor) and a.dtype == type(model).sample_dtype and a.shape[0] == 3
    assert torch.isfinite(a).all()
    lo_hi = type(model).sample_range
    if lo_hi is not None:
        assert a.min() >= lo_hi[0] and a.max() <= lo_hi[1]
    assert torch.equal(a, b), "the same seed must give the same samples"
    assert not torch.equal(a, c), "different seeds should give different samples"


@pytest.mark.parametrize("name", list_generators())
def test_save_load_gives_identical_samples(name: str, tmp_path: Path) -> None:
    model, tc = _tiny(name)
    # one train step so that the weights differ from a fresh init
    model.train_step(_batch(model, tc), model.configure_optimizers(tc), 0, tc)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "model.safetensors").exists()
    loaded = Generator.from_pretrained(tmp_path / "m", device="cpu")
    assert type(loaded) is type(model)
    cond = type(model).example_condition
    s1 = model.sample(2, generator=torch.Generator().manual_seed(3), **cond)
    s2 = loaded.sample(2, generator=torch.Generator().manual_seed(3), **cond)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("name", [n for n in list_generators() if get_model_class(n).log_prob_kind])
def test_log_prob_finite(name: str) -> None:
    model, tc = _tiny(name)
    model.eval()
    x = _batch(model, tc)["x"][:4]
    lp = model.log_prob(x)
    assert lp.shape == (len(x),) and torch.isfinite(lp).all()


@pytest.mark.parametrize("name", [n for n in list_generators() if not get_model_class(n).log_prob_kind])
def test_no_log_prob_raises(name: str) -> None:
    model, tc = _tiny(name)
    with pytest.raises(NotImplementedError):
        model.log_prob(torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_bf16_train_step_and_seeded_sampling(name: str) -> None:
    from dataclasses import replace

    from dreamlab.errors import DreamlabError

    try:
        model, tc = _tiny(name)
        batch = _batch(model, tc)
    except (DreamlabError, OSError) as e:
        # a data package or pretrained weights this GPU machine lacks (e.g. MiniLM's 91 MB, too big to carry
        # there); building the tiny model is the same code the CPU tests above run, and they never skip
        pytest.skip(f"{name}: {e}")
    dev = torch.device("cuda")
    tc = replace(tc, device="cuda", amp=True)
    model.to(dev).train()
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    metrics = model.train_step(batch, model.configure_optimizers(tc), 0, tc)
    assert metrics and all(math.isfinite(float(v)) for v in metrics.values()), metrics
    if name in list_generators():
        model.eval()
        cond = type(model).example_condition
        # a seeded CPU generator works for a CUDA model and draws the same noise every time; cuDNN's
        # convolutions are not bitwise deterministic by default (seen on an H100: equal to 4 decimals)
        a = model.sample(3, generator=torch.Generator().manual_seed(1), **cond)
        b = model.sample(3, generator=torch.Generator().manual_seed(1), **cond)
        assert a.is_cuda and torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
