"""A fixed-rate control loop with synchronous or asynchronous chunk inference.

Tick ``k`` is due at ``t0 + k * period`` on a monotonic clock (no drift accumulates). At
each tick the loop observes the robot, takes the action planned for that tick, makes it
safe and sends it. Where the actions come from:

- ``mode="sync"``: when nothing is planned, infer a chunk right there (the tick stalls;
  every deadline that passes meanwhile is counted as missed) and plan its first
  ``n_action_steps`` actions for the ticks that follow, as LeRobot's ``select_action``.
- ``mode="async"``: when the actions planned ahead fall to ``threshold``, a background
  worker infers a chunk from the current observation (tick ``k_obs``). When it arrives,
  actions for ticks that already passed (the measured latency) are dropped and the rest
  are merged into the plan by ``merge``: ``latest`` (the new chunk wins), ``average``
  (a weighted average where chunks overlap) or ``temporal_ensemble`` (ACT: every
  prediction for a tick, weighted ``exp(-m * i)`` with ``i = 0`` the oldest). A tick
  never waits for inference; a tick with nothing planned holds the last action (starved).

Safety: actions are clamped to the action space and to a maximum change per tick; an
exception in inference stops the robot safely (hold for ``stop_hold_ticks`` ticks, then
zero motion) and is reported. Telemetry per tick and per chunk lives in preallocated
arrays, so a long run does not grow in memory.
"""

from __future__ import annotations

import gc
import math
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.control.clock import RealClock, SimClock, make_executor
from policies.control.config import MERGE_RULES, MODES, ChunkFn, ControlConfig
from policies.control.plan import ActionPlan, auto_threshold
from policies.control.safety import SafetyFilter, check_chunk
from policies.control.telemetry import ControlResult, Telemetry, format_summary, summarize

__all__ = [
    "MERGE_RULES",
    "MODES",
    "ActionPlan",
    "ChunkFn",
    "ControlConfig",
    "ControlLoop",
    "ControlResult",
    "SafetyFilter",
    "Telemetry",
    "format_summary",
]


@dataclass
class _Run:
    """One run's state: the tick, the plan, the last action sent, faults and telemetry."""

    plan: ActionPlan
    tel: Telemetry
    last: np.ndarray
    executor: Any  # async: the inference worker; sync: None
    t0: float = 0.0
    k: int = 0  # the tick index (executed plus missed ticks)
    horizon: int | None = None  # H, once a chunk has been seen
    error: str | None = None
    stop_tick: int | None = None  # set by an inference error: the safe stop starts here
    missed_total: int = 0
    missed_pending: int = 0  # misses since the last executed tick (recorded with it)
    recent: deque = field(default_factory=lambda: deque(maxlen=20))  # latest inference latencies
    frames: list = field(default_factory=list)

    def miss(self, ticks: int) -> None:
        self.missed_total += ticks
        self.missed_pending += ticks
        self.k += ticks

    def fail(self, exc: BaseException) -> None:
        """An inference error: remember it and start the safe stop at this tick."""
        self.error = "".join(traceback.format_exception_only(exc)).strip()
        self.stop_tick = self.k


