"""Results of ablation runs: parse each run's log, print one table, draw one bar chart.

A run is a ``train_net.py`` output folder. Its COCO box AP comes from the last
``copypaste:`` block that Detectron2's ``print_csv_format`` writes to ``log.txt`` (falling back
to the last evaluation in ``metrics.json``); its training time from the
``Total training time: H:MM:SS (H:MM:SS on hooks)`` line, minus the time spent in hooks
(periodic evaluation, checkpointing), so that it measures the optimisation steps only.
"""
import json
import math
import re
from pathlib import Path

import numpy as np

from .curves import load_metrics
from .figures import new_figure, save_figure

__all__ = [
    "METRICS",
    "parse_coco_copypaste",
    "parse_training_seconds",
    "read_run_result",
    "format_results_table",
    "plot_comparison",
    "write_results",
]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

_COPYPASTE = re.compile(r"copypaste: (.*)$")
_DURATION = r"(?:(\d+) days?, )?(\d+):(\d\d):(\d\d)"
_TOTAL_TIME = re.compile(rf"Total training time: {_DURATION} \({_DURATION} on hooks\)")


def parse_coco_copypaste(log_text, task="bbox"):
    """The metrics of the last evaluation of ``task`` in a Detectron2 log.

    Detectron2 logs each evaluation as three ``copypaste:`` lines: ``Task: bbox``, the metric
    names (comma separated) and their values.

    Args:
        log_text (str): the log (``log.txt`` or captured stdout).
        task (str): the evaluated task.

    Returns:
        dict[str, float] or None: metric name -> value (percent; NaN where COCO reports none),
        or None when the log holds no evaluation of ``task``.
    """
    payloads = [m.group(1).strip() for m in map(_COPYPASTE.search, log_text.splitlines()) if m]
    result = None
    for i, payload in enumerate(payloads[:-2]):
        if payload != f"Task: {task}":
            continue
        names, values = payloads[i + 1].split(","), payloads[i + 2].split(",")
        if len(names) != len(values):
            raise ValueError(
                f"malformed copypaste block for task {task!r}: {len(names)} names {names} "
                f"but {len(values)} values {values}"
            )
        try:
            result = {n.strip(): float(v) for n, v in zip(names, values)}
        except ValueError as e:
            raise ValueError(f"non-numeric value in copypaste block {values}: {e}") from e
    return result


def _seconds(days, hours, minutes, seconds):
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)


def parse_training_seconds(log_text):
    """Seconds spent in training steps, from the last ``Total training time`` line.

    Returns:
        float or None: total time minus the time in hooks; None if the line is absent (the
        run did not finish).
    """
    matches = list(_TOTAL_TIME.finditer(log_text))
    if not matches:
        return None
    groups = matches[-1].groups()
    return float(_seconds(*groups[:4]) - _seconds(*groups[4:]))


def read_run_result(run_dir, task="bbox"):
    """The metrics and training time of one finished ``train_net.py`` run.

    Args:
        run_dir (str or Path): the run's ``OUTPUT_DIR``.

    Returns:
        dict: ``{"AP": ..., ..., "APl": ..., "train_seconds": float or None}``; metrics that
        the evaluation did not report are NaN.
    """
    run_dir = Path(run_dir)
    log_file = run_dir / "log.txt"
    log_text = log_file.read_text() if log_file.is_file() else ""
    metrics = parse_coco_copypaste(log_text, task)
    if metrics is None and (run_dir / "metrics.json").is_file():
        evaluations = [r for r in load_metrics(run_dir / "metrics.json") if f"{task}/AP" in r]
        if evaluations:
            prefix = f"{task}/"
            metrics = {k[len(prefix):]: v for k, v in evaluations[-1].items()
                       if k.startswith(prefix)}
    if metrics is None:
        raise ValueError(
            f"no COCO {task!r} evaluation found in {log_file} or {run_dir / 'metrics.json'}: "
            "did the run finish its final evaluation?"
        )
    result = {name: float(metrics.get(name, math.nan)) for name in METRICS}
    result["train_seconds"] = parse_training_seconds(log_text)
    return result


def _format_duration(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _format_metric(value):
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def format_results_table(results):
    """A Markdown table of the runs' COCO metrics and training times.

    Args:
        results (dict[str, dict]): run name -> :func:`read_run_result` output, in display order.

    Returns:
        str: the table, one row per run; ``-`` marks metrics COCO did not report.
    """
    header = ["run", *METRICS, "train time"]
    rows = [
        [name, *(_format_metric(r.get(m)) for m in METRICS),
         _format_duration(r.get("train_seconds"))]
        for name, r in results.items()
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join(
        "-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(header), separator, *map(line, rows)])


def plot_comparison(results, output_path, title="COCO box AP on the validation set"):
    """Grouped bars of the COCO metrics per run, and the training time per run, in one PNG.

    Args:
        results (dict[str, dict]): as for :func:`format_results_table`.
        output_path (str or Path): the PNG to write.

    Returns:
        Path: ``output_path``.
    """
    if not results:
        raise ValueError("no run results to plot")
    names = list(results)
    fig, axes = new_figure(1, 2, panel_size=(5.5, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    ap_ax, time_ax = axes[0]
    x = np.arange(len(METRICS))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name].get(m, math.nan) for m in METRICS]
        bars = ap_ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        labels = [_format_metric(v) if math.isfinite(v) else "" for v in values]
        ap_ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
    ap_ax.set_xticks(x, METRICS)
    ap_ax.set_ylabel("COCO box AP (%)")
    ap_ax.set_title(title)
    ap_ax.legend(fontsize=8)
    ap_ax.grid(axis="y", alpha=0.3)

    minutes = [(results[n].get("train_seconds") or math.nan) / 60 for n in names]
    colours = [f"C{i}" for i in range(len(names))]
    time_ax.bar(np.arange(len(names)), minutes, color=colours)
    time_ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    time_ax.set_ylabel("minutes")
    time_ax.set_title("training time")
    time_ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, output_path)


def write_results(results, output_dir):
    """Write ``results.json`` and ``results.md`` (the table) into ``output_dir``.

    Returns:
        list[Path]: the two files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, table_path = output_dir / "results.json", output_dir / "results.md"
    serialisable = {
        name: {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in r.items()}
        for name, r in results.items()
    }
    json_path.write_text(json.dumps(serialisable, indent=2) + "\n")
    table_path.write_text(format_results_table(results) + "\n")
    return [json_path, table_path]
