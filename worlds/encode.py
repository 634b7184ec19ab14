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
from dreamlab.io import load_json, load_tensors, remove_stale_temps, save_json, save_tensors
from worlds.rollouts import episode_files, load_episode

LATENT_KEYS = ("mu", "logvar", "action", "reward", "done")


def encode_rollouts(
    vae: Any, rollouts: str | Path, out: str | Path, *, progress: bool = True, vae_id: str = ""
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    rollouts, out = Path(rollouts), Path(out)
    files = episode_files(rollouts)
    out.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(out)
    reuse = old.get("vae") == vae_id and vae_id != ""
    # kept: latents of this V whose episode is still listed and whose file is still there (a file deleted as an error
    # advised is encoded again, once: listing it twice trained M on it twice)
    wanted = {f.with_suffix(".safetensors").name: f.name for f in files}
    entries = [e for e in old.get("episodes", []) if reuse and wanted.get(e.get("file")) == e.get("source")
               and (out / e["file"]).is_file()]
    done = {e["file"] for e in entries}
    remove_stale_temps(out)  # what a killed atomic write left behind
    frames = 0
    bar = tqdm(files, desc="encode", unit="ep", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for f in bar:
        name = f.with_suffix(".safetensors").name
        if name in done:
            continue
        ep = load_episode(f)
        mu, logvar = vae.encode_frames(ep.obs)
        save_tensors(
            out / name,
            {
                "mu": mu.half(),
                "logvar": logvar.half(),
                "action": torch.from_numpy(ep.actions),
                "reward": torch.from_numpy(ep.rewards),
                "done": torch.from_numpy(ep.terminated.astype("uint8")),
            },
        )
        entries.append({"file": name, "source": f.name, "steps": ep.steps})
        frames += len(ep.obs)
        bar.set_postfix(frames_per_s=f"{frames / max(time.perf_counter() - start, 1e-9):.0f}")
        save_json(
            out / "manifest.json",
            {"vae": vae_id, "rollouts": str(rollouts), "z_dim": int(mu.shape[1]), "episodes": entries},
        )
    save_json(out / "manifest.json", {"vae": vae_id, "rollouts": str(rollouts), "z_dim": vae.config.z_dim,
                                      "episodes": sorted(entries, key=lambda e: e["file"])})
    return {"episodes": len(entries), "encoded_frames": frames, "seconds": round(time.perf_counter() - start, 2)}


def _read_manifest(out: Path) -> dict[str, Any]:
    """The latents' manifest, or {} when there is none or it is damaged (every episode is then encoded again)."""
    p = out / "manifest.json"
    try:
        m = load_json(p) if p.exists() else {}
    except DreamlabError:
        return {}
    ok = isinstance(m, dict) and isinstance(m.get("episodes"), list) and all(isinstance(e, dict) for e in m["episodes"])
    return m if ok else {}


def _encode_hint(folder: Path) -> str:
    run = folder.parent if folder.name == "latents" else "RUN"
    return f"dreamlab worldmodel encode {run}"


def latent_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        raise DreamlabError(f"{folder} has no manifest.json; encode rollouts first: {_encode_hint(folder)}")
    m = load_json(folder / "manifest.json")
    eps = m.get("episodes") if isinstance(m, dict) else None
    if not isinstance(eps, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in eps):
        raise DreamlabError(f"{folder / 'manifest.json'} is not a latents manifest; delete it and encode again: "
                            f"{_encode_hint(folder)}")
    if not eps:
        raise DreamlabError(f"{folder / 'manifest.json'} lists no encoded episodes; run: {_encode_hint(folder)}")
    return [folder / e["file"] for e in eps]


def load_latents(path: str | Path) -> dict[str, torch.Tensor]:
    """One encoded episode, checked (keys, shapes, finite values; any stored dtype is read as float32); errors name
    the file and the fix."""
    path = Path(path)
    fix = f"delete it and encode again: {_encode_hint(path.parent)}"
    if not path.exists():
        raise DreamlabError(f"latent file {path} is missing; {fix}")
    try:
        t = load_tensors(path)
    except DreamlabError as e:  # truncated, empty, not safetensors: what to do is to encode it again
        raise DreamlabError(f"latent file {str(e).split('; it is corrupt')[0]}; {fix}") from e
    missing = [k for k in LATENT_KEYS if k not in t]
    if missing:
        raise DreamlabError(f"latent file {path} lacks {missing[0]!r}; {fix}")
    n = len(t["action"]) if t["action"].ndim else -1
    if (t["mu"].ndim != 2 or t["mu"].shape[0] != n + 1 or t["logvar"].shape != t["mu"].shape
            or t["action"].ndim != 2 or t["reward"].shape != (n,) or t["done"].shape != (n,)):
        raise DreamlabError(f"latent file {path} has inconsistent shapes (mu {tuple(t['mu'].shape)}, "
                            f"action {tuple(t['action'].shape)}); {fix}")
    if not (t["mu"].is_floating_point() and t["logvar"].is_floating_point()):
        raise DreamlabError(f"latent file {path} holds mu/logvar of dtype {t['mu'].dtype}/{t['logvar'].dtype}, not "
                            f"floats; {fix}")
    out = {k: t[k].float() for k in LATENT_KEYS}
    if not all(torch.isfinite(v).all() for v in out.values()):
        raise DreamlabError(f"latent file {path} contains NaN/inf; if V diverged, retrain it (lower vae.lr) and encode "
                            f"again, else {fix}")
    return out


def initial_latents(folder: str | Path, max_episodes: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) of the first frame of each encoded episode: the dream's real initial states."""
    mus, lvs = [], []
    files = latent_files(folder)[:max_episodes]
    for f in files:
        t = load_latents(f)
        mus.append(t["mu"][:1])
        lvs.append(t["logvar"][:1])
    z = {int(m.shape[1]) for m in mus}
    if len(z) > 1:
        raise DreamlabError(f"{Path(folder)} mixes codes of sizes {sorted(z)} (encoded by different Vs); encode "
                            f"again: {_encode_hint(Path(folder))}")
    return torch.cat(mus), torch.cat(lvs)
