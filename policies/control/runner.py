"""Running a trained policy checkpoint on a MuJoCo task in real time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the env ids)
from envs.ids import is_tabletop, task_env_id, task_name
from envs.registration import resolve_env_ids
from policies.control.clock import RealClock, SimClock
from policies.control.config import ControlConfig
from policies.control.loop import ControlLoop, stop_on_interrupt
from policies.control.robot import MujocoRobot
from policies.control.server import PolicyProcess, chunk_fn
from policies.control.telemetry import ControlResult

# The tabletop's action: gripper displacement (dx, dy, dz) and the gripper command; a safe
# stop zeroes the displacement and keeps the gripper as it is.
TABLETOP_MOTION_DIMS = (0, 1, 2)
# Where chunk inference runs: "thread", a thread of the control process (the loop and the
# policy share its interpreter); "process", a child process of its own (policies.control.server).
INFERENCE = ("thread", "process")


def make_robot(
    policy: Any, task: str, clock: RealClock | SimClock, endless: bool = False, video: bool = False
) -> MujocoRobot:
    """The task's env with the policy's cameras, driven by ``clock``; ``endless`` removes the
    time limit and keeps going after success (for timing runs)."""
    (env_id,) = resolve_env_ids(task_env_id(task))
    kwargs: dict[str, Any] = {"cameras": tuple(policy.config.cameras), "image_size": policy.config.image_size}
    if video:
        kwargs.update(render_mode="rgb_array", render_size=256)
    if endless:
        kwargs.update(max_episode_steps=10**9)
        if is_tabletop(env_id):
            kwargs["terminate_on_success"] = False
    return MujocoRobot(gym.make(env_id, **kwargs), clock)


def run_policy(
    policy: Any,
    task: str,
    config: ControlConfig,
    seed: int = 0,
    clock: RealClock | SimClock | None = None,
    endless: bool = False,
    inference: str = "thread",
) -> ControlResult:
    _check_inference(inference)
    clock = clock or RealClock()
    robot = make_robot(policy, task, clock, endless=endless, video=config.video)
    if config.motion_dims is None and robot.action_space.shape == (4,):
        config.motion_dims = TABLETOP_MOTION_DIMS
    if config.n_action_steps is None and hasattr(policy.config, "n_action_steps"):
        config.n_action_steps = policy.config.n_action_steps
    policy.eval()
    try:
        with _chunks(policy, inference) as infer:
            loop = ControlLoop(robot, infer, config, clock)
            with stop_on_interrupt(loop):  # Ctrl-C: a safe stop, and the summary is still written
                return loop.run(seed=seed)
    finally:
        robot.close()


def _check_inference(inference: str) -> None:
    if inference not in INFERENCE:
        raise ValueError(f"inference={inference!r} is not one of {INFERENCE}")


@contextmanager
def _chunks(policy: Any, inference: str) -> Iterator[Callable[..., np.ndarray]]:
    """The loop's chunk function: ``policy`` in this process, or served from a process of
    its own (ended on leaving; its sampling seeded from torch's seed here)."""
    if inference == "thread":
        yield chunk_fn(policy)
        return
    with PolicyProcess(policy) as served:
        yield served


def run_episodes(
    policy: Any,
    tasks: str | list[str],
    episodes_per_task: int,
    config: ControlConfig,
    seed: int = 100_000,
    instruction_split: str = "train",
    progress: bool = True,
    clock: Callable[[], RealClock | SimClock] = RealClock,
    max_episode_steps: int | None = None,
    simulated_latency_s: float | None = None,
    inference: str = "thread",
) -> dict[str, Any]:
    """Real-time rollouts of ``policy`` on every task of ``tasks`` (suite names or env ids),
    on the scenes offline evaluation uses (``policies.evaluation``: seed ``seed + 1000 * task
    index + i``), so success here pairs with offline success episode by episode. Each episode
    runs until it ends (success or the env's time limit) on the wall clock (``clock``: a
    fresh one per episode; ``max_episode_steps`` overrides the envs' time limits).
    ``simulated_latency_s``: run on virtual time instead, every inference taking exactly
    that long (a deterministic study of what latency does to success). ``inference``:
    ``"process"`` serves the policy from a child process for all the episodes (``INFERENCE``).
    Returns the per-episode records and the timing over every tick of every episode
    (``aggregate``)."""
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if instruction_split not in ("train", "heldout"):
        raise ValueError(f"instruction_split={instruction_split!r} is not one of ('train', 'heldout')")
    _check_inference(inference)
    config.validate()
    if simulated_latency_s is not None:
        if not (isinstance(simulated_latency_s, (int, float)) and 0 <= simulated_latency_s < 10):
            raise ValueError(f"simulated_latency_s must be in [0, 10) seconds, got {simulated_latency_s!r}")
        clock = SimClock
    ids = resolve_env_ids(tasks)
    policy.eval()
    with _chunks(policy, inference) as chunks:
        return _run_episodes(
            policy, chunks, ids, episodes_per_task, config, seed, instruction_split, progress, clock,
            max_episode_steps, simulated_latency_s, inference,
        )  # fmt: skip


def _run_episodes(
    policy: Any,
    chunks: Callable[..., np.ndarray],
    ids: list[str],
    episodes_per_task: int,
    config: ControlConfig,
    seed: int,
    instruction_split: str,
    progress: bool,
    clock: Callable[[], RealClock | SimClock],
    max_episode_steps: int | None,
    simulated_latency_s: float | None,
    inference: str,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    episodes, jitter, latency = [], [], []
    bar = tqdm(total=len(ids) * episodes_per_task, desc="real time", unit="ep", disable=not progress)
    for task_index, env_id in enumerate(ids):
        kwargs: dict[str, Any] = {"cameras": tuple(policy.config.cameras), "image_size": policy.config.image_size}
        if is_tabletop(env_id):
            kwargs["instruction_split"] = instruction_split
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = max_episode_steps
        for i in range(episodes_per_task):
            episode_clock = clock()
            robot = MujocoRobot(gym.make(env_id, **kwargs), episode_clock)
            episode_config = replace(config, max_ticks=max(config.max_ticks, 2 * _time_limit(robot.env)))
            if episode_config.motion_dims is None and robot.action_space.shape == (4,):
                episode_config.motion_dims = TABLETOP_MOTION_DIMS
            if episode_config.n_action_steps is None and hasattr(policy.config, "n_action_steps"):
                episode_config.n_action_steps = policy.config.n_action_steps  # sync: as offline evaluation
            episode_seed = seed + 1000 * task_index + i
            try:
                infer = chunks
                if simulated_latency_s is not None:
                    infer = _taking(infer, episode_clock, simulated_latency_s)
                loop = ControlLoop(robot, infer, episode_config, episode_clock)
                with stop_on_interrupt(loop):
                    result = loop.run(seed=episode_seed)
            finally:
                robot.close()
            tel, s = result.telemetry, result.summary
            jitter.append(np.abs(tel.tick_array("actual") - tel.tick_array("scheduled")))
            latency.append(tel.chunk_array("finished") - tel.chunk_array("submitted"))
            episodes.append(
                {
                    "task": task_name(env_id),
                    "env_id": env_id,
                    "seed": episode_seed,
                    "success": bool(s.get("success", False)),
                    "ticks": s["ticks"],
                    "robot_steps": int(s.get("robot_steps", 0)),
                    "deadline_misses": s["deadline_misses"],
                    "starved_ticks": s["starved_ticks"],
                    "chunks": s["chunks"],
                    "jitter_p99_ms": s["jitter_ms"]["p99"],
                    "stop_reason": s["stop_reason"],
                }
            )
            bar.update(1)
            if s["stop_reason"] == "stop_requested":  # Ctrl-C: keep what ran, skip the rest
                bar.close()
                return aggregate(episodes, jitter, latency, config, simulated_latency_s, inference)
    bar.close()
    return aggregate(episodes, jitter, latency, config, simulated_latency_s, inference)


def _taking(infer: Callable[[Any], np.ndarray], clock: SimClock, seconds: float) -> Callable[[Any], np.ndarray]:
    """``infer`` taking ``seconds`` of ``clock``'s virtual time (however long it computes)."""

    def run(obs: Any, *args: Any) -> np.ndarray:
        chunk = infer(obs, *args)
        clock.sleep(seconds)
        return chunk

    return run


def _time_limit(env: gym.Env) -> int:
    limit = getattr(env.spec, "max_episode_steps", None) if env.spec is not None else None
    return int(limit) if limit else 1000


def aggregate(
    episodes: list[dict[str, Any]],
    jitter: list[np.ndarray],
    latency: list[np.ndarray],
    config: ControlConfig,
    simulated_latency_s: float | None = None,
    inference: str = "thread",
) -> dict[str, Any]:
    """Success per task and overall, and timing over every tick and chunk of the episodes:
    deadline misses, starved ticks (and their share), p99 tick jitter, inference latency."""
    ticks = sum(e["ticks"] for e in episodes)
    starved = sum(e["starved_ticks"] for e in episodes)
    all_jitter = np.concatenate(jitter) if jitter else np.zeros(0)
    all_latency = np.concatenate(latency) if latency else np.zeros(0)
    pct = lambda values, q: float(np.percentile(values, q) * 1e3) if len(values) else float("nan")
    per_task: dict[str, list[bool]] = {}
    for e in episodes:
        per_task.setdefault(e["task"], []).append(e["success"])
    return {
        "per_episode": episodes,
        "per_task": {t: {"episodes": len(v), "success_rate": float(np.mean(v))} for t, v in per_task.items()},
        "aggregated": {
            "episodes": len(episodes),
            "success_rate": float(np.mean([np.mean(v) for v in per_task.values()])) if per_task else 0.0,
            "ticks": ticks,
            "deadline_misses": sum(e["deadline_misses"] for e in episodes),
            "starved_ticks": starved,
            "starved_fraction": starved / ticks if ticks else 0.0,
            "jitter_p99_ms": pct(all_jitter, 99),
            "jitter_p99_fraction_of_period": pct(all_jitter, 99) / (1e3 * config.period) if ticks else 0.0,
            "inference_latency_ms": {"median": pct(all_latency, 50), "p99": pct(all_latency, 99)},
            "safe_stops": sum(e["stop_reason"] is not None for e in episodes),
        },
        "config": {
            "rate_hz": config.rate_hz,
            "mode": config.mode,
            "merge": config.merge,
            "threshold": config.threshold,
            "inpaint": config.inpaint,
            "simulated_latency_s": simulated_latency_s,
            "inference": inference,
        },
    }
