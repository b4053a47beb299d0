"""Scripted experts: state machines on ``environment_state`` that solve each task.

``envs.make_expert(env_id, noise)`` (in ``envs/registration.py``) is the public entry point. An expert is an object with
``reset()`` and ``act(obs) -> action``; noise is Gaussian on every action dimension
(standard deviation ``noise``) plus, optionally, a probability of a uniformly random
action, so demonstrations can span a range of quality.

``act_with_label(obs) -> (executed, clean)`` also returns the noise-free action the
expert meant in that state. Collection executes the noisy action and records the clean
one as the label (DART, Laskey et al. 2017): the noise shows a policy the states it
will drift into, and the label says how to recover from them, instead of teaching it to
imitate the noise.
"""

from __future__ import annotations

import numpy as np

from envs.tabletop import ACTION_SCALE
from envs.tasks import CUBE_HALF, LongTask, SceneState, Task

OPEN, CLOSE = -1.0, 1.0
SAFE_HEIGHT = 0.09  # grip height for moving across the table: fingertips clear every cube
CARRY_HEIGHT = 0.12  # a held cube's bottom clears every other cube
GAIN = 0.6  # fraction of the remaining error commanded per step (before the per-step clip)


def move_towards(grip: np.ndarray, target: np.ndarray, gripper: float, gain: float = GAIN) -> np.ndarray:
    delta = np.clip(gain * (target - grip) / ACTION_SCALE, -1.0, 1.0)
    return np.array([*delta, gripper])


