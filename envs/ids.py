"""Env ids and task names: the one place that spells them.

- ``adamoe/Tabletop-<Task>-v0``: a built-in tabletop task (``adamoe/Tabletop-PickRed-v0``);
- ``adamoe/MetaWorld-<task-name>``: a Meta-World v3 task (``adamoe/MetaWorld-reach-v3``).

A task name is what an id names: ``PickRed``, ``reach-v3``. Imports nothing of ``envs``, so
every module can use it without an import cycle.
"""

from __future__ import annotations

TABLETOP_PREFIX = "adamoe/Tabletop-"
TABLETOP_VERSION = "-v0"
METAWORLD_PREFIX = "adamoe/MetaWorld-"


def tabletop_id(task: str) -> str:
    """``adamoe/Tabletop-PickRed-v0`` for ``PickRed``."""
    return f"{TABLETOP_PREFIX}{task}{TABLETOP_VERSION}"


def metaworld_id(task: str) -> str:
    """``adamoe/MetaWorld-reach-v3`` for ``reach-v3``."""
    return f"{METAWORLD_PREFIX}{task}"


def is_tabletop(env_id: str) -> bool:
    return env_id.startswith(TABLETOP_PREFIX)


def is_metaworld(env_id: str) -> bool:
    return env_id.startswith(METAWORLD_PREFIX)


def task_name(env_id: str) -> str:
    """``PickRed`` for ``adamoe/Tabletop-PickRed-v0``, ``reach-v3`` for ``adamoe/MetaWorld-reach-v3``;
    any other id as it is."""
    if is_tabletop(env_id):
        return env_id.removeprefix(TABLETOP_PREFIX).removesuffix(TABLETOP_VERSION)
    return env_id.removeprefix(METAWORLD_PREFIX)


def task_env_id(task: str) -> str:
    """The env id for a tabletop task name, or ``task`` itself when it is already an id."""
    return task if "/" in task else tabletop_id(task)