class ControlLoop:
    """Runs ``chunk_fn`` (observation -> ``(H, action_dim)`` actions) on ``robot`` at a fixed rate."""

    def __init__(self, robot: Any, chunk_fn: ChunkFn, config: ControlConfig, clock: RealClock | SimClock) -> None:
        config.validate()
        self.robot, self.chunk_fn, self.config, self.clock = robot, chunk_fn, config, clock
        space = robot.action_space
        self.safety = SafetyFilter(np.asarray(space.low), np.asarray(space.high), config.max_delta)
        self.action_dim = int(np.prod(space.shape))
        n = self.action_dim
        self.motion = list(config.motion_dims) if config.motion_dims is not None else list(range(n))

    def run(self, seed: int | None = None, callback: Callable[[int], None] | None = None) -> ControlResult:
        """Reset the robot and run ticks until ``max_ticks``, the episode's end or a safe stop;
        ``callback(ticks_done)`` after every executed tick."""
        cfg, clock = self.config, self.clock
        self.robot.reset(seed=seed)
        executor = make_executor(clock) if cfg.mode == "async" else None
        plan = ActionPlan(cfg.merge, cfg.average_weight, cfg.ensemble_m)
        run = _Run(plan, Telemetry(cfg.max_ticks), np.zeros(self.action_dim, dtype=np.float32), executor)
        primed = self._prime(run) if executor is not None and cfg.prime else None
        # Real time: no cyclic garbage collection pauses inside the loop (the loop allocates
        # little, and telemetry is preallocated); collected once at the end.
        pause_gc = gc.isenabled() and isinstance(clock, RealClock)
        if pause_gc:
            gc.disable()
        run.t0 = clock.now()
        if primed is not None:
            run.tel.chunk(submitted=primed[0] - run.t0, finished=primed[1] - run.t0, obs_tick=0, dropped=0)
        try:
            while run.k < cfg.max_ticks and self._tick(run, callback):
                pass
        finally:
            if executor is not None:
                executor.close()
            if pause_gc:
                gc.enable()
                gc.collect()
        summary = summarize(run.tel, cfg, run.missed_total, run.error, self.robot)
        return ControlResult(summary, run.tel, run.frames)

    def _prime(self, run: _Run) -> tuple[float, float]:
        """Async: infer the first chunk before tick 0 is due (the robot is at rest)."""
        submitted = self.clock.now()
        try:
            chunk = check_chunk(self.chunk_fn(_copy_obs(self.robot.observe())), self.action_dim)
        except Exception as exc:
            run.executor.close()
            raise RuntimeError(f"the first inference failed before the loop started: {exc}") from exc
        run.horizon = len(chunk)
        run.plan.merge(chunk, 0, 0, 0)
        return submitted, self.clock.now()

    def _tick(self, run: _Run, callback: Callable[[int], None] | None) -> bool:
        """Wait for tick ``run.k`` and execute it; False when the run ends."""
        cfg = self.config
        scheduled = run.t0 + run.k * cfg.period
        self.clock.sleep_until(scheduled)
        actual = self.clock.now()
        if actual - scheduled > cfg.miss_tolerance * cfg.period:  # overran: skip to the next deadline
            run.miss(max(1, int(math.floor((actual - scheduled) / cfg.period + (1.0 - cfg.miss_tolerance)))))
            return True
        obs = self.robot.observe()
        if cfg.stop_on_done and self.robot.done:
            return False
        if run.stop_tick is not None and run.k - run.stop_tick >= cfg.stop_hold_ticks:
            run.last = run.last.copy()  # held long enough: zero motion, and stop
            run.last[self.motion] = 0.0
            self.robot.act(run.last)
            self._record(run, scheduled, actual, np.nan, 0, False)
            return False
        starved, age, action = False, np.nan, run.last
        if run.stop_tick is None:
            if run.executor is not None:
                self._infer_async(run, obs)
            elif run.plan.depth(run.k) == 0:
                scheduled, actual = self._infer_sync(run, obs, scheduled, actual)
            planned = run.plan.pop(run.k) if run.stop_tick is None else None
            starved = planned is None and run.stop_tick is None
            if planned is not None:
                action, age = self.safety(planned[0], run.last), run.k - planned[1]
        self.robot.act(action)
        run.last = np.asarray(action, dtype=np.float32)
        self._record(run, scheduled, actual, age, run.plan.depth(run.k + 1), starved)
        if cfg.video and (frame := self.robot.render()) is not None:
            run.frames.append(frame)
        if callback is not None:
            callback(run.tel.n_ticks)
        run.k += 1
        return True

    def _infer_async(self, run: _Run, obs: dict[str, Any]) -> None:
        """Merge a chunk the worker finished, and start the next when the plan runs low."""
        job = run.executor.poll()
        if job is not None and job.error is not None:
            run.fail(job.error)
            run.plan.clear()
        elif job is not None:
            chunk = check_chunk(job.result, self.action_dim)
            run.horizon = run.horizon or len(chunk)
            dropped = run.plan.merge(chunk, job.payload, job.payload, run.k)
            run.recent.append(job.finished - job.submitted)
            tel = dict(submitted=job.submitted - run.t0, finished=job.finished - run.t0, obs_tick=job.payload)
            run.tel.chunk(**tel, dropped=dropped)
        cfg = self.config
        threshold = cfg.threshold if cfg.threshold is not None else auto_threshold(run.horizon, run.recent, cfg.period)
        if run.stop_tick is None and not run.executor.busy and run.plan.depth(run.k) <= threshold:
            snapshot = _copy_obs(obs)
            run.executor.submit(lambda o=snapshot: self.chunk_fn(o), payload=run.k)

    def _infer_sync(self, run: _Run, obs: dict[str, Any], scheduled: float, actual: float) -> tuple[float, float]:
        """Infer in the tick; deadlines that pass meanwhile are missed, and the stalled tick
        becomes the current one, late. Returns the tick's (scheduled, actual) times."""
        submitted = self.clock.now()
        try:
            chunk = check_chunk(self.chunk_fn(obs), self.action_dim)
        except Exception as exc:  # the robot is stopped safely
            run.fail(exc)
            return scheduled, actual
        run.horizon = run.horizon or len(chunk)
        steps = self.config.n_action_steps or max(1, len(chunk) // 2)
        finished = self.clock.now()
        run.tel.chunk(submitted=submitted - run.t0, finished=finished - run.t0, obs_tick=run.k, dropped=0)
        late = int(max(0.0, finished - scheduled) // self.config.period)  # deadlines that passed
        if late:
            run.miss(late)
            scheduled, actual = run.t0 + run.k * self.config.period, finished
        run.plan.merge(chunk[:steps], run.k, run.k - late, run.k)
        return scheduled, actual

    def _record(self, run: _Run, scheduled: float, actual: float, age: float, depth: int, starved: bool) -> None:
        run.tel.tick(
            scheduled=scheduled - run.t0,
            actual=actual - run.t0,
            age=age,
            depth=depth,
            starved=int(starved),
            missed_before=run.missed_pending,
        )
        run.missed_pending = 0


def _copy_obs(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: _copy_obs(v) for k, v in obs.items()}
    return obs.copy() if isinstance(obs, np.ndarray) else obs
