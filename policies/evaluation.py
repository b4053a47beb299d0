"""Evaluation rollouts: a policy on Gymnasium tasks through vector envs, per-task success,
``eval_info.json`` (DESIGN.md) and optional videos."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import envs  # noqa: F401  (registers the env ids)
from envs.registration import METAWORLD_PREFIX, TABLETOP_PREFIX, make_vector_env, resolve_env_ids


@dataclass
class EvalConfig:
    episodes_per_task: int = 20
    # Evaluation scenes come from seeds no demonstration used (collection seeds start at
    # 10**8: envs.collection.scene_seed).
    seed: int = 100_000
    instruction_split: str = "train"  # "heldout": the paraphrases no training episode used
    max_envs: int = 25  # envs stepped as one batch (one chunk inference serves them all)
    videos_per_task: int = 1
    video_size: int = 256

    def validate(self) -> None:
        if self.episodes_per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {self.episodes_per_task}")
        if self.max_envs < 1:
            raise ValueError(f"max_envs must be >= 1, got {self.max_envs}")
        if self.instruction_split not in ("train", "heldout"):
            raise ValueError(f"instruction_split={self.instruction_split!r} is not one of ('train', 'heldout')")


def _env_kwargs(env_id: str, policy: Any, config: EvalConfig, video: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"cameras": tuple(policy.config.cameras), "image_size": policy.config.image_size}
    if env_id.startswith(TABLETOP_PREFIX):
        kwargs["instruction_split"] = config.instruction_split
    if video:
        kwargs.update(render_mode="rgb_array", render_size=config.video_size)
    return kwargs


def task_name(env_id: str) -> str:
    """``PickRed`` for ``adamoe/Tabletop-PickRed-v0``, ``reach-v3`` for ``adamoe/MetaWorld-reach-v3``."""
    if env_id.startswith(TABLETOP_PREFIX):
        return env_id.removeprefix(TABLETOP_PREFIX).removesuffix("-v0")
    return env_id.removeprefix(METAWORLD_PREFIX)


def rollout_wave(
    policy: Any, venv: gym.vector.SyncVectorEnv, seeds: list[int], record: bool
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """One episode in each of the first ``len(seeds)`` envs, stepped together until all end."""
    n = len(seeds)
    obs, info = venv.reset(seed=seeds + [seeds[-1] + 10_000 + i for i in range(venv.num_envs - n)])
    policy.reset()
    returns, lengths = np.zeros(venv.num_envs), np.zeros(venv.num_envs, dtype=int)
    success, done = np.zeros(venv.num_envs, dtype=bool), np.zeros(venv.num_envs, dtype=bool)
    done[n:] = True
    instructions = list(obs["instruction"])
    frames = [venv.envs[0].render()] if record else []
    while not done.all():
        action = np.asarray(policy.select_action(obs), dtype=np.float32)
        obs, reward, terminated, truncated, info = venv.step(action)
        live = ~done
        returns[live] += reward[live]
        lengths[live] += 1
        success[live] |= np.asarray(info["is_success"], dtype=bool)[live]
        if record and not done[0]:
            frames.append(venv.envs[0].render())
        done |= terminated | truncated
    episodes = [
        {
            "seed": int(seeds[i]),
            "instruction": str(instructions[i]),
            "return": float(returns[i]),
            "success": bool(success[i]),
            "length": int(lengths[i]),
        }
        for i in range(n)
    ]
    return episodes, frames


def evaluate(
    policy: Any,
    env_ids: str | list[str],
    config: EvalConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Roll ``policy`` out on every task of ``env_ids`` (suite names or ids); write
    ``eval_info.json`` (and ``videos/*.mp4``) under ``output_dir`` when given."""
    config = config or EvalConfig()
    config.validate()
    ids = resolve_env_ids(env_ids)
    out = Path(output_dir) if output_dir is not None else None
    was_training = getattr(policy, "training", False)
    policy.eval()
    per_episode: list[dict[str, Any]] = []
    began = time.perf_counter()
    bar = tqdm(total=len(ids) * config.episodes_per_task, desc="evaluate", unit="ep", disable=not progress)
    for task_index, env_id in enumerate(ids):
        video = out is not None and config.videos_per_task > 0
        num_envs = min(config.max_envs, config.episodes_per_task)
        venv = make_vector_env(env_id, num_envs, asynchronous=False, **_env_kwargs(env_id, policy, config, video))
        task = task_name(env_id)
        try:
            seeds = [config.seed + 1000 * task_index + i for i in range(config.episodes_per_task)]
            for wave, start in enumerate(range(0, len(seeds), num_envs)):
                chunk = seeds[start : start + num_envs]
                record = video and wave < config.videos_per_task
                episodes, frames = rollout_wave(policy, venv, chunk, record)
                for ep in episodes:
                    per_episode.append({"task": task, "env_id": env_id, **ep})
                if record and frames:
                    _write_video(frames, out / "videos" / f"{task}_seed{chunk[0]}.mp4", venv)
                bar.update(len(chunk))
        finally:
            venv.close()
    bar.close()
    if was_training:
        policy.train()
    result = summarize(per_episode)
    result["eval_config"] = asdict(config)
    result["wall_s"] = time.perf_counter() - began
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".eval_info.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out / "eval_info.json")
    return result


def summarize(per_episode: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task and overall success rate and mean return (DESIGN.md's ``eval_info.json``)."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for ep in per_episode:
        tasks.setdefault(ep["task"], []).append(ep)
    per_task = {
        task: {
            "episodes": len(eps),
            "success_rate": float(np.mean([e["success"] for e in eps])),
            "mean_return": float(np.mean([e["return"] for e in eps])),
            "mean_length": float(np.mean([e["length"] for e in eps])),
        }
        for task, eps in tasks.items()
    }
    aggregated = {
        "episodes": len(per_episode),
        "success_rate": float(np.mean([t["success_rate"] for t in per_task.values()])) if per_task else 0.0,
        "mean_return": float(np.mean([e["return"] for e in per_episode])) if per_episode else 0.0,
    }
    return {"per_episode": per_episode, "per_task": per_task, "aggregated": aggregated}


def _write_video(frames: list[np.ndarray], path: Path, venv: gym.vector.VectorEnv) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    fps = venv.envs[0].metadata.get("render_fps", 25)
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
    tmp.replace(path)
