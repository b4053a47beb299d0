"""Collect scripted-expert demonstrations into Minari datasets, one dataset per task.

    python scripts/collect.py --suite tabletop --episodes-per-task 50 --noise 0.0 0.1 0.3

Each task's dataset holds every noise level (the level, task and instruction are stored
per episode) and is written atomically: an interrupted run leaves no loadable dataset, and
running the same command again keeps the datasets already collected with these settings
(they are recorded in each dataset's metadata) and collects the rest. A dataset collected
with other settings is an error unless --overwrite.
Datasets land under --root (default outputs/datasets, or $MINARI_DATASETS_PATH); point
MINARI_DATASETS_PATH at that root and ``minari.load_dataset(id)`` reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.collection import CollectionJob, run_collection  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=["tabletop"], help="suite names or env ids (tabletop, mt10, ...)")
    p.add_argument("--episodes-per-task", type=int, default=50, help="episodes per task and noise level")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0], help="Gaussian action noise levels (std)")
    p.add_argument("--random-action-prob", type=float, default=0.0, help="chance of a uniformly random action")
    p.add_argument("--no-pixels", action="store_true", help="state-only observations (no cameras)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--instruction-split", default="train", choices=["train", "heldout"])
    p.add_argument("--dataset-name", default="demos", help="dataset ids are <family>/<task>/<name>-v0")
    p.add_argument("--root", default=None, help="dataset root (default $MINARI_DATASETS_PATH or outputs/datasets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--jpeg", action="store_true", help="JPEG-encode images (lossy, ~10x smaller)")
    p.add_argument("--overwrite", action="store_true", help="collect every dataset again, replacing any already there")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = CollectionJob(
        env_ids=args.suite,
        episodes_per_task=args.episodes_per_task,
        noise_levels=tuple(args.noise),
        random_action_prob=args.random_action_prob,
        pixels=not args.no_pixels,
        image_size=args.image_size,
        instruction_split=args.instruction_split,
        dataset_name=args.dataset_name,
        root=args.root,
        seed=args.seed,
        workers=args.workers,
        jpeg=args.jpeg,
        overwrite=args.overwrite,
    )
    summary = run_collection(job)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
