"""MuJoCo + Gymnasium environments, scripted experts and demonstration datasets (no torch).

``import envs`` registers every env id with Gymnasium (see ``envs.registration``).
"""

from envs.rendering import ensure_gl_backend

ensure_gl_backend()  # before anything imports mujoco

from envs.experts import ScriptedExpert, TabletopExpert  # noqa: E402
from envs.ids import metaworld_id, tabletop_id, task_name  # noqa: E402
from envs.locomotion import LOCOMOTION, get_locomotion, make_locomotion_env, normalized_score  # noqa: E402
from envs.meta_world import METAWORLD_INSTRUCTIONS, MT10, MetaWorldEnv  # noqa: E402
from envs.registration import SUITES, make_expert, make_vector_env, register_envs, resolve_env_ids, suite  # noqa: E402
from envs.tabletop import CAMERAS, TabletopEnv  # noqa: E402
from envs.tasks import LONG_TASK_LIST, TASK_LIST, TASKS, LongTask, SceneState, Task, get_task  # noqa: E402

register_envs()

__all__ = [
    "CAMERAS",
    "LOCOMOTION",
    "METAWORLD_INSTRUCTIONS",
    "MT10",
    "SUITES",
    "LONG_TASK_LIST",
    "LongTask",
    "TASKS",
    "TASK_LIST",
    "MetaWorldEnv",
    "SceneState",
    "ScriptedExpert",
    "TabletopEnv",
    "TabletopExpert",
    "Task",
    "get_locomotion",
    "get_task",
    "make_expert",
    "make_locomotion_env",
    "make_vector_env",
    "metaworld_id",
    "normalized_score",
    "register_envs",
    "resolve_env_ids",
    "suite",
    "tabletop_id",
    "task_name",
]
