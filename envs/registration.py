"""Gymnasium ids, suites and vector envs for every env of the project.

``import envs`` registers:
- ``adamoe/Tabletop-<Task>-v0`` for each built-in tabletop task: the twelve of the
  ``tabletop`` suite and the seven of ``tabletop-long`` (long-horizon and unseen pairings);
- ``adamoe/MetaWorld-<task-name>`` for each Meta-World v3 task (``adamoe/MetaWorld-reach-v3``),
  registered even when Meta-World is not installed, so asking for one says how to install it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym

from envs.experts import LongTaskExpert, TabletopExpert
from envs.ids import METAWORLD_PREFIX, TABLETOP_PREFIX, is_metaworld, is_tabletop, metaworld_id, task_name
from envs.meta_world import METAWORLD_INSTRUCTIONS, MT10, MetaWorldExpert
from envs.tasks import LONG_TASK_LIST, TASK_LIST, LongTask, get_task


def register_envs() -> None:
    for task in (*TASK_LIST, *LONG_TASK_LIST):
        if task.env_id not in gym.registry:
            gym.register(
                id=task.env_id,
                entry_point="envs.tabletop:TabletopEnv",
                kwargs={"task": task.name},
                max_episode_steps=task.max_episode_steps,
            )
    for name in METAWORLD_INSTRUCTIONS:
        env_id = metaworld_id(name)
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point="envs.meta_world:MetaWorldEnv",
                kwargs={"task": name},
                max_episode_steps=500,
            )


SUITES: dict[str, tuple[str, ...]] = {
    "tabletop": tuple(task.env_id for task in TASK_LIST),
    "tabletop-long": tuple(task.env_id for task in LONG_TASK_LIST),
    "mt10": tuple(metaworld_id(name) for name in MT10),
    "metaworld": tuple(metaworld_id(name) for name in METAWORLD_INSTRUCTIONS),
}


def suite(name: str) -> tuple[str, ...]:
    """The env ids of a named suite (``tabletop``, ``mt10``, ``metaworld``)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites are {sorted(SUITES)}")
    return SUITES[name]


def resolve_env_ids(names: str | Sequence[str]) -> tuple[str, ...]:
    """Expand suite names and check env ids: ``"tabletop"``, ``["adamoe/Tabletop-PickRed-v0"]``..."""
    names = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for name in names:
        if name in SUITES:
            out.extend(SUITES[name])
        elif name in gym.registry:
            out.append(name)
        else:
            known = sorted(SUITES) + sorted(e for e in gym.registry if e.startswith("adamoe/"))
            raise ValueError(f"unknown env or suite {name!r}; valid names are {known}")
    return tuple(out)


def make_vector_env(
    env_ids: str | Sequence[str],
    num_envs_per_task: int = 1,
    asynchronous: bool = True,
    **kwargs,
) -> gym.vector.VectorEnv:
    """One vector env over several tasks (a suite name or env ids), ``num_envs_per_task`` copies each.

    Every task of a suite shares its observation and action spaces, so a suite steps as
    one batch; ``kwargs`` go to every ``gym.make``.
    """
    if num_envs_per_task < 1:
        raise ValueError(f"num_envs_per_task must be >= 1, got {num_envs_per_task}")
    ids = resolve_env_ids(env_ids)
    fns: list[Callable[[], gym.Env]] = [_maker(env_id, kwargs) for env_id in ids for _ in range(num_envs_per_task)]
    if asynchronous and len(fns) > 1:
        # Gymnasium's shared-memory transport garbles Text spaces (every string comes back as
        # "aaa..."), so observations travel through the pipes; spawn, because a forked
        # worker would inherit the parent's OpenGL state.
        return gym.vector.AsyncVectorEnv(fns, shared_memory=False, context="spawn")
    return gym.vector.SyncVectorEnv(fns)


def _maker(env_id: str, kwargs: dict) -> Callable[[], gym.Env]:
    def make() -> gym.Env:
        import envs  # noqa: F401  (registers the ids in a spawned worker)

        return gym.make(env_id, **kwargs)

    return make


def make_expert(env_id: str, noise: float = 0.0, random_action_prob: float = 0.0, seed: int | None = None):
    """The scripted expert for a registered env id (tabletop or Meta-World)."""
    if is_tabletop(env_id):
        task = get_task(task_name(env_id))
        expert = LongTaskExpert if isinstance(task, LongTask) else TabletopExpert
        return expert(task, noise, random_action_prob, seed)
    if is_metaworld(env_id):
        return MetaWorldExpert(task_name(env_id), noise, random_action_prob, seed)
    raise ValueError(
        f"no scripted expert for {env_id!r}; experts exist for "
        f"{TABLETOP_PREFIX}<Task>-v0 and {METAWORLD_PREFIX}<task-name> ids"
    )
