"""The user-facing tools: compare.py's table, plot_curves.py, demo.py, visualize_assignment.py,
the FCOS baseline and the pictures of a finished run."""
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import BUILTIN_CONFIGS, BUILTIN_DW_CONFIG, REPO

BUILTIN_AUTOASSIGN_CONFIG = BUILTIN_CONFIGS / "autoassign_R_18_FPN_shapes.yaml"


def load_tool(name):
    """The module ``tools/<name>.py``."""
    return importlib.import_module(f"tools.{name}")


def png_size(path):
    """(width, height) of a non-empty PNG."""
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# ---------------------------------------------------------------------------------------------
# compare.py: results parsing, table, chart, run plan
# ---------------------------------------------------------------------------------------------

LOG_WITH_TWO_EVALUATIONS = """\
[11/22 19:00:01 d2.engine.train_loop]: Starting training from iteration 0
[11/22 19:01:00 d2.evaluation.testing]: copypaste: Task: bbox
[11/22 19:01:00 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/22 19:01:00 d2.evaluation.testing]: copypaste: 1.0000,2.0000,3.0000,4.0000,5.0000,6.0000
[11/22 19:02:00 d2.engine.hooks]: Overall training speed: 97 iterations in 0:01:40 (1.0309 s / it)
[11/22 19:02:00 d2.engine.hooks]: Total training time: 0:02:05 (0:00:20 on hooks)
[11/22 19:02:30 d2.evaluation.testing]: copypaste: Task: bbox
[11/22 19:02:30 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/22 19:02:30 d2.evaluation.testing]: copypaste: 41.5000,60.2500,44.7500,nan,45.1000,52.0000
"""


def test_parse_coco_copypaste_takes_the_last_evaluation():
    from dw_d2.viz.comparison import parse_coco_copypaste

    result = parse_coco_copypaste(LOG_WITH_TWO_EVALUATIONS)
    assert list(result) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert result["AP"] == 41.5 and result["AP75"] == 44.75 and result["APl"] == 52.0
    assert math.isnan(result["APs"])
    assert parse_coco_copypaste(LOG_WITH_TWO_EVALUATIONS, task="segm") is None
    assert parse_coco_copypaste("no evaluation here\n") is None


def test_parse_coco_copypaste_rejects_a_malformed_block():
    from dw_d2.viz.comparison import parse_coco_copypaste

    broken = "copypaste: Task: bbox\ncopypaste: AP,AP50\ncopypaste: 1.0\n"
    with pytest.raises(ValueError, match="2 names"):
        parse_coco_copypaste(broken)


def test_parse_training_seconds_subtracts_hooks():
    from dw_d2.viz.comparison import parse_training_seconds

    assert parse_training_seconds(LOG_WITH_TWO_EVALUATIONS) == 125 - 20
    long_run = "Total training time: 1 day, 2:00:00 (0:10:00 on hooks)"
    assert parse_training_seconds(long_run) == 26 * 3600 - 600
    assert parse_training_seconds("crashed before the end") is None


def test_read_run_result_from_log_and_from_metrics_json(tmp_path):
    from dw_d2.viz.comparison import read_run_result

    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "log.txt").write_text(LOG_WITH_TWO_EVALUATIONS)
    result = read_run_result(logged)
    assert result["AP"] == 41.5 and result["train_seconds"] == 105.0

    # Without a log (e.g. a run from another tool), the last evaluation in metrics.json counts.
    metrics_only = tmp_path / "metrics_only"
    metrics_only.mkdir()
    records = [
        {"iteration": 19, "total_loss": 2.0},
        {"iteration": 20, "bbox/AP": 10.0, "bbox/AP50": 20.0, "bbox/AP-circle": 3.0},
        {"iteration": 40, "bbox/AP": 12.5, "bbox/AP50": 25.0, "bbox/APl": 30.0},
    ]
    (metrics_only / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = read_run_result(metrics_only)
    assert result["AP"] == 12.5 and result["AP50"] == 25.0 and result["APl"] == 30.0
    assert math.isnan(result["AP75"]) and result["train_seconds"] is None

    with pytest.raises(ValueError, match="no COCO 'bbox' evaluation"):
        read_run_result(tmp_path / "missing")


def test_results_table_lists_every_run_and_marks_missing_metrics():
    from dw_d2.viz.comparison import format_results_table

    table = format_results_table({
        "dw": {"AP": 41.5, "AP50": 60.25, "AP75": 44.75, "APs": math.nan, "APm": 45.1,
               "APl": 52.0, "train_seconds": 125.0},
        "fcos": {"AP": 38.04, "AP50": 57.0, "AP75": 41.0, "APs": 20.0, "APm": 42.0,
                 "APl": 49.0, "train_seconds": None},
    }).splitlines()
    assert len(table) == 4
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "run", "AP", "AP50", "AP75", "APs", "APm", "APl", "train time"]
    dw_cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert dw_cells == ["dw", "41.5", "60.2", "44.8", "-", "45.1", "52.0", "2m 05s"]
    fcos_cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert fcos_cells[:2] == ["fcos", "38.0"] and fcos_cells[-1] == "-"
    assert len({len(line) for line in table}) == 1  # aligned columns


