#!/usr/bin/env python
"""Run a trained policy on a tabletop task in real time, at a fixed control rate.

    python scripts/control.py --checkpoint outputs/demo/checkpoints/adamoe --task PickRed
    python scripts/control.py --checkpoint outputs/demo/checkpoints/dense --task PickRed --mode sync --video

The simulated robot advances with the wall clock whether or not the policy has answered.
Prints success and the timing summary (tick jitter, deadline misses, starved ticks,
inference latency, action age) and writes ``summary.json``, ``telemetry.npz``,
``timeline.png`` (and ``video.mp4`` with ``--video``) to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies import from_pretrained  # noqa: E402
from policies.control import MERGE_RULES, MODES, ControlConfig, format_summary  # noqa: E402
from policies.control.runner import run_policy  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a policy checkpoint directory (dense or AdaMoE VLA)")
    p.add_argument("--task", default="PickRed", help="tabletop task name or a full env id")
    p.add_argument("--rate", type=float, default=50.0, help="control rate in Hz")
    p.add_argument("--mode", default="async", choices=MODES)
    p.add_argument("--merge", default="latest", choices=MERGE_RULES)
    p.add_argument("--threshold", type=int, default=None, help="async: infer when this many actions are left")
    p.add_argument("--max-delta", type=float, default=None, help="largest change of an action entry per tick")
    p.add_argument("--seconds", type=float, default=None, help="run length (default: until the episode ends)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", action="store_true")
    p.add_argument("--output-dir", default="outputs/control")
    args = p.parse_args(argv)
    policy = from_pretrained(args.checkpoint)
    if not hasattr(policy, "predict_action_chunk"):
        raise ValueError(f"{args.checkpoint} holds a {policy.policy_type!r} policy without predict_action_chunk")
    ticks = int(args.seconds * args.rate) if args.seconds else 10**6
    config = ControlConfig(
        rate_hz=args.rate,
        mode=args.mode,
        merge=args.merge,
        threshold=args.threshold,
        max_delta=args.max_delta,
        max_ticks=min(ticks, 10**6),
        stop_on_done=args.seconds is None,
        video=args.video,
    )
    if args.seconds is None:
        config.max_ticks = 20 * int(args.rate) * 60  # an episode ends well before 20 minutes
    result = run_policy(policy, args.task, config, seed=args.seed, endless=args.seconds is not None)
    out = result.save(args.output_dir, config)
    print(format_summary(result.summary))
    print(f"-> {out}/summary.json, {out}/timeline.png" + (f", {out}/video.mp4" if result.frames else ""))
    return result.summary


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
