"""Demonstration collection: run scripted experts in the envs and keep every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from minari.data_collector import EpisodeBuffer

from envs.experts import make_expert


@dataclass(frozen=True)
class Episode:
    buffer: EpisodeBuffer
    metadata: dict[str, Any]


def _stack(observations: list[dict[str, Any]]) -> dict[str, Any]:
    first = observations[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _stack([o[key] for o in observations])
        elif isinstance(value, str):
            out[key] = [o[key] for o in observations]
        else:
            out[key] = np.stack([o[key] for o in observations])
    return out


def run_episode(
    env: gym.Env,
    expert,
    seed: int,
    episode_id: int | None = None,
    noise: float = 0.0,
    random_action_prob: float = 0.0,
) -> Episode:
    """One expert episode from ``env.reset(seed=seed)`` until termination or truncation."""
    expert.reset(seed=seed)
    obs, info = env.reset(seed=seed)
    observations, actions, rewards, terminations, truncations, successes = [obs], [], [], [], [], []
    while True:
        action = expert.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(float(reward))
        terminations.append(bool(terminated))
        truncations.append(bool(truncated))
        successes.append(bool(info["is_success"]))
        if terminated or truncated:
            break
    buffer = EpisodeBuffer(
        id=episode_id,
        seed=seed,
        observations=_stack(observations),
        actions=np.stack(actions).astype(np.float32),
        rewards=rewards,
        terminations=terminations,
        truncations=truncations,
        infos={"is_success": np.array(successes)},
    )
    metadata = {
        "env_id": env.spec.id if env.spec is not None else "",
        "task": info.get("task", ""),
        "instruction": info["instruction"],
        "noise": float(noise),
        "random_action_prob": float(random_action_prob),
        "success": bool(any(successes)),
        "return": float(np.sum(rewards)),
        "length": len(actions),
    }
    return Episode(buffer, metadata)


def collect(
    env_id: str,
    seeds: list[int],
    noise: float = 0.0,
    random_action_prob: float = 0.0,
    env_kwargs: dict[str, Any] | None = None,
) -> list[Episode]:
    """Expert episodes on ``env_id``, one per seed (episode ids are left for the writer)."""
    import envs  # noqa: F401  (registers the ids, also in worker processes)

    env = gym.make(env_id, **(env_kwargs or {}))
    expert = make_expert(env_id, noise=noise, random_action_prob=random_action_prob)
    try:
        return [run_episode(env, expert, seed, None, noise, random_action_prob) for seed in seeds]
    finally:
        env.close()


@dataclass(frozen=True)
class CollectionJob:
    """What ``scripts/collect.py`` runs: experts on every task, one Minari dataset per task."""

    env_ids: tuple[str, ...] | list[str] | str = ("tabletop",)
    episodes_per_task: int = 50  # per noise level
    noise_levels: tuple[float, ...] = (0.0,)
    random_action_prob: float = 0.0
    pixels: bool = True
    image_size: int = 64
    instruction_split: str = "train"
    dataset_name: str = "demos"
    root: str | None = None
    seed: int = 0
    workers: int = 2
    jpeg: bool = False
    overwrite: bool = False
    chunk_size: int = 10  # episodes per unit of work handed to a worker


def dataset_id_for(env_id: str, name: str = "demos") -> str:
    """``tabletop/pick-red/demos-v0`` for a tabletop id, ``metaworld/reach/demos-v0`` for Meta-World."""
    from envs.registration import METAWORLD_PREFIX, TABLETOP_PREFIX
    from envs.tasks import get_task

    if env_id.startswith(TABLETOP_PREFIX):
        return f"tabletop/{get_task(env_id[len(TABLETOP_PREFIX) :].removesuffix('-v0')).slug}/{name}-v0"
    if env_id.startswith(METAWORLD_PREFIX):
        return f"metaworld/{env_id[len(METAWORLD_PREFIX) :].removesuffix('-v3')}/{name}-v0"
    raise ValueError(f"no dataset naming for {env_id!r}")


def _env_kwargs(env_id: str, job: CollectionJob) -> dict[str, Any]:
    from envs.registration import TABLETOP_PREFIX

    kwargs: dict[str, Any] = {"image_size": job.image_size}
    if not job.pixels:
        kwargs["cameras"] = ()
    if env_id.startswith(TABLETOP_PREFIX):
        kwargs["instruction_split"] = job.instruction_split
    return kwargs


def _collect_unit(unit: tuple[str, list[int], float, float, dict[str, Any]]) -> tuple[str, float, list[Episode]]:
    env_id, seeds, noise, random_action_prob, kwargs = unit
    return env_id, noise, collect(env_id, seeds, noise, random_action_prob, kwargs)


def run_collection(job: CollectionJob, progress: bool = True) -> dict[str, Any]:
    """Collect every task of ``job`` and write its datasets; returns a per-dataset summary."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    from envs.datasets import dataset_path, remove_stale_tmp, write_dataset
    from envs.registration import resolve_env_ids

    if job.episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {job.episodes_per_task}")
    if not job.noise_levels or any(n < 0 for n in job.noise_levels):
        raise ValueError(f"noise levels must be a non-empty list of values >= 0, got {list(job.noise_levels)}")
    env_ids = resolve_env_ids(job.env_ids)
    ids = {env_id: dataset_id_for(env_id, job.dataset_name) for env_id in env_ids}
    existing = [d for d in ids.values() if dataset_path(d, job.root).exists()]
    if existing and not job.overwrite:
        raise FileExistsError(f"datasets already exist: {existing}; pass --overwrite to replace them")
    remove_stale_tmp(job.root)

    units = []
    for env_id in env_ids:
        for level, noise in enumerate(job.noise_levels):
            # The same scene seeds at every noise level, so levels differ only by the expert.
            seeds = [job.seed * 1_000_000 + level * 100_000 + i for i in range(job.episodes_per_task)]
            for start in range(0, len(seeds), job.chunk_size):
                chunk = seeds[start : start + job.chunk_size]
                units.append((env_id, chunk, float(noise), job.random_action_prob, _env_kwargs(env_id, job)))
    pending = {env_id: sum(1 for u in units if u[0] == env_id) for env_id in env_ids}
    results: dict[str, list[tuple[int, Episode]]] = {env_id: [] for env_id in env_ids}
    summary: dict[str, Any] = {}
    bar = tqdm(total=len(units) * job.chunk_size, desc="collect", unit="ep", disable=not progress)
    bar.total = sum(len(u[1]) for u in units)

    def finish(env_id: str, noise: float, episodes: list[Episode]) -> None:
        level = job.noise_levels.index(noise)
        results[env_id].extend((level, ep) for ep in episodes)
        bar.update(len(episodes))
        pending[env_id] -= 1
        if pending[env_id] == 0:
            ordered = [ep for _, ep in sorted(results.pop(env_id), key=lambda x: (x[0], x[1].buffer.seed))]
            summary[ids[env_id]] = _write(env_id, ids[env_id], ordered, job, write_dataset)

    if job.workers > 1 and len(units) > 1:
        with ProcessPoolExecutor(job.workers, mp_context=get_context("spawn")) as pool:
            for env_id, noise, episodes in pool.map(_collect_unit, units):
                finish(env_id, noise, episodes)
    else:
        for unit in units:
            finish(*_collect_unit(unit))
    bar.close()
    return summary


def _write(env_id: str, dataset_id: str, episodes: list[Episode], job: CollectionJob, write_dataset) -> dict[str, Any]:
    import envs  # noqa: F401

    env = gym.make(env_id, **_env_kwargs(env_id, job))
    try:
        write_dataset(
            dataset_id,
            [ep.buffer for ep in episodes],
            [ep.metadata for ep in episodes],
            observation_space=env.observation_space,
            action_space=env.action_space,
            env_spec=env.spec,
            root=job.root,
            description=f"Scripted-expert episodes on {env_id} at noise levels {list(job.noise_levels)}.",
            jpeg=job.jpeg,
            overwrite=job.overwrite,
        )
    finally:
        env.close()
    by_noise = {}
    for noise in job.noise_levels:
        eps = [ep.metadata for ep in episodes if ep.metadata["noise"] == noise]
        by_noise[str(noise)] = {
            "episodes": len(eps),
            "success_rate": float(np.mean([m["success"] for m in eps])),
            "mean_return": float(np.mean([m["return"] for m in eps])),
            "mean_length": float(np.mean([m["length"] for m in eps])),
        }
    return {"env_id": env_id, "steps": int(sum(ep.metadata["length"] for ep in episodes)), "by_noise": by_noise}
