"""The robot a control loop drives: ``observe``, ``act``, ``reset``.

``MujocoRobot`` wraps a Gymnasium MuJoCo env and advances its physics in step with the
clock, like hardware: whenever it is observed or commanded, it first runs every control
step of the env that has come due since the last one, with the last command held. A
policy that is late does not pause the world; the robot keeps executing what it was told.
"""

from __future__ import annotations

from typing import Any, Protocol

import gymnasium as gym
import numpy as np


class Robot(Protocol):
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
        self._obs, self.info = self.env.reset(seed=seed)
        self._command[:] = 0.0
        self._sim_time = self.clock.now()
        self.steps, self.success, self.total_reward, self._done = 0, False, 0.0, False
        return self._obs

    def _catch_up(self) -> None:
        if self._obs is None:
            raise RuntimeError("call reset() before observe() or act()")
        due = int((self.clock.now() - self._sim_time) // self.dt)
        for _ in range(min(due, self.max_catch_up)):
            if self._done:
                break
            self._obs, reward, terminated, truncated, self.info = self.env.step(self._command)
            self.total_reward += float(reward)
            self.steps += 1
            self.success |= bool(self.info.get("is_success", False))
            self._done = bool(terminated or truncated)
        self._sim_time += due * self.dt

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
