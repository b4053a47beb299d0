#!/usr/bin/env python
"""Decision Transformers merged into one multi-task policy, over several seeds.

    python scripts/dt_merge.py                  # = make dt-merge: 4 tabletop tasks, seeds 0-4
    python scripts/dt_merge.py --quick          # 2 tasks, tiny budgets: a smoke run in ~1 minute
    python scripts/dt_merge.py --dataset hopper=mujoco/hopper/medium-v0 --dataset ...  # any Minari data

Per seed, after the merging paper (Lawson & Qureshi, arXiv 2303.07551): one common
initialisation, one specialist per task fine-tuned from it, each specialist's diagonal
Fisher on its own data, then the merges: uniform average, Fisher-weighted average, task
arithmetic, TIES and a merge into an AdaMoE body. Every model is evaluated on every task
(normalised return: 0 random, 100 scripted expert). The stages are
``policies.dt.experiment``.

Writes ``<output-dir>/results.md``, ``results.json``, ``plots/normalized_return.png`` and
per seed ``seed<k>/{common, specialists/<task>, merged/<method>}`` (each a
``from_pretrained`` directory). Every stage skips outputs that are already complete.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.dt.experiment import FISHER_NORMALIZATIONS, QUICK, MergeExperimentConfig, run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> MergeExperimentConfig:
    d = MergeExperimentConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--root", default=None, help="dataset root (default: <output-dir>/datasets)")
    p.add_argument("--tasks", nargs="+", default=None, help=f"tabletop tasks to collect and merge (default {d.tasks})")
    p.add_argument("--dataset", dest="datasets", action="append", default=[], help="TASK=MINARI_ID_OR_PATH")
    p.add_argument("--episodes-per-task", type=int, default=None, help="per noise level")
    p.add_argument("--noise", type=float, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--common-steps", type=int, default=None)
    p.add_argument("--specialist-steps", type=int, default=None)
    p.add_argument("--router-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="windows per task per step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--router-lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--fisher-samples", type=int, default=None)
    p.add_argument("--fisher-normalization", default=None, choices=FISHER_NORMALIZATIONS)
    p.add_argument("--ta-scale", type=float, default=None, help="task arithmetic scale (1/n tasks = the average)")
    p.add_argument("--ties-scale", type=float, default=None)
    p.add_argument("--ties-density", type=float, default=None)
    p.add_argument("--eval-episodes", type=int, default=None)
    p.add_argument("--target-quantile", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="2 tasks, tiny budgets")
    args = p.parse_args(argv)
    cfg = replace(d, **QUICK) if args.quick else d
    if args.quick and args.seeds:
        args.seeds = args.seeds[:1]
    given = {f.name: getattr(args, f.name) for f in fields(d) if getattr(args, f.name, None) not in (None, [])}
    return replace(cfg, **given)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
