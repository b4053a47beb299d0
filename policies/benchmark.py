"""Benchmark rows and the command line every ``scripts/bench_*.py`` section shares.

A row is ``{"benchmark", "case", "metric", "value", "unit"}``; ratios are rows of their
own, computed from measurements taken side by side in the same run. ``make bench``
(``scripts/bench.py``) runs each section in its own process and gathers the rows into
``outputs/bench/results.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from policies.io import write_json

Rows = list[dict]


def rows_markdown(rows: Rows) -> str:
    """The rows as a markdown table (large values with thousands separators)."""
    lines = ["| benchmark | case | metric | value | unit |", "|---|---|---|---:|---|"]
    for r in rows:
        value = r["value"]
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        lines.append(f"| {r['benchmark']} | {r['case']} | {r['metric']} | {shown} | {r['unit']} |")
    return "\n".join(lines)


def section_main(run: Callable[..., Rows], description: str | None, argv: list[str] | None = None) -> int:
    """``run(repeats=, quick=)`` from the command line: print its rows, and with ``--json``
    write them there."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are reported)")
    p.add_argument("--quick", action="store_true", help="fewer steps per repeat (a smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.json is not None and args.json.is_dir():
        p.error(f"--json {args.json} is a folder; give the path of the file to write")
    rows = run(repeats=args.repeats, quick=args.quick)
    if args.json is not None:
        write_json(args.json, rows)
    print(rows_markdown(rows))
    return 0
