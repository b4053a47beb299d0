#!/usr/bin/env python
"""Merge Decision Transformer specialists into one multi-task checkpoint.

    python scripts/merge.py --checkpoints outputs/dt_merge/seed0/specialists/* \\
        --method fisher --root outputs/dt_merge/datasets --output outputs/merged/fisher

Each checkpoint directory is a specialist fine-tuned from one common initialisation (its
config's ``role`` names its task; ``--tasks`` names them otherwise). ``--method``:
``average``, ``fisher`` (Fisher files from ``--fishers``, else ``fisher.safetensors``
beside each checkpoint, computed on the task's dataset and saved there when absent),
``task_arithmetic`` / ``ties`` (need ``--base``, the common initialisation), or ``moe``
(the specialists' MLPs as AdaMoE experts; the routers are fitted for ``--router-steps``
on the tasks' datasets). ``--plan``: ``body`` (default: the transformer blocks, timestep
embedding and embedding norm are merged, each task's embeddings and heads kept),
``all-shared``, or ``"merge=REGEX,REGEX;keep=REGEX"``. The output directory loads with
``policies.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies import DecisionTransformer, from_pretrained  # noqa: E402
from policies.dt.data import load_offline  # noqa: E402
from policies.dt.merging import MERGE_METHODS, merge_into_moe, merge_specialists, plan_from  # noqa: E402
from policies.dt.recipe import FISHER_NAME, fisher_for, specialist_task  # noqa: E402
from policies.dt.training import DTTrainConfig, train_dt  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, help="specialist checkpoint directories")
    p.add_argument("--tasks", nargs="+", default=None, help="the task of each checkpoint (default: from its config)")
    p.add_argument("--method", required=True, choices=MERGE_METHODS)
    p.add_argument("--output", required=True, help="merged checkpoint directory (new, empty, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint already at --output")
    p.add_argument("--base", default=None, help="the common initialisation (task_arithmetic, ties)")
    p.add_argument("--plan", default="body")
    p.add_argument("--fishers", nargs="+", default=None, help="Fisher files, one per checkpoint")
    p.add_argument("--root", default=None, help="dataset root for the tasks' datasets (Fishers, router fitting)")
    p.add_argument("--fisher-samples", type=int, default=512)
    p.add_argument("--fisher-kind", default="exact", choices=["exact", "empirical"])
    p.add_argument("--normalization", default="none", choices=["none", "trace", "l2"])
    p.add_argument("--floor", type=float, default=1e-8)
    p.add_argument("--scale", type=float, default=None, help="task arithmetic / TIES scale (default 1/n, 1)")
    p.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    p.add_argument("--router-steps", type=int, default=100)
    p.add_argument("--router-lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    dirs = [Path(c) for c in args.checkpoints]
    if args.tasks is not None and len(args.tasks) != len(dirs):
        raise ValueError(f"--tasks names {len(args.tasks)} tasks for {len(dirs)} checkpoints")
    if args.fishers is not None and len(args.fishers) != len(dirs):
        raise ValueError(f"--fishers gives {len(args.fishers)} files for {len(dirs)} checkpoints")
    tasks = args.tasks or [specialist_task(d) for d in dirs]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"two checkpoints are specialists of the same task: {tasks}")
    specialists: dict[str, DecisionTransformer] = {}
    for task, directory in zip(tasks, dirs, strict=True):
        model = from_pretrained(directory)
        if not isinstance(model, DecisionTransformer):
            raise ValueError(f"{directory} holds a {model.policy_type!r} policy, not a Decision Transformer")
        specialists[task] = model

    def data(task: str):
        name = specialists[task].config.task(task).dataset
        return load_offline(name, args.root) if name else None

    t0 = time.perf_counter()
    norm = None if args.normalization == "none" else args.normalization
    fishers = None
    if args.method == "fisher" or (args.method == "moe" and args.fishers):
        fishers = {}
        for i, (task, directory) in enumerate(zip(tasks, dirs, strict=True)):
            path = Path(args.fishers[i]) if args.fishers else directory / FISHER_NAME
            fishers[task] = fisher_for(
                directory,
                specialists[task],
                task,
                None if path.is_file() else data(task),
                args.fisher_samples,
                args.fisher_kind,
                args.seed,
                path,
            )
    base = from_pretrained(args.base) if args.base else None
    if args.method == "moe":
        merged = merge_into_moe(specialists, generator=torch.Generator().manual_seed(args.seed))
        if args.router_steps > 0:
            train_dt(
                merged,
                {t: data(t) for t in tasks},
                DTTrainConfig(
                    steps=args.router_steps,
                    batch_size=args.batch_size,
                    lr=args.router_lr,
                    warmup_steps=min(10, args.router_steps),
                    trainable="router",
                    seed=args.seed,
                ),
            )
    else:
        options = {"plan": plan_from(args.plan), "fishers": fishers, "base": base}
        if args.method == "fisher":
            options.update(normalization=norm, floor=args.floor)
        if args.method in ("task_arithmetic", "ties"):
            default = 1.0 / len(tasks) if args.method == "task_arithmetic" else 1.0
            options.update(scale=args.scale if args.scale is not None else default)
        if args.method == "ties":
            options.update(density=args.density)
        merged = merge_specialists(specialists, args.method, **options)
    out = merged.save_pretrained(
        args.output,
        overwrite=args.overwrite,
        extra_files={
            "merge.json": json.dumps(
                {"method": args.method, "plan": args.plan, "checkpoints": [str(d) for d in dirs], "tasks": tasks},
                indent=2,
            )
        },
    )
    print(f"merged {len(tasks)} specialists ({', '.join(tasks)}) by {args.method} in {time.perf_counter() - t0:.1f} s")
    print(f"-> {out}")
    return out


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
