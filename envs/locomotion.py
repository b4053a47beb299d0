"""Gymnasium's MuJoCo locomotion tasks (v5, state only) for the Decision Transformer work.

Reference returns are D4RL's (Fu et al., 2020), the ones every offline-RL paper uses
to report normalised scores: 0 is a uniformly random policy, 100 an expert (SAC).
Minari's ``mujoco/<task>/{simple,medium,expert}-v0`` datasets come from these envs.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class LocomotionTask:
    name: str
    env_id: str
    random_return: float
    expert_return: float

    @property
    def minari_prefix(self) -> str:
        return f"mujoco/{self.name}"


LOCOMOTION: dict[str, LocomotionTask] = {
    "halfcheetah": LocomotionTask("halfcheetah", "HalfCheetah-v5", -280.178953, 12135.0),
    "hopper": LocomotionTask("hopper", "Hopper-v5", -20.272305, 3234.3),
    "walker2d": LocomotionTask("walker2d", "Walker2d-v5", 1.629008, 4592.3),
}


def get_locomotion(name: str) -> LocomotionTask:
    key = name.lower()
    if key not in LOCOMOTION:
        raise ValueError(f"unknown locomotion task {name!r}; valid tasks are {sorted(LOCOMOTION)}")
    return LOCOMOTION[key]


def make_locomotion_env(name: str, **kwargs) -> gym.Env:
    """The Gymnasium env for ``halfcheetah``, ``hopper`` or ``walker2d`` (state observations)."""
    return gym.make(get_locomotion(name).env_id, **kwargs)


def normalized_score(name: str, returns: float | np.ndarray) -> float | np.ndarray:
    """100 * (return - random) / (expert - random), D4RL's normalised score."""
    task = get_locomotion(name)
    return 100.0 * (np.asarray(returns) - task.random_return) / (task.expert_return - task.random_return)
