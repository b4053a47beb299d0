"""Decision Transformer rollouts: return-conditioned episodes in Gymnasium envs, batched
over episodes, and normalised returns (0 = random policy, 100 = reference expert)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

import envs  # noqa: F401  (registers the env ids)
from envs.ids import is_tabletop
from envs.locomotion import LOCOMOTION
from policies.dt.data import flatten_observations
from policies.dt.modeling_dt import DecisionTransformer

EVAL_SEED = 100_000  # evaluation scenes come from seeds no demonstration used


def env_kwargs(env_id: str) -> dict[str, Any]:
    """State-only envs: the tabletop without cameras; anything else as registered."""
    return {"cameras": ()} if is_tabletop(env_id) else {}


def _state(obs: Any) -> np.ndarray:
    if isinstance(obs, dict):
        return flatten_observations({k: np.asarray(v)[None] for k, v in obs.items() if not isinstance(v, str)})[0]
    return np.asarray(obs, dtype=np.float32).reshape(-1)


def run_episodes(
    env_id: str,
    episodes: int,
    seed: int,
    act: Any,
    max_steps: int | None = None,
    progress: bool = False,
    desc: str = "",
) -> list[dict[str, Any]]:
    """``episodes`` episodes from seeds ``seed, seed + 1, ...``, stepped together.

    ``act(states (n, S), step_rewards (n,), alive index list) -> actions (n, A)`` is called
    once per step for the episodes still running. Returns per episode: seed, return,
    success, length.
    """
    kwargs = env_kwargs(env_id)
    envs_ = [gym.make(env_id, **kwargs) for _ in range(episodes)]
    try:
        obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs_)]
        if hasattr(act, "start"):
            act.start(episodes)
        limit = max_steps or envs_[0].spec.max_episode_steps or 1000
        returns = np.zeros(episodes)
        success = np.zeros(episodes, dtype=bool)
        lengths = np.zeros(episodes, dtype=int)
        alive = list(range(episodes))
        last_rewards = np.zeros(episodes)
        bar = tqdm(total=limit, desc=desc or f"eval {env_id}", disable=not progress, leave=False)
        for _ in range(limit):
            if not alive:
                break
            states = np.stack([_state(obs[i]) for i in alive])
            actions = np.asarray(act(states, last_rewards[alive], alive))
            running = []
            for j, i in enumerate(alive):
                obs[i], reward, terminated, truncated, info = envs_[i].step(actions[j])
                returns[i] += reward
                last_rewards[i] = reward
                lengths[i] += 1
                success[i] |= bool(info.get("is_success", info.get("success", False)))
                if not (terminated or truncated or lengths[i] >= limit):
                    running.append(i)
            alive = running
            bar.update(1)
        bar.close()
    finally:
        for env in envs_:
            env.close()
    return [
        {"seed": seed + i, "return": float(returns[i]), "success": bool(success[i]), "length": int(lengths[i])}
        for i in range(episodes)
    ]


class DTActor:
    """Keeps each episode's history and asks the model for the next action."""

    def __init__(self, model: DecisionTransformer, task: str, target_return: float, device: str = "cpu") -> None:
        self.model, self.task, self.target = model.eval(), task, float(target_return)
        self.device = torch.device(device)
        self.spec = model.config.task(task)

    def start(self, n: int) -> None:
        self.states: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.actions: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.rtg: list[list[float]] = [[] for _ in range(n)]

    def __call__(self, states: np.ndarray, rewards: np.ndarray, alive: list[int]) -> np.ndarray:
        k = self.model.config.context_length
        for j, i in enumerate(alive):
            previous = self.rtg[i][-1] if self.rtg[i] else self.target
            self.rtg[i].append(previous - float(rewards[j]) if self.states[i] else self.target)
            self.states[i].append(states[j])
            self.actions[i].append(np.zeros(self.spec.act_dim, dtype=np.float32))
        t = len(self.states[alive[0]])
        # Every episode starts together, so the running ones have all taken t steps.
        s = torch.as_tensor(np.stack([np.stack(self.states[i][-k:]) for i in alive]), device=self.device)
        a = torch.as_tensor(np.stack([np.stack(self.actions[i][-k:]) for i in alive]), device=self.device)
        r = torch.as_tensor(np.array([self.rtg[i][-k:] for i in alive], dtype=np.float32), device=self.device)
        steps = torch.arange(max(0, t - k), t, device=self.device).expand(len(alive), -1)
        action = self.model.get_action(s, a, r, steps, task=self.task).cpu().numpy()
        for j, i in enumerate(alive):
            self.actions[i][-1] = action[j]
        return action


def evaluate_task(
    model: DecisionTransformer,
    task: str,
    episodes: int = 20,
    seed: int = EVAL_SEED,
    target_return: float | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    spec = model.config.task(task)
    if not spec.env_id:
        raise ValueError(f"task {task!r} names no env_id to evaluate in")
    target = spec.target_return if target_return is None else target_return
    return run_episodes(spec.env_id, episodes, seed, DTActor(model, task, target, device), progress=progress)


def random_policy_episodes(env_id: str, episodes: int, seed: int = EVAL_SEED) -> list[dict[str, Any]]:
    """Uniformly random actions (seeded), the 0 of the normalised return."""
    rng = np.random.default_rng(seed)
    space = gym.make(env_id, **env_kwargs(env_id)).action_space
    return run_episodes(
        env_id,
        episodes,
        seed,
        lambda states, rewards, alive: rng.uniform(space.low, space.high, (len(alive), *space.shape)),
    )


def expert_episodes(env_id: str, episodes: int, seed: int = EVAL_SEED) -> list[dict[str, Any]]:
    """The scripted expert at zero noise, the 100 of the normalised return (manipulation).
    Experts read the full observation dict, so they run through their own loop."""
    out = []
    for i in range(episodes):
        env = gym.make(env_id, **env_kwargs(env_id))
        expert = envs.make_expert(env_id, noise=0.0)
        try:
            obs, _ = env.reset(seed=seed + i)
            expert.reset(seed=seed + i)
            ret, success, length, done = 0.0, False, 0, False
            while not done:
                obs, reward, terminated, truncated, info = env.step(expert.act(obs))
                ret, length = ret + reward, length + 1
                success |= bool(info.get("is_success", False))
                done = terminated or truncated
        finally:
            env.close()
        out.append({"seed": seed + i, "return": float(ret), "success": bool(success), "length": length})
    return out


def reference_returns(env_id: str, episodes: int = 20, seed: int = EVAL_SEED) -> dict[str, float]:
    """``{"random": R0, "expert": R100}``: D4RL's for locomotion, measured on the evaluation
    seeds otherwise (random actions; the scripted expert at zero noise)."""
    for task in LOCOMOTION.values():
        if task.env_id == env_id:
            return {"random": task.random_return, "expert": task.expert_return}
    rand = random_policy_episodes(env_id, episodes, seed)
    expert = expert_episodes(env_id, episodes, seed)
    return {
        "random": float(np.mean([e["return"] for e in rand])),
        "expert": float(np.mean([e["return"] for e in expert])),
        "expert_success": float(np.mean([e["success"] for e in expert])),
        "random_success": float(np.mean([e["success"] for e in rand])),
    }


def normalized_return(value: float, reference: dict[str, float]) -> float:
    span = reference["expert"] - reference["random"]
    if span == 0:
        raise ValueError(f"reference returns are equal ({reference}); cannot normalise")
    return 100.0 * (value - reference["random"]) / span
