"""Results as files: JSON, and the needle grids (accuracy, block ranks) as markdown tables (depth rows x length
columns)."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Sequence


def write_json(path: str, content) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")


def grid_key(value) -> str:
    """JSON object keys are strings: lengths as integers, depths as '%g' percentages."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid_table(grid: Dict[str, Dict[str, float]], lengths: Sequence[int], depths: Sequence[float],
               cell: Callable[[float], str], mean: Callable[[float], str], title: str = "depth \\ length") -> str:
    """grid[length][depth] -> a markdown table (depth rows, length columns, a last row of the depths' mean),
    cells written by `cell`, the means by `mean`."""
    header = f"| {title} | " + " | ".join(f"{length:,}" for length in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    rows = [f"| {depth:g}% | " + " | ".join(cell(grid[grid_key(length)][grid_key(depth)]) for length in lengths)
            + " |" for depth in depths]
    means = [sum(grid[grid_key(length)][grid_key(d)] for d in depths) / len(depths) for length in lengths]
    rows.append("| mean | " + " | ".join(mean(m) for m in means) + " |")
    return "\n".join([header, rule, *rows])


def accuracy_table(accuracy: Dict[str, Dict[str, float]], lengths: Sequence[int], depths: Sequence[float],
                   title: str = "depth \\ length") -> str:
    """accuracy[length][depth] (fractions) -> a markdown table of percentages."""
    return grid_table(accuracy, lengths, depths, lambda v: f"{100 * v:.0f}%", lambda m: f"{100 * m:.1f}%", title)


def rank_table(rank: Dict[str, Dict[str, float]], lengths: Sequence[int], depths: Sequence[float]) -> str:
    """rank[length][depth] (medians of block ranks) -> a markdown table."""
    return grid_table(rank, lengths, depths, lambda v: f"{v:g}", lambda m: f"{m:.1f}")
