"""What a control run records and reports: per-tick and per-chunk arrays allocated once,
the run's summary (jitter, deadline misses, starved ticks, latency), and its files
(``summary.json``, ``telemetry.npz``, ``timeline.png``, ``video.mp4``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies.control.config import ControlConfig
from policies.io import atomic_file, write_json
from policies.plotting import pyplot, save_figure


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
        write_json(directory / "summary.json", data)
        arrays = {f"tick_{k}": self.telemetry.tick_array(k) for k in Telemetry.TICK_FIELDS}
        arrays.update({f"chunk_{k}": self.telemetry.chunk_array(k) for k in Telemetry.CHUNK_FIELDS})
        with atomic_file(directory / "telemetry.npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        plot_telemetry(self, directory / "timeline.png")
        if self.frames:
            import imageio.v2 as imageio

            with atomic_file(directory / "video.mp4") as tmp:
                imageio.mimsave(tmp, self.frames, fps=self.summary["rate_hz"], macro_block_size=1)
        return directory


def _stats(values: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"median": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {
        "median": float(np.median(values) * scale),
        "p99": float(np.percentile(values, 99) * scale),
        "max": float(np.max(values) * scale),
    }


def summarize(
    tel: Telemetry,
    cfg: ControlConfig,
    missed: int,
    error: str | None,
    robot: Any,
    reason: str | None = None,
    nonfinite: int = 0,
) -> dict[str, Any]:
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
        "nonfinite_chunks": int(nonfinite),
        "error": error,
        "safe_stop": error is not None,
        "stop_reason": reason,
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
        lines.append(f"  SAFE STOP ({summary.get('stop_reason') or 'fault'}): {summary['error']}")
    if summary.get("nonfinite_chunks"):
        lines.append(f"  non-finite chunks discarded: {summary['nonfinite_chunks']}")
    return "\n".join(lines)


def plot_telemetry(result: ControlResult, path: Path) -> None:
    plt = pyplot()
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
    save_figure(fig, path)
