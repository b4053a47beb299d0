"""Evaluation rollouts: a policy on Gymnasium tasks through vector envs, per-task success,
``eval_info.json`` (docs/design.md) and optional videos."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

import envs  # noqa: F401  (registers the env ids)
from envs.ids import is_tabletop, task_name
from envs.registration import make_vector_env, resolve_env_ids
from policies.io import atomic_file, write_json


@dataclass
class EvalConfig:
    episodes_per_task: int = 20
    # Evaluation scenes come from seeds no demonstration used (collection seeds start at
    # 10**8: envs.collection.scene_seed).
    seed: int = 100_000
    instruction_split: str = "train"  # "heldout": the paraphrases no training episode used
    max_envs: int = 25  # envs stepped as one batch (one chunk inference serves them all)
    # A chunking policy (``predict_action_chunk`` and ``config.n_action_steps``) infers for,
    # and steps, only the envs whose episode is still running; False: every env of the
    # wave goes through ``select_action`` and ``venv.step`` until the last episode ends (the
    # plain reference, and the path of every other policy). The two give the same episodes
    # for a deterministic policy; a sampling one (the VLA) draws its noise per batch row, so
    # its episodes differ between the paths by sampling alone.
    skip_finished: bool = True
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
    if is_tabletop(env_id):
        kwargs["instruction_split"] = config.instruction_split
    if video:
        kwargs.update(render_mode="rgb_array", render_size=config.video_size)
    return kwargs


def _chunk_steps(policy: Any) -> int | None:
    """The actions a chunking policy executes per chunk; None for any other policy."""
    steps = getattr(getattr(policy, "config", None), "n_action_steps", None)
    chunking = hasattr(policy, "predict_action_chunk") and hasattr(policy, "batch_from_observation")
    return int(steps) if chunking and isinstance(steps, int) and steps >= 1 else None


def _row(obs: Any, i: int) -> Any:
    """Env ``i``'s observation out of a vector env's batch."""
    if isinstance(obs, dict):
        return {k: _row(v, i) for k, v in obs.items()}
    return obs[i]


def _stack(rows: list[Any]) -> Any:
    """Single-env observations as one batch, laid out as a vector env lays it out."""
    if isinstance(rows[0], dict):
        return {k: _stack([r[k] for r in rows]) for k in rows[0]}
    if isinstance(rows[0], np.ndarray):
        return np.stack(rows)
    return tuple(rows)


def rollout_wave(
    policy: Any, venv: gym.vector.SyncVectorEnv, seeds: list[int], record: bool, skip_finished: bool = True
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """One episode in each of the first ``len(seeds)`` envs, stepped together until all end.
    With ``skip_finished`` (and a chunking policy), an env whose episode has ended is
    neither stepped nor inferred for; otherwise the whole batch runs until the last ends."""
    n = len(seeds)
    obs, info = venv.reset(seed=seeds + [seeds[-1] + 10_000 + i for i in range(venv.num_envs - n)])
    policy.reset()
    returns, lengths = np.zeros(venv.num_envs), np.zeros(venv.num_envs, dtype=int)
    max_reward = np.full(venv.num_envs, -np.inf)
    success, done = np.zeros(venv.num_envs, dtype=bool), np.zeros(venv.num_envs, dtype=bool)
    # Long tasks (and every tabletop task) report the stages that hold: at the end, and the most reached.
    staged = "stages_done" in info
    stages, best = np.zeros(venv.num_envs, dtype=int), np.zeros(venv.num_envs, dtype=int)
    num_stages = np.asarray(info["num_stages"], dtype=int) if staged else None
    done[n:] = True
    instructions = list(obs["instruction"])
    frames = [venv.envs[0].render()] if record else []
    steps = _chunk_steps(policy) if skip_finished else None
    singles = [_row(obs, i) for i in range(venv.num_envs)] if steps else []
    queue: dict[int, np.ndarray] = {}
    t = 0
    while not done.all():
        if steps is None:
            action = np.asarray(policy.select_action(obs), dtype=np.float32)
            obs, reward, terminated, truncated, info = venv.step(action)
        else:
            reward, terminated, truncated, info = _step_live(policy, venv, singles, queue, done, t, steps)
            t += 1
        live = ~done
        returns[live] += reward[live]
        max_reward[live] = np.maximum(max_reward[live], reward[live])
        lengths[live] += 1
        success[live] |= np.asarray(info["is_success"], dtype=bool)[live]
        if staged:
            now = np.asarray(info["stages_done"], dtype=int)
            stages[live] = now[live]
            best[live] = np.maximum(best[live], now[live])
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
            # LeRobot's names for the same episode (eval_info.json reads in its tools).
            "sum_reward": float(returns[i]),
            "max_reward": float(max_reward[i]),
            **(
                {"stages_done": int(stages[i]), "max_stages_done": int(best[i]), "num_stages": int(num_stages[i])}
                if staged
                else {}
            ),
        }
        for i in range(n)
    ]
    return episodes, frames


def _step_live(
    policy: Any,
    venv: gym.vector.SyncVectorEnv,
    singles: list[Any],
    queue: dict[int, np.ndarray],
    done: np.ndarray,
    t: int,
    steps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Step ``t`` of the envs still running: every ``steps`` steps a chunk is inferred for
    them alone (as ``select_action`` does for the whole batch), then each env takes its
    next action. Returns reward, terminated, truncated and info for every env (zeros and
    done for the finished ones), as ``venv.step`` lays them out."""
    live = np.flatnonzero(~done)
    if t % steps == 0:
        batch = policy.batch_from_observation(_stack([singles[i] for i in live]))
        with torch.no_grad():
            chunk = policy.predict_action_chunk(batch)[:, :steps].cpu().numpy()
        queue.clear()
        queue.update({int(i): chunk[j] for j, i in enumerate(live)})
    n = venv.num_envs
    reward, terminated, truncated = np.zeros(n), done.copy(), np.zeros(n, dtype=bool)
    infos: dict[int, dict[str, Any]] = {}
    for i in live:
        singles[i], r, term, trunc, infos[i] = venv.envs[i].step(np.asarray(queue[i][t % steps], dtype=np.float32))
        reward[i], terminated[i], truncated[i] = r, term, trunc
    numeric = (bool, int, float, np.number, np.bool_)
    keys = [k for k, v in next(iter(infos.values())).items() if isinstance(v, numeric)]
    info = {k: np.array([infos[i][k] if i in infos else 0 for i in range(n)]) for k in keys}
    return reward, terminated, truncated, info


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
                episodes, frames = rollout_wave(policy, venv, chunk, record, config.skip_finished)
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
    result["aggregated"]["eval_s"] = result["wall_s"]
    result["aggregated"]["eval_ep_s"] = result["wall_s"] / max(1, len(per_episode))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval_info.json", result)
    return result


