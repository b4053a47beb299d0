"""Running a trained policy checkpoint on a MuJoCo task in real time."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401  (registers the env ids)
from envs.ids import is_tabletop, task_env_id
from envs.registration import resolve_env_ids
from policies.control.clock import RealClock, SimClock
from policies.control.config import ControlConfig
from policies.control.loop import ControlLoop, stop_on_interrupt
from policies.control.robot import MujocoRobot
from policies.control.telemetry import ControlResult

# The tabletop's action: gripper displacement (dx, dy, dz) and the gripper command; a safe
# stop zeroes the displacement and keeps the gripper as it is.
TABLETOP_MOTION_DIMS = (0, 1, 2)


def chunk_fn(policy: Any):
    """``obs -> (H, action_dim)`` for a policy with ``predict_action_chunk`` (the VLA)."""

    def infer(obs: dict[str, Any]) -> np.ndarray:
        with torch.inference_mode():
            chunk = policy.predict_action_chunk(policy.batch_from_observation(obs))
        return chunk[0].cpu().numpy()

    return infer


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
) -> ControlResult:
    clock = clock or RealClock()
    robot = make_robot(policy, task, clock, endless=endless, video=config.video)
    if config.motion_dims is None and robot.action_space.shape == (4,):
        config.motion_dims = TABLETOP_MOTION_DIMS
    if config.n_action_steps is None and hasattr(policy.config, "n_action_steps"):
        config.n_action_steps = policy.config.n_action_steps
    policy.eval()
    try:
        loop = ControlLoop(robot, chunk_fn(policy), config, clock)
        with stop_on_interrupt(loop):  # Ctrl-C: a safe stop, and the summary is still written
            return loop.run(seed=seed)
    finally:
        robot.close()
