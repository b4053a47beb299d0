"""Actions planned for future ticks: chunks merged by a rule (``latest``, ``average``,
``temporal_ensemble``), and when an asynchronous loop should ask for the next chunk."""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from policies.control.config import MERGE_RULES


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

    def planned(self, tick: int, limit: int) -> np.ndarray:
        """The actions planned for ``tick``, ``tick + 1``, ... (up to ``limit``, stopping at the
        first tick with none), merged as ``pop`` would merge them, without removing them:
        ``(n, action_dim)``, or ``(0, 0)`` when nothing is planned for ``tick``."""
        out = []
        for k in range(tick, tick + limit):
            entries = self._plan.get(k)
            if entries is None:
                break
            if len(entries) == 1:
                out.append(entries[0][0])
            else:
                w = np.exp(-self.m * np.arange(len(entries)))
                out.append(sum(wi * a for wi, (a, _) in zip(w, entries, strict=True)) / w.sum())
        return np.asarray(out, dtype=np.float32) if out else np.zeros((0, 0), dtype=np.float32)

    def depth(self, tick: int) -> int:
        """How many ticks from ``tick`` on have an action planned."""
        return sum(1 for t in self._plan if t >= tick)

    def clear(self) -> None:
        self._plan.clear()

    def __len__(self) -> int:
        return len(self._plan)


def auto_threshold(horizon: int | None, recent: deque[float], period: float) -> int:
    """Start the next chunk when the actions planned ahead just cover the slowest recent
    inference (plus one tick), and never later than half a chunk; at most H - 1."""
    h = horizon or 2
    need = math.ceil(max(recent) / period) + 1 if recent else 0
    return max(1, min(h - 1, max(h // 2, need)))


def inpainting_weights(planned: int, committed: int) -> np.ndarray:
    """Real-time chunking's soft mask over a new chunk's first ``planned`` actions (Black et
    al., 2025): 1 for the ``committed`` ones (executed while the chunk is inferred), then an
    exponential decay to 0 over the rest of what is already planned."""
    committed = min(committed, planned)
    i = np.arange(planned)
    c = (planned - i) / max(1, planned - committed + 1)
    decay = c * (np.exp(c) - 1) / (math.e - 1)
    return np.where(i < committed, 1.0, decay).astype(np.float32)
