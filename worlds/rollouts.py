"""The rollout store: one compressed file per episode plus a manifest listing only complete episodes.

An episode file `ep_000123.npz` (numpy's compressed zip, loaded with `allow_pickle=False`) holds

    obs         (T+1, 64, 64, 3) uint8   frames; obs[t] is what the agent saw before actions[t]
    actions     (T, 3) float32           CarRacing actions (steer, gas, brake)
    rewards     (T,) float32             reward received after actions[t]
    terminated  (T,) bool                the env ended the episode after actions[t] (a real "done")
    truncated   (T,) bool                the time limit (or the collector's max_steps) cut it

Episode files are written atomically (temp file + rename); the manifest is rewritten atomically after
each file lands, so a killed collector never lists a partial episode. Any unreadable or inconsistent file
raises a `DreamlabError` naming the file and the fix.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamlab.errors import DreamlabError
from dreamlab.io import atomic_write_bytes, load_json, save_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KEYS = ("obs", "actions", "rewards", "terminated", "truncated")


@dataclass
class Episode:
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray

    @property
    def steps(self) -> int:
        return int(len(self.actions))

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())


def episode_name(index: int) -> str:
    return f"ep_{index:06d}.npz"


def recollect_hint(path: str | Path) -> str:
    """The command that replaces a bad or missing episode file of RUN/rollouts: a resumed collection re-runs every
    listed episode whose file is missing or unreadable (its seed gives the same episode again)."""
    folder = Path(path).parent
    run = folder.parent if folder.name == "rollouts" else None
    return f"dreamlab worldmodel collect {run} --resume" if run is not None else "collect with --resume"


def episode_file_intact(path: Path) -> bool:
    """A cheap check that an episode file exists and is a whole zip holding every array (its directory sits at the
    end of the file, so a truncated file fails here); reading the arrays is load_episode's work."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
    return all(f"{k}.npy" in names for k in KEYS)


def validate_episode(ep: Episode, where: str, fix: str = "") -> None:
    """Shapes, dtypes and finite values of an episode; the error names `where` and `fix` (what to do)."""
    problems = []
    if ep.actions.ndim != 2 or ep.actions.dtype.kind not in "fiu" or len(ep.actions) < 1:
        problems.append(f"actions has dtype {ep.actions.dtype} shape {ep.actions.shape}, expected numbers (T, A), "
                        "T >= 1")
    t = len(ep.actions) if ep.actions.ndim else 0
    if ep.obs.dtype != np.uint8 or ep.obs.ndim != 4 or ep.obs.shape[-1] != 3:
        problems.append(f"obs has dtype {ep.obs.dtype} shape {ep.obs.shape}, expected uint8 (T+1, H, W, 3)")
    elif len(ep.obs) != t + 1:
        problems.append(f"obs has {len(ep.obs)} frames for {t} actions, expected {t + 1}")
    for k, kinds in (("rewards", "fiu"), ("terminated", "biu"), ("truncated", "biu")):
        a = getattr(ep, k)
        if a.shape != (t,) or a.dtype.kind not in kinds:
            what = "numbers" if k == "rewards" else "bools"
            problems.append(f"{k} has dtype {a.dtype} shape {a.shape}, expected ({t},) of {what}")
    if not problems and (not np.isfinite(ep.actions).all() or not np.isfinite(ep.rewards).all()):
        problems.append("actions or rewards contain NaN/inf")
    if problems:
        raise DreamlabError(f"{where}: {problems[0]}" + (f"; {fix}" if fix else ""))


def episode_bytes(ep: Episode, where: str) -> bytes:
    """The episode file's content (checked first): a Ray worker returns it and the driver writes it."""
    validate_episode(ep, where)
    buf = io.BytesIO()
    np.savez_compressed(buf, obs=ep.obs, actions=ep.actions.astype(np.float32), rewards=ep.rewards.astype(np.float32),
                        terminated=ep.terminated.astype(bool), truncated=ep.truncated.astype(bool))
    return buf.getvalue()


def save_episode(path: str | Path, ep: Episode) -> Path:
    return atomic_write_bytes(path, episode_bytes(ep, str(path)))


def load_episode(path: str | Path) -> Episode:
    """Load one episode; a missing, truncated or inconsistent file raises an error naming it."""
    path = Path(path)
    if not path.exists():
        raise DreamlabError(f"episode file {path} is missing; re-collect it: {recollect_hint(path)}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise DreamlabError(f"episode file {path} lacks {missing[0]!r}; it is not a dreamlab episode: "
                                    f"delete it and re-collect it: {recollect_hint(path)}")
            arrs = {k: z[k] for k in KEYS}
    except DreamlabError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise DreamlabError(f"episode file {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                            f"delete it and re-collect it: {recollect_hint(path)}") from e
    ep = Episode(**arrs)
    validate_episode(ep, f"episode file {path}", f"delete it and re-collect it: {recollect_hint(path)}")
    return ep


# ----------------------------------------------------------------------------- manifest


def read_manifest(folder: str | Path, *, must_exist: bool = True) -> dict[str, Any]:
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.exists():
        if must_exist:
            run = folder.parent if folder.name == "rollouts" else "RUN"
            raise DreamlabError(
                f"{folder} has no {MANIFEST}; collect rollouts first: dreamlab worldmodel collect {run}"
            )
        return {"version": FORMAT_VERSION, "episodes": []}
    m = load_json(p)
    if not isinstance(m, dict) or not isinstance(m.get("episodes"), list) or not all(
            isinstance(e, dict) and isinstance(e.get("index"), int) and isinstance(e.get("file"), str)
            and isinstance(e.get("steps"), int) for e in m["episodes"]):
        raise DreamlabError(f"{p} is not a rollout manifest; delete it and re-collect: {recollect_hint(p)} "
                            "(every episode is collected again)")
    return m


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    manifest["episodes"] = sorted(manifest["episodes"], key=lambda e: e["index"])
    manifest["total_steps"] = int(sum(e["steps"] for e in manifest["episodes"]))
    return save_json(Path(folder) / MANIFEST, manifest)


def episode_files(folder: str | Path) -> list[Path]:
    """The episode files the manifest lists (complete ones only), in index order."""
    folder = Path(folder)
    m = read_manifest(folder)
    if not m["episodes"]:
        raise DreamlabError(
            f"{folder / MANIFEST} lists no episodes; collect some first: dreamlab worldmodel collect --out {folder}"
        )
    return [folder / e["file"] for e in m["episodes"]]


def split_files(files: list[Path], split: str, val_every: int = 10) -> list[Path]:
    """Deterministic episode-level split: every `val_every`-th episode is held out (val and test share it)."""
    if len(files) < 2:
        return list(files)
    held = [f for i, f in enumerate(files) if i % val_every == val_every - 1] or files[-1:]
    if split == "train":
        return [f for f in files if f not in held]
    return held


# ----------------------------------------------------------------------------- frames


def preprocess_frame(frame: np.ndarray, size: int = 64) -> np.ndarray:
    """World Models preprocessing: crop CarRacing's HUD (bottom 12 of 96 rows), resize to size x size.

    Frames that already have the target size (e.g. from a fast env that renders 64x64) pass through.
    """
    if frame.shape[:2] == (size, size):
        return np.ascontiguousarray(frame, dtype=np.uint8)
    h = frame.shape[0]
    crop = frame[: int(round(h * 84 / 96))] if h == 96 or frame.shape[:2] == (96, 96) else frame
    import cv2

    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
