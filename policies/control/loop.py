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

Safety: actions are clamped to the action space and to a maximum change per tick. A
fault stops the robot safely (hold for ``stop_hold_ticks`` ticks, then zero motion) and
is reported with its reason (``summary["stop_reason"]``), the same in both modes: an
exception in inference (``inference_error``), a chunk of the wrong shape (``bad_chunk``),
``max_bad_chunks`` non-finite chunks in a row (``nonfinite_chunks``; each one is
discarded and counted), no fresh chunk for ``watchdog_s`` in async mode (``watchdog``: a
hung inference), ``robot.act`` raising (``robot_error``: one zero-motion command is tried,
then the run ends) or :meth:`ControlLoop.request_stop` (``stop_requested``). A hung
inference never holds up ``run()``: the worker is a daemon thread that is not waited
for. Telemetry per tick and per chunk lives in preallocated arrays, so a long run does
not grow in memory.
"""

from __future__ import annotations

import gc
import math
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.control.clock import RealClock, SimClock, make_executor
from policies.control.config import MERGE_RULES, MODES, ChunkFn, ControlConfig
from policies.control.plan import ActionPlan, auto_threshold, inpainting_weights
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
    "stop_on_interrupt",
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
    reason: str | None = None  # why the robot was stopped (see the module's docstring)
    stop_tick: int | None = None  # set by a fault: the safe stop starts here
    last_fresh: float = 0.0  # when the last good chunk arrived (the watchdog's reference)
    stopped: bool = False  # the final zero-motion command was sent
    bad_in_row: int = 0  # non-finite chunks since the last good one
    nonfinite: int = 0  # non-finite chunks discarded in the run
    missed_total: int = 0
    missed_pending: int = 0  # misses since the last executed tick (recorded with it)
    recent: deque = field(default_factory=lambda: deque(maxlen=20))  # latest inference latencies
    frames: list = field(default_factory=list)

    def miss(self, ticks: int) -> None:
        self.missed_total += ticks
        self.missed_pending += ticks
        self.k += ticks

    def fail(self, fault: BaseException | str, reason: str) -> None:
        """A fault: remember it and start the safe stop at this tick (the first one counts)."""
        if self.stop_tick is not None:
            return
        self.error = fault if isinstance(fault, str) else "".join(traceback.format_exception_only(fault)).strip()
        self.reason, self.stop_tick = reason, self.k
        self.plan.clear()


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
        if any(not 0 <= d < n for d in self.motion):
            raise ValueError(f"motion_dims={config.motion_dims} must index the robot's {n} action dims")
        self._stop_requested = threading.Event()

    def request_stop(self) -> None:
        """Stop the running loop safely at its next tick (thread-safe: a signal handler, a
        callback or another thread may call it)."""
        self._stop_requested.set()

    def run(self, seed: int | None = None, callback: Callable[[int], None] | None = None) -> ControlResult:
        """Reset the robot and run ticks until ``max_ticks``, the episode's end or a safe stop;
        ``callback(ticks_done)`` after every executed tick."""
        cfg, clock = self.config, self.clock
        self._stop_requested.clear()
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
        run.t0 = run.last_fresh = clock.now()
        if (align := getattr(self.robot, "align", None)) is not None:
            align(run.t0)  # a simulated robot steps its physics on the ticks (MujocoRobot.align)
        if primed is not None:
            run.tel.chunk(submitted=primed[0] - run.t0, finished=primed[1] - run.t0, obs_tick=0, dropped=0)
        try:
            while run.k < cfg.max_ticks and self._tick_safely(run, callback):
                pass
            if run.stop_tick is not None and not run.stopped:  # the run ended while still holding
                self._send(run, self._zero_motion(run.last))
        finally:
            if executor is not None:
                executor.close(wait_s=0.0 if run.reason == "watchdog" else 5 * cfg.period)
            if pause_gc:
                gc.enable()
                gc.collect()
        summary = summarize(run.tel, cfg, run.missed_total, run.error, self.robot, run.reason, run.nonfinite)
        return ControlResult(summary, run.tel, run.frames)

    def _prime(self, run: _Run) -> tuple[float, float]:
        """Async: infer the first chunk before tick 0 is due (the robot is at rest), waiting
        at most ``first_chunk_s``."""
        clock, limit = self.clock, self.config.first_chunk_s
        try:
            snapshot = _copy_obs(self.robot.observe())
            job = run.executor.submit(lambda: self.chunk_fn(snapshot), payload=0)
        except BaseException:
            run.executor.close()  # give back the interpreter's settings before the error leaves
            raise
        deadline = job.submitted + limit
        while run.executor.poll() is None:
            if clock.now() >= deadline:
                run.executor.close()
                raise RuntimeError(f"the first inference did not finish within first_chunk_s={limit:g} s")
            clock.sleep_until(min(deadline, job.finished if job.finished is not None else clock.now() + 1e-3))
        try:
            if job.error is not None:
                raise job.error
            chunk = check_chunk(job.result, self.action_dim)
            if not np.isfinite(chunk).all():
                raise ValueError("the chunk holds NaN or inf")
        except Exception as exc:
            run.executor.close()
            raise RuntimeError(f"the first inference failed before the loop started: {exc}") from exc
        run.horizon = len(chunk)
        run.plan.merge(chunk, 0, 0, 0)
        return job.submitted, job.finished

    def _tick_safely(self, run: _Run, callback: Callable[[int], None] | None) -> bool:
        """One tick; an exception from the robot, a callback or the loop itself stops the
        robot safely (``loop_error``: one zero-motion command, and the run ends)."""
        try:
            return self._tick(run, callback)
        except Exception as exc:
            if run.stop_tick is None:
                run.fail(exc, "loop_error")
            try:
                self.robot.act(self._zero_motion(run.last))
                run.stopped = True
            except Exception:
                pass  # nothing more can be commanded; the summary reports the fault
            return False

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
        self._watch(run, actual)
        if run.stop_tick is not None and run.k - run.stop_tick >= cfg.stop_hold_ticks:
            run.stopped = self._send(run, self._zero_motion(run.last))  # held long enough: zero motion, stop
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
        sent = self._send(run, action)
        self._record(run, scheduled, actual, age, run.plan.depth(run.k + 1), starved)
        if not sent:
            return False
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
            run.fail(job.error, "inference_error")
        elif job is not None and (chunk := self._accept(run, job.result, job.finished)) is not None:
            dropped = run.plan.merge(chunk, job.payload, job.payload, run.k)
            run.recent.append(job.finished - job.submitted)
            tel = dict(submitted=job.submitted - run.t0, finished=job.finished - run.t0, obs_tick=job.payload)
            run.tel.chunk(**tel, dropped=dropped)
        cfg = self.config
        threshold = cfg.threshold if cfg.threshold is not None else auto_threshold(run.horizon, run.recent, cfg.period)
        if run.stop_tick is None and not run.executor.busy and run.plan.depth(run.k) <= threshold:
            snapshot = _copy_obs(obs)
            if cfg.inpaint and run.horizon:
                prefix = run.plan.planned(run.k, run.horizon)
                # The actions executed before the chunk can arrive: this tick's (taken from the
                # plan after this submission) and those due while the slowest recent inference
                # runs, counted from now (a late tick leaves less of its period).
                late = self.clock.now() - (run.t0 + run.k * cfg.period)
                committed = max(1, math.ceil((late + max(run.recent, default=0.0)) / cfg.period))
                if len(prefix):
                    weights = inpainting_weights(len(prefix), committed)
                    run.executor.submit(lambda o=snapshot: self.chunk_fn(o, prefix, weights), payload=run.k)
                    return
            run.executor.submit(lambda o=snapshot: self.chunk_fn(o), payload=run.k)

    def _infer_sync(self, run: _Run, obs: dict[str, Any], scheduled: float, actual: float) -> tuple[float, float]:
        """Infer in the tick; deadlines that pass meanwhile are missed, and the stalled tick
        becomes the current one, late. Returns the tick's (scheduled, actual) times."""
        submitted = self.clock.now()
        try:
            result = self.chunk_fn(obs)
        except Exception as exc:  # the robot is stopped safely
            run.fail(exc, "inference_error")
            return scheduled, actual
        finished = self.clock.now()
        chunk = self._accept(run, result, finished)
        if chunk is None:  # nothing planned: this tick holds the last action
            return scheduled, actual
        steps = self.config.n_action_steps or max(1, len(chunk) // 2)
        run.tel.chunk(submitted=submitted - run.t0, finished=finished - run.t0, obs_tick=run.k, dropped=0)
        late = int(max(0.0, finished - scheduled) // self.config.period)  # deadlines that passed
        if late:
            run.miss(late)
            scheduled, actual = run.t0 + run.k * self.config.period, finished
        run.plan.merge(chunk[:steps], run.k, run.k - late, run.k)
        return scheduled, actual

    def _accept(self, run: _Run, result: Any, finished: float) -> np.ndarray | None:
        """An inference's chunk if it is fit to plan; a wrong shape stops the robot, a
        non-finite chunk is discarded and counted (``max_bad_chunks`` in a row stop it)."""
        try:
            chunk = check_chunk(result, self.action_dim)
        except Exception as exc:  # a wrong shape, or anything numpy cannot read as numbers
            run.fail(exc, "bad_chunk")
            return None
        if not np.isfinite(chunk).all():
            run.nonfinite += 1
            run.bad_in_row += 1
            if run.bad_in_row >= self.config.max_bad_chunks:
                run.fail(f"{run.bad_in_row} chunks in a row held NaN or inf", "nonfinite_chunks")
            return None
        run.bad_in_row, run.last_fresh = 0, finished
        run.horizon = run.horizon or len(chunk)
        return chunk

    def _watch(self, run: _Run, now: float) -> None:
        """A stop request, or (async) no fresh chunk for longer than the watchdog allows."""
        if self._stop_requested.is_set():
            run.fail("a stop was requested", "stop_requested")
        limit = self.config.watchdog(run.horizon)
        if run.executor is not None and now - run.last_fresh > limit:
            run.fail(f"no fresh chunk for {now - run.last_fresh:.3f} s (watchdog: {limit:.3f} s)", "watchdog")

    def _zero_motion(self, action: np.ndarray) -> np.ndarray:
        stopped = np.array(action, dtype=np.float32)
        stopped[self.motion] = 0.0
        return stopped

    def _send(self, run: _Run, action: np.ndarray) -> bool:
        """``robot.act``; if it raises, the run stops: one zero-motion command is tried."""
        try:
            self.robot.act(action)
        except Exception as exc:
            message = "robot.act raised " + "".join(traceback.format_exception_only(exc)).strip()
            if run.stop_tick is None:
                run.fail(message, "robot_error")
            else:  # already stopping: the first fault stays the reason
                run.error = f"{run.error}; then {message}"
            try:
                self.robot.act(self._zero_motion(run.last))
            except Exception:
                pass  # nothing more can be commanded; the summary reports the fault
            run.stopped = True  # no further command is sent either way
            return False
        run.last = np.asarray(action, dtype=np.float32)
        return True

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


@contextmanager
def stop_on_interrupt(loop: ControlLoop) -> Iterator[None]:
    """While inside, Ctrl-C (SIGINT) asks ``loop`` to stop safely instead of raising
    ``KeyboardInterrupt`` in the middle of a tick (a second Ctrl-C raises it, for a loop
    that cannot stop, e.g. a hung sync inference); the previous handler comes back after.
    Only the main thread can install a signal handler; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if loop._stop_requested.is_set():  # a second Ctrl-C: the stop did not come, break out
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        loop.request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _copy_obs(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: _copy_obs(v) for k, v in obs.items()}
    return obs.copy() if isinstance(obs, np.ndarray) else obs
