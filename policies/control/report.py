"""Real-time success beside offline success on the same scenes, and the timing that
explains a difference (``scripts/control.py --suite``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.stats import format_difference, hierarchical_bootstrap, wilson_interval


def _rate(successes: list[bool]) -> dict[str, float]:
    k, n = int(sum(successes)), len(successes)
    low, high = wilson_interval(k, n)
    return {"success": k / n if n else 0.0, "low": low, "high": high, "episodes": n}


def compare(offline: dict[str, Any], realtime: dict[str, Any]) -> dict[str, Any]:
    """``offline``: an ``eval_info.json``; ``realtime``: ``runner.run_episodes``' result, on the
    same scenes. Success both ways (95% Wilson intervals), the paired difference real time
    minus offline per episode (95% bootstrap interval; significant when it excludes 0), per
    task, and the real-time run's timing."""
    by_scene = {(e["task"], e["seed"]): bool(e["success"]) for e in offline["per_episode"]}
    pairs = []
    for e in realtime["per_episode"]:
        key = (e["task"], e["seed"])
        if key not in by_scene:
            raise ValueError(f"real-time episode {key} has no offline episode on the same scene")
        pairs.append((by_scene[key], bool(e["success"]), e["task"]))
    if not pairs:
        raise ValueError("no real-time episodes to compare")
    difference = hierarchical_bootstrap([[float(r) - float(o) for o, r, _ in pairs]])
    difference["significant"] = bool(difference["low"] > 0 or difference["high"] < 0)
    tasks = list(dict.fromkeys(t for _, _, t in pairs))
    return {
        "offline": _rate([o for o, _, _ in pairs]),
        "realtime": _rate([r for _, r, _ in pairs]),
        "difference": difference,
        "per_task": {
            t: {
                "offline": float(np.mean([o for o, _, u in pairs if u == t])),
                "realtime": float(np.mean([r for _, r, u in pairs if u == t])),
            }
            for t in tasks
        },
        "timing": realtime["aggregated"],
    }


def realtime_markdown(
    results: dict[str, dict[str, Any]], rate_hz: float, mode: str, simulated_ticks: float | None = None
) -> str:
    """One row per policy: success offline and in real time, their paired difference, and timing."""
    pct = lambda r: f"{100 * r['success']:.1f}% [{100 * r['low']:.0f}, {100 * r['high']:.0f}]"
    clock = "" if simulated_ticks is None else f", virtual time, every inference {simulated_ticks:g} ticks"
    lines = [
        f"Real time at {rate_hz:g} Hz ({mode} inference{clock}) against offline evaluation on the same scenes; "
        "95% intervals; the difference is paired per episode (**bold**: significant).",
        "",
        "| policy | episodes | offline success | real-time success | real time - offline | deadline misses "
        "| starved ticks | p99 jitter | inference latency (median / p99) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        d, t = r["difference"], r["timing"]
        diff = format_difference(d)
        starved = f"{t['starved_ticks']} of {t['ticks']} ({100 * t['starved_fraction']:.2f}%)"
        latency = f"{t['inference_latency_ms']['median']:.1f} / {t['inference_latency_ms']['p99']:.1f} ms"
        lines.append(
            f"| {name} | {r['offline']['episodes']} | {pct(r['offline'])} | {pct(r['realtime'])} | {diff} "
            f"| {t['deadline_misses']} | {starved} | {t['jitter_p99_ms']:.2f} ms | {latency} |"
        )
    return "\n".join(lines)
