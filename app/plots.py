"""Plotting helpers shared by every figure the app writes (evaluation, fine-tuning, comparison)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend: files only, no display on training machines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frame_grid(frames: np.ndarray, path: str | Path, title: str = "", columns: int = 8) -> Path:
    """A PNG grid of camera frames: ``frames`` (N, V, H, W, 3) uint8, one row per sample's V views side by
    side, wrapped into ``columns`` samples per row of the figure; written to ``path``."""
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frame_grid: frames are {frames.dtype} {frames.shape}; expected uint8 (N, V, H, W, 3)"
        )
    n, views, h, w, _ = frames.shape
    tiles = np.concatenate(
        list(frames.transpose(1, 0, 2, 3, 4)), axis=2
    )  # (N, H, V * W, 3): views side by side
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    pad = np.full((rows * columns - n, h, views * w, 3), 255, np.uint8)
    tiles = np.concatenate([tiles, pad]).reshape(rows, columns, h, views * w, 3)
    sheet = np.pad(tiles, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)
    sheet = sheet.transpose(0, 2, 1, 3, 4).reshape(rows * (h + 2), columns * (views * w + 2), 3)
    plt = pyplot()
    scale = 2.0 / max(h, 32)  # inches per pixel: a 64-pixel frame is about 1.3 inches
    fig, ax = plt.subplots(figsize=(max(3.0, sheet.shape[1] * scale), max(2.0, sheet.shape[0] * scale + 0.4)))
    ax.imshow(sheet, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