class ScriptedExpert:
    """Base of every scripted expert: a clean action from ``_clean_action`` plus noise.

    ``_clean_action`` runs exactly once per step (a phase machine advances in it), so
    ``act`` and ``act_with_label`` are the two views of one step, never called together.
    """

    def __init__(self, noise: float = 0.0, random_action_prob: float = 0.0, seed: int | None = None):
        if not np.isfinite(noise) or noise < 0:  # NaN would pass a `< 0` test
            raise ValueError(f"noise must be a finite number >= 0, got {noise}")
        if not 0.0 <= random_action_prob <= 1.0:
            raise ValueError(f"random_action_prob must be in [0, 1], got {random_action_prob}")
        self.noise = float(noise)
        self.random_action_prob = float(random_action_prob)
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: dict) -> np.ndarray:
        """The action to execute: the clean action with this expert's noise."""
        return self.act_with_label(obs)[0]

    def act_with_label(self, obs: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(executed, clean)``: the noisy action to execute and the noise-free one, both
        ``float32 (4,)`` in the action space; equal when the expert has no noise."""
        action = self._clean_action(obs)
        clean = np.clip(action, -1.0, 1.0).astype(np.float32)
        if self.random_action_prob and self.rng.random() < self.random_action_prob:
            action = self.rng.uniform(-1.0, 1.0, size=4)
        elif self.noise:
            action = action + self.rng.normal(0.0, self.noise, size=4)
        return np.clip(action, -1.0, 1.0).astype(np.float32), clean

    def _clean_action(self, obs: dict) -> np.ndarray:
        raise NotImplementedError


class TabletopExpert(ScriptedExpert):
    """A phase machine per goal family; every phase re-reads the scene, so it recovers
    from a dropped cube or a cube knocked aside by noise."""

    def __init__(self, task: Task, noise: float = 0.0, random_action_prob: float = 0.0, seed: int | None = None):
        self.task = task
        super().__init__(noise, random_action_prob, seed)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.phase = "approach"
        self.timer = 0

    def _clean_action(self, obs: dict) -> np.ndarray:
        return getattr(self, f"_{self.task.family}")(SceneState.from_observation(obs))

    def _set(self, phase: str) -> None:
        self.phase, self.timer = phase, 0

    # -- goal families -------------------------------------------------------------

    def _reach(self, s: SceneState) -> np.ndarray:
        goal = s.cubes[self.task.cube] + np.array([0.0, 0.0, 0.05])
        return move_towards(s.grip, goal, OPEN)

    def _pick(self, s: SceneState) -> np.ndarray:
        return self._grasp_then(s, lambda held: move_towards(s.grip, held_lift(s), CLOSE))

    def _place(self, s: SceneState) -> np.ndarray:
        pad = s.pads[self.task.target]
        return self._grasp_then(s, lambda held: self._carry_and_release(s, np.array([*pad, CUBE_HALF])))

    def _stack(self, s: SceneState) -> np.ndarray:
        base = s.cubes[self.task.target]
        return self._grasp_then(s, lambda held: self._carry_and_release(s, base + np.array([0.0, 0.0, 2 * CUBE_HALF])))

    def _grasp_then(self, s: SceneState, after) -> np.ndarray:
        """Approach from above, descend open, close, then hand over to ``after``."""
        cube = s.cubes[self.task.cube]
        self.timer += 1
        if self.phase in ("carry", "lower", "release", "retreat"):
            return after(True)
        if self.phase == "lift":
            if np.linalg.norm(s.grip - cube) > 0.03:  # dropped it: start again
                self._set("approach")
            else:
                return after(True)
        if self.phase == "approach":
            above = cube + np.array([0.0, 0.0, SAFE_HEIGHT - CUBE_HALF])
            if np.linalg.norm(s.grip[:2] - cube[:2]) < 0.006 and abs(s.grip[2] - above[2]) < 0.03:
                self._set("descend")
            else:
                return move_towards(s.grip, above, OPEN)
        if self.phase == "descend":
            if np.linalg.norm(s.grip[:2] - cube[:2]) > 0.015:
                self._set("approach")
                return move_towards(s.grip, s.grip + np.array([0, 0, 0.02]), OPEN)
            if abs(s.grip[2] - cube[2]) < 0.006:
                self._set("close")
            else:
                return move_towards(s.grip, cube, OPEN)
        if self.phase == "close":
            if self.timer > 5 and s.holds(self.task.cube):
                self._set("lift")
                return after(True)
            if self.timer > 15:  # fingers never met the cube: retry
                self._set("approach")
            return move_towards(s.grip, cube, CLOSE)
        return move_towards(s.grip, cube + np.array([0.0, 0.0, SAFE_HEIGHT]), OPEN)

    def _carry_and_release(self, s: SceneState, goal: np.ndarray) -> np.ndarray:
        """Carry the held cube above ``goal`` (its centre's final position), lower, let go, back off."""
        cube = s.cubes[self.task.cube]
        offset = s.grip - cube  # keep the grasp offset so the cube, not the grip point, hits the goal
        if self.phase == "lift":
            self._set("carry")
        if self.phase == "carry":
            if np.linalg.norm(s.grip - cube) > 0.03:
                self._set("approach")
                return move_towards(s.grip, s.grip + np.array([0, 0, 0.02]), OPEN)
            above = np.array([*(goal[:2] + offset[:2]), CARRY_HEIGHT])
            if cube[2] < CARRY_HEIGHT - 0.04 and np.linalg.norm(s.grip[:2] - above[:2]) > 0.01:
                return move_towards(s.grip, np.array([*s.grip[:2], CARRY_HEIGHT]), CLOSE)  # up first
            if np.linalg.norm(cube[:2] - goal[:2]) < 0.006:
                self._set("lower")
            else:
                return move_towards(s.grip, above, CLOSE)
        if self.phase == "lower":
            target = goal + offset + np.array([0.0, 0.0, 0.004])
            if cube[2] - goal[2] < 0.008:
                self._set("release")
            else:
                return move_towards(s.grip, target, CLOSE, gain=0.4)
        if self.phase == "release":
            if self.timer > 6:
                self._set("retreat")
            return np.array([0.0, 0.0, 0.0, OPEN])
        return move_towards(s.grip, np.array([*s.grip[:2], SAFE_HEIGHT + 0.03]), OPEN)

    def _push(self, s: SceneState) -> np.ndarray:
        cube = s.cubes[self.task.cube]
        pad = s.pads[self.task.target]
        to_pad = pad - cube[:2]
        direction = to_pad / max(np.linalg.norm(to_pad), 1e-6)
        behind = cube[:2] - direction * (CUBE_HALF + 0.032)  # fingers' centre just behind the cube
        push_height = CUBE_HALF + 0.004  # fingertips clear the table
        self.timer += 1
        if self.phase == "approach":
            above = np.array([*behind, SAFE_HEIGHT])
            if np.linalg.norm(s.grip[:2] - behind) < 0.006:
                self._set("lower")
            else:
                return move_towards(s.grip, above, CLOSE)
        if self.phase == "lower":
            if np.linalg.norm(s.grip[:2] - behind) > 0.015:
                self._set("approach")
            elif s.grip[2] < push_height + 0.006:
                self._set("push")
            else:
                return move_towards(s.grip, np.array([*behind, push_height]), CLOSE)
        if self.phase == "push":
            rel = s.grip[:2] - cube[:2]
            along = float(rel @ direction)  # about -0.04 while the fingers touch the cube
            across = rel - along * direction
            if np.linalg.norm(across) > 0.012 or along > -0.025 or along < -0.075:
                self._set("rise")  # off the line through the cube to the pad: line up again
            else:
                forward = min(0.015, float(np.linalg.norm(to_pad)) + 0.004)
                aim = s.grip[:2] + direction * forward - across * 0.5
                return move_towards(s.grip, np.array([*aim, push_height]), CLOSE, gain=1.0)
        if self.phase == "rise":
            if s.grip[2] > SAFE_HEIGHT - 0.02:
                self._set("approach")
            return move_towards(s.grip, np.array([*s.grip[:2], SAFE_HEIGHT]), CLOSE)
        return move_towards(s.grip, np.array([*behind, SAFE_HEIGHT]), CLOSE)


def held_lift(s: SceneState) -> np.ndarray:
    return np.array([*s.grip[:2], 0.15])


class LongTaskExpert(ScriptedExpert):
    """One :class:`TabletopExpert` per stage, each taking over when the stages before it
    hold; a stage undone later (a placed cube knocked off its pad) is done again."""

    def __init__(self, task: LongTask, noise: float = 0.0, random_action_prob: float = 0.0, seed: int | None = None):
        self.task = task
        self.experts = [TabletopExpert(stage) for stage in task.stages]  # clean: the noise is added once, here
        super().__init__(noise, random_action_prob, seed)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.stage, self.clearing, self.gripper = 0, False, OPEN
        for expert in self.experts:
            expert.reset()

    def _clean_action(self, obs: dict) -> np.ndarray:
        s = SceneState.from_observation(obs)
        stage = min(self.task.stages_done(s), len(self.experts) - 1)
        if stage != self.stage:
            # A stage just came to hold (or one before it was undone): first rise straight
            # up from where the last stage left the hand, so that moving on does not drag
            # the cube it just let go of.
            self.stage, self.clearing = stage, True
            self.experts[stage].reset()
        if self.clearing:
            if s.grip[2] < SAFE_HEIGHT:
                return move_towards(s.grip, self._clear_of(s), self.gripper)
            self.clearing = False
        action = self.experts[stage]._clean_action(obs)
        self.gripper = float(action[3])
        return action

    def _clear_of(self, s: SceneState) -> np.ndarray:
        """Up, and 2 cm back from the cube the last stage moved (the hand trails the
        commanded position: holding still would carry a pushed cube past its pad)."""
        cube = s.cubes[self.task.stages[max(self.stage - 1, 0)].cube]
        away = s.grip[:2] - cube[:2]
        norm = float(np.linalg.norm(away))
        back = away / norm * 0.02 if norm > 0.005 else np.zeros(2)
        return np.array([*(s.grip[:2] + back), SAFE_HEIGHT + 0.02])
