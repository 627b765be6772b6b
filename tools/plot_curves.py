#!/usr/bin/env python
"""Plot a run's training curves (each loss component, AP over evaluations) into one PNG.

Example::

    python tools/plot_curves.py output/shapes_dw            # writes output/shapes_dw/curves.png
    python tools/plot_curves.py output/shapes_dw/metrics.json --output curves.png
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from dw_d2.viz.curves import load_metrics, plot_training_curves  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run's OUTPUT_DIR, or its metrics.json")
    parser.add_argument("--output", help="the PNG to write (default: RUN/curves.png)")
    parser.add_argument("--title", help="figure title (default: the run folder's name)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    run = Path(args.run)
    metrics_file = run / "metrics.json" if run.is_dir() else run
    output = Path(args.output) if args.output else metrics_file.parent / "curves.png"
    records = load_metrics(metrics_file)
    path = plot_training_curves(records, output, title=args.title or metrics_file.parent.name)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
