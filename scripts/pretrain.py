"""Pretrain the dense VLA from nothing (``make pretrain``): collect, perception, policy,
evaluation and report, resumable, every stage skipped when its output is complete.

    python scripts/pretrain.py                          # the shipped base's recipe (~1 h, 2 cores)
    python scripts/pretrain.py --quick                  # tiny sizes: the plumbing in a few minutes
    python scripts/pretrain.py --ship checkpoints/vla-tabletop-base   # then copy it there with a card

Writes under --output-dir (default outputs/pretrain/): datasets/, perception/ (scene
encoder checkpoint, probe.json), policy/ (checkpoint/, run/, curve.json), eval/{train,heldout}/,
results.md, results.json, plots/*.png. See policies/vla/recipe.py for the stages.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import envs  # noqa: E402,F401  (GL backend first, registers the envs)
from policies.training import resolve_device  # noqa: E402
from policies.vla import parse_overrides  # noqa: E402
from policies.vla.recipe import QUICK, RecipeConfig, run  # noqa: E402
from policies.vla.recipe_report import ship  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[RecipeConfig, argparse.Namespace]:
    d = RecipeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--quick", action="store_true", help="tiny preset, few steps and episodes")
    p.add_argument("--suite", nargs="+", default=None, help="suite names or env ids")
    p.add_argument("--episodes-per-task", type=int, default=None, help="demos per task and noise level")
    p.add_argument("--preset", default=None, help="VLA preset: tiny, small, base")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="VLAConfig overrides")
    p.add_argument("--perception-steps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="policy training steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per task and phrasing split")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--ship", default=None, metavar="DIR", help="copy the checkpoint to DIR with a model card")
    args = p.parse_args(argv)
    cfg = replace(d, **QUICK) if args.quick else d
    given = {
        "output_dir": args.output_dir,
        "suite": args.suite,
        "episodes_per_task": args.episodes_per_task,
        "preset": args.preset,
        "perception_steps": args.perception_steps,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "eval_episodes": args.eval_episodes,
    }
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    cfg.overrides = {**cfg.overrides, **parse_overrides(args.set)}
    cfg.seed, cfg.device = args.seed, args.device
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    resolve_device(cfg.device)  # an unusable device is an error before any work starts
    report = run(cfg)
    if args.ship:
        command = " ".join(["python", "scripts/pretrain.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"shipped {ship(cfg, report, args.ship, command=command)}")
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
