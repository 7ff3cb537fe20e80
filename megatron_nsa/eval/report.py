"""Results as files: JSON, and the needle accuracy grid as a markdown table (depth rows x length columns)."""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence


def write_json(path: str, content) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")


def grid_key(value) -> str:
    """JSON object keys are strings: lengths as integers, depths as '%g' percentages."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def accuracy_table(accuracy: Dict[str, Dict[str, float]], lengths: Sequence[int], depths: Sequence[float],
                   title: str = "depth \\ length") -> str:
    """accuracy[length][depth] (fractions) -> a markdown table of percentages."""
    header = f"| {title} | " + " | ".join(f"{length:,}" for length in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    rows = [f"| {depth:g}% | " + " | ".join(f"{100 * accuracy[grid_key(length)][grid_key(depth)]:.0f}%"
                                           for length in lengths) + " |" for depth in depths]
    means = [sum(accuracy[grid_key(length)][grid_key(d)] for d in depths) / len(depths) for length in lengths]
    rows.append("| mean | " + " | ".join(f"{100 * m:.1f}%" for m in means) + " |")
    return "\n".join([header, rule, *rows])
