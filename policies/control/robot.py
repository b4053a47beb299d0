"""The robot a control loop drives: ``observe``, ``act``, ``reset``.

``MujocoRobot`` wraps a Gymnasium MuJoCo env and advances its physics in step with the
clock, like hardware: whenever it is observed or commanded, it first runs every control
step of the env that has come due since the last one, with the last command held. A
policy that is late does not pause the world; the robot keeps executing what it was told.

The env steps in whole control steps (``dt``), so where their boundaries fall between a
control loop's ticks matters: ``ControlLoop`` calls the optional ``align(t0)`` with its
first tick's time, which puts the boundaries on the ticks (see ``MujocoRobot.align``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import gymnasium as gym
import numpy as np


class Robot(Protocol):
    """What ``ControlLoop`` drives. A simulated robot may also have ``align(t0)``, which the
    loop calls with its first tick's time to put the simulation's steps on its ticks."""

    action_space: gym.spaces.Box

    def reset(self, seed: int | None = None) -> dict[str, Any]: ...

    def observe(self) -> dict[str, Any]: ...

    def act(self, action: np.ndarray) -> None: ...

    @property
    def done(self) -> bool: ...


class MujocoRobot:
    """A Gymnasium env run against a clock (``RealClock`` or ``SimClock``).

    The env's own control step (``dt``: 20 ms on the tabletop) is the physics granularity;
    a loop at 25 Hz sees two env steps per tick, at 50 Hz one. ``info`` keeps the last
    step's info; ``success`` is set once the task has been solved.
    """

    def __init__(self, env: gym.Env, clock: Any, dt: float | None = None, max_catch_up: int = 1000) -> None:
        self.env, self.clock = env, clock
        self.dt = float(dt if dt is not None else getattr(env.unwrapped, "dt", 1.0 / env.metadata["render_fps"]))
        if not self.dt > 0:
            raise ValueError(f"the env's control step must be > 0 s, got {self.dt}")
        space = env.action_space
        if not isinstance(space, gym.spaces.Box):
            raise TypeError(f"MujocoRobot needs a Box action space, got {space}")
        self.action_space = space
        self.max_catch_up = max_catch_up
        self._command = np.zeros(space.shape, dtype=np.float32)
        self._obs: dict[str, Any] | None = None
        self._sim_time = 0.0
        self.steps = 0
        self.success = False
        self.total_reward = 0.0
        self.info: dict[str, Any] = {}
        self._done = False

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Reset the env; its steps then come due every ``dt`` from now (until ``align``)."""
        self._obs, self.info = self.env.reset(seed=seed)
        self._command[:] = 0.0
        self._sim_time = self.clock.now()
        self.steps, self.success, self.total_reward, self._done = 0, False, 0.0, False
        return self._obs

    def _catch_up(self) -> None:
        if self._obs is None:
            raise RuntimeError("call reset() before observe() or act()")
        # A step is due once its end has passed; the tolerance absorbs floating-point error
        # in sums of dt, so a tick on a step boundary reliably sees that step done.
        due = max(0, math.floor((self.clock.now() - self._sim_time) / self.dt + 1e-6))
        for _ in range(min(due, self.max_catch_up)):
            if self._done:
                break
            self._obs, reward, terminated, truncated, self.info = self.env.step(self._command)
            self.total_reward += float(reward)
            self.steps += 1
            self.success |= bool(self.info.get("is_success", False))
            self._done = bool(terminated or truncated)
        self._sim_time += due * self.dt

    def align(self, t0: float) -> None:
        """Step on the grid ``t0 + i * dt`` from now on: the world holds still until ``t0``
        (the robot rests while the first chunk is inferred, as offline evaluation waits for
        it), and a tick at ``t0 + k * period`` observes the state right after its step
        boundary, and the command it sends drives the next step, as offline evaluation
        steps the env: observation, action, step. Without alignment the boundaries keep
        whatever phase the time between ``reset`` and the first tick gave them; a boundary
        that falls between a tick's observation and its command makes that tick observe the
        state one step old and its command miss a step (measured: 0-25% of the steps of an
        episode at 50 Hz, depending on the phase)."""
        if self._obs is None:
            raise RuntimeError("call reset() before align()")
        if not math.isfinite(t0):
            raise ValueError(f"align needs a finite time, got t0={t0!r}")
        self._sim_time = float(t0)

    def observe(self) -> dict[str, Any]:
        self._catch_up()
        return self._obs

    def act(self, action: np.ndarray) -> None:
        self._catch_up()
        self._command = np.asarray(action, dtype=np.float32).copy()

    @property
    def done(self) -> bool:
        return self._done

    def render(self) -> np.ndarray | None:
        return self.env.render()

    def close(self) -> None:
        self.env.close()
