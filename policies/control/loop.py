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
import json
import math
import os
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies.control.clock import RealClock, SimClock, make_executor

MODES = ("sync", "async")
MERGE_RULES = ("latest", "average", "temporal_ensemble")
ChunkFn = Callable[[dict[str, Any]], np.ndarray]  # observation -> (H, action_dim)


@dataclass
class ControlConfig:
    rate_hz: float = 50.0
    mode: str = "async"
    merge: str = "latest"
    # async: infer when this many actions are planned ahead; None: adapt to the measured
    # latency (enough ticks to cover the slowest of the last 20 inferences, at least H // 2)
    threshold: int | None = None
    n_action_steps: int | None = None  # sync: actions executed per chunk (default H // 2)
    average_weight: float = 0.5  # "average": weight of the new chunk where chunks overlap
    ensemble_m: float = 0.01  # "temporal_ensemble": ACT's exp(-m * i) weights
    max_ticks: int = 1000  # the run ends at this tick index (executed plus missed ticks)
    stop_on_done: bool = True  # end when the robot's episode ends (success or time limit)
    max_delta: float | None = None  # largest change of any action entry per tick
    stop_hold_ticks: int = 5  # on an inference error: hold this many ticks, then zero motion
    motion_dims: tuple[int, ...] | None = None  # zeroed by a safe stop (default: every dim)
    miss_tolerance: float = 0.5  # a tick later than this fraction of a period is skipped as missed
    prime: bool = True  # async: infer the first chunk before the clock starts (the robot is at rest)
    video: bool = False

    def validate(self) -> None:
        if not 1.0 <= self.rate_hz <= 1000.0:
            raise ValueError(f"rate_hz must be in [1, 1000], got {self.rate_hz}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"merge={self.merge!r} is not one of {MERGE_RULES}")
        for name in ("threshold", "n_action_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "threshold" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'threshold' else 1}, got {value}")
        if not 0.0 < self.average_weight <= 1.0:
            raise ValueError(f"average_weight must be in (0, 1], got {self.average_weight}")
        if self.ensemble_m < 0:
            raise ValueError(f"ensemble_m must be >= 0, got {self.ensemble_m}")
        if self.max_ticks < 1:
            raise ValueError(f"max_ticks must be >= 1, got {self.max_ticks}")
        if self.max_delta is not None and not self.max_delta > 0:
            raise ValueError(f"max_delta must be > 0 (or None), got {self.max_delta}")
        if not 0.0 < self.miss_tolerance < 1.0:
            raise ValueError(f"miss_tolerance must be in (0, 1), got {self.miss_tolerance}")

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz


class ActionPlan:
    """Actions planned for future ticks, merged from chunks by a rule; bounded by the
    chunks in flight (entries for past ticks are discarded as the loop advances)."""

    def __init__(self, rule: str = "latest", average_weight: float = 0.5, ensemble_m: float = 0.01) -> None:
        if rule not in MERGE_RULES:
            raise ValueError(f"merge rule {rule!r} is not one of {MERGE_RULES}")
        self.rule, self.w, self.m = rule, average_weight, ensemble_m
        # tick -> list of (action, obs tick) in arrival order (one entry unless ensembling)
        self._plan: dict[int, list[tuple[np.ndarray, int]]] = {}

    def merge(self, chunk: np.ndarray, start_tick: int, obs_tick: int, now_tick: int) -> int:
        """Plan ``chunk[i]`` for tick ``start_tick + i``; returns how many were dropped because
        their tick is before ``now_tick``."""
        dropped = 0
        for i, action in enumerate(np.asarray(chunk, dtype=np.float32)):
            tick = start_tick + i
            if tick < now_tick:
                dropped += 1
                continue
            old = self._plan.get(tick)
            if old is None or self.rule == "latest":
                self._plan[tick] = [(action, obs_tick)]
            elif self.rule == "average":
                self._plan[tick] = [((1.0 - self.w) * old[0][0] + self.w * action, obs_tick)]
            else:
                old.append((action, obs_tick))
        return dropped

    def pop(self, tick: int) -> tuple[np.ndarray, int] | None:
        """The action for ``tick`` and the observation tick it was computed from (the newest
        contributing one), or ``None``; forgets every tick up to ``tick``."""
        for stale in [t for t in self._plan if t < tick]:
            del self._plan[stale]
        entries = self._plan.pop(tick, None)
        if entries is None:
            return None
        if len(entries) == 1:
            return entries[0]
        weights = np.exp(-self.m * np.arange(len(entries)))  # i = 0: the oldest prediction
        action = sum(w * a for w, (a, _) in zip(weights, entries, strict=True)) / weights.sum()
        return action.astype(np.float32), entries[-1][1]

    def depth(self, tick: int) -> int:
        """How many ticks from ``tick`` on have an action planned."""
        return sum(1 for t in self._plan if t >= tick)

    def clear(self) -> None:
        self._plan.clear()

    def __len__(self) -> int:
        return len(self._plan)


class Telemetry:
    """Per-tick and per-chunk records in arrays allocated once for ``capacity`` ticks."""

    TICK_FIELDS = ("scheduled", "actual", "age", "depth", "starved", "missed_before")
    CHUNK_FIELDS = ("submitted", "finished", "obs_tick", "dropped")

    def __init__(self, capacity: int) -> None:
        self.ticks = {f: np.full(capacity, np.nan) for f in self.TICK_FIELDS}
        self.chunks = {f: np.full(capacity, np.nan) for f in self.CHUNK_FIELDS}
        self.n_ticks = 0
        self.n_chunks = 0

    def tick(self, **values: float) -> None:
        for f in self.TICK_FIELDS:
            self.ticks[f][self.n_ticks] = values[f]
        self.n_ticks += 1

    def chunk(self, **values: float) -> None:
        if self.n_chunks < len(self.chunks["submitted"]):
            for f in self.CHUNK_FIELDS:
                self.chunks[f][self.n_chunks] = values[f]
            self.n_chunks += 1

    def tick_array(self, name: str) -> np.ndarray:
        return self.ticks[name][: self.n_ticks]

    def chunk_array(self, name: str) -> np.ndarray:
        return self.chunks[name][: self.n_chunks]


@dataclass
class ControlResult:
    summary: dict[str, Any]
    telemetry: Telemetry
    frames: list[np.ndarray]

    def save(self, directory: str | os.PathLike, config: ControlConfig | None = None) -> Path:
        """``summary.json``, ``telemetry.npz`` and ``timeline.png`` (and ``video.mp4``) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"summary": self.summary, "config": asdict(config) if config else None}
        _atomic_write(directory / "summary.json", json.dumps(data, indent=2))
        arrays = {f"tick_{k}": self.telemetry.tick_array(k) for k in Telemetry.TICK_FIELDS}
        arrays.update({f"chunk_{k}": self.telemetry.chunk_array(k) for k in Telemetry.CHUNK_FIELDS})
        tmp = directory / ".telemetry.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, directory / "telemetry.npz")
        plot_telemetry(self, directory / "timeline.png")
        if self.frames:
            import imageio.v2 as imageio

            tmp = directory / ".video.tmp.mp4"
            fps = self.summary["rate_hz"]
            imageio.mimsave(tmp, self.frames, fps=fps, macro_block_size=1)
            os.replace(tmp, directory / "video.mp4")
        return directory


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SafetyFilter:
    """Clamp to the action space and to ``max_delta`` per tick."""

    def __init__(self, low: np.ndarray, high: np.ndarray, max_delta: float | None) -> None:
        self.low, self.high, self.max_delta = low.astype(np.float32), high.astype(np.float32), max_delta

    def __call__(self, action: np.ndarray, previous: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self.low.shape:
            raise ValueError(f"the policy's action has shape {action.shape}, the robot takes {self.low.shape}")
        action = np.where(np.isfinite(action), action, previous)  # a NaN entry holds its last value
        if self.max_delta is not None:
            action = np.clip(action, previous - self.max_delta, previous + self.max_delta)
        return np.clip(action, self.low, self.high)


class ControlLoop:
    """Runs ``chunk_fn`` (observation -> ``(H, action_dim)`` actions) on ``robot`` at a fixed rate."""

    def __init__(self, robot: Any, chunk_fn: ChunkFn, config: ControlConfig, clock: RealClock | SimClock) -> None:
        config.validate()
        self.robot, self.chunk_fn, self.config, self.clock = robot, chunk_fn, config, clock
        space = robot.action_space
        self.safety = SafetyFilter(np.asarray(space.low), np.asarray(space.high), config.max_delta)
        self.action_dim = int(np.prod(space.shape))

    def run(self, seed: int | None = None, callback: Callable[[int], None] | None = None) -> ControlResult:
        cfg, clock = self.config, self.clock
        period = cfg.period
        executor = make_executor(clock) if cfg.mode == "async" else None
        plan = ActionPlan(cfg.merge, cfg.average_weight, cfg.ensemble_m)
        tel = Telemetry(cfg.max_ticks)
        frames: list[np.ndarray] = []
        self.robot.reset(seed=seed)
        last = np.zeros(self.action_dim, dtype=np.float32)
        motion = list(cfg.motion_dims) if cfg.motion_dims is not None else list(range(self.action_dim))
        horizon: int | None = None
        error: str | None = None
        stop_tick: int | None = None  # set by an inference error: the safe stop starts here
        missed_total = 0
        missed_pending = 0
        k = 0
        primed = None
        recent: deque[float] = deque(maxlen=20)  # the latest inference latencies (auto threshold)
        if executor is not None and cfg.prime:  # the first chunk, before tick 0 is due
            submitted = clock.now()
            try:
                chunk = _check_chunk(self.chunk_fn(_copy_obs(self.robot.observe())), self.action_dim)
            except Exception as exc:
                executor.close()
                raise RuntimeError(f"the first inference failed before the loop started: {exc}") from exc
            horizon = len(chunk)
            plan.merge(chunk, 0, 0, 0)
            primed = (submitted, clock.now())
        # Real time: no cyclic garbage collection pauses inside the loop (the loop allocates
        # little, and telemetry is preallocated); collected once at the end.
        gc_was_enabled = gc.isenabled() and isinstance(clock, RealClock)
        if gc_was_enabled:
            gc.disable()
        t0 = clock.now()
        if primed is not None:
            tel.chunk(submitted=primed[0] - t0, finished=primed[1] - t0, obs_tick=0, dropped=0)
        try:
            while k < cfg.max_ticks:
                scheduled = t0 + k * period
                clock.sleep_until(scheduled)
                actual = clock.now()
                if actual - scheduled > cfg.miss_tolerance * period:  # overran: skip to the next deadline
                    skipped = int(math.floor((actual - scheduled) / period + (1.0 - cfg.miss_tolerance)))
                    skipped = max(skipped, 1)
                    missed_total += skipped
                    missed_pending += skipped
                    k += skipped
                    continue
                obs = self.robot.observe()
                if cfg.stop_on_done and self.robot.done:
                    break
                starved = False
                age = np.nan
                if stop_tick is not None:
                    if k - stop_tick >= cfg.stop_hold_ticks:  # held long enough: zero motion, and stop
                        last = last.copy()
                        last[motion] = 0.0
                        self.robot.act(last)
                        tel.tick(
                            scheduled=scheduled - t0,
                            actual=actual - t0,
                            age=np.nan,
                            depth=0,
                            starved=0,
                            missed_before=missed_pending,
                        )
                        break
                    action = last
                else:
                    if executor is not None:
                        job = executor.poll()
                        if job is not None:
                            if job.error is not None:
                                error = "".join(traceback.format_exception_only(job.error)).strip()
                                stop_tick = k
                                plan.clear()
                            else:
                                chunk = _check_chunk(job.result, self.action_dim)
                                horizon = horizon or len(chunk)
                                obs_tick = job.payload
                                dropped = plan.merge(chunk, obs_tick, obs_tick, k)
                                recent.append(job.finished - job.submitted)
                                tel.chunk(
                                    submitted=job.submitted - t0,
                                    finished=job.finished - t0,
                                    obs_tick=obs_tick,
                                    dropped=dropped,
                                )
                        threshold = (
                            cfg.threshold if cfg.threshold is not None else _auto_threshold(horizon, recent, period)
                        )
                        if stop_tick is None and not executor.busy and plan.depth(k) <= threshold:
                            snapshot = _copy_obs(obs)
                            executor.submit(lambda o=snapshot: self.chunk_fn(o), payload=k)
                    elif plan.depth(k) == 0:  # sync: infer now, in the tick
                        submitted = clock.now()
                        try:
                            chunk = _check_chunk(self.chunk_fn(obs), self.action_dim)
                        except Exception as exc:  # the robot is stopped safely below
                            error = "".join(traceback.format_exception_only(exc)).strip()
                            stop_tick = k
                            chunk = None
                        if chunk is not None:
                            horizon = horizon or len(chunk)
                            steps = cfg.n_action_steps or max(1, len(chunk) // 2)
                            finished = clock.now()
                            tel.chunk(submitted=submitted - t0, finished=finished - t0, obs_tick=k, dropped=0)
                            late = int(max(0.0, finished - scheduled) // period)  # deadlines that passed
                            if late:  # the stalled tick becomes the current one, late
                                missed_total += late
                                missed_pending += late
                                k += late
                                scheduled, actual = t0 + k * period, finished
                            plan.merge(chunk[:steps], k, k - late, k)
                    planned = plan.pop(k) if stop_tick is None else None
                    if planned is None:
                        starved = stop_tick is None
                        action = last
                    else:
                        action = self.safety(planned[0], last)
                        age = k - planned[1]
                self.robot.act(action)
                last = np.asarray(action, dtype=np.float32)
                tel.tick(
                    scheduled=scheduled - t0,
                    actual=actual - t0,
                    age=age,
                    depth=plan.depth(k + 1),
                    starved=int(starved),
                    missed_before=missed_pending,
                )
                missed_pending = 0
                if cfg.video:
                    frame = self.robot.render()
                    if frame is not None:
                        frames.append(frame)
                if callback is not None:
                    callback(tel.n_ticks)
                k += 1
        finally:
            if executor is not None:
                executor.close()
            if gc_was_enabled:
                gc.enable()
                gc.collect()
        summary = summarize(tel, cfg, missed_total, error, self.robot)
        return ControlResult(summary, tel, frames)


def _auto_threshold(horizon: int | None, recent: deque[float], period: float) -> int:
    """Start the next chunk when the actions planned ahead just cover the slowest recent
    inference (plus one tick), and never later than half a chunk; at most H - 1."""
    h = horizon or 2
    need = math.ceil(max(recent) / period) + 1 if recent else 0
    return max(1, min(h - 1, max(h // 2, need)))


def _copy_obs(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: _copy_obs(v) for k, v in obs.items()}
    return obs.copy() if isinstance(obs, np.ndarray) else obs


def _check_chunk(chunk: Any, action_dim: int) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim == 3 and chunk.shape[0] == 1:
        chunk = chunk[0]
    if chunk.ndim != 2 or chunk.shape[1] != action_dim or len(chunk) == 0:
        raise ValueError(f"a chunk must have shape (H, {action_dim}) with H >= 1, got {chunk.shape}")
    return chunk


def _stats(values: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"median": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {
        "median": float(np.median(values) * scale),
        "p99": float(np.percentile(values, 99) * scale),
        "max": float(np.max(values) * scale),
    }


def summarize(tel: Telemetry, cfg: ControlConfig, missed: int, error: str | None, robot: Any) -> dict[str, Any]:
    actual, scheduled = tel.tick_array("actual"), tel.tick_array("scheduled")
    jitter = np.abs(actual - scheduled)
    latency = tel.chunk_array("finished") - tel.chunk_array("submitted")
    summary = {
        "mode": cfg.mode,
        "merge": cfg.merge,
        "rate_hz": cfg.rate_hz,
        "period_ms": 1e3 * cfg.period,
        "ticks": tel.n_ticks,
        "duration_s": float(actual[-1]) if tel.n_ticks else 0.0,
        "jitter_ms": _stats(jitter, 1e3),
        "jitter_p99_fraction_of_period": float(np.percentile(jitter, 99) / cfg.period) if tel.n_ticks else 0.0,
        "deadline_misses": int(missed),
        "starved_ticks": int(np.nansum(tel.tick_array("starved"))),
        "chunks": tel.n_chunks,
        "inference_latency_ms": _stats(latency, 1e3),
        "action_age_ticks": _stats(tel.tick_array("age")),
        "queue_depth": _stats(tel.tick_array("depth")),
        "dropped_actions": int(np.nansum(tel.chunk_array("dropped"))),
        "error": error,
        "safe_stop": error is not None,
    }
    for name in ("success", "total_reward", "steps"):
        if hasattr(robot, name):
            value = getattr(robot, name)
            summary[name if name != "steps" else "robot_steps"] = value if isinstance(value, bool) else float(value)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    j, lat, age = summary["jitter_ms"], summary["inference_latency_ms"], summary["action_age_ticks"]
    lines = [
        f"{summary['mode']} ({summary['merge']}) at {summary['rate_hz']:g} Hz: {summary['ticks']} ticks in "
        f"{summary['duration_s']:.1f} s",
        f"  tick jitter      median {j['median']:.3f} ms, p99 {j['p99']:.3f} ms "
        f"({100 * summary['jitter_p99_fraction_of_period']:.1f}% of the period), max {j['max']:.3f} ms",
        f"  deadline misses  {summary['deadline_misses']}; starved ticks {summary['starved_ticks']}",
        f"  inference        {summary['chunks']} chunks, latency median {lat['median']:.1f} ms, "
        f"p99 {lat['p99']:.1f} ms",
        f"  action age       median {age['median']:.1f} ticks, p99 {age['p99']:.1f}; "
        f"dropped actions {summary['dropped_actions']}",
    ]
    if "success" in summary:
        lines.append(f"  task             success {summary['success']}, return {summary.get('total_reward', 0):.1f}")
    if summary["error"]:
        lines.append(f"  SAFE STOP after an inference error: {summary['error']}")
    return "\n".join(lines)


def plot_telemetry(result: ControlResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tel, s = result.telemetry, result.summary
    t = tel.tick_array("actual")
    jitter_ms = 1e3 * (t - tel.tick_array("scheduled"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.5), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0, 0]
    ax.plot(t, jitter_ms, lw=0.6, label="tick start - schedule (ms)")
    starved = tel.tick_array("starved") > 0
    ax.scatter(t[starved], jitter_ms[starved], s=6, c="tab:red", label="starved tick (held action)", zorder=3)
    ax.axhline(0.1 * s["period_ms"], color="k", ls="--", lw=0.8, label="10% of the period")
    ax.set_ylabel("jitter (ms)")
    ax.set_title(f"{s['mode']} control at {s['rate_hz']:g} Hz: timeline")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1, 0]
    ax.step(t, tel.tick_array("depth"), where="post", lw=0.7, label="actions planned ahead")
    for sub, fin in zip(tel.chunk_array("submitted"), tel.chunk_array("finished"), strict=True):
        ax.axvspan(sub, fin, color="tab:orange", alpha=0.25, lw=0)
    ax.plot([], [], color="tab:orange", alpha=0.5, lw=6, label="inference running")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("queue depth")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[0, 1]
    ax.hist(np.abs(jitter_ms), bins=50, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("|jitter| (ms)")
    ax.set_title(f"p99 {s['jitter_ms']['p99']:.2f} ms, misses {s['deadline_misses']}")
    ax = axes[1, 1]
    latency = 1e3 * (tel.chunk_array("finished") - tel.chunk_array("submitted"))
    ax.hist(latency, bins=30, color="tab:orange")
    ax.axvline(s["period_ms"], color="k", ls="--", lw=0.8, label="one period")
    ax.set_xlabel("inference latency (ms)")
    ax.set_title(f"{s['chunks']} chunks, median {s['inference_latency_ms']['median']:.1f} ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
