#!/usr/bin/env python
"""Ablation: train DW, DW without box refinement, every other assignment scheme and FCOS
alike; compare COCO AP.

Every run starts from one reference config (default: the main job's, DW on the built-in
dataset from the ImageNet-pretrained EfficientNet-Lite0) and changes only what defines the
method, so backbone and its ImageNet start, head width, input size, schedule, batch and seed
are identical:

    dw           the reference config (DW, box refinement on)
    dw_norefine  MODEL.DW.BOX_REFINEMENT False
    autoassign   MODEL.ASSIGNER.NAME AutoAssign, without box refinement (DW's branch); each
                 scheme that dw_d2 registers gets such a run, named after it in lower case
    fcos         Detectron2's FCOS (dw_d2.baselines) with the same backbone and head sizes

Each run is a ``train_net.py`` subprocess writing to ``OUTPUT/<run>``; its final COCO
evaluation and training time are read back from its ``log.txt``. The table is printed and
saved as ``OUTPUT/results.md`` and ``results.json``, the bar chart as ``OUTPUT/comparison.png``.

Examples::

    python tools/compare.py              # 150 iterations each: 6.5 min on 2 CPU cores
    python tools/compare.py --iters 3000 --runs dw fcos --output output/compare_long
    python tools/compare.py --opts MODEL.DEVICE cuda SOLVER.IMS_PER_BATCH 16
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout

from dw_d2 import ASSIGNER_REGISTRY  # noqa: E402
from dw_d2.baselines import FCOS_META_ARCHITECTURE  # noqa: E402
from dw_d2.viz.comparison import (  # noqa: E402
    format_results_table,
    plot_comparison,
    read_run_result,
    write_results,
)
from dw_d2.viz.tool_config import load_config  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "Builtin" / "dw_lite0_FPN_shapes.yaml"


def run_overrides():
    """Run name -> the KEY VALUE opts that make the method, in table order."""
    runs = {"dw": [], "dw_norefine": ["MODEL.DW.BOX_REFINEMENT", "False"]}
    # The runs are train_net.py processes, which know the schemes that importing dw_d2
    # registers, not those a caller of this module may have added.
    for scheme, module in ASSIGNER_REGISTRY:
        if not module.__module__.startswith("dw_d2."):
            continue
        runs.setdefault(scheme.lower(), ["MODEL.ASSIGNER.NAME", scheme,
                                         "MODEL.DW.BOX_REFINEMENT", "False"])
    runs["fcos"] = ["MODEL.META_ARCHITECTURE", FCOS_META_ARCHITECTURE,
                    "MODEL.DW.BOX_REFINEMENT", "False"]
    return runs


RUN_OVERRIDES = run_overrides()

# train_net.py runs under this launcher, which imports dw_d2.baselines first so that the FCOS
# builder is registered whether or not train_net.py imports it.
TRAIN_NET_LAUNCHER = (
    "import runpy, sys; import dw_d2.baselines; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


# Four runs of the built-in schedule scaled to 150 iterations took 6.5 minutes on 2 CPU cores
# (about 0.6 s per iteration, plus start-up and evaluation), leaving room for slower machines
# within the 20-minute budget; --iters 400 is the schedule of `make run`.
DEFAULT_ITERS = 150


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG), metavar="FILE",
                        help="reference config every run starts from (default: %(default)s)")
    parser.add_argument("--runs", nargs="+", default=list(RUN_OVERRIDES),
                        choices=list(RUN_OVERRIDES), help="which runs, in table order")
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                        help="training iterations per run; the config's LR steps and warm-up "
                             "are scaled to it (default: %(default)s, so that the four runs "
                             "fit in 20 minutes on 2 CPU cores; 0 means the config's "
                             "SOLVER.MAX_ITER)")
    parser.add_argument("--seed", type=int, default=42, help="SEED of every run")
    parser.add_argument("--output", default=str(REPO / "output" / "compare"),
                        help="folder for the runs, the table and the chart")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the results of runs that already finished in --output with "
                             "the same config")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="KEY VALUE config overrides applied to every run")
    return parser


def scaled_schedule(cfg, iters):
    """``SOLVER`` overrides that fit the config's schedule (LR steps, warm-up) into ``iters``.

    Args:
        cfg (CfgNode): the reference config.
        iters (int): the new ``SOLVER.MAX_ITER``.

    Returns:
        list[str]: ``KEY VALUE`` opts.
    """
    if iters < 1:
        raise ValueError(f"--iters must be at least 1, got {iters}")
    ratio = iters / cfg.SOLVER.MAX_ITER
    # fvcore's scheduler needs every LR step strictly before the last iteration.
    steps = tuple(sorted({max(1, round(s * ratio)) for s in cfg.SOLVER.STEPS}))
    steps = tuple(s for s in steps if s < iters)
    warmup = min(round(cfg.SOLVER.WARMUP_ITERS * ratio), iters)
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", str(steps),
        "SOLVER.WARMUP_ITERS", str(warmup),
        # One evaluation and one checkpoint, at the end: periodic ones would count as training
        # time for some runs and not others.
        "TEST.EVAL_PERIOD", "0",
        "SOLVER.CHECKPOINT_PERIOD", str(iters + 1),
    ]


def run_command(config_file, opts):
    """The ``train_net.py`` command line of one run."""
    return [
        sys.executable, "-c", TRAIN_NET_LAUNCHER, str(REPO / "train_net.py"),
        "--config-file", str(config_file), *opts,
    ]


def train(command, run_dir):
    """Run one training, echoing its output and keeping a copy in ``run_dir/stdout.log``.

    Returns:
        int: the exit status.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        return process.wait()


