#!/usr/bin/env python3
"""Trims benchmark result directories to what a reader needs before they go into git.

    bench/trim.py bench/results/<run> [...]            # keep results.md, results.json, cdf.png
    bench/trim.py --no-plot bench/results/<run> [...]  # the plot too goes
    bench/trim.py --no-series bench/results/<run>      # keep the plot, not the data to redraw it
    bench/trim.py --no-curves bench/results/<run>      # drop each node's progress curve

For every directory given (and every run directory below it: one holding a results.json):
removes the raw material (`logs/`, `plot-data/`, which .gitignore keeps out of git anyway),
rewrites results.json without indentation, and with --no-plot removes cdf.png and the per-mode
time series it is drawn from (`modes.*.series`; without them `--replot` cannot redraw it);
--no-series drops only the series (a long direct mode makes them most of the file);
--no-curves drops each node's progress curve (`modes.*.progress.nodes[].curve`, most of an N=16
run's file; `progress.png` is drawn from them) and keeps its 95 % and tail times.
Prints what each directory weighed before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

RAW = ("logs", "plot-data")


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trim(run: Path, plot: bool, series: bool, curves: bool) -> None:
    before = size(run)
    for raw in RAW:
        shutil.rmtree(run / raw, ignore_errors=True)
    results = run / "results.json"
    data = json.loads(results.read_text())
    if not plot:
        (run / "cdf.png").unlink(missing_ok=True)
        md = run / "results.md"
        if md.exists():
            lines = md.read_text().splitlines(keepends=True)
            md.write_text("".join(line for line in lines if not line.startswith("Plot: [cdf.png]")))
        if str(data.get("plot", "")).endswith("cdf.png"):
            data.pop("plot")
    for mode in (data.get("modes") or {}).values():
        if not isinstance(mode, dict):
            continue
        if not plot or not series:
            mode.pop("series", None)
        if not curves:
            for node in (mode.get("progress") or {}).get("nodes") or []:
                node.pop("curve", None)
    results.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"{run}: {before / 1024:.0f} KiB -> {size(run) / 1024:.0f} KiB")


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/trim.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-plot", dest="plot", action="store_false", help="drop cdf.png and the series too")
    p.add_argument("--no-series", dest="series", action="store_false", help="drop the series, keep cdf.png")
    p.add_argument("--no-curves", dest="curves", action="store_false",
                   help="drop each node's progress curve, keep its 95 %% and tail times")
    p.add_argument("dirs", nargs="+", type=Path)
    a = p.parse_args()
    runs = []
    for d in a.dirs:
        if not d.is_dir():
            print(f"bench/trim.py: {d} is not a directory", file=sys.stderr)
            return 1
        runs += sorted({r.parent for r in d.rglob("results.json")})
    if not runs:
        print("bench/trim.py: no results.json below the directories given", file=sys.stderr)
        return 1
    for run in runs:
        trim(run, a.plot, a.series, a.curves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
