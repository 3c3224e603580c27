"""Figures for runs: the layer x step rank-allocation heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rankopt.training.events import RankEvent  # noqa: E402


def short_layer_name(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i:])
    return name


def rank_heatmap(history: list[RankEvent], path: Path, title: str = "rank allocation") -> Path:
    """Rows: adapted layers; columns: reallocation steps; colour: rank. Saved as PNG."""
    layers = list(history[0].ranks)
    grid = np.array([[event.ranks[name] for event in history] for name in layers], dtype=float)
    steps = [event.step for event in history]
    fig_h = max(3.0, 0.18 * len(layers) + 1.5)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(steps) + 3), fig_h))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [short_layer_name(n) for n in layers], fontsize=6)
    stride = max(1, len(steps) // 12)
    ax.set_xticks(range(0, len(steps), stride), [str(s) for s in steps[::stride]], fontsize=7)
    ax.set_xlabel("training step")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
