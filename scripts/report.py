"""Build an HTML report of one training run, or several side by side, from the files training wrote.

    python scripts/report.py results/flax-seed-1epoch                          # -> results/flax-seed-1epoch/report/
    python scripts/report.py results/flax-seed-1epoch results/torch-seed-1epoch --out /tmp/compare

Writes report.html and the PNGs it shows (curves, per-class accuracy and confusion, mean attention
per class, expert usage over training, worst mistakes) into one directory; open report.html in a
browser. The grid of mistakes needs the CIFAR-10 test images (--data, else CIFAR10_PATH).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.cifar10 import SOURCE_KINDS
from expert_core.flags import refuse_counts_below_one
from expert_core.report import GRID_SIZE, ReportError, build_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (a training script's --out)")
    parser.add_argument("--out", help="report directory (default: RUN_DIR/report for one run, "
                        "report-<run>-vs-<run> in the current directory for several)")
    parser.add_argument("--data", help="CIFAR-10 location for the test images (default: CIFAR10_PATH)")
    parser.add_argument("--data-source", choices=SOURCE_KINDS)
    parser.add_argument("--grid-size", type=int, default=GRID_SIZE, help="mistakes shown per run")
    args = parser.parse_args(argv)
    refuse_counts_below_one(parser, args, ("grid_size",))
    out = Path(args.out) if args.out else default_out(args.runs)
    dataset, problem = load_test_images(args.data, args.data_source)
    try:
        path = build_report(args.runs, out, dataset, problem, args.grid_size)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def default_out(runs: list[str]) -> Path:
    if len(runs) == 1:
        return Path(runs[0]) / "report"
    return Path("report-" + "-vs-".join(Path(run).resolve().name for run in runs))


def load_test_images(path, source):
    """The data set, or None and why: without it the report still has everything but the mistakes grid."""
    from data import load_cifar10
    from data.errors import DataError

    try:
        return load_cifar10(path, source), ""
    except DataError as error:
        print(f"warning: no test images, so no grid of mistakes: {error}", file=sys.stderr)
        return None, str(error)


if __name__ == "__main__":
    sys.exit(main())