def finished_result(run_dir, expected_cfg):
    """The result of a run that already finished in ``run_dir`` with the config this comparison
    would give it (``MODEL.DEVICE`` aside), else None."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:
        saved_cfg = load_config(saved, ["MODEL.DEVICE", expected_cfg.MODEL.DEVICE])
    except KeyError:  # written by another version of dw-d2, with other keys
        return None
    # Compare the values, not the YAML text (whose anchors depend on object identity).
    if yaml.safe_load(saved_cfg.dump()) != yaml.safe_load(expected_cfg.dump()):
        return None
    try:
        return read_run_result(run_dir)
    except (OSError, ValueError):
        return None


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    if args.iters == 0:
        args.iters = cfg.SOLVER.MAX_ITER
    common = [*args.opts, *scaled_schedule(cfg, args.iters), "SEED", str(args.seed)]
    output = Path(args.output)

    results, failures = {}, {}
    for name in args.runs:
        run_dir = output / name
        run_opts = [*common, *RUN_OVERRIDES[name], "OUTPUT_DIR", str(run_dir)]
        command = run_command(args.config_file, run_opts)
        if args.dry_run:
            print(" ".join(command))
            continue
        if args.reuse:
            result = finished_result(run_dir, load_config(args.config_file, run_opts))
            if result is not None:
                print(f"[compare] {name}: reusing the finished run in {run_dir}")
                results[name] = result
                continue
        print(f"[compare] {name}: training {args.iters} iterations into {run_dir}", flush=True)
        start = time.monotonic()
        status = train(command, run_dir)
        if status != 0:
            failures[name] = f"exit status {status}; see {run_dir / 'stdout.log'}"
            continue
        try:
            results[name] = read_run_result(run_dir)
        except ValueError as e:
            failures[name] = str(e)
            continue
        if results[name]["train_seconds"] is None:  # no timing line: fall back to wall time
            results[name]["train_seconds"] = time.monotonic() - start
    if args.dry_run:
        return 0

    if results:
        table = format_results_table(results)
        print(f"\n[compare] {args.iters} iterations, seed {args.seed}, "
              f"reference config {args.config_file}\n{table}\n")
        title = (f"COCO box AP on {', '.join(cfg.DATASETS.TEST)}: {args.iters} iterations, "
                 f"seed {args.seed}")
        chart = plot_comparison(results, output / "comparison.png", title=title)
        for path in [*write_results(results, output), chart]:
            print(f"[compare] wrote {path}")
    for name, reason in failures.items():
        print(f"[compare] {name} FAILED: {reason}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
