"""The control loop's settings: rate, inference mode, merge rule, safety limits."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    stop_hold_ticks: int = 5  # on a fault: hold this many ticks, then zero motion
    # async: the watchdog stops safely when no fresh chunk has arrived for this long;
    # None: 4 chunk lengths (H ticks each), from the last chunk (or the loop's start)
    watchdog_s: float | None = None
    first_chunk_s: float = 10.0  # the first inference (a cold start) may take up to this long
    max_bad_chunks: int = 3  # non-finite chunks in a row (each discarded) before a safe stop
    motion_dims: tuple[int, ...] | None = None  # zeroed by a safe stop (default: every dim)
    miss_tolerance: float = 0.5  # a tick later than this fraction of a period is skipped as missed
    prime: bool = True  # async: infer the first chunk before the clock starts (the robot is at rest)
    # async, real-time chunking: each chunk is inferred to continue the actions already planned
    # (those executed during the inference in full, the rest with decaying weight); the chunk
    # function then takes ``(obs, prefix, weights)``
    inpaint: bool = False
    video: bool = False

    def validate(self) -> None:
        for name in ("rate_hz", "average_weight", "ensemble_m", "miss_tolerance", "first_chunk_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("max_ticks", "stop_hold_ticks", "max_bad_chunks", "threshold", "n_action_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("max_delta", "watchdog_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{name} must be a number > 0 (or None), got {value!r}")
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
        if self.stop_hold_ticks < 0:
            raise ValueError(f"stop_hold_ticks must be >= 0, got {self.stop_hold_ticks}")
        if self.max_bad_chunks < 1:
            raise ValueError(f"max_bad_chunks must be >= 1, got {self.max_bad_chunks}")
        if not self.first_chunk_s > 0:
            raise ValueError(f"first_chunk_s must be > 0, got {self.first_chunk_s}")
        if not 0.0 < self.miss_tolerance < 1.0:
            raise ValueError(f"miss_tolerance must be in (0, 1), got {self.miss_tolerance}")

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz

    def watchdog(self, horizon: int | None) -> float:
        """Seconds without a fresh chunk before the watchdog stops the robot."""
        if horizon is None:
            return self.first_chunk_s
        return self.watchdog_s if self.watchdog_s is not None else 4 * horizon * self.period
