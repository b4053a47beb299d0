"""Benchmarks (``make bench``): prints a markdown table and writes outputs/bench/results.json.

Every row is ``{"benchmark", "case", "metric", "value", "unit"}``; ratios are rows of
their own, computed from measurements taken side by side in the same run (medians of
interleaved repeats, since this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import envs  # noqa: E402,F401  (GL backend first)

SECTIONS = {
    "envs": "bench_envs",
    "moe": "bench_moe",
    "vla": "bench_vla",
    "perception": "bench_perception",
    "fisher": "bench_fisher",
    "control": "bench_control",
}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | case | metric | value | unit |", "|---|---|---|---:|---|"]
    for r in rows:
        value = r["value"]
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        lines.append(f"| {r['benchmark']} | {r['case']} | {r['metric']} | {shown} | {r['unit']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="fewer steps per repeat (for a smoke test)")
    p.add_argument("--output-dir", default="outputs/bench")
    args = p.parse_args(argv)
    rows: list[dict] = []
    start = time.perf_counter()
    for section in args.only:
        module = __import__(SECTIONS[section])
        print(f"running {section} ...", flush=True)
        rows.extend(module.run(repeats=args.repeats, quick=args.quick))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores"
    print()
    print(to_markdown(rows))
    print(f"\n{machine}; {args.repeats} repeats; {time.perf_counter() - start:.0f} s; wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
