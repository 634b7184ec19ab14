"""Encode every episode of a rollout folder with V into (mu, logvar) series for training M.

`latents/ep_000123.safetensors` holds mu, logvar (T+1, Z) float16, action (T, A), reward (T,), done (T,)
(the env's `terminated`), plus `latents/manifest.json`. Episodes already encoded by the same VAE are
skipped, so an interrupted encode continues where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dreamlab.errors import DreamlabError
from dreamlab.io import load_json, load_tensors, save_json, save_tensors
from worlds.rollouts import episode_files, load_episode

LATENT_KEYS = ("mu", "logvar", "action", "reward", "done")


def encode_rollouts(vae: Any, rollouts: str | Path, out: str | Path, *, progress: bool = True, vae_id: str = "") -> dict[str, Any]:
    from tqdm.auto import tqdm

    rollouts, out = Path(rollouts), Path(out)
    files = episode_files(rollouts)
    out.mkdir(parents=True, exist_ok=True)
    old = load_json(out / "manifest.json") if (out / "manifest.json").exists() else {}
    reuse = old.get("vae") == vae_id and vae_id != ""
    done = {e["file"] for e in old.get("episodes", [])} if reuse else set()
    entries = [e for e in old.get("episodes", []) if e["file"] in done]
    frames = 0
    bar = tqdm(files, desc="encode", unit="ep", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for f in bar:
        name = f.with_suffix(".safetensors").name
        if name in done and (out / name).exists():
            continue
        ep = load_episode(f)
        mu, logvar = vae.encode_frames(ep.obs)
        save_tensors(out / name, {"mu": mu.half(), "logvar": logvar.half(), "action": torch.from_numpy(ep.actions),
                                  "reward": torch.from_numpy(ep.rewards), "done": torch.from_numpy(ep.terminated.astype("uint8"))})
        entries.append({"file": name, "source": f.name, "steps": ep.steps})
        frames += len(ep.obs)
        bar.set_postfix(frames_per_s=f"{frames / max(time.perf_counter() - start, 1e-9):.0f}")
        save_json(out / "manifest.json", {"vae": vae_id, "rollouts": str(rollouts), "z_dim": int(mu.shape[1]), "episodes": entries})
    save_json(out / "manifest.json", {"vae": vae_id, "rollouts": str(rollouts), "z_dim": vae.config.z_dim,
                                      "episodes": sorted(entries, key=lambda e: e["file"])})
    return {"episodes": len(entries), "encoded_frames": frames, "seconds": round(time.perf_counter() - start, 2)}


def latent_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        run = folder.parent if folder.name == "latents" else "RUN"
        raise DreamlabError(f"{folder} has no manifest.json; encode rollouts first: dreamlab worldmodel encode {run}")
    m = load_json(folder / "manifest.json")
    eps = m.get("episodes", [])
    if not eps:
        raise DreamlabError(f"{folder / 'manifest.json'} lists no encoded episodes; run: dreamlab worldmodel encode RUN")
    return [folder / e["file"] for e in eps]


def load_latents(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    t = load_tensors(path)
    missing = [k for k in LATENT_KEYS if k not in t]
    if missing:
        raise DreamlabError(f"latent file {path} lacks {missing[0]!r}; delete it and re-run encode")
    n = len(t["action"])
    if t["mu"].shape[0] != n + 1 or t["logvar"].shape != t["mu"].shape or t["reward"].shape != (n,) or t["done"].shape != (n,):
        raise DreamlabError(f"latent file {path} has inconsistent shapes (mu {tuple(t['mu'].shape)}, action {tuple(t['action'].shape)}); "
                            "delete it and re-run encode")
    if not (torch.isfinite(t["mu"].float()).all() and torch.isfinite(t["logvar"].float()).all()):
        raise DreamlabError(f"latent file {path} contains NaN/inf; the VAE diverged: retrain it (lower lr) and re-encode")
    return {"mu": t["mu"].float(), "logvar": t["logvar"].float(), "action": t["action"].float(), "reward": t["reward"].float(),
            "done": t["done"].float()}


def initial_latents(folder: str | Path, max_episodes: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) of the first frame of each encoded episode: the dream's real initial states."""
    mus, lvs = [], []
    for f in latent_files(folder)[:max_episodes]:
        t = load_tensors(f)
        mus.append(t["mu"][:1].float())
        lvs.append(t["logvar"][:1].float())
    return torch.cat(mus), torch.cat(lvs)
