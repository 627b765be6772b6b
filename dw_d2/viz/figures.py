"""Figures rendered by matplotlib's Agg canvas, without pyplot.

Figures are built as standalone :class:`matplotlib.figure.Figure` objects attached to an Agg
canvas, so drawing works on headless machines and never changes the user's pyplot backend
(for example inside a notebook).
"""
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure"]


def new_figure(rows, columns, panel_size=(4.0, 3.0), **subplot_kw):
    """A figure with a ``rows x columns`` grid of axes (always a 2-D array of axes).

    Args:
        panel_size (tuple[float, float]): (width, height) of one panel, in inches.
        subplot_kw: passed to :meth:`Figure.subplots` (e.g. ``gridspec_kw``).
    """
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False, **subplot_kw)
    return fig, axes


def save_figure(fig, output_path, dpi=100):
    """Write ``fig`` as a PNG (creating its folder) and return the path.

    The PNG is exactly ``figsize * dpi`` pixels (no tight cropping), so callers and tests can
    predict its size.
    """
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=dpi, format="png")
    return output_path
