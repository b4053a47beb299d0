#!/usr/bin/env python
"""The scripted experts' success per task on hidden scenes, with 95% intervals.

    python scripts/experts.py --suite tabletop-long --episodes 200

Seeds start at 100,000 (the evaluation block: no demonstration is collected there). Per
task: success, the stages left done on average (long tasks), and how many episodes ended
with a cube off the table. Writes the table and the per-episode results to --output-dir.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

import envs  # noqa: E402,F401  (registers the envs)
from envs.collection import CUBE_OFF_TABLE, expert_success  # noqa: E402
from envs.ids import task_name  # noqa: E402
from envs.registration import resolve_env_ids  # noqa: E402
from policies.io import write_json, write_text  # noqa: E402
from policies.stats import wilson_interval  # noqa: E402


def table(results: list[dict]) -> str:
    lines = [
        "| task | stages | success | 95% interval | stages done (mean) | cube off table |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in results:
        n, wins = len(r["success"]), sum(r["success"])
        low, high = wilson_interval(wins, n)
        stages = sum(r["stages_done"]) / n
        off = r["termination_reason"].count(CUBE_OFF_TABLE)
        lines.append(
            f"| {task_name(r['env_id'])} | {r['num_stages']} | {100 * wins / n:.1f}% ({wins}/{n}) | "
            f"[{100 * low:.1f}, {100 * high:.1f}] | {stages:.2f} | {off} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=["tabletop-long"], help="suite names or env ids")
    p.add_argument("--episodes", type=int, default=200, help="episodes per task")
    p.add_argument("--first-seed", type=int, default=100_000)
    p.add_argument("--noise", type=float, default=0.0, help="the experts' action noise")
    p.add_argument("--output-dir", default="outputs/experts")
    args = p.parse_args(argv)
    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    if args.first_seed < 0:
        raise ValueError(f"--first-seed must be >= 0, got {args.first_seed}")
    env_ids = resolve_env_ids(args.suite)
    results = [
        expert_success(env_id, args.episodes, args.first_seed, args.noise)
        for env_id in tqdm(env_ids, desc="experts", unit="task")
    ]
    out = Path(args.output_dir)
    markdown = table(results)
    write_json(out / "results.json", {"suite": args.suite, "episodes": args.episodes, "results": results})
    write_text(out / "results.md", markdown + "\n")
    print(markdown)
    print(f"\nwrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
