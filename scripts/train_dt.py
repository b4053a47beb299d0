#!/usr/bin/env python
"""Train a (multi-task) Decision Transformer on Minari datasets, or fine-tune a specialist.

    # a common initialisation on two tasks (ids under --root, or paths, or Minari's own root)
    python scripts/train_dt.py --dataset pick-red=tabletop/pick-red/dt-state-v0 \\
        --dataset reach-red=tabletop/reach-red/dt-state-v0 --steps 2000 --output-dir outputs/dt/common
    # the public locomotion datasets, if you have them
    python scripts/train_dt.py --dataset hopper=mujoco/hopper/medium-v0 --output-dir outputs/dt/hopper
    # a specialist of one task, fine-tuned from the common initialisation
    python scripts/train_dt.py --init outputs/dt/common --task pick-red \\
        --dataset pick-red=tabletop/pick-red/dt-state-v0 --output-dir outputs/dt/pick-red

Defaults are the DT paper's (AdamW 1e-4, weight decay 1e-4, warm-up, clip 0.25, batch 64,
context 20, 3 layers, 128 wide, 1 head, dropout 0.1). Writes a ``from_pretrained``
directory (with ``train.json``) and ``<output-dir>-logs/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies import DecisionTransformer, from_pretrained  # noqa: E402
from policies.dt.recipe import build_model, load_task_data, parse_datasets  # noqa: E402
from policies.dt.training import DTTrainConfig, specialist_from, train_dt  # noqa: E402
from policies.pretrained import check_destination  # noqa: E402
from policies.training import resolve_device  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", action="append", required=True, help="TASK=MINARI_ID_OR_PATH (repeat per task)")
    p.add_argument("--root", default=None, help="dataset root (default $MINARI_DATASETS_PATH or outputs/datasets)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint already at --output-dir")
    p.add_argument("--init", default=None, help="checkpoint to fine-tune from (a common initialisation)")
    p.add_argument("--task", default=None, help="with --init: the task whose specialist this is")
    defaults = DTTrainConfig()
    for name in ("steps", "batch_size", "warmup_steps", "seed", "log_every"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "grad_clip"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.add_argument("--device", default="cpu")
    p.add_argument("--context-length", type=int, default=20)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=1)
    p.add_argument("--target-quantile", type=float, default=0.9, help="evaluation target: this quantile of returns")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    resolve_device(args.device)  # an unusable device is an error before any work starts
    check_destination(args.output_dir, args.overwrite)  # and so is an output it may not replace
    data = load_task_data(parse_datasets(args.dataset), args.root)
    for task, d in data.items():
        print(f"{task}: {json.dumps(d.summary())}")
    if args.init:
        if args.task is None or args.task not in data:
            raise ValueError(f"--init needs --task naming one of the datasets' tasks {sorted(data)}")
        common = from_pretrained(args.init)
        if not isinstance(common, DecisionTransformer):
            raise ValueError(f"{args.init} holds a {common.policy_type!r} policy, not a Decision Transformer")
        model, tasks = specialist_from(common, args.task), [args.task]
    else:
        model = build_model(
            data,
            args.target_quantile,
            context_length=args.context_length,
            hidden_size=args.hidden_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
        )
        model.config.role = "common" if len(data) > 1 else f"single:{next(iter(data))}"
        tasks = list(data)
    config = DTTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        seed=args.seed,
        log_every=args.log_every,
        device=args.device,
        tasks=tasks,
    )
    out = Path(args.output_dir)
    start = time.perf_counter()
    history = train_dt(model, data, config, out.parent / f"{out.name}-logs")
    info = {
        "train": asdict(config),
        "datasets": {t: d.summary() for t, d in data.items()},
        "seconds": time.perf_counter() - start,
        "final": history[-1],
    }
    model.save_pretrained(out, extra_files={"train.json": json.dumps(info, indent=2)}, overwrite=args.overwrite)
    print(f"trained {config.steps} steps in {info['seconds']:.0f} s -> {out}")
    return out


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
