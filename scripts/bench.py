"""Benchmarks (``make bench``): prints a markdown table and writes outputs/bench/results.json.

Every row is ``{"benchmark", "case", "metric", "value", "unit"}``; ratios are rows of
their own, computed from measurements taken side by side in the same run (medians of
interleaved repeats, since this machine is shared and noisy). Each section is its own
script (``scripts/bench_<section>.py``, runnable alone) and runs here in its own process,
one after another, so no section's threads or memory disturb another's timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.benchmark import rows_markdown  # noqa: E402
from policies.io import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTIONS = ("control", "envs", "fisher", "moe", "perception", "vla")


def run_section(section: str, repeats: int, quick: bool) -> list[dict]:
    """``scripts/bench_<section>.py`` in a fresh process; its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        command = [sys.executable, str(HERE / f"bench_{section}.py"), "--repeats", str(repeats), "--json", rows_path]
        paths = [str(HERE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        # The section's own table is printed once, merged with the others, below.
        subprocess.run([*command, *(["--quick"] if quick else [])], check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(rows_path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="fewer steps per repeat (for a smoke test)")
    p.add_argument("--output-dir", default="outputs/bench")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    rows: list[dict] = []
    start = time.perf_counter()
    for section in args.only:
        print(f"running {section} ...", flush=True)
        try:
            rows.extend(run_section(section, args.repeats, args.quick))
        except subprocess.CalledProcessError as err:
            raise SystemExit(f"error: benchmark section {section!r} failed (exit status {err.returncode})") from err
    out = Path(args.output_dir)
    write_json(out / "results.json", rows)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print()
    print(rows_markdown(rows))
    print(f"\n{machine}; {args.repeats} repeats; {time.perf_counter() - start:.0f} s; wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
