"""M (MDN-RNN): the loss against a direct numeric computation, the step/LSTM equivalence, sampling."""
from __future__ import annotations

import math

import pytest
import torch

from dreamlab.errors import DreamlabError
from worlds.models import MDNRNN, MDNRNNConfig, chunk_sequences


def _batch(b: int, t: int, z: int, a: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[1, -2:] = 0  # padded tail must not count
    mu, act = torch.randn(b, t + 1, z, generator=g), torch.rand(b, t, a, generator=g)
    return {
        "x": torch.cat([mu, torch.cat([act, torch.zeros(b, 1, a)], 1)], -1),
        "logvar": torch.full((b, t + 1, z), -30.0),
        "reward": torch.randn(b, t, generator=g),
        "done": (torch.rand(b, t, generator=g) < 0.3).float(),
        "mask": mask,
    }


def test_mdn_loss_matches_direct_computation() -> None:
    torch.manual_seed(0)
    cfg = MDNRNNConfig(z_dim=3, action_dim=2, hidden=5, mixtures=2, seq_len=4, reward_weight=0.7, done_weight=1.3)
    m = MDNRNN(cfg).double()
    batch = {k: v.double() for k, v in _batch(2, 4, 3, 2).items()}
    # with logvar = -30 the resampled z equals mu to ~1e-7, so the loss is (numerically) deterministic
    loss, metrics = m.loss(batch)
    # direct computation: raw head outputs, then explicit sums over steps, components and dimensions
    mu_seq = batch["x"][..., :3]
    x = batch["x"][:, :-1]
    out = m.head(m.rnn(x)[0]).detach()
    K, Z = 2, 3
    nll = mse = bce = n = 0.0
    for b in range(2):
        for t in range(4):
            if batch["mask"][b, t] == 0:
                continue
            o = out[b, t].tolist()
            logits = o[:K]
            mx = max(logits)
            pis = [math.exp(v - mx) for v in logits]
            pis = [p / sum(pis) for p in pis]
            dens = 0.0
            for k in range(K):
                prod = 1.0
                for d in range(Z):
                    mu = o[K + k * Z + d]
                    sig = math.exp(min(max(o[K + K * Z + k * Z + d], -7.0), 5.0))
                    y = float(mu_seq[b, t + 1, d])
                    prod *= math.exp(-0.5 * ((y - mu) / sig) ** 2) / (sig * math.sqrt(2 * math.pi))
                dens += pis[k] * prod
            nll -= math.log(dens)
            mse += (o[-2] - float(batch["reward"][b, t])) ** 2
            p = 1 / (1 + math.exp(-o[-1]))
            y = float(batch["done"][b, t])
            bce -= y * math.log(p) + (1 - y) * math.log(1 - p)
            n += 1
    want = nll / n / Z + 0.7 * mse / n + 1.3 * bce / n
    assert metrics["nll_per_step"] == pytest.approx(nll / n, rel=1e-5)
    assert metrics["reward_mse"] == pytest.approx(mse / n, rel=1e-6)
    assert metrics["done_bce"] == pytest.approx(bce / n, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)


def test_step_equals_lstm_and_log_prob_is_sum_of_steps() -> None:
    torch.manual_seed(1)
    m = MDNRNN(MDNRNNConfig(z_dim=4, hidden=8, mixtures=3)).eval()
    z = torch.randn(2, 6, 4)
    a = torch.rand(2, 5, 3)
    seq, _ = m.rnn(torch.cat([z[:, :-1], a], -1))
    h = c = torch.zeros(2, 8)
    lp = torch.zeros(2)
    for t in range(5):
        h, c, out = m.step(z[:, t], a[:, t], h, c)
        assert torch.allclose(h, seq[:, t], atol=1e-6)
        logpi, mu, ls, _, _ = m.split_head(out)
        lp += m.mixture_log_prob(z[:, t + 1], logpi, mu, ls)
    x = torch.cat([z, torch.cat([a, torch.zeros(2, 1, 3)], 1)], -1)
    assert torch.allclose(m.log_prob(x), lp, atol=1e-5)


def test_sample_shapes_temperature_and_errors() -> None:
    torch.manual_seed(2)
    m = MDNRNN(MDNRNNConfig(z_dim=4, hidden=8, mixtures=3)).eval()
    a = torch.rand(3, 7, 3)
    x1 = m.sample(3, generator=torch.Generator().manual_seed(0), actions=a)
    x2 = m.sample(3, generator=torch.Generator().manual_seed(0), actions=a)
    assert x1.shape == (3, 8, 4 + 3) and torch.equal(x1, x2)
    assert torch.equal(x1[:, :-1, 4:], a)  # the conditioning actions ride along, so log_prob(sample) works
    assert torch.isfinite(m.log_prob(x1)).all()
    # tau -> 0: the draw collapses onto the most likely component's mean
    logpi = torch.log(torch.tensor([[0.1, 0.9]]))
    mu = torch.tensor([[[5.0, 5.0], [-1.0, 2.0]]])
    z = MDNRNN.sample_mixture(logpi, mu, torch.zeros(1, 2, 2), 1e-8, torch.Generator().manual_seed(0))
    assert torch.allclose(z, torch.tensor([[-1.0, 2.0]]), atol=2e-2)
    with pytest.raises(DreamlabError, match="actions have shape"):
        m.sample(3, actions=torch.rand(2, 7, 3))


def test_chunk_sequences_masks_padding_and_checks_z_dim() -> None:
    ep = {"mu": torch.randn(11, 4), "logvar": torch.zeros(11, 4), "action": torch.rand(10, 3), "reward": torch.ones(10),
          "done": torch.zeros(10)}
    d = chunk_sequences([ep], 4, 4, 3)
    assert d["x"].shape == (3, 5, 4 + 3)
    assert d["mask"].sum() == 10 and d["mask"][2].tolist() == [1, 1, 0, 0]
    assert torch.allclose(d["x"][1, 0, :4].float(), ep["mu"][4].half().float())  # chunks overlap by one latent
    assert torch.allclose(d["x"][0, :4, 4:].float(), ep["action"][:4].half().float())
    with pytest.raises(DreamlabError, match="z_dim"):
        chunk_sequences([ep], 4, 8, 3)


def test_a_saved_m_of_an_earlier_release_loads_and_a_removed_option_is_named(tmp_path) -> None:
    """config.json of M written with the removed chunk_stride/self_feed options still loads at their neutral values."""
    import json

    from generators.base import Generator

    m = MDNRNN(MDNRNNConfig(z_dim=4, hidden=8, mixtures=2, seq_len=4))
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["config"].update(chunk_stride=0, self_feed=0.0)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(Generator.from_pretrained(tmp_path / "m", device="cpu").head.weight, m.head.weight)
    cfg["config"]["self_feed"] = 0.5
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DreamlabError, match="self_feed=0.5 was an experiment option"):
        Generator.from_pretrained(tmp_path / "m", device="cpu")
