"""Training frames from Minari datasets: each frame with its instruction, state, images and
the next H actions (padded and masked past the episode's end), plus image augmentation."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import minari
import numpy as np
import torch
from tqdm.auto import tqdm

from envs.datasets import episode_metadata, load_dataset
from policies.constants import ACTION, OBS_ENV_STATE, OBS_STATE, image_key
from policies.normalize import feature_stats

LABELS = ("expert", "executed")
BALANCES = (None, "task")
EXPERT_ACTION = "expert_action"  # the per-step infos key collection stores the clean label under


class ChunkDataset:
    """Every frame of one or more Minari datasets, held in memory.

    ``cameras``: which ``pixels`` entries to keep (``()`` for state-only training). The
    instruction of an episode is its observations' ``instruction`` (or, failing that, the
    episode metadata's). A frame's action chunk is ``actions[t : t + chunk_size]``; steps
    past the episode's end repeat its last action and are flagged in ``action_is_pad``.

    ``label``: which actions the chunks (and the ``action`` statistics) hold. ``"expert"``
    (default) takes the expert's clean action recorded per step in
    ``infos["expert_action"]``: demonstrations execute a noisy action so they visit the
    states a policy drifts into, and the clean label says how to recover (DART), where the
    executed action would teach the noise. A dataset without the label (any other Minari
    dataset) falls back to its executed actions, with a warning. ``"executed"`` always
    takes the executed actions. ``actions`` holds the label trained on,
    ``executed_actions`` the executed ones.

    Batches are gathered with one fancy index per array (:meth:`get`), not through
    ``torch.utils.data.DataLoader``: on the 105k-frame tabletop demos with both cameras,
    a batch of 64 takes 0.45 ms here and 5.0 ms as 64 ``__getitem__`` calls plus
    ``default_collate`` (2-core VM, medians of 5 x 200 batches), a few percent of a
    training step that the frames, all in memory, never need.
    """

    def __init__(
        self,
        datasets: Sequence[str | os.PathLike | minari.MinariDataset] | str,
        chunk_size: int,
        cameras: Sequence[str] = (),
        root: str | os.PathLike | None = None,
        progress: bool = True,
        label: str = "expert",
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if label not in LABELS:
            raise ValueError(f"label={label!r}; valid labels are {LABELS}")
        datasets = [datasets] if isinstance(datasets, (str, os.PathLike)) else list(datasets)
        if not datasets:
            raise ValueError("ChunkDataset needs at least one dataset")
        self.chunk_size = chunk_size
        self.cameras = tuple(cameras)
        self.label = label
        images: dict[str, list[np.ndarray]] = {c: [] for c in self.cameras}
        states, actions, executed, tasks, starts, ends, episode_tasks, scenes = [], [], [], [], [], [], [], []
        frames = 0
        for source in tqdm(datasets, desc="load datasets", unit="ds", disable=not progress):
            ds = source if isinstance(source, minari.MinariDataset) else load_dataset(source, root)
            metas = episode_metadata(ds)
            unlabelled = 0
            for episode, meta in zip(ds.iterate_episodes(), metas, strict=True):
                obs = episode.observations
                length = len(episode.actions)
                if length == 0:
                    continue
                for camera in self.cameras:
                    pixels = obs.get("pixels") if isinstance(obs, dict) else None
                    if pixels is None or camera not in pixels:
                        have = sorted(pixels) if pixels is not None else []
                        raise ValueError(f"dataset {ds.id!r} has no camera {camera!r}; it has {have}")
                    images[camera].append(np.asarray(pixels[camera][:length], dtype=np.uint8))
                states.append(np.asarray(_state(obs, ds.id)[:length], dtype=np.float32))
                if isinstance(obs, dict) and "environment_state" in obs:
                    scenes.append(np.asarray(obs["environment_state"][:length], dtype=np.float32))
                done = np.asarray(episode.actions, dtype=np.float32).reshape(length, -1)
                executed.append(done)
                if label == "expert":
                    expert = _expert_action(episode, done.shape, ds.id)
                    unlabelled += expert is None
                    actions.append(done if expert is None else expert)
                else:
                    actions.append(done)
                tasks.append(_instruction(obs, meta, ds.id))
                episode_tasks.append(meta.get("task", ds.id))
                starts.append(frames)
                frames += length
                ends.append(frames)
            if unlabelled:
                warnings.warn(
                    f"dataset {ds.id!r} has no infos[{EXPERT_ACTION!r}] in {unlabelled} episode(s): "
                    "falling back to the executed actions as labels there",
                    stacklevel=2,
                )
        if frames == 0:
            raise ValueError(f"datasets {datasets} hold no steps")
        self.images = {c: np.concatenate(v) for c, v in images.items()}
        self.state = np.concatenate(states)
        self.actions = np.concatenate(actions)  # the label trained on
        self.executed_actions = np.concatenate(executed)
        # Privileged object state, when every episode has it: a training target only.
        self.environment_state = np.concatenate(scenes) if len(scenes) == len(states) else None
        self.episode_instruction = tasks
        self.episode_task = episode_tasks
        lengths = np.array(ends) - np.array(starts)
        self.frame_episode = np.repeat(np.arange(len(starts)), lengths)
        self.frame_end = np.repeat(np.array(ends), lengths)
        # Frames grouped by task, for task-balanced sampling.
        task_names, episode_task_ids = np.unique(np.array(episode_tasks, dtype=object), return_inverse=True)
        frame_task = episode_task_ids[self.frame_episode]
        self._task_frames = np.argsort(frame_task, kind="stable")
        self._task_counts = np.bincount(frame_task, minlength=len(task_names))
        self._task_starts = np.cumsum(self._task_counts) - self._task_counts
        self.frame_features: dict[str, np.ndarray] = {}

    def attach_frame_features(self, features: dict[str, np.ndarray], drop_images: bool = True) -> None:
        """Per-frame arrays (``(len(self), ...)``) that ``get`` adds to every batch under their
        keys: a frozen encoder's outputs, computed once instead of at every step. With
        ``drop_images`` the images are released and batches no longer carry them."""
        for key, value in features.items():
            if len(value) != len(self):
                raise ValueError(f"frame feature {key!r} has {len(value)} rows, the dataset {len(self)} frames")
        self.frame_features.update(features)
        if drop_images:
            self.images = {}

    def __len__(self) -> int:
        return len(self.state)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_instruction)

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Normalisation statistics; ``action``'s are those of the label trained on."""
        stats = {OBS_STATE: feature_stats(self.state), ACTION: feature_stats(self.actions)}
        if self.environment_state is not None:
            stats[OBS_ENV_STATE] = feature_stats(self.environment_state)
        return stats

    def get(self, indices: np.ndarray) -> dict[str, Any]:
        """A batch (LeRobot keys) of the frames at ``indices``; images as floats in [0, 1]."""
        indices = np.asarray(indices)
        steps = indices[:, None] + np.arange(self.chunk_size)[None, :]  # (B, H)
        is_pad = steps >= self.frame_end[indices][:, None]
        steps = np.minimum(steps, self.frame_end[indices][:, None] - 1)
        batch: dict[str, Any] = {
            OBS_STATE: torch.from_numpy(self.state[indices]),
            ACTION: torch.from_numpy(self.actions[steps]),
            "action_is_pad": torch.from_numpy(is_pad),
            "task": [self.episode_instruction[e] for e in self.frame_episode[indices]],
        }
        if self.environment_state is not None:
            batch[OBS_ENV_STATE] = torch.from_numpy(self.environment_state[indices])
        for camera, frames in self.images.items():
            batch[image_key(camera)] = torch.from_numpy(frames[indices]).permute(0, 3, 1, 2).float() / 255
        for key, values in self.frame_features.items():
            batch[key] = torch.from_numpy(values[indices])
        return batch

    def sample(
        self, batch_size: int, rng: np.random.Generator, shift: int = 0, balance: str | None = None
    ) -> dict[str, Any]:
        """A random batch; ``shift > 0`` augments images by random shifts of up to that many pixels.

        ``balance=None`` draws frames uniformly, so a task with more (or longer) episodes
        is seen more often; ``balance="task"`` draws a task uniformly (an episode's task is
        ``episode_task``), then a frame uniformly within it, so every task gets an equal
        share of the gradient whatever its dataset's size.
        """
        if balance not in BALANCES:
            raise ValueError(f"balance={balance!r}; valid choices are {BALANCES}")
        if balance == "task":
            tasks = rng.integers(0, len(self._task_counts), size=batch_size)
            offsets = rng.integers(0, self._task_counts[tasks])
            indices = self._task_frames[self._task_starts[tasks] + offsets]
        else:
            indices = rng.integers(0, len(self), size=batch_size)
        batch = self.get(indices)
        if shift > 0:
            seed = int(rng.integers(1 << 62))
            for camera in self.images:
                key = image_key(camera)
                batch[key] = random_shift(batch[key], shift, torch.Generator().manual_seed(seed))
                seed += 1
        return batch


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ's augmentation: pad by repeating the border, then crop back at a random offset per image."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _expert_action(episode: Any, shape: tuple[int, int], dataset_id: str) -> np.ndarray | None:
    """The episode's recorded clean label, ``float32`` of the executed actions' ``shape``, or None."""
    infos = episode.infos if isinstance(episode.infos, dict) else {}
    if EXPERT_ACTION not in infos:
        return None
    label = np.asarray(infos[EXPERT_ACTION], dtype=np.float32)
    if label.reshape(len(label), -1).shape != shape:
        raise ValueError(
            f"dataset {dataset_id!r} episode {episode.id}: infos[{EXPERT_ACTION!r}] has shape {label.shape}, "
            f"its actions {shape}; pass label='executed' to train on the executed actions"
        )
    return label.reshape(shape)


def _state(obs: Any, dataset_id: str) -> np.ndarray:
    if isinstance(obs, dict):
        for key in ("agent_pos", "state", "observation"):
            if key in obs:
                return np.asarray(obs[key])
        raise ValueError(f"dataset {dataset_id!r} observations have no 'agent_pos'; keys are {sorted(obs)}")
    return np.asarray(obs)


def _instruction(obs: Any, meta: dict[str, Any], dataset_id: str) -> str:
    if isinstance(obs, dict) and "instruction" in obs:
        first = obs["instruction"][0]
        return first.decode() if isinstance(first, bytes) else str(first)
    if "instruction" in meta:
        return str(meta["instruction"])
    raise ValueError(f"dataset {dataset_id!r} has no instruction in its observations or episode metadata")
