"""What keeps the robot safe whatever the policy does: actions clamped to the action space
and to a largest change per tick, chunks checked before they are planned."""

from __future__ import annotations

from typing import Any

import numpy as np


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


def check_chunk(chunk: Any, action_dim: int) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim == 3 and chunk.shape[0] == 1:
        chunk = chunk[0]
    if chunk.ndim != 2 or chunk.shape[1] != action_dim or len(chunk) == 0:
        raise ValueError(f"a chunk must have shape (H, {action_dim}) with H >= 1, got {chunk.shape}")
    return chunk
