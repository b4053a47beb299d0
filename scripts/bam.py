#!/usr/bin/env python
"""BAM on the VLA from several specialists: branch, train, mix, fine-tune, evaluate.

    python scripts/bam.py                          # 4 specialists of 200 steps, mixed, 200 more steps
    python scripts/bam.py --share-kv --eval-episodes 10
    python scripts/bam.py --groups reach=ReachRed,ReachBlue pick=PickRed,PickGreen,PickBlue

Branch: copies of one pretrained dense VLA (the shipped ``checkpoints/vla-tabletop-base``
unless ``--pretrained``) are fine-tuned, each on one group of tasks (default: reach and push, pick,
place, stack), into specialists. Mix (``policies.vla.mix_specialists``): specialist
``e``'s action-expert FFNs become routed expert ``e`` (top-2, as Branch-Train-MiX) and
its attention becomes soft attention expert ``e``, everything else the specialists'
average. The mixture is then fine-tuned on every task. For a fair reading the dense
policy is fine-tuned on every task for the same total steps (``dense_long``: the
specialists' steps plus the mixture's). Stages and outputs as ``policies.vla.pipeline``
(``<output-dir>/checkpoints``, ``eval``, ``results.md``); each stage records the settings
it was made with (``runs/<stage>/stage.json``) and is reused only when they are the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import adamoe  # noqa: E402
from envs.collection import dataset_id_for  # noqa: E402
from envs.datasets import dataset_path  # noqa: E402
from envs.ids import tabletop_id  # noqa: E402
from envs.tasks import get_task  # noqa: E402
from policies import from_pretrained  # noqa: E402
from policies.data import ChunkDataset  # noqa: E402
from policies.io import log  # noqa: E402
from policies.pretrained import weights_sha256  # noqa: E402
from policies.training import TrainConfig  # noqa: E402
from policies.vla import VLAPolicy, mix_specialists, pipeline  # noqa: E402
from policies.vla.report import to_markdown  # noqa: E402

DEFAULT_GROUPS = {
    "reach-push": ["ReachRed", "ReachBlue", "PushRedToYellowPad", "PushGreenToPurplePad"],
    "pick": ["PickRed", "PickGreen", "PickBlue"],
    "place": ["PlaceBlueOnYellowPad", "PlaceRedOnPurplePad", "PlaceGreenOnYellowPad"],
    "stack": ["StackRedOnGreen", "StackBlueOnRed"],
}
PRETRAINED = [pipeline.SHIPPED_BASE]
DATASETS = [Path("outputs/families/datasets"), Path("outputs/pretrain/datasets")]  # the base suite's demos


def parse_groups(pairs: list[str] | None) -> dict[str, list[str]]:
    """``["pick=PickRed,PickBlue", ...]`` -> ``{"pick": ["PickRed", "PickBlue"], ...}``."""
    if not pairs:
        return DEFAULT_GROUPS
    groups = {}
    for pair in pairs:
        name, sep, tasks = pair.partition("=")
        if not sep or not name or not tasks:
            raise ValueError(f"--groups expects NAME=Task,Task,..., got {pair!r}")
        if name in groups:
            raise ValueError(f"--groups names {name!r} twice; give each specialist its own name")
        groups[name] = [get_task(t).name for t in tasks.split(",")]  # unknown tasks fail here, named
    if len(groups) < 2:
        raise ValueError(f"BAM mixes at least 2 specialists; --groups gave {len(groups)}")
    return groups


def group_data(cfg: pipeline.PipelineConfig, tasks: list[str], like: ChunkDataset) -> ChunkDataset:
    ids = [dataset_id_for(tabletop_id(t)) for t in tasks]
    return ChunkDataset(ids, like.chunk_size, like.cameras, root=cfg.root, progress=False)


def train_config(cfg: pipeline.PipelineConfig, steps: int) -> TrainConfig:
    """The families' fine-tuning recipe (lr, warm-up, the same batch seed) for ``steps``."""
    return TrainConfig(
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.finetune_lr,
        warmup_steps=min(50, steps // 10),
        seed=cfg.seed + 1,
        progress=cfg.progress,
    )


def run(args: argparse.Namespace) -> int:
    groups = parse_groups(args.groups)
    pretrained = Path(args.pretrained) if args.pretrained else next((p for p in PRETRAINED if p.is_dir()), None)
    tasks = [t for group in groups.values() for t in group]
    env_ids = [tabletop_id(t) for t in tasks]
    holds_all = lambda root: all(dataset_path(dataset_id_for(e), root).exists() for e in env_ids)
    root = Path(args.datasets_root) if args.datasets_root else next((p for p in DATASETS if holds_all(p)), None)
    if pretrained is None or root is None:
        raise SystemExit(
            "no pretrained dense VLA or datasets of the groups' tasks found: run `make families` or `make pretrain` "
            "first (their datasets hold the base suite), or pass both flags"
        )
    specialists = [f"specialist_{name}" for name in groups]
    cfg = replace(
        pipeline.PipelineConfig(),
        output_dir=args.output_dir or "outputs/bam",
        suite=env_ids,
        datasets_root=str(root),
        pretrained=str(pretrained),
        eval_episodes=args.eval_episodes,
        variants=["dense_long", *specialists, "bam_mixed"],
        eval_pretrained=False,
        retention_episodes=0,
        reference_episodes=0,
        curve_points=1,
        seed=args.seed,
    )
    if args.quick:
        quick = {k: pipeline.QUICK[k] for k in ("batch_size", "videos", "latency_calls")}
        cfg = replace(cfg, output_dir=args.output_dir or "outputs/bam_quick", progress=False, **quick)
    began = time.perf_counter()
    data = pipeline.load_data(cfg, env_ids)
    out = Path(cfg.output_dir) / "checkpoints"
    base = weights_sha256(pretrained)
    data_settings = {
        "root": str(Path(root).resolve()),
        "datasets": pipeline.datasets_record(root, env_ids),  # re-collected in place: a change too
        "chunk_size": data.chunk_size,
        "cameras": list(data.cameras),
    }

    def settings(stage_tasks: list[str], steps: int, **extra) -> dict:
        """What a BAM stage depends on (a change reruns it, and every stage after it)."""
        train = {"steps": steps, "batch_size": cfg.batch_size, "lr": cfg.finetune_lr, "seed": cfg.seed}
        return {"tasks": sorted(stage_tasks), "base": base, "data": data_settings, "train": train, **extra}

    total = args.specialist_steps * len(groups) + args.finetune_steps
    log(f"dense_long: the dense policy fine-tuned {total} steps on every task")
    pipeline.train_stage(
        cfg,
        "dense_long",
        settings(tasks, total),
        lambda: from_pretrained(pretrained),
        data,
        train_config(cfg, total),
    )
    for (name, group), variant in zip(groups.items(), specialists, strict=True):
        log(f"branch {name}: {args.specialist_steps} steps on {group}")
        pipeline.train_stage(
            cfg,
            variant,
            settings(group, args.specialist_steps),
            lambda: from_pretrained(pretrained),
            group_data(cfg, group, data),
            train_config(cfg, args.specialist_steps),
        )
    experts = len(groups)

    def mixed() -> VLAPolicy:
        return mix_specialists(
            [from_pretrained(out / v) for v in specialists],
            attention_config=adamoe.MoAConfig(num_experts=experts, share_kv=args.share_kv),
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    log(f"mix: {experts} specialists, fine-tuned {args.finetune_steps} steps on every task")
    specialist_weights = {v: weights_sha256(out / v) for v in specialists}
    pipeline.train_stage(
        cfg,
        "bam_mixed",
        settings(tasks, args.finetune_steps, specialists=specialist_weights, share_kv=args.share_kv),
        mixed,
        data,
        train_config(cfg, args.finetune_steps),
    )
    pipeline.evaluate_all(cfg, env_ids)
    results = pipeline.report(cfg, data, env_ids, began)
    print()
    print(to_markdown(results))
    print(f"\nwrote {Path(cfg.output_dir) / 'results.md'}; took {(time.perf_counter() - began) / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=None, help="default outputs/bam (outputs/bam_quick)")
    p.add_argument("--quick", action="store_true", help="small batches, few steps, 1 episode: the plumbing")
    p.add_argument("--pretrained", default=None, help="the dense VLA to branch (default: the families' or demo's)")
    p.add_argument("--datasets-root", default=None, help="the demonstrations (default: the families' or demo's)")
    p.add_argument("--groups", nargs="+", default=None, metavar="NAME=Task,Task", help="one specialist per group")
    p.add_argument("--specialist-steps", type=int, default=None, help="per specialist (default 200; --quick 10)")
    p.add_argument("--finetune-steps", type=int, default=None, help="of the mixture (default 200; --quick 10)")
    p.add_argument("--share-kv", action="store_true", help="attention experts share keys and values")
    p.add_argument(
        "--eval-episodes", type=int, default=None, help="episodes per task and phrasing split (default 20; --quick 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = {"specialist_steps": 10, "finetune_steps": 10, "eval_episodes": pipeline.QUICK["eval_episodes"]}
    full = {"specialist_steps": 200, "finetune_steps": 200, "eval_episodes": 20}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return run(args)


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
