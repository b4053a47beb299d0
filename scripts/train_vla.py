"""Train the pi0-style VLA policy on demonstration datasets, then (optionally) evaluate it.

    python scripts/train_vla.py --root outputs/demo/datasets --preset small --max-minutes 10 --eval-episodes 20

Datasets: ``--datasets`` ids or paths, or by default the ``--dataset-name`` datasets of
every task in ``--suite`` under ``--root`` (``scripts/collect.py`` writes them). Writes
under ``--output-dir``: metrics.jsonl, loss.png, checkpoints/last/{pretrained_model,
training_state}/ and, with ``--eval-episodes``, eval/eval_info.json and videos. Re-running
with the same output directory resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import envs  # noqa: E402,F401  (GL backend first)
from envs.collection import dataset_id_for  # noqa: E402
from envs.registration import resolve_env_ids  # noqa: E402
from policies import (  # noqa: E402
    VLAPolicy,
    from_pretrained,  # noqa: E402
    vla_config,
)
from policies.data import ChunkDataset  # noqa: E402
from policies.evaluation import EvalConfig, evaluate  # noqa: E402
from policies.training import TrainConfig, resolve_device, train  # noqa: E402
from policies.vla import parse_overrides  # noqa: E402
from policies.vla.perception import encode_frames  # noqa: E402
from policies.vla.recipe import ENCODER_STATE, BalancedSampler  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=None, help="Minari dataset ids or paths")
    p.add_argument("--suite", nargs="+", default=["tabletop"], help="tasks whose datasets to train on")
    p.add_argument("--dataset-name", default="demos")
    p.add_argument("--root", default=None, help="dataset root (default $MINARI_DATASETS_PATH or outputs/datasets)")
    p.add_argument("--preset", default="small", help="VLA preset: tiny, small, base")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="VLAConfig overrides")
    p.add_argument(
        "--scene-aux",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="train-time auxiliary loss: regress the datasets' environment_state from the image tokens",
    )
    p.add_argument(
        "--encoder",
        default=None,
        metavar="CHECKPOINT",
        help="a checkpoint whose trained scene encoder to start from (vision='scene', the default: "
        "e.g. outputs/pretrain/perception/checkpoint from `make pretrain`); the policy trains on its "
        "cached outputs",
    )
    p.add_argument("--balance", default="task", choices=["task", "none"], help="balance batches over tasks")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the weights (e.g. 0.999)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop and save after this much training time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", default="outputs/train_vla")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--eval-episodes", type=int, default=0, help="episodes per task to evaluate after training")
    p.add_argument("--eval-split", default="train", choices=["train", "heldout", "both"])
    p.add_argument("--videos", type=int, default=1, help="videos per task in evaluation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolve_device(args.device)  # an unusable device is an error before any work starts
    config = vla_config(args.preset, **parse_overrides(args.set))
    env_ids = resolve_env_ids(args.suite)  # every flag is checked before the first error about combining them
    encoder = from_pretrained(args.encoder) if args.encoder else None
    if config.vision == "scene" and encoder is None:
        print(
            "error: vision='scene' trains on a trained scene encoder: pass --encoder CHECKPOINT (`make pretrain` "
            "writes outputs/pretrain/perception/checkpoint), or --set vision=conv for the end-to-end conv stem",
            file=sys.stderr,
        )
        return 2
    datasets = args.datasets or [dataset_id_for(env_id, args.dataset_name) for env_id in env_ids]
    data = ChunkDataset(datasets, config.chunk_size, config.cameras, root=args.root)
    if args.scene_aux > 0:
        if data.environment_state is None:
            raise ValueError("--scene-aux needs datasets whose observations hold environment_state")
        config.scene_aux_dim, config.scene_aux_weight = data.environment_state.shape[1], args.scene_aux
    print(f"{len(data):,} frames from {data.num_episodes} episodes in {len(datasets)} datasets")
    policy = VLAPolicy(config)
    if encoder is not None:  # its scene encoder and the statistics it was trained in
        ours = {k: v for k, v in policy.state_dict().items() if k.startswith(ENCODER_STATE)}
        theirs = {k: v for k, v in encoder.state_dict().items() if k.startswith(ENCODER_STATE)}
        mismatched = sorted(k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape)
        if config.vision != "scene" or getattr(encoder.config, "vision", None) != "scene" or mismatched:
            print(
                f"error: --encoder {args.encoder} must hold a scene encoder of this config's shape "
                f"(vision='scene', scene_* fields as the preset's); mismatched: {mismatched[:3]}",
                file=sys.stderr,
            )
            return 2
        policy.load_state_dict(theirs, strict=False)
    policy.set_normalization(data.stats(), scene=encoder is None)
    if encoder is not None and config.freeze_vision:
        data.attach_frame_features(encode_frames(policy, data.get, len(data)))
    print(f"VLA preset {args.preset!r}: {policy.num_parameters():,} parameters")
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema,
        seed=args.seed,
        max_minutes=args.max_minutes,
        device=args.device,
    )
    sampler = BalancedSampler(data, None if args.balance == "none" else args.balance)
    summary = train(policy, sampler, train_config, args.output_dir, resume=not args.no_resume)
    print(json.dumps(summary, indent=2))
    if args.eval_episodes > 0:
        splits = ["train", "heldout"] if args.eval_split == "both" else [args.eval_split]
        for split in splits:
            out = Path(args.output_dir) / ("eval" if split == "train" else f"eval_{split}")
            result = evaluate(
                policy,
                list(env_ids),
                EvalConfig(episodes_per_task=args.eval_episodes, instruction_split=split, videos_per_task=args.videos),
                out,
            )
            print(f"\n{split} instructions: mean success {100 * result['aggregated']['success_rate']:.1f}%")
            for task, row in result["per_task"].items():
                print(f"  {task:24s} {100 * row['success_rate']:5.1f}%  ({row['episodes']} episodes)")
            print(f"wrote {out / 'eval_info.json'}")
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
