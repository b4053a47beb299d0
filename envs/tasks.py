"""The tabletop tasks: one scene, many goals that differ only by their instruction.

Every task starts from the same distribution of scenes (as in LIBERO-Goal), so a
policy must read the instruction to know what to do. A task is a goal family (reach,
push, pick, place, stack) applied to named cubes and pads; its success check and its
shaped progress are pure functions of a :class:`SceneState`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from envs.ids import tabletop_id

CUBES = ("red", "green", "blue")
PADS = ("yellow", "purple")
CUBE_HALF = 0.02  # cube half size (m); a cube resting on the table has its centre at z = CUBE_HALF
PAD_RADIUS = 0.045
FINGER_GAP_OPEN = 0.08  # gap between the finger pads when fully open (m)
# A grasped cube keeps the fingers at least its width apart, at most its diagonal (yawed).
GRASP_GAP = (2 * CUBE_HALF - 0.004, 2 * CUBE_HALF * np.sqrt(2) + 0.004)

# environment_state layout: cube positions, cube quaternions (w, x, y, z), pad centres (x, y).
STATE_CUBE_POS = slice(0, 9)
STATE_CUBE_QUAT = slice(9, 21)
STATE_PAD_XY = slice(21, 25)
STATE_DIM = 25
# agent_pos layout: grip point (x, y, z) between the fingertips, then the finger gap (m).
AGENT_DIM = 4

REACH_HEIGHT = 0.05  # "above the cube": the grip point this far above the cube's centre
REACH_TOLERANCE = 0.02
ON_PAD_TOLERANCE = 0.03
LIFT_HEIGHT = 0.08  # a cube counts as picked up when its centre is this high


@dataclass(frozen=True)
class SceneState:
    """Everything a success check or a scripted expert needs, in metres."""

    grip: np.ndarray  # (3,)
    finger_gap: float
    cubes: dict[str, np.ndarray]  # colour -> (3,) centre
    pads: dict[str, np.ndarray]  # colour -> (2,) centre

    @classmethod
    def from_arrays(cls, agent_pos: np.ndarray, environment_state: np.ndarray) -> SceneState:
        agent_pos = np.asarray(agent_pos, dtype=np.float64)
        state = np.asarray(environment_state, dtype=np.float64)
        cube_pos = state[STATE_CUBE_POS].reshape(len(CUBES), 3)
        pad_xy = state[STATE_PAD_XY].reshape(len(PADS), 2)
        return cls(
            grip=agent_pos[:3].copy(),
            finger_gap=float(agent_pos[3]),
            cubes={c: cube_pos[i].copy() for i, c in enumerate(CUBES)},
            pads={p: pad_xy[i].copy() for i, p in enumerate(PADS)},
        )

    @classmethod
    def from_observation(cls, obs: dict) -> SceneState:
        return cls.from_arrays(obs["agent_pos"], obs["environment_state"])

    def holds(self, cube: str) -> bool:
        """The cube sits between closed fingers."""
        near = np.linalg.norm(self.grip - self.cubes[cube]) < 0.02
        return bool(near and GRASP_GAP[0] < self.finger_gap < GRASP_GAP[1])

    def released(self, cube: str) -> bool:
        """The gripper has let go: open fingers or a grip point away from the cube."""
        far = np.linalg.norm(self.grip - self.cubes[cube]) > 0.035
        return bool(far or self.finger_gap > GRASP_GAP[1] + 0.004)

    def on_table(self, cube: str) -> bool:
        return bool(self.cubes[cube][2] < CUBE_HALF + 0.01)


def _closeness(distance: float, scale: float) -> float:
    """1 at distance 0, falling smoothly towards 0 (a tolerance-style shaping term)."""
    return float(1.0 - np.tanh(distance / scale))


class _Named:
    """The names every tabletop task has, from its CamelCase ``name``."""

    name: str

    @property
    def slug(self) -> str:
        """lower-case-hyphen form used in dataset ids and file names."""
        out = [self.name[0].lower()]
        for ch in self.name[1:]:
            out.append("-" + ch.lower() if ch.isupper() else ch)
        return "".join(out)

    @property
    def env_id(self) -> str:
        return tabletop_id(self.name)


@dataclass(frozen=True)
class Task(_Named):
    """A goal in the shared scene. ``target`` is a pad colour (push, place) or a cube colour (stack)."""

    name: str  # CamelCase, as in the env id adamoe/Tabletop-<name>-v0
    family: str
    cube: str
    target: str | None
    max_episode_steps: int

    @property
    def stages(self) -> tuple[Task, ...]:
        """A one-stage task is its own only stage (:class:`LongTask` has several)."""
        return (self,)

    def stages_done(self, s: SceneState) -> int:
        """How many stages hold, in order: 1 when solved, else 0."""
        return int(self.success(s))

    def instructions(self, split: str = "train") -> tuple[str, ...]:
        """The paraphrases of this task's instruction; ``split`` is ``train`` or ``heldout``."""
        if split not in INSTRUCTION_SPLITS:
            raise ValueError(f"instruction split {split!r} is not one of {INSTRUCTION_SPLITS}")
        templates = TEMPLATES[self.family]
        chosen = templates[:-1] if split == "train" else templates[-1:]
        return tuple(t.format(cube=self.cube, target=self.target) for t in chosen)

    def success(self, s: SceneState) -> bool:
        cube = s.cubes[self.cube]
        if self.family == "reach":
            goal = cube + np.array([0.0, 0.0, REACH_HEIGHT])
            return bool(np.linalg.norm(s.grip - goal) < REACH_TOLERANCE)
        if self.family == "pick":
            return bool(cube[2] > LIFT_HEIGHT and s.holds(self.cube))
        if self.family == "push":
            on_pad = np.linalg.norm(cube[:2] - s.pads[self.target]) < ON_PAD_TOLERANCE
            return bool(on_pad and s.on_table(self.cube))
        if self.family == "place":
            on_pad = np.linalg.norm(cube[:2] - s.pads[self.target]) < ON_PAD_TOLERANCE
            return bool(on_pad and s.on_table(self.cube) and s.released(self.cube))
        if self.family == "stack":
            base = s.cubes[self.target]
            aligned = np.linalg.norm(cube[:2] - base[:2]) < 0.02
            level = abs(cube[2] - base[2] - 2 * CUBE_HALF) < 0.01
            return bool(aligned and level and s.on_table(self.target) and s.released(self.cube))
        raise AssertionError(self.family)

    def progress(self, s: SceneState) -> float:
        """Shaped progress in [0, 1], equal to 1 exactly when the task is solved."""
        if self.success(s):
            return 1.0
        cube = s.cubes[self.cube]
        to_cube = _closeness(float(np.linalg.norm(s.grip - cube)), 0.1)
        if self.family == "reach":
            goal = cube + np.array([0.0, 0.0, REACH_HEIGHT])
            return 0.9 * _closeness(float(np.linalg.norm(s.grip - goal)), 0.1)
        if self.family == "pick":
            held = s.holds(self.cube)
            lift = np.clip((cube[2] - CUBE_HALF) / (LIFT_HEIGHT - CUBE_HALF), 0.0, 1.0) if held else 0.0
            return 0.3 * to_cube + 0.2 * held + 0.4 * lift
        if self.family == "push":
            to_pad = _closeness(float(np.linalg.norm(cube[:2] - s.pads[self.target])), 0.1)
            return 0.2 * to_cube + 0.7 * to_pad
        if self.family in ("place", "stack"):
            if self.family == "place":
                goal = np.array([*s.pads[self.target], CUBE_HALF])
            else:
                goal = s.cubes[self.target] + np.array([0.0, 0.0, 2 * CUBE_HALF])
            to_goal = _closeness(float(np.linalg.norm(cube - goal)), 0.1)
            held = s.holds(self.cube)
            return 0.2 * to_cube + 0.1 * held + 0.6 * to_goal
        raise AssertionError(self.family)


