"""Evaluate a VLA checkpoint on a suite, both phrasing splits, and print success per task
with 95% intervals (the table of a shipped checkpoint's card).

    python scripts/evaluate_vla.py --checkpoint checkpoints/vla-tabletop-base --episodes 50

Writes <output-dir>/{train,heldout}/eval_info.json and <output-dir>/results.md. Seeds come
from policies.evaluation.EvalConfig (never a demonstration's), so a rerun reproduces the
table exactly on the same machine and software.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import envs  # noqa: E402,F401  (GL backend first, registers the envs)
from policies import from_pretrained  # noqa: E402
from policies.evaluation import EvalConfig, evaluate  # noqa: E402
from policies.io import write_text  # noqa: E402
from policies.training import resolve_device  # noqa: E402
from policies.vla.recipe_report import SPLITS, success_markdown, success_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a from_pretrained directory")
    p.add_argument("--suite", nargs="+", default=["tabletop"], help="suite names or env ids")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task and phrasing split")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--videos", type=int, default=0, help="videos per task")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler's noise (the recipe evaluates with 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", default="outputs/evaluate_vla")
    args = p.parse_args(argv)
    policy = from_pretrained(args.checkpoint, device=resolve_device(args.device))
    results = {}
    for split in args.splits:
        config = EvalConfig(episodes_per_task=args.episodes, instruction_split=split, videos_per_task=args.videos)
        torch.manual_seed(args.seed)
        results[split] = evaluate(policy, args.suite, config, Path(args.output_dir) / split)
    text = success_markdown(success_table(results))
    out = write_text(Path(args.output_dir) / "results.md", text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
