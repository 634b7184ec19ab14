"""Image grids, plots and videos for run folders (PNG via Pillow, curves via matplotlib's Agg backend)."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dreamlab.io import atomic_write_bytes


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, H, W, C) uint8."""
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 and x.shape[1] in (1, 3) else x


def make_grid(x: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = imgs[i]
    if c == 1:
        grid = grid[..., 0]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_png(arr: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_grid(x: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    return save_png(make_grid(x, nrow=nrow, scale=scale), path)


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_curves(rows: Sequence[dict], keys: Sequence[str], path: str | Path, title: str = "") -> Path | None:
    """Plot metric curves (from metrics.jsonl rows) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_video(frames: Sequence[np.ndarray] | np.ndarray, path: str | Path, fps: int = 30) -> Path:
    """Write (T, H, W, 3) uint8 frames as MP4 (imageio-ffmpeg) or GIF, by the file's suffix, atomically.

    When MP4 cannot be written (imageio-ffmpeg not installed, or its encoder fails), a GIF is written beside
    the asked name (suffix .gif) instead: GIF needs only Pillow. Returns the path actually written."""
    import importlib.util

    import imageio.v3 as iio

    path = Path(path)
    frames = np.asarray(frames)
    ext = path.suffix.lower()
    if ext != ".gif" and importlib.util.find_spec("imageio_ffmpeg") is not None:
        try:
            data = iio.imwrite("<bytes>", frames, extension=ext or ".mp4", fps=fps, codec="libx264", macro_block_size=1)
            return atomic_write_bytes(path, data)
        except Exception:  # a broken ffmpeg install: fall back to GIF like a missing one
            pass
    data = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
    return atomic_write_bytes(path.with_suffix(".gif"), data)