INSTRUCTION_SPLITS = ("train", "heldout")

# The last template of each family is held out: policies never see it in training.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "reach": (
        "move the gripper above the {cube} cube",
        "reach for the {cube} cube",
        "put your hand over the {cube} block",
        "hover right on top of the {cube} box",
    ),
    "pick": (
        "pick up the {cube} cube",
        "lift the {cube} cube off the table",
        "grab the {cube} block and raise it",
        "take hold of the {cube} box and hold it up in the air",
    ),
    "push": (
        "push the {cube} cube onto the {target} pad",
        "slide the {cube} cube to the {target} pad",
        "shove the {cube} block over to the {target} target",
        "nudge the {cube} box along the table until it sits on the {target} mat",
    ),
    "place": (
        "put the {cube} cube on the {target} pad",
        "place the {cube} cube onto the {target} pad",
        "pick up the {cube} block and set it down on the {target} target",
        "carry the {cube} box over and drop it on the {target} mat",
    ),
    "stack": (
        "stack the {cube} cube on the {target} cube",
        "put the {cube} cube on top of the {target} cube",
        "place the {cube} block onto the {target} block",
        "build a tower with the {cube} box resting on the {target} box",
    ),
}

_STEPS = {"reach": 60, "pick": 120, "push": 200, "place": 200, "stack": 200}


def _task(family: str, cube: str, target: str | None = None) -> Task:
    words = [family.capitalize(), cube.capitalize()]
    if family in ("push", "place"):
        words += ["To", target.capitalize(), "Pad"] if family == "push" else ["On", target.capitalize(), "Pad"]
    elif family == "stack":
        words += ["On", target.capitalize()]
    return Task("".join(words), family, cube, target, _STEPS[family])


