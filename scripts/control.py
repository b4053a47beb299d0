#!/usr/bin/env python
"""Run a trained policy in real time, at a fixed control rate: one task, or a whole suite
with its success next to offline success on the same scenes.

    python scripts/control.py --checkpoint outputs/demo/checkpoints/adamoe --task PickRed
    python scripts/control.py --checkpoint outputs/demo/checkpoints/dense --task PickRed --mode sync --video
    python scripts/control.py --checkpoint outputs/demo/checkpoints/dense outputs/demo/checkpoints/adamoe \
        --suite tabletop-long --episodes 10

The simulated robot advances with the wall clock whether or not the policy has answered.
One task: prints success and the timing summary (tick jitter, deadline misses, starved
ticks, inference latency, action age) and writes ``summary.json``, ``telemetry.npz``,
``timeline.png`` (and ``video.mp4`` with ``--video``) to ``--output-dir``.

A suite (``--suite``): every checkpoint runs ``--episodes`` per task in real time on the
scenes offline evaluation uses, and offline on the same scenes; writes ``results.md`` and
``results.json`` (per checkpoint: success both ways with 95% intervals, their paired
difference, deadline misses, p99 jitter, starved ticks, inference latency) and each
checkpoint's ``<name>/realtime.json`` and ``<name>/offline/eval_info.json``.

``--noise-scale`` and ``--inference-steps`` set a VLA checkpoint's sampler (its starting
noise, 0 for deterministic chunks, and its flow steps per chunk) for both runs, and
``--moe-backend`` its MoE layers' dispatch.
``--inference process`` serves the policy from a process of its own (``policies.control.server``),
so inference never holds the loop's interpreter.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adamoe.dispatch import BACKENDS  # noqa: E402
from adamoe.moe_model import moe_layers  # noqa: E402
from envs.registration import resolve_env_ids  # noqa: E402
from policies import from_pretrained  # noqa: E402
from policies.control import MERGE_RULES, MODES, ControlConfig, format_summary  # noqa: E402
from policies.control.report import compare, realtime_markdown  # noqa: E402
from policies.control.runner import INFERENCE, run_episodes, run_policy  # noqa: E402
from policies.evaluation import EvalConfig, evaluate  # noqa: E402
from policies.io import log, write_json, write_text  # noqa: E402
from policies.vla.report import machine  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint", required=True, nargs="+", help="a policy checkpoint directory (with --suite: one or more)"
    )
    p.add_argument("--task", default="PickRed", help="tabletop task name or a full env id")
    p.add_argument("--suite", nargs="+", default=None, help="run a suite (names or env ids) instead of one task")
    p.add_argument("--episodes", type=int, default=10, help="--suite: episodes per task")
    p.add_argument("--split", default="train", choices=("train", "heldout"), help="--suite: instruction phrasings")
    p.add_argument(
        "--simulate-latency",
        type=float,
        default=None,
        metavar="TICKS",
        help="--suite: run on virtual time, each inference taking TICKS control periods",
    )
    p.add_argument("--rate", type=float, default=50.0, help="control rate in Hz")
    p.add_argument("--mode", default="async", choices=MODES)
    p.add_argument("--merge", default="latest", choices=MERGE_RULES)
    p.add_argument("--threshold", type=int, default=None, help="async: infer when this many actions are left")
    p.add_argument("--max-delta", type=float, default=None, help="largest change of an action entry per tick")
    p.add_argument(
        "--inpaint", action="store_true", help="async: real-time chunking (each chunk continues the planned actions)"
    )
    p.add_argument(
        "--noise-scale",
        type=float,
        default=None,
        help="the VLA's sampling noise (its inference_noise_scale; 0: deterministic chunks; default: the checkpoint's)",
    )
    p.add_argument(
        "--inference-steps", type=int, default=None, help="the VLA's flow steps per chunk (default: the checkpoint's)"
    )
    p.add_argument(
        "--moe-backend",
        default=None,
        choices=("auto", *BACKENDS),
        help="the MoE layers' dispatch backend (default: the checkpoint's; dense policies are unaffected)",
    )
    p.add_argument(
        "--inference",
        default="thread",
        choices=INFERENCE,
        help="async: run the policy in a thread of this process, or in a process of its own",
    )
    p.add_argument("--seconds", type=float, default=None, help="run length (default: until the episode ends)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", action="store_true")
    p.add_argument("--output-dir", default="outputs/control")
    args = p.parse_args(argv)
    if args.suite is not None:
        return run_suite(args)
    if len(args.checkpoint) > 1:
        raise ValueError(f"one task runs one checkpoint; got {len(args.checkpoint)} (several need --suite)")
    policy = load_policy(args.checkpoint[0], args)
    ticks = int(args.seconds * args.rate) if args.seconds else 10**6
    config = loop_config(args, max_ticks=min(ticks, 10**6), stop_on_done=args.seconds is None, video=args.video)
    if args.seconds is None:
        config.max_ticks = 20 * int(args.rate) * 60  # an episode ends well before 20 minutes
    result = run_policy(
        policy, args.task, config, seed=args.seed, endless=args.seconds is not None, inference=args.inference
    )
    out = result.save(args.output_dir, config)
    print(format_summary(result.summary))
    print(f"-> {out}/summary.json, {out}/timeline.png" + (f", {out}/video.mp4" if result.frames else ""))
    return result.summary


def load_policy(checkpoint: str, args: argparse.Namespace) -> Any:
    """A chunking policy from ``checkpoint``, with the command line's sampling settings on
    top (offline and real time then run the same sampler)."""
    policy = from_pretrained(checkpoint)
    if not hasattr(policy, "predict_action_chunk"):
        raise ValueError(f"{checkpoint} holds a {policy.policy_type!r} policy without predict_action_chunk")
    settings = {"inference_noise_scale": args.noise_scale, "num_inference_steps": args.inference_steps}
    settings = {k: v for k, v in settings.items() if v is not None}
    if settings:
        if not all(hasattr(policy.config, k) for k in settings):
            flags = "--noise-scale and --inference-steps"
            raise ValueError(f"{flags} set a VLA's sampler; {checkpoint} holds a {policy.policy_type!r} policy")
        replace(policy.config, **settings).validate()  # names the bad value and the valid range
        for key, value in settings.items():
            setattr(policy.config, key, value)
    if args.moe_backend is not None and getattr(policy.config, "moe", None) is not None:
        policy.config.moe["config"]["backend"] = args.moe_backend  # what a served copy loads
        for layer in moe_layers(policy).values():
            layer.config.backend = args.moe_backend
    return policy


def loop_config(args: argparse.Namespace, **extra) -> ControlConfig:
    """The loop settings the command line gives, with ``extra`` on top."""
    return ControlConfig(
        rate_hz=args.rate,
        mode=args.mode,
        merge=args.merge,
        threshold=args.threshold,
        max_delta=args.max_delta,
        inpaint=args.inpaint,
        **extra,
    )


def run_suite(args: argparse.Namespace) -> dict:
    """Every checkpoint on the suite in real time and offline, on the same scenes."""
    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    if args.simulate_latency is not None and not 0 <= args.simulate_latency <= 100:
        raise ValueError(f"--simulate-latency must be in [0, 100] ticks, got {args.simulate_latency}")
    tasks = list(resolve_env_ids(args.suite))
    names = [Path(c).name for c in args.checkpoint]
    if len(set(names)) != len(names):
        raise ValueError(f"the checkpoints' directory names must differ (their results are named so): {names}")
    policies = {name: load_policy(checkpoint, args) for name, checkpoint in zip(names, args.checkpoint, strict=True)}
    out = Path(args.output_dir)
    results = {}
    for name, policy in policies.items():
        config = loop_config(args)
        log(f"{name}: {args.episodes} episodes per task offline, then in real time at {args.rate:g} Hz ({args.mode})")
        torch.manual_seed(args.seed)
        eval_config = EvalConfig(episodes_per_task=args.episodes, instruction_split=args.split, videos_per_task=0)
        offline = evaluate(policy, tasks, eval_config, out / name / "offline")
        torch.manual_seed(args.seed)
        latency = None if args.simulate_latency is None else args.simulate_latency / args.rate
        realtime = run_episodes(
            policy,
            tasks,
            args.episodes,
            config,
            instruction_split=args.split,
            simulated_latency_s=latency,
            inference=args.inference,
        )
        write_json(out / name / "realtime.json", realtime)
        results[name] = compare(offline, realtime)
        results[name]["config"] = realtime["config"]
        results[name]["sampling"] = {
            k: getattr(policy.config, k, None) for k in ("inference_noise_scale", "num_inference_steps")
        }
        moe = getattr(policy.config, "moe", None)
        results[name]["sampling"]["moe_backend"] = None if moe is None else moe["config"].get("backend", "auto")
        results[name]["checkpoint"] = str(args.checkpoint[names.index(name)])
    summary = {"tasks": tasks, "episodes_per_task": args.episodes, "split": args.split, "policies": results}
    summary["simulated_latency_ticks"] = args.simulate_latency
    summary["machine"] = machine()
    write_json(out / "results.json", summary)
    table = realtime_markdown(results, args.rate, args.mode, args.simulate_latency)
    write_text(out / "results.md", table + "\n")
    print(table)
    print(f"-> {out}/results.md, {out}/results.json")
    return summary


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
