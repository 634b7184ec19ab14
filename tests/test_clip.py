"""CLIP with open_clip and the pretrained MiniLM text tower: tiny training, open_clip local-dir round trip."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from dreamlab.errors import DreamlabError

pytestmark = pytest.mark.usefixtures("offline_small_procedural")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import multimodal.clip  # noqa: F401  (registers "clip")
    from generators.trainer import train_from_name

    out = tmp_path_factory.mktemp("clip_run")
    model, res, run = train_from_name("clip", preset="tiny", out=out, progress=False)
    return model, res, run


def test_offline_environment():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError):
        socket.create_connection(("huggingface.co", 443), timeout=1)


def test_tiny_clip_trains_and_reports_zero_shot(trained):
    model, res, run = trained
    assert res["status"] == "finished" and res["step"] == 3
    for key in ("test_zeroshot_faces_heldout_combo_acc", "test_zeroshot_faces_heldout_attr_acc",
                "test_zeroshot_faces_heldout_paraphrase_attr_acc", "test_zeroshot_flowers_heldout_attr_acc"):
        assert 0.0 <= res[key] <= 1.0
    assert (run / "model" / "open_clip_config.json").exists() and (run / "model" / "tokenizer.json").exists()
    assert (run / "metrics.jsonl").read_text().count("\n") >= 3


def test_text_tower_is_the_pretrained_minilm_and_frozen(trained):
    from transformers import AutoModel

    from multimodal.clip import minilm_path

    model, _, _ = trained
    ref = AutoModel.from_pretrained(minilm_path())
    w = model.text.transformer.embeddings.word_embeddings.weight
    assert torch.equal(w, ref.embeddings.word_embeddings.weight)  # frozen: unchanged by training
    assert not any(p.requires_grad for p in model.text.transformer.parameters())
    assert model.text.proj[0].weight.requires_grad


def test_open_clip_local_dir_round_trip(trained):
    import open_clip

    from multimodal.clip import load_clip

    model, _, run = trained
    d = run / "model"
    oc = open_clip.create_model(f"local-dir:{d}").eval()
    tok = open_clip.get_tokenizer(f"local-dir:{d}")
    again = load_clip(run, device="cpu")
    x = torch.rand(4, 3, 16, 16)
    texts = ["a smiling face with red hair", "a blue flower with five petals"]
    model.eval()
    with torch.no_grad():
        ours_i, ours_t = model.encode_image(x), model.encode_text(texts)
        oc_i = torch.nn.functional.normalize(oc.encode_image((x - 0.5) / 0.5), dim=-1)
        oc_t = torch.nn.functional.normalize(oc.encode_text(tok(texts)), dim=-1)
        torch.testing.assert_close(oc_i, ours_i)
        torch.testing.assert_close(oc_t, ours_t)
        torch.testing.assert_close(again.encode_image(x), ours_i)
        torch.testing.assert_close(again.encode_text(texts), ours_t)


def test_training_fits_a_fixed_batch():
    from generators.base import TrainConfig
    from multimodal.clip import ClipConfig, ClipModel

    torch.manual_seed(0)
    m = ClipModel(
        ClipConfig(
            sets="bricks",
            max_per_set=32,
            image_size=16,
            embed_dim=32,
            vision_width=32,
            vision_layers=1,
            vision_head_width=16,
            captions_per_class=1,
        )
    )
    batch = m.train_data("train")
    (opt,) = m.configure_optimizers(TrainConfig(lr=3e-3))
    first = float(m.loss(batch)[0].detach())
    for _ in range(25):
        loss, _ = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(m.loss(batch)[0].detach()) < 0.7 * first


def test_finetune_mode_updates_the_text_transformer():
    from generators.base import TrainConfig
    from multimodal.clip import ClipConfig, ClipModel

    m = ClipModel(
        ClipConfig(
            sets="bricks",
            max_per_set=16,
            image_size=16,
            embed_dim=32,
            vision_width=32,
            vision_layers=1,
            vision_head_width=16,
            captions_per_class=1,
            text_mode="finetune",
        )
    )
    batch = m.train_data("train")
    before = m.text.transformer.encoder.layer[0].attention.self.query.weight.detach().clone()
    (opt,) = m.configure_optimizers(TrainConfig(lr=1e-3))
    loss, _ = m.loss(batch)
    loss.backward()
    opt.step()
    assert not torch.equal(before, m.text.transformer.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("", "empty"),
        ("   ", "empty"),
        (3, "must be a string"),
        (None, "must be a string"),
        ("x" * 400, "shorten"),
        ([], "non-empty list"),
        (["ok", 5], r"prompt\[1\]"),
    ],
)
def test_prompt_validation(bad, match):
    from multimodal.clip import validate_prompts

    with pytest.raises(DreamlabError, match=match):
        validate_prompts(bad)


def test_missing_clip_folder_says_how_to_train(tmp_path):
    from multimodal.clip import load_clip

    with pytest.raises(DreamlabError, match="train-clip"):
        load_clip(tmp_path / "nothing")