def test_comparison_chart_and_results_files(tmp_path):
    from dw_d2.viz.comparison import plot_comparison, write_results

    results = {
        "dw": {"AP": 41.5, "AP50": 60.0, "AP75": 44.0, "APs": math.nan, "APm": 45.0,
               "APl": 52.0, "train_seconds": 125.0},
        "autoassign": {"AP": 40.0, "AP50": 59.0, "AP75": 43.0, "APs": 20.0, "APm": 44.0,
                       "APl": 50.0, "train_seconds": 130.0},
    }
    assert png_size(plot_comparison(results, tmp_path / "comparison.png")) == (1100, 380)
    json_path, table_path = write_results(results, tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["dw"]["APs"] is None and saved["autoassign"]["AP"] == 40.0
    assert "autoassign" in table_path.read_text()


def test_compare_scales_the_schedule_and_changes_only_the_method(capsys):
    compare = load_tool("compare")
    from dw_d2.viz.tool_config import load_config

    cfg = load_config(BUILTIN_DW_CONFIG) if BUILTIN_DW_CONFIG.is_file() else None
    if cfg is None:
        pytest.skip(f"{BUILTIN_DW_CONFIG} is not there yet")
    opts = compare.scaled_schedule(cfg, cfg.SOLVER.MAX_ITER // 2)
    schedule = dict(zip(opts[::2], opts[1::2]))
    assert schedule["SOLVER.MAX_ITER"] == str(cfg.SOLVER.MAX_ITER // 2)
    half_steps = tuple(round(s * (cfg.SOLVER.MAX_ITER // 2) / cfg.SOLVER.MAX_ITER)
                       for s in cfg.SOLVER.STEPS)
    assert schedule["SOLVER.STEPS"] == str(half_steps)
    with pytest.raises(ValueError, match="--iters"):
        compare.scaled_schedule(cfg, 0)

    assert compare.main(["--dry-run", "--iters", "10", "--output", "/tmp/unused"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 4
    common = [c.split(" OUTPUT_DIR ")[0] for c in commands]
    # Every run has the same schedule and seed; the method's own overrides come last.
    shared = common[0]
    assert all(c.startswith(shared) for c in common)
    assert "SOLVER.MAX_ITER 10" in shared and "SEED 42" in shared
    assert "MODEL.DW.BOX_REFINEMENT False" in common[1]
    assert "MODEL.ASSIGNER.NAME AutoAssign" in common[2]
    assert "MODEL.META_ARCHITECTURE FCOSBaseline" in common[3]


def test_compare_reuses_only_a_finished_run_with_the_same_config(tmp_path, capsys):
    compare = load_tool("compare")
    from dw_d2.viz.tool_config import load_config

    cfg = builtin_config()
    run_dir = tmp_path / "dw"
    run_dir.mkdir()
    opts = [*compare.scaled_schedule(cfg, 10), "SEED", "42", "OUTPUT_DIR", str(run_dir)]
    (run_dir / "config.yaml").write_text(load_config(BUILTIN_DW_CONFIG, opts).dump())
    (run_dir / "log.txt").write_text(LOG_WITH_TWO_EVALUATIONS)

    argv = ["--config-file", str(BUILTIN_DW_CONFIG), "--reuse", "--runs", "dw", "--iters", "10",
            "--output", str(tmp_path)]
    assert compare.main(argv) == 0  # returns at once: nothing is trained
    out = capsys.readouterr().out
    assert "reusing the finished run" in out
    assert [line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith("| dw ")] == ["41.5"]
    assert png_size(tmp_path / "comparison.png") == (1100, 380)
    another_seed = load_config(BUILTIN_DW_CONFIG, [*opts, "SEED", "7"])
    assert compare.finished_result(run_dir, another_seed) is None


# ---------------------------------------------------------------------------------------------
# plot_curves.py
# ---------------------------------------------------------------------------------------------

def write_metrics(path, iterations=40, eval_every=20, resumed_from=None):
    lines = []
    for it in range(iterations):
        record = {"iteration": it, "total_loss": 3.0 - it / iterations, "lr": 0.01,
                  "loss_cls_pos": 1.0 - it / (2 * iterations), "loss_loc": 1.0,
                  "loss_cls_neg": 1.0 - it / (2 * iterations)}
        lines.append(json.dumps(record))
        if (it + 1) % eval_every == 0:
            lines.append(json.dumps({"iteration": it + 1, "bbox/AP": it / 2, "bbox/AP50": it,
                                     "bbox/AP75": it / 3}))
    if resumed_from is not None:  # a resumed run repeats iterations with new values
        lines += [json.dumps({"iteration": it, "total_loss": 9.0})
                  for it in range(resumed_from, iterations)]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def test_load_metrics_merges_resumed_runs_and_rejects_bad_lines(tmp_path):
    from dw_d2.viz.curves import ap_series, load_metrics, loss_series

    records = load_metrics(write_metrics(tmp_path / "metrics.json", resumed_from=30))
    losses = loss_series(records)
    assert list(losses) == ["total_loss", "loss_cls_neg", "loss_cls_pos", "loss_loc"]
    total = dict(losses["total_loss"])
    assert total[29] == pytest.approx(3.0 - 29 / 40) and total[35] == 9.0
    assert [i for i, _ in losses["total_loss"]] == sorted({i for i, _ in losses["total_loss"]})
    assert ap_series(records)["bbox/AP"] == [(20, 9.5), (40, 19.5)]

    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + '\n{"iterat')
    assert len(load_metrics(truncated)) == 1  # a run killed mid-write
    broken = tmp_path / "broken.json"
    broken.write_text('{"iterat\n' + json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="broken.json, line 1"):
        load_metrics(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_metrics(tmp_path / "nothing.json")


def test_plot_curves_tool_writes_one_png(tmp_path):
    plot_curves = load_tool("plot_curves")
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run / "metrics.json")
    assert plot_curves.main([str(run)]) == 0
    # 4 loss panels + 1 AP panel: a 2 x 3 grid of 4.2 x 3.0 inch panels at 100 dpi.
    assert png_size(run / "curves.png") == (1260, 600)

    without_eval = tmp_path / "early.json"
    write_metrics(without_eval, iterations=10, eval_every=1000)
    assert plot_curves.main([str(without_eval), "--output", str(tmp_path / "early.png")]) == 0
    assert png_size(tmp_path / "early.png") == (1260, 600)


# ---------------------------------------------------------------------------------------------
# Tools that run a model: a checkpoint of the built-in DW detector's initial weights
# ---------------------------------------------------------------------------------------------

def builtin_config(path=BUILTIN_DW_CONFIG, opts=()):
    from dw_d2.viz.tool_config import load_config

    if not Path(path).is_file():
        pytest.skip(f"{path} is not there")
    return load_config(path, opts)


@pytest.fixture(scope="session")
def initial_checkpoint(tmp_path_factory):
    """The built-in DW detector's initial weights (seeded), saved by DetectionCheckpointer."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(builtin_config())
    folder = tmp_path_factory.mktemp("initial_checkpoint")
    DetectionCheckpointer(model, save_dir=str(folder)).save("model_final")
    return folder / "model_final.pth"


@pytest.fixture(scope="session")
def val_records():
    import dw_d2  # noqa: F401  (registers the built-in dataset)
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get("dw_shapes_val")


def first_index_with_boxes(records, at_least):
    return next(i for i, r in enumerate(records) if len(r.get("annotations", [])) >= at_least)


@pytest.mark.parametrize("config", [BUILTIN_DW_CONFIG, BUILTIN_AUTOASSIGN_CONFIG],
                         ids=["DW", "AutoAssign"])
def test_heat_maps_equal_the_weights_of_the_assigner(config, val_records, monkeypatch):
    """The drawn maps are the weighting function's own output on what training feeds it."""
    from detectron2.modeling import build_model
    from dw_d2.viz.assignment import compute_assignment_maps, deterministic_mapper

    cfg = builtin_config(config)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    record = val_records[first_index_with_boxes(val_records, 2)]
    mapped = deterministic_mapper(cfg)(record)
    maps = compute_assignment_maps(model, mapped)

    # Reference: the weights the assigner returns for the inputs that the training path
    # (DWDetector.forward_training) assembles for this image.
    captured = {}
    assign = model.assigner.forward

    def capture(*args, **kwargs):
        wanted = kwargs.pop("return_weights", False)
        losses, captured["weights"] = assign(*args, **kwargs, return_weights=True)
        return (losses, captured["weights"]) if wanted else losses

    monkeypatch.setattr(model.assigner, "forward", capture)
    with torch.no_grad():
        images = model.preprocess_image([mapped])
        features = [model.backbone(images.tensor)[f] for f in model.head_in_features]
        model.forward_training(images, features, model.head(features),
                               [mapped["instances"].to(model.device)])
    weights = captured["weights"][0]

    gt_boxes = mapped["instances"].gt_boxes.tensor
    gt_classes = mapped["instances"].gt_classes
    assert maps.assigner == cfg.MODEL.ASSIGNER.NAME
    assert len(maps.pos_weights) == len(maps.strides) == 5
    start = 0
    for level, ((h, w), stride) in enumerate(zip(maps.level_shapes, maps.strides)):
        rows = slice(start, start + h * w)
        for m in range(len(gt_boxes)):
            pos = weights["pos_weight"][rows, m].reshape(h, w).numpy()
            neg = weights["neg_weight"][rows, gt_classes[m]].reshape(h, w).numpy()
            assert np.array_equal(maps.pos_weights[level][m], pos)
            assert np.array_equal(maps.neg_weights[level][m], neg)
            # The map's cell (y, x) is the point ((x + o) s, (y + o) s): inside the box exactly
            # where the map marks a candidate.
            xs = (np.arange(w) + maps.point_offset) * stride
            ys = (np.arange(h) + maps.point_offset) * stride
            x1, y1, x2, y2 = gt_boxes[m].tolist()
            inside = ((xs > x1) & (xs < x2))[None, :] & ((ys > y1) & (ys < y2))[:, None]
            assert np.array_equal(maps.candidates[level][m], inside)
        start += h * w
    assert start == weights["pos_weight"].shape[0]
    assert any(p.max() > 0 for p in maps.pos_weights)


def test_visualize_assignment_tool_writes_the_grid(initial_checkpoint, val_records, tmp_path):
    tool = load_tool("visualize_assignment")
    index = first_index_with_boxes(val_records, 2)
    output = tmp_path / "assignment.png"
    assert tool.main([
        "--config-file", str(BUILTIN_DW_CONFIG), "--dataset", "dw_shapes_val",
        "--index", str(index), "--max-gt", "2", "--output", str(output),
        "--opts", "MODEL.WEIGHTS", str(initial_checkpoint),
    ]) == 0
    # 2 GT rows x (5 levels x {pos, neg}) columns of 1.7-inch panels at 100 dpi.
    assert png_size(output) == (1700, 340)

    with pytest.raises(KeyError, match="no image with image_id"):
        tool.main(["--config-file", str(BUILTIN_DW_CONFIG), "--dataset", "dw_shapes_val",
                   "--image-id", "no-such-id", "--output", str(tmp_path / "x.png")])


def test_demo_tool_writes_pictures_and_detections(initial_checkpoint, val_records, tmp_path):
    from dw_d2.viz.tool_config import dataset_class_names

    demo = load_tool("demo")
    files = sorted(r["file_name"] for r in val_records)[:2]
    output = tmp_path / "demo"
    # The initial weights score every (point, class) about 0.02 * 0.5: a threshold below that
    # makes detections to draw.
    assert demo.main([
        "--config-file", str(BUILTIN_DW_CONFIG), "--input", *files, "--output", str(output),
        "--confidence-threshold", "0.005", "--opts", "MODEL.WEIGHTS", str(initial_checkpoint),
    ]) == 0
    names = dataset_class_names("dw_shapes_val")
    for image_file in files:
        stem = Path(image_file).stem
        with Image.open(image_file) as image:
            assert png_size(output / f"{stem}.png") == image.size
        saved = json.loads((output / f"{stem}.json").read_text())
        assert saved["file_name"] == image_file
        assert (saved["width"], saved["height"]) == image.size
        detections = saved["detections"]
        assert 0 < len(detections) <= 100
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0.005
        for d in detections:
            x1, y1, x2, y2 = d["bbox"]
            assert 0 <= x1 <= x2 <= saved["width"] and 0 <= y1 <= y2 <= saved["height"]
            assert d["category_name"] == names[d["category_id"]]

    with pytest.raises(FileNotFoundError, match="matches no file"):
        demo.main(["--config-file", str(BUILTIN_DW_CONFIG), "--input", str(tmp_path / "*.jpg"),
                   "--output", str(output)])


def test_write_run_pictures(initial_checkpoint, val_records, tmp_path):
    from dw_d2.viz import write_run_pictures

    run = tmp_path / "run"
    run.mkdir()
    (run / "model_final.pth").symlink_to(initial_checkpoint)
    (run / "last_checkpoint").write_text("model_final.pth")
    write_metrics(run / "metrics.json")
    cfg = builtin_config(opts=["OUTPUT_DIR", str(run)])
    pictures = write_run_pictures(cfg, run / "pictures")
    assert [p.name for p in pictures] == ["val_detections.png", "training_curves.png"]
    shown = val_records[first_index_with_boxes(val_records, 1)]
    # Ground truth and detections side by side, 8 pixels apart, under a 16-pixel caption.
    assert png_size(pictures[0]) == (2 * shown["width"] + 8, shown["height"] + 16)
    assert png_size(pictures[1]) == (1260, 600)


def test_fcos_baseline_trains_and_predicts_with_the_dw_backbone(val_records):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from dw_d2.baselines import FCOS_META_ARCHITECTURE
    from dw_d2.viz.assignment import deterministic_mapper

    cfg = builtin_config(opts=["MODEL.META_ARCHITECTURE", FCOS_META_ARCHITECTURE])
    torch.manual_seed(0)
    model = build_model(cfg)
    dw_model = build_model(builtin_config())
    # Same backbone: identical parameter names and shapes.
    assert {k: v.shape for k, v in model.backbone.state_dict().items()} == {
        k: v.shape for k, v in dw_model.backbone.state_dict().items()}

    mapper = deterministic_mapper(cfg)
    mapped = mapper(val_records[first_index_with_boxes(val_records, 1)])
    empty = mapper(next(r for r in val_records if not r.get("annotations")))
    assert len(empty["instances"]) == 0
    with EventStorage():
        losses = model([mapped, empty])  # Detectron2's own FCOS fails on the empty image
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        instances = model([mapped])[0]["instances"]
    assert instances.image_size == (mapped["height"], mapped["width"])

    with pytest.raises(ValueError, match="p9"):
        build_model(builtin_config(opts=["MODEL.META_ARCHITECTURE", FCOS_META_ARCHITECTURE,
                                         "MODEL.DW.IN_FEATURES", "['p3', 'p9']"]))


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "train_net.py").is_file(), reason="train_net.py is not there")
def test_compare_end_to_end_trains_evaluates_and_tabulates(tmp_path, capsys):
    """One FCOS run through train_net.py (the launcher registers the baseline), then the table."""
    compare = load_tool("compare")
    assert compare.main(["--iters", "2", "--runs", "fcos", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fcos " in out and "train time" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"fcos"} and saved["fcos"]["train_seconds"] is not None
    assert png_size(tmp_path / "comparison.png") == (1100, 380)
    assert (tmp_path / "fcos" / "model_final.pth").is_file()
