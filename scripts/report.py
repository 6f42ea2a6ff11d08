"""Figures and a results table from TensorBoard runs (thin wrapper over manualbp.tools.report).

    python scripts/report.py --runs runs --out docs/results      # the latest fit of each
    python scripts/report.py --out docs/results runs/simard_800_ce/version_0 runs/...

Writes ``<out>/*.png`` and ``<out>/results.md``; ``manualbp/tools/report.py`` says what each
shows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from manualbp.tools.report import write_report
from manualbp.tools.runs import discover_runs


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, write the report, print the files written; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs",
        nargs="*",
        type=Path,
        help="explicit run directories (.../<experiment>/version_N); default: discover",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="root holding one directory per experiment (default: runs)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="output folder")
    args = parser.parse_args(argv)
    if args.run_dirs:
        run_dirs = list(args.run_dirs)
    elif args.runs.is_dir():
        run_dirs = discover_runs(args.runs)
    else:
        run_dirs = []
    if not run_dirs:
        print(f"report: no runs with event files found under {args.runs}", file=sys.stderr)
        return 1
    for run_dir in run_dirs:
        print(f"reading {run_dir}")
    for path in write_report(run_dirs, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
