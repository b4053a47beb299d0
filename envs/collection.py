"""Demonstration collection: run scripted experts in the envs and keep every step.

Each step records the executed (noisy) action as the Minari ``actions`` and the expert's
clean action as ``infos["expert_action"]`` (``float32 (steps, 4)``), the label a policy
learns from (DART: execute noisy, label clean). Scenes in which a cube leaves the table
are dropped and replaced by fresh ones.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from minari.data_collector import EpisodeBuffer

from envs.ids import is_metaworld, is_tabletop, task_name
from envs.registration import SUITES, make_expert, resolve_env_ids
from envs.tasks import get_task

# Keys of a collected dataset's Minari metadata: the job settings it was made with, and its summary.
COLLECTION_KEY, SUMMARY_KEY = "collection", "collection_summary"
CUBE_OFF_TABLE = "cube_off_table"  # the tabletop env's termination_reason for a broken scene


@dataclass(frozen=True)
class Episode:
    buffer: EpisodeBuffer
    metadata: dict[str, Any]
    termination_reason: str | None = None  # the last step's info["termination_reason"], if any

    @property
    def dropped(self) -> bool:
        """A cube left the table: the scene is broken and collection does not keep it."""
        return self.termination_reason == CUBE_OFF_TABLE


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
    """One expert episode from ``env.reset(seed=seed)`` until termination or truncation.

    An expert without ``act_with_label`` (any object with ``act``) labels each step with
    the action it executed.
    """
    expert.reset(seed=seed)
    obs, info = env.reset(seed=seed)
    act_with_label = getattr(expert, "act_with_label", None)
    observations, actions, labels, rewards, terminations, truncations, successes = [obs], [], [], [], [], [], []
    while True:
        if act_with_label is not None:
            action, label = act_with_label(obs)
        else:
            action = label = expert.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        actions.append(action)
        labels.append(label)
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
        infos={
            "is_success": np.array(successes),
            "expert_action": np.stack(labels).astype(np.float32).reshape(len(labels), -1),
        },
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
    return Episode(buffer, metadata, info.get("termination_reason"))


def expert_success(env_id: str, episodes: int, first_seed: int = 100_000, noise: float = 0.0) -> dict[str, Any]:
    """The scripted expert on ``episodes`` scenes (seeds ``first_seed``...; the default
    block is the evaluation seeds', never a demonstration's): per episode its success,
    the stages it left done, and why it ended."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not is_tabletop(env_id):
        raise ValueError(f"expert_success measures tabletop tasks, not {env_id!r}")
    env = gym.make(env_id, cameras=())
    expert = make_expert(env_id, noise=noise)
    out: dict[str, list] = {"success": [], "stages_done": [], "termination_reason": []}
    try:
        for seed in range(first_seed, first_seed + episodes):
            obs, info = env.reset(seed=seed)
            expert.reset(seed=seed)  # its noise too is a function of the episode's seed
            done = False
            while not done:
                obs, _, terminated, truncated, info = env.step(expert.act(obs))
                done = terminated or truncated
            out["success"].append(bool(info["is_success"]))
            out["stages_done"].append(int(info["stages_done"]))
            out["termination_reason"].append(info["termination_reason"])
    finally:
        env.close()
    return {"env_id": env_id, "num_stages": int(info["num_stages"]), "first_seed": first_seed, **out}


def collect(
    env_id: str,
    seeds: list[int],
    noise: float = 0.0,
    random_action_prob: float = 0.0,
    env_kwargs: dict[str, Any] | None = None,
) -> list[Episode]:
    """Expert episodes on ``env_id``, one per seed, dropped scenes included (episode ids are
    left for the writer)."""
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
    max_retries: int = 5  # per episode: fresh scenes tried after a cube left the table, before giving up

    def record(self, env_id: str) -> dict[str, Any]:
        """What ``env_id``'s dataset holds is a function of these (not of workers or chunking):
        stored in the dataset's metadata, so a rerun can tell a dataset it would make again."""
        return {
            "env_id": env_id,
            "episodes_per_task": self.episodes_per_task,
            "noise_levels": [float(x) for x in self.noise_levels],
            "random_action_prob": float(self.random_action_prob),
            "pixels": self.pixels,
            "image_size": self.image_size,
            "instruction_split": self.instruction_split,
            "seed": self.seed,
            "jpeg": self.jpeg,
        }