def summarize(per_episode: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task and overall success rate and mean return (``eval_info.json``, docs/design.md)."""
    per_episode = [{"episode_ix": i, **ep} for i, ep in enumerate(per_episode)]  # the caller's dicts stay as given
    tasks: dict[str, list[dict[str, Any]]] = {}
    for ep in per_episode:
        tasks.setdefault(ep["task"], []).append(ep)
    per_task = {task: _aggregate(eps) for task, eps in tasks.items()}
    aggregated = _aggregate(per_episode)
    # The task mean: every task weighs the same whatever its episode count.
    aggregated["success_rate"] = float(np.mean([t["success_rate"] for t in per_task.values()])) if per_task else 0.0
    aggregated["pc_success"] = 100 * aggregated["success_rate"]
    return {"per_episode": per_episode, "per_task": per_task, "aggregated": aggregated}


def _aggregate(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Success rate, mean return and length over ``episodes``, with LeRobot's names beside
    ours (``pc_success``: percent; ``avg_sum_reward`` / ``avg_max_reward``)."""
    mean = lambda key: float(np.mean([e[key] for e in episodes])) if episodes else 0.0
    out = {"episodes": len(episodes), "success_rate": mean("success"), "mean_return": mean("return")}
    out["mean_length"] = mean("length")
    out["pc_success"] = 100 * out["success_rate"]
    out["avg_sum_reward"] = out["mean_return"]
    out["avg_max_reward"] = mean("max_reward") if all("max_reward" in e for e in episodes) else None
    if episodes and all("stages_done" in e for e in episodes):  # the share of stages that hold at the end
        out["stage_progress"] = float(np.mean([e["stages_done"] / e["num_stages"] for e in episodes]))
    return out


def _write_video(frames: list[np.ndarray], path: Path, venv: gym.vector.VectorEnv) -> None:
    import imageio.v2 as imageio

    fps = venv.envs[0].metadata.get("render_fps", 25)
    with atomic_file(path) as tmp:
        imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
