"""Training curves from Detectron2's ``metrics.json``: one panel per loss, one for AP."""
import json
import logging
import math
from pathlib import Path

from .figures import new_figure, save_figure

__all__ = ["load_metrics", "loss_series", "ap_series", "plot_training_curves"]

logger = logging.getLogger(__name__)

# COCOEvaluator's summary metrics, as EvalHook flattens them into metrics.json.
AP_KEYS = ("bbox/AP", "bbox/AP50", "bbox/AP75")


def load_metrics(path):
    """Read the records of a Detectron2 ``metrics.json`` (one JSON object per line).

    A resumed run appends records for iterations it repeats; the later record wins, so the
    result describes the run as it finally went. A truncated last line (a run killed while
    writing) is skipped with a warning; any other malformed line is an error.

    Args:
        path (str or Path): the ``metrics.json`` file.

    Returns:
        list[dict]: the records, sorted by ``"iteration"``; records with the same iteration
        are merged, later keys overriding earlier ones.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist (is it a run's OUTPUT_DIR?)")
    lines = path.read_text().splitlines()
    by_iteration = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if line_number == len(lines):
                logger.warning(f"{path}: skipping the truncated last line {line_number}")
                continue
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or "iteration" not in record:
            raise ValueError(
                f"{path}, line {line_number}: expected a JSON object with an 'iteration' field, "
                f"got {line[:80]!r}"
            )
        by_iteration.setdefault(record["iteration"], {}).update(record)
    return [by_iteration[i] for i in sorted(by_iteration)]


def _series(records, key):
    points = [(r["iteration"], r[key]) for r in records if key in r]
    return [p for p in points if isinstance(p[1], (int, float)) and math.isfinite(p[1])]


def loss_series(records):
    """The loss curves of a run.

    Returns:
        dict[str, list[tuple[int, float]]]: ``total_loss`` first, then every ``loss_*`` key
        in name order, each as (iteration, value) pairs.
    """
    keys = sorted({k for r in records for k in r if k.startswith("loss_")})
    if any("total_loss" in r for r in records):
        keys.insert(0, "total_loss")
    return {k: _series(records, k) for k in keys}


def ap_series(records):
    """The COCO box AP (AP, AP50, AP75) of every evaluation in a run.

    Returns:
        dict[str, list[tuple[int, float]]]: key -> (iteration, value) pairs; empty lists when
        the run has not been evaluated yet.
    """
    return {k: _series(records, k) for k in AP_KEYS}


def plot_training_curves(records, output_path, title=None):
    """Draw each loss component and the AP over evaluations into one PNG.

    Args:
        records (list[dict]): as returned by :func:`load_metrics`.
        output_path (str or Path): the PNG to write (its folder is created).
        title (str or None): the figure title.

    Returns:
        Path: ``output_path``.
    """
    losses = loss_series(records)
    if not losses:
        raise ValueError(
            "the metrics contain no 'total_loss' or 'loss_*' entries: nothing to plot "
            "(did the run log any iteration?)"
        )
    panels = len(losses) + 1
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    fig, axes = new_figure(rows, columns, panel_size=(4.2, 3.0))
    axes = axes.ravel()
    for ax, (name, points) in zip(axes, losses.items()):
        if points:
            ax.plot(*zip(*points), color="tab:blue", linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)

    ap_ax = axes[len(losses)]
    aps = ap_series(records)
    if any(aps.values()):
        for name, points in aps.items():
            if points:
                ap_ax.plot(*zip(*points), marker="o", label=name.split("/")[-1])
        ap_ax.legend(loc="best")
        ap_ax.set_ylabel("COCO box AP (%)")
    else:
        ap_ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                   transform=ap_ax.transAxes)
    ap_ax.set_title("AP over evaluations")
    ap_ax.set_xlabel("iteration")
    ap_ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, output_path)
