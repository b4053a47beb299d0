"""Offline trajectories for the Decision Transformer, from any Minari dataset.

A dataset is named by id (looked up under the project's dataset root, then Minari's own)
or by path. Observations become flat state vectors: a ``Box`` as it is; a ``Dict`` by
the project's contract (``agent_pos`` then ``environment_state``; images and text are
never read) or, for other datasets, every numeric entry in key order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from envs.datasets import load_dataset

STATE_KEYS = ("agent_pos", "environment_state")
SKIP_KEYS = ("pixels", "instruction")


def flatten_observations(observations: Any) -> np.ndarray:
    """``(T, S)`` float32 states from a Minari episode's observations (array or dict)."""
    if isinstance(observations, np.ndarray):
        return observations.reshape(len(observations), -1).astype(np.float32)
    if isinstance(observations, dict):
        if all(k in observations for k in STATE_KEYS):
            parts = [observations[k] for k in STATE_KEYS]
        else:
            parts = [
                flatten_observations(observations[k])
                for k in sorted(observations)
                if k not in SKIP_KEYS and isinstance(observations[k], (np.ndarray, dict))
            ]
            parts = [p for p in parts if p.dtype != np.uint8]
        if not parts:
            raise ValueError(f"no numeric state in observations with keys {sorted(observations)}")
        n = len(parts[0])
        return np.concatenate([np.asarray(p, dtype=np.float32).reshape(n, -1) for p in parts], axis=1)
    raise TypeError(f"cannot read states from observations of type {type(observations).__name__}")


@dataclass
class Trajectory:
    states: np.ndarray  # (T, S): the state each action was taken in
    actions: np.ndarray  # (T, A)
    rewards: np.ndarray  # (T,)
    success: bool = False

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())


@dataclass
class OfflineData:
    """A dataset's trajectories and what the model needs to know about it."""

    name: str
    trajectories: list[Trajectory]
    env_id: str

    @property
    def state_dim(self) -> int:
        return self.trajectories[0].states.shape[1]

    @property
    def act_dim(self) -> int:
        return self.trajectories[0].actions.shape[1]

    @property
    def returns(self) -> np.ndarray:
        return np.array([t.ret for t in self.trajectories])

    @property
    def steps(self) -> int:
        return sum(len(t) for t in self.trajectories)

    def state_stats(self) -> tuple[np.ndarray, np.ndarray]:
        states = np.concatenate([t.states for t in self.trajectories])
        return states.mean(0), states.std(0) + 1e-6

    def summary(self) -> dict[str, Any]:
        r = self.returns
        return {
            "dataset": self.name,
            "env_id": self.env_id,
            "episodes": len(self.trajectories),
            "steps": self.steps,
            "state_dim": self.state_dim,
            "act_dim": self.act_dim,
            "return_min": float(r.min()),
            "return_mean": float(r.mean()),
            "return_max": float(r.max()),
            "success_rate": float(np.mean([t.success for t in self.trajectories])),
        }


def load_offline(
    name: str | os.PathLike, root: str | os.PathLike | None = None, max_episodes: int | None = None
) -> OfflineData:
    """Trajectories of the Minari dataset ``name`` (an id or a path)."""
    dataset = load_dataset(name, root)
    trajectories = []
    for i, episode in enumerate(dataset.iterate_episodes()):
        if max_episodes is not None and i >= max_episodes:
            break
        actions = np.asarray(episode.actions, dtype=np.float32).reshape(len(episode.actions), -1)
        if len(actions) == 0:
            continue
        states = flatten_observations(episode.observations)[: len(actions)]
        success = episode.infos.get("is_success") if isinstance(episode.infos, dict) else None
        trajectories.append(
            Trajectory(
                states=states,
                actions=actions,
                rewards=np.asarray(episode.rewards, dtype=np.float32),
                success=bool(np.any(success)) if success is not None else False,
            )
        )
    if not trajectories:
        raise ValueError(f"dataset {str(name)!r} has no episodes with actions")
    spec = dataset.spec.env_spec
    env_id = spec.id if spec is not None else ""
    return OfflineData(str(name), trajectories, env_id)


class WindowSampler:
    """Random context windows of one task's trajectories, as the DT paper samples them.

    A trajectory is drawn with probability proportional to its length, a start step
    uniformly, and the window of up to ``context_length`` steps from there is left-padded
    (mask 0) to full length. Returns-to-go (undiscounted, from each step to the episode's
    end) are divided by ``return_scale``; states are normalised with ``state_mean`` /
    ``state_std``; timesteps are clipped to ``max_ep_len - 1``.
    """

    def __init__(
        self,
        data: OfflineData,
        context_length: int,
        return_scale: float,
        state_mean: np.ndarray,
        state_std: np.ndarray,
        max_ep_len: int,
    ) -> None:
        self.data, self.k = data, context_length
        lengths = np.array([len(t) for t in data.trajectories])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = lengths
        self.p = lengths / lengths.sum()
        self.states = ((np.concatenate([t.states for t in data.trajectories]) - state_mean) / state_std).astype(
            np.float32
        )
        self.actions = np.concatenate([t.actions for t in data.trajectories])
        rtg = [np.cumsum(t.rewards[::-1])[::-1] for t in data.trajectories]
        self.rtg = (np.concatenate(rtg) / return_scale).astype(np.float32)
        self.timesteps = np.minimum(np.concatenate([np.arange(n) for n in lengths]), max_ep_len - 1)

    def sample(self, batch_size: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> dict:
        episodes = rng.choice(len(self.lengths), size=batch_size, p=self.p)
        starts = (rng.random(batch_size) * self.lengths[episodes]).astype(np.int64)
        valid = np.minimum(self.lengths[episodes] - starts, self.k)  # steps in each window
        pos = np.arange(self.k)[None, :] - (self.k - valid)[:, None]  # left padding: negative = pad
        mask = pos >= 0
        index = self.offsets[episodes][:, None] + starts[:, None] + np.maximum(pos, 0)
        zero = ~mask
        states, actions = self.states[index], self.actions[index]
        rtg, steps = self.rtg[index], self.timesteps[index]
        states[zero], actions[zero], rtg[zero], steps[zero] = 0.0, 0.0, 0.0, 0
        return {
            "states": torch.from_numpy(states).to(device),
            "actions": torch.from_numpy(actions).to(device),
            "returns_to_go": torch.from_numpy(rtg).unsqueeze(-1).to(device),
            "timesteps": torch.from_numpy(steps).to(device),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)).to(device),
        }


def window_sampler(model: Any, task: str, data: OfflineData) -> WindowSampler:
    """A sampler that reads ``data`` the way ``model`` reads ``task`` (its normalisation and scale)."""
    spec = model.config.task(task)
    io = model.tasks[task]
    if (data.state_dim, data.act_dim) != (spec.state_dim, spec.act_dim):
        raise ValueError(
            f"dataset {data.name!r} has states of size {data.state_dim} and actions of size {data.act_dim}; "
            f"task {task!r} expects {spec.state_dim} and {spec.act_dim}"
        )
    return WindowSampler(
        data,
        model.config.context_length,
        spec.return_scale,
        io.state_mean.cpu().numpy(),
        io.state_std.cpu().numpy(),
        model.config.max_ep_len,
    )