# Scene seed blocks (see scene_seed); each bound keeps one block inside the next.
MAX_TASKS = 100  # per suite
MAX_NOISE_LEVELS = 10
SEEDS_PER_LEVEL = 100_000  # per task and noise level: its episodes and their replacements


def scene_seed(job_seed: int, task_index: int, level: int, index: int) -> int:
    """The ``env.reset`` seed of scene ``index`` of task ``task_index`` at noise level ``level``.

    All tabletop tasks draw from one scene distribution (they differ only by the
    instruction), so tasks sharing seeds would show a policy the same few scenes under
    every instruction, and levels sharing seeds would repeat them at every noise level.
    Here every (job seed, task, level, index) has its own scene, and every seed is at
    least 10**8, far above the evaluation seeds (``policies/evaluation.py`` draws
    ``EvalConfig.seed + 1000 * task + i`` from 100_000), so no demonstration scene is
    ever an evaluation scene::

        100_000_000 * (job_seed + 1) + 1_000_000 * task_index + 100_000 * level + index
    """
    bounds = {"job_seed": None, "task_index": MAX_TASKS, "level": MAX_NOISE_LEVELS, "index": SEEDS_PER_LEVEL}
    values = {"job_seed": job_seed, "task_index": task_index, "level": level, "index": index}
    for name, bound in bounds.items():
        value = values[name]
        if value < 0 or (bound is not None and value >= bound):
            valid = ">= 0" if bound is None else f"in [0, {bound})"
            raise ValueError(f"{name} must be {valid}, got {value}")
    return 100_000_000 * (job_seed + 1) + 1_000_000 * task_index + 100_000 * level + index


def task_index(env_id: str) -> int:
    """``env_id``'s index in :func:`scene_seed`: its position among the tabletop tasks (the
    ``tabletop`` suite, then ``tabletop-long``) or in the ``metaworld`` suite.

    Not its position in the job: a rerun that collects only the missing tasks (``make
    demo`` does) must give each task the scenes a full run would have given it.
    """

    for names in (("tabletop", "tabletop-long"), ("metaworld",)):
        ids = [e for name in names for e in SUITES[name]]
        if env_id in ids:
            return ids.index(env_id)
    raise ValueError(
        f"no scene seeds for {env_id!r}; valid ids are those of the tabletop, tabletop-long and metaworld suites"
    )


def dataset_id_for(env_id: str, name: str = "demos") -> str:
    """``tabletop/pick-red/demos-v0`` for a tabletop id, ``metaworld/reach/demos-v0`` for Meta-World."""
    if is_tabletop(env_id):
        return f"tabletop/{get_task(task_name(env_id)).slug}/{name}-v0"
    if is_metaworld(env_id):
        return f"metaworld/{task_name(env_id).removesuffix('-v3')}/{name}-v0"
    raise ValueError(f"no dataset naming for {env_id!r}")


def _env_kwargs(env_id: str, job: CollectionJob) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"image_size": job.image_size}
    if not job.pixels:
        kwargs["cameras"] = ()
    if is_tabletop(env_id):
        kwargs["instruction_split"] = job.instruction_split
    return kwargs


def _collect_unit(unit: tuple[CollectionJob, str, int, list[int]]) -> tuple[str, int, list[Episode], int]:
    """Episodes ``indices`` of one task at noise level ``level``: ``(env_id, level, kept, dropped)``.

    A dropped scene is replaced by its episode's next seed, index ``i + k *
    episodes_per_task`` at the k-th retry: never another episode's seed, and the same
    whichever worker runs which episodes, so a collection is a function of its job.
    """
    job, env_id, level, indices = unit
    noise, task = float(job.noise_levels[level]), task_index(env_id)
    kwargs = _env_kwargs(env_id, job)
    kept: list[Episode] = []
    dropped, pending = 0, list(indices)
    for attempt in range(job.max_retries + 1):
        seeds = [scene_seed(job.seed, task, level, i + attempt * job.episodes_per_task) for i in pending]
        episodes = collect(env_id, seeds, noise, job.random_action_prob, kwargs)
        kept.extend(ep for ep in episodes if not ep.dropped)
        pending = [i for i, ep in zip(pending, episodes, strict=True) if ep.dropped]
        dropped += len(pending)
        if not pending:
            return env_id, level, kept, dropped
    i = pending[0]
    tried = [scene_seed(job.seed, task, level, i + k * job.episodes_per_task) for k in range(job.max_retries + 1)]
    raise RuntimeError(
        f"{env_id} at noise {noise}: a cube left the table in all {len(tried)} scenes tried for episode {i} "
        f"(seeds {tried}); lower the noise or raise max_retries (now {job.max_retries})"
    )


