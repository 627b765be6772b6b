"""Drawing and plotting for dw-d2's tools (matplotlib's Agg canvas; needs Detectron2).

- :mod:`.assignment`: DW / AutoAssign weight maps per GT box and FPN level.
- :mod:`.detections`: detections drawn with Detectron2's Visualizer, and as JSON.
- :mod:`.curves`: loss and AP curves from ``metrics.json``.
- :mod:`.comparison`: the results table and bar chart of ablation runs.
- :mod:`.run_pictures`: :func:`write_run_pictures`, the pictures a finished run leaves.
"""
from .run_pictures import write_run_pictures

__all__ = ["write_run_pictures"]
