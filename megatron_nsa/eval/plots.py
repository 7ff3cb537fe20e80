"""PNG figures with matplotlib when it is installed (it is not a dependency): without it each function
prints why it wrote nothing and returns None."""
from __future__ import annotations

import os
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from .report import grid_key


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def wrapped_title(ax, title: str, figure_width_inches: float) -> None:
    """The title in lines that fit the figure (about 12 characters per inch at 9 points)."""
    ax.set_title("\n".join(textwrap.wrap(title, max(20, int(12 * figure_width_inches)))), fontsize=9)


def _skipped(path: str) -> None:
    print(f"matplotlib is not installed: skipped {path} (pip install matplotlib to draw it)", flush=True)


def accuracy_heatmap(accuracy: Dict[str, Dict[str, float]], lengths: Sequence[int], depths: Sequence[float],
                     path: str, title: str) -> Optional[str]:
    """accuracy[length][depth] in [0, 1] -> heat map: context length across, needle depth down."""
    plt = _pyplot()
    if plt is None:
        _skipped(path)
        return None
    grid = [[accuracy[grid_key(length)][grid_key(depth)] for length in lengths] for depth in depths]
    width = 1.4 + 1.1 * len(lengths)
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.42 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for row, line in enumerate(grid):
        for column, value in enumerate(line):
            ax.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{length // 1024}k" if length >= 1024 else str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth:g}%" for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    wrapped_title(ax, title, width)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(curves: Dict[str, List[Tuple[int, float]]], path: str, title: str,
                ylabel: str = "validation loss") -> Optional[str]:
    """{label: [(step, loss), ...]} -> one line per label."""
    plt = _pyplot()
    if plt is None:
        _skipped(path)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    wrapped_title(ax, title, 6)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