TASK_LIST: tuple[Task, ...] = (
    _task("reach", "red"),
    _task("reach", "blue"),
    _task("pick", "red"),
    _task("pick", "green"),
    _task("pick", "blue"),
    _task("push", "red", "yellow"),
    _task("push", "green", "purple"),
    _task("place", "blue", "yellow"),
    _task("place", "red", "purple"),
    _task("place", "green", "yellow"),
    _task("stack", "red", "green"),
    _task("stack", "blue", "red"),
)
TASKS: dict[str, Task] = {t.name: t for t in TASK_LIST}


# -- long-horizon tasks -------------------------------------------------------------------

# Short phrases for the stages of a long task, so that a whole instruction fits the 16 words
# a VLA reads (``VLAConfig.max_words``): the colours name the cubes and pads unambiguously.
# As in TEMPLATES, the last phrase of each family and the last connector are held out.
STAGE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "push": ("push {cube} to {target}", "slide {cube} onto {target}", "nudge {cube} over to {target}"),
    "place": ("put {cube} on {target}", "place {cube} onto {target}", "carry {cube} over to {target}"),
    "stack": ("stack {cube} on {target}", "set {cube} atop {target}", "rest {cube} upon {target}"),
    "pick": ("pick up {cube}", "lift {cube}", "raise {cube} up"),
}
CONNECTORS = ("then", "and then", "afterwards")
MAX_INSTRUCTION_WORDS = 16


@dataclass(frozen=True)
class LongTask(_Named):
    """Base skills done in order (LIBERO-Long style): solved when every stage's goal holds
    at the same time, at the end. ``stages_done`` counts the stages that hold, in order,
    and ``progress`` is ``(stages done + the next stage's progress) / stages``."""

    name: str
    stages: tuple[Task, ...]

    family = "long"

    def __post_init__(self) -> None:
        if len(self.stages) < 2:
            raise ValueError(f"a long task has at least 2 stages, {self.name} has {len(self.stages)}")
        for stage in self.stages:
            if stage.family not in STAGE_TEMPLATES:
                raise ValueError(f"{stage.family!r} is not a stage family; valid: {sorted(STAGE_TEMPLATES)}")

    @property
    def max_episode_steps(self) -> int:
        return sum(stage.max_episode_steps for stage in self.stages)

    def instructions(self, split: str = "train") -> tuple[str, ...]:
        """Every combination of the stages' phrases and connectors of ``split``."""
        if split not in INSTRUCTION_SPLITS:
            raise ValueError(f"instruction split {split!r} is not one of {INSTRUCTION_SPLITS}")
        pick = (lambda options: options[:-1]) if split == "train" else (lambda options: options[-1:])
        phrases = [
            [t.format(cube=stage.cube, target=stage.target) for t in pick(STAGE_TEMPLATES[stage.family])]
            for stage in self.stages
        ]
        out = []
        for connector in pick(CONNECTORS):
            for combination in itertools.product(*phrases):
                out.append(f" {connector} ".join(combination))
        return tuple(out)

    def stages_done(self, s: SceneState) -> int:
        done = 0
        for stage in self.stages:
            if not stage.success(s):
                break
            done += 1
        return done

    def success(self, s: SceneState) -> bool:
        return self.stages_done(s) == len(self.stages)

    def progress(self, s: SceneState) -> float:
        done = self.stages_done(s)
        if done == len(self.stages):
            return 1.0
        return (done + self.stages[done].progress(s)) / len(self.stages)


def _long(*stages: Task) -> LongTask:
    return LongTask("Then".join(stage.name for stage in stages), tuple(stages))


# The fine-tuning suite (``tabletop-long``): long-horizon compositions of the base skills,
# and base skills on cube-pad or cube-cube pairings that no base task uses.
LONG_TASK_LIST: tuple[Task | LongTask, ...] = (
    _long(_task("place", "red", "yellow"), _task("stack", "green", "red")),
    _long(_task("push", "green", "yellow"), _task("pick", "blue")),
    _long(_task("place", "blue", "purple"), _task("place", "red", "yellow")),
    _long(_task("place", "red", "yellow"), _task("place", "blue", "purple"), _task("stack", "green", "blue")),
    _task("push", "blue", "yellow"),
    _task("place", "green", "purple"),
    _task("stack", "green", "blue"),
)
ALL_TASKS: dict[str, Task | LongTask] = {t.name: t for t in (*TASK_LIST, *LONG_TASK_LIST)}


def get_task(name: str) -> Task | LongTask:
    """Look a task up by its name (``PickRed``) or slug (``pick-red``), base or long."""
    if name in ALL_TASKS:
        return ALL_TASKS[name]
    for task in ALL_TASKS.values():
        if task.slug == name:
            return task
    raise ValueError(f"unknown tabletop task {name!r}; valid tasks are {sorted(ALL_TASKS)}")
