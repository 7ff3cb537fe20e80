"""Figure titles fit their figures (the PNGs themselves need matplotlib, which CI does not install)."""
from __future__ import annotations

from megatron_nsa.eval.plots import wrapped_title


class _Axes:
    def set_title(self, text, fontsize):
        self.text, self.fontsize = text, fontsize


def test_long_titles_wrap_to_the_figure_width():
    title = "NSA vs dense, language modelling on real text, 16,384 tokens (NVIDIA H100 80GB HBM3)"
    ax = _Axes()
    wrapped_title(ax, title, 6)
    lines = ax.text.split("\n")
    assert len(lines) == 2 and max(map(len, lines)) <= 72 and " ".join(lines) == title
    wrapped_title(ax, title, 12)
    assert ax.text == title