def run_collection(job: CollectionJob, progress: bool = True) -> dict[str, Any]:
    """Collect every task of ``job`` and write its datasets; returns a per-dataset summary.

    Episodes whose scene broke (a cube left the table) are not kept: each is replaced by
    a fresh scene, and the summary counts them as ``dropped`` (per dataset and per noise
    level).
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    from envs.datasets import dataset_path, remove_stale_tmp, write_dataset

    if job.episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {job.episodes_per_task}")
    if not job.noise_levels or any(not np.isfinite(n) or n < 0 for n in job.noise_levels):
        raise ValueError(f"noise levels must be a non-empty list of values >= 0, got {list(job.noise_levels)}")
    if len(job.noise_levels) > MAX_NOISE_LEVELS:
        raise ValueError(f"at most {MAX_NOISE_LEVELS} noise levels per job, got {len(job.noise_levels)}")
    if job.seed < 0:
        raise ValueError(f"seed must be >= 0, got {job.seed}")
    if job.max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {job.max_retries}")
    if job.episodes_per_task * (job.max_retries + 1) > SEEDS_PER_LEVEL:
        raise ValueError(
            f"episodes_per_task * (max_retries + 1) must be <= {SEEDS_PER_LEVEL} (the scene seeds of a task and "
            f"noise level), got {job.episodes_per_task} * {job.max_retries + 1}"
        )
    env_ids = resolve_env_ids(job.env_ids)
    ids = {env_id: dataset_id_for(env_id, job.dataset_name) for env_id in env_ids}
    for env_id in env_ids:
        task_index(env_id)  # raises before any work for an env without scene seeds
    for first in {(is_tabletop(e), is_metaworld(e)): e for e in reversed(env_ids)}.values():
        gym.make(first, **_env_kwargs(first, job)).close()  # bad env options (image size...) fail here, not in a worker
    remove_stale_tmp(job.root)
    summary: dict[str, Any] = {}
    if not job.overwrite:  # a dataset this job would write again is kept: a rerun resumes
        existing = {e: d for e, d in ids.items() if dataset_path(d, job.root).exists()}
        stored = {e: collection_metadata(d, job.root) for e, d in existing.items()}
        other = {e: d for e, d in existing.items() if stored[e].get(COLLECTION_KEY) != _as_json(job.record(e))}
        if other:
            env_id = next(iter(other))
            differ = _differences(stored[env_id].get(COLLECTION_KEY) or {}, _as_json(job.record(env_id)))
            raise FileExistsError(
                f"datasets {list(other.values())} already exist, collected with other settings "
                f"({other[env_id]}: {'; '.join(differ)}); pass --overwrite to replace them, or another --root"
            )
        for env_id, dataset_id in existing.items():
            summary[dataset_id] = {**stored[env_id][SUMMARY_KEY], "reused": True}
        if existing and progress:
            print(f"collect: {len(existing)} of {len(ids)} datasets already collected with these settings, kept")
        env_ids = [e for e in env_ids if e not in existing]

    units = []
    for env_id in env_ids:
        for level in range(len(job.noise_levels)):
            for start in range(0, job.episodes_per_task, job.chunk_size):
                indices = list(range(start, min(start + job.chunk_size, job.episodes_per_task)))
                units.append((job, env_id, level, indices))
    pending = {env_id: sum(1 for u in units if u[1] == env_id) for env_id in env_ids}
    results: dict[str, list[tuple[int, Episode]]] = {env_id: [] for env_id in env_ids}
    dropped = {env_id: [0] * len(job.noise_levels) for env_id in env_ids}
    bar = tqdm(total=sum(len(u[3]) for u in units), desc="collect", unit="ep", disable=not (progress and units))

    def finish(env_id: str, level: int, episodes: list[Episode], n_dropped: int) -> None:
        results[env_id].extend((level, ep) for ep in episodes)
        dropped[env_id][level] += n_dropped
        bar.update(len(episodes))
        pending[env_id] -= 1
        if pending[env_id] == 0:
            ordered = [ep for _, ep in sorted(results.pop(env_id), key=lambda x: (x[0], x[1].buffer.seed))]
            summary[ids[env_id]] = _write(env_id, ids[env_id], ordered, dropped.pop(env_id), job, write_dataset)

    if job.workers > 1 and len(units) > 1:
        # Ctrl-C reaches every process of the group: the workers ignore it and the main
        # process cancels the queued work, so it stops with one message, not one per worker.
        context, ignore = get_context("spawn"), (signal.SIGINT, signal.SIG_IGN)
        pool = ProcessPoolExecutor(job.workers, mp_context=context, initializer=signal.signal, initargs=ignore)
        try:
            for result in pool.map(_collect_unit, units):
                finish(*result)
        except KeyboardInterrupt:
            print("\ninterrupt: finishing the episodes in progress, keeping the finished datasets", file=sys.stderr)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        for unit in units:
            finish(*_collect_unit(unit))
    bar.close()
    return summary


def _write(
    env_id: str, dataset_id: str, episodes: list[Episode], dropped: list[int], job: CollectionJob, write_dataset
) -> dict[str, Any]:
    import envs  # noqa: F401

    by_noise: dict[str, dict[str, Any]] = {}
    for level, noise in enumerate(job.noise_levels):
        eps = [ep.metadata for ep in episodes if ep.metadata["noise"] == noise]
        by_noise[str(noise)] = {
            "episodes": len(eps),
            "dropped": dropped[level],
            "success_rate": float(np.mean([m["success"] for m in eps])),
            "mean_return": float(np.mean([m["return"] for m in eps])),
            "mean_length": float(np.mean([m["length"] for m in eps])),
        }
    summary = {
        "env_id": env_id,
        "steps": int(sum(ep.metadata["length"] for ep in episodes)),
        "dropped": int(sum(dropped)),
        "by_noise": by_noise,
    }
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
            extra_metadata={COLLECTION_KEY: _as_json(job.record(env_id)), SUMMARY_KEY: summary},
        )
    finally:
        env.close()
    return summary


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def _differences(made: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """``"<field> <made> there, <asked> asked"`` for each field of ``asked`` that ``made`` differs in."""
    return [f"{k} {made.get(k, 'unrecorded')!r} there, {v!r} asked" for k, v in asked.items() if made.get(k) != v]


def check_reusable(
    dataset_id: str,
    root: str | os.PathLike | None,
    episodes_per_task: int,
    noise_levels,
    job: CollectionJob | None = None,
    env_id: str | None = None,
) -> None:
    """Raise ``ValueError`` unless the dataset holds exactly ``episodes_per_task`` episodes at
    each of ``noise_levels`` and, when it records the job that collected it, that ``job``
    would collect it the same way for ``env_id`` (images, instructions, noise...) but for
    the collection seed: the pipelines' seeds share one collection on purpose, so that
    their comparison differs only by training. What a pipeline that reuses datasets by
    name must check first."""
    from envs.datasets import dataset_path, episode_metadata, load_dataset

    path = dataset_path(dataset_id, root)
    noise = [m["noise"] for m in episode_metadata(load_dataset(dataset_id, root=root))]
    levels = sorted(set(noise))
    if levels != sorted(float(x) for x in noise_levels):
        raise ValueError(
            f"{path} holds noise levels {levels}, this run asks for {sorted(noise_levels)}: "
            "choose another --output-dir, or delete that dataset to re-collect it"
        )
    counts = sorted({noise.count(level) for level in levels})
    if counts != [episodes_per_task]:
        raise ValueError(
            f"{path} holds {'/'.join(map(str, counts))} episodes per noise level, this run asks for "
            f"--episodes-per-task {episodes_per_task}: pass the dataset's count, choose another "
            "--output-dir, or delete that dataset to re-collect it"
        )
    made = collection_metadata(dataset_id, root).get(COLLECTION_KEY)
    if made is not None and job is not None and env_id is not None:
        asked = {k: v for k, v in _as_json(job.record(env_id)).items() if k != "seed"}
        differ = _differences(made, asked)
        if differ:
            raise ValueError(
                f"{path} was collected with other settings ({'; '.join(differ)}): choose another --output-dir, "
                "or delete that dataset to re-collect it"
            )


def collection_metadata(dataset_id: str, root: str | None) -> dict[str, Any]:
    """The collection settings and summary stored in a dataset this module wrote ({} for
    any other dataset)."""
    from envs.datasets import read_dataset_metadata

    metadata = read_dataset_metadata(dataset_id, root)
    return {k: metadata[k] for k in (COLLECTION_KEY, SUMMARY_KEY) if k in metadata}
