"""tools/benchmark.py: its synthetic inputs, its table, and smoke runs of the CLI."""
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tools import benchmark as bench

ROW_KEYS = {
    "section", "measure", "subject", "value", "unit", "baseline", "baseline_value", "ratio",
    "ratio_kind", "target", "met", "cpu_time_ratio", "max_rel_diff", "fp64_max_rel_diff", "note",
}


def test_coco_input_has_22400_points():
    height, width = bench.padded_size(800, 1333)
    assert (height, width) == (800, 1344)
    sizes = bench.feature_sizes(height, width)
    assert sizes == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    layout = bench.make_points(sizes, 0.5, torch.float32, "cpu")
    points, strides = layout.points, layout.strides
    assert points.shape == (22400, 2) and strides.shape == (22400,)
    # Level-major, row-major: the second point of P3 is one stride to the right of the first.
    assert points[:2].tolist() == [[4.0, 4.0], [12.0, 4.0]]
    assert strides[-1] == 128 and points[-1].tolist() == [(10 + 0.5) * 128, (6 + 0.5) * 128]


def test_gt_boxes_are_inside_and_coco_sized():
    generator = torch.Generator().manual_seed(0)
    boxes = bench.sample_gt_boxes(4000, 480, 640, generator, torch.float64)
    assert torch.all(boxes[:, :2] >= 0)
    assert torch.all(boxes[:, 2] <= 640) and torch.all(boxes[:, 3] <= 480)
    sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    assert torch.all(boxes[:, 2:] - boxes[:, :2] >= 2)
    small, large = (sides < 32).double().mean().item(), (sides > 96).double().mean().item()
    # COCO: ~41% small, ~24% large.
    assert 0.33 < small < 0.49, small
    assert 0.17 < large < 0.32, large


def test_weighting_inputs_exercise_both_negative_branches():
    leaves, fixed = bench.make_weighting_inputs("DW", 128, 192, 2, 6, 5, torch.float64, "cpu",
                                                seed=3)
    points = fixed["points"]
    assert leaves["cls_logits"].shape == (2, points.num_points, 5)
    assert leaves["box_dists"].min() >= 0
    assert [len(b) for b in fixed["gt_boxes"]] == [6, 6]
    from dw_d2.assign import reference

    out = reference.reference_dual_weighting_loss(
        points.points, points.strides, leaves["cls_logits"], leaves["box_dists"],
        leaves["score_logits"], fixed["gt_boxes"], fixed["gt_classes"], return_intermediates=True,
    )
    ious = torch.cat([img["ious"][img["inside_gt_bbox_mask"]] for img in out["per_image"]])
    # Candidates both above and below the 0.5 IoU threshold.
    assert (ious >= 0.5).any() and (ious < 0.5).any()
    leaves_aa, _ = bench.make_weighting_inputs("AutoAssign", 128, 192, 2, 6, 5, torch.float32,
                                               "cpu")
    assert leaves_aa["prior_sigma"].shape == (5, 2)


def test_rows_targets_and_table():
    met = bench.make_row("weighting", "weighting fwd+bwd", "DW, 50 GT/img", 0.01, "s", "ref", 0.2,
                         20.0, "speed-up", bench.TARGETS[("weighting fwd+bwd", 50)], check=1e-7)
    missed = bench.make_row("detectors", "train step", "DW", 1.2, "s", "FCOS", 1.0, 1.2, "ratio",
                            bench.TARGETS[("train step", "DW")])
    untargeted = bench.make_row("detectors", "inference", "AutoAssign", 1.0, "s", "FCOS", 1.0, 1.0,
                                "ratio", None)
    assert (met["met"], missed["met"], untargeted["met"]) == (True, False, None)
    assert set(met) == ROW_KEYS
    table = bench.render_table([met, missed, untargeted]).splitlines()
    assert len(table) == 2 + 3
    assert "20.00x" in table[2] and "yes" in table[2] and "NO" in table[3]
    assert bench.format_value(3 * 2 ** 20, "bytes") == "3 MiB"
    assert bench.format_value(0.0123, "s") == "12.3 ms"


def _check_result(result, out_dir, sections):
    on_disk = json.loads((out_dir / "benchmark.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    assert (out_dir / "benchmark.txt").read_text().count("\n") == len(result["rows"]) + 2
    assert set(on_disk["sections"]) == set(sections)
    for row in on_disk["rows"]:
        assert set(row) == ROW_KEYS
        assert row["value"] > 0 and row["baseline_value"] > 0
        assert math.isclose(row["ratio"], row["baseline_value"] / row["value"], rel_tol=1e-9) or \
            math.isclose(row["ratio"], row["value"] / row["baseline_value"], rel_tol=1e-9)
    return on_disk


def test_quick_weighting_and_scaling_run(tmp_path):
    result = bench.main(["--quick", "--sections", "weighting", "scaling",
                         "--output", str(tmp_path)])
    on_disk = _check_result(result, tmp_path, ["weighting", "scaling"])
    rows = on_disk["rows"]
    # Every scheme (DW, AutoAssign) x 2 GT counts x (fwd, fwd+bwd).
    schemes = bench.scheme_names()
    assert {"DW", "AutoAssign"} <= set(schemes)
    assert len(rows) == len(schemes) * 4
    assert {r["subject"] for r in rows} == {f"{scheme}, {gts} GT/img" for scheme in schemes
                                            for gts in (1, 4)}
    for row in rows:
        assert row["ratio_kind"] == "speed-up"
        assert row["cpu_time_ratio"] > 0
        # Same inputs, same run: float32 round-off only; float64 to the golden precision.
        assert row["max_rel_diff"] < 1e-4, row
        assert row["fp64_max_rel_diff"] is None or row["fp64_max_rel_diff"] < 1e-9, row
    assert sum(r["fp64_max_rel_diff"] is not None for r in rows) == len(schemes) * 2
    scaling = on_disk["sections"]["scaling"]
    assert len(scaling["by_gt_count"]) == len(scaling["by_input_size"]) == len(schemes) * 2
    assert all(e["dw_d2_s"] > 0 and e["reference_s"] > 0 for e in scaling["by_gt_count"])
    png = tmp_path / "weighting_scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_cli_with_detectors(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "benchmark.py"), "--quick", "--sections", "detectors",
         "--output", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    _check_result(result, tmp_path, ["detectors"])
    rows = result["rows"]
    # The schemes (DW, AutoAssign) and RetinaNet against FCOS: train step, inference, memory.
    assert [(r["measure"], r["subject"].split(",")[0].split(" ")[0]) for r in rows] == [
        (m, name) for name in bench.detector_names() if name != bench.BASELINE_DETECTOR
        for m in ("train step", "inference", "peak train memory")
    ]
    assert [r["met"] is not None for r in rows[:3]] == [True, True, True]
    memory = result["sections"]["detectors"]["memory"]
    assert set(memory) == set(bench.detector_names())
    assert all(m["peak_bytes"] > 0 for m in memory.values())
    assert "| train step" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--gt-counts", "10", "-1"], "--gt-counts must be >= 0, got -1"),
    (["--det-size", "16", "512"], "--det-size 16 512: both sides must be >= 32 pixels"),
    (["--infer-batch", "3"], "--infer-batch (3) cannot exceed --det-batch (2)"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
