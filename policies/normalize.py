"""State and action normalisation from dataset statistics, stored as buffers so that a
checkpoint's ``model.safetensors`` carries them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MODES = ("mean_std", "min_max")


class Normalizer(nn.Module):
    """Maps one feature (state or action) to a normalised scale and back.

    ``mean_std``: ``(x - mean) / std``; ``min_max``: to [-1, 1] from the data range.
    Tiny spreads are floored (``eps``) so a constant feature does not blow up.
    """

    def __init__(self, dim: int, mode: str = "mean_std", eps: float = 1e-3) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"normalisation mode {mode!r} is not one of {MODES}")
        self.mode, self.eps = mode, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("min", -torch.ones(dim))
        self.register_buffer("max", torch.ones(dim))

    @torch.no_grad()
    def fit(self, stats: dict[str, np.ndarray | torch.Tensor]) -> Normalizer:
        """Set the statistics from a dict with ``mean``, ``std``, ``min`` and ``max``."""
        missing = [name for name in ("mean", "std", "min", "max") if name not in stats]
        if missing:
            raise ValueError(f"statistics are missing {missing}; each feature needs mean, std, min and max")
        for name in ("mean", "std", "min", "max"):
            value = torch.as_tensor(np.asarray(stats[name]), dtype=torch.float32)
            buffer = getattr(self, name)
            if value.shape != buffer.shape:
                raise ValueError(f"statistic {name!r} has shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"statistic {name!r} is not finite: {value.tolist()}")
            buffer.copy_(value)
        return self

    @property
    def fitted(self) -> bool:
        """False while every statistic still holds its initial value (mean 0, std 1, range
        [-1, 1]): ``fit`` was never called, neither here nor in the checkpoint loaded."""
        initial = (
            bool((self.mean == 0).all())
            and bool((self.std == 1).all())
            and bool((self.min == -1).all())
            and bool((self.max == 1).all())
        )
        return not initial

    def _scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "mean_std":
            return self.mean, self.std.clamp_min(self.eps)
        centre = (self.max + self.min) / 2
        return centre, ((self.max - self.min) / 2).clamp_min(self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self._scale()
        return (x - shift) / scale

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self._scale()
        return x * scale + shift


def feature_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """``mean``, ``std``, ``min``, ``max`` over the first axis of ``(N, D)`` data."""
    x = np.asarray(x, dtype=np.float64)
    return {
        "mean": x.mean(0).astype(np.float32),
        "std": x.std(0).astype(np.float32),
        "min": x.min(0).astype(np.float32),
        "max": x.max(0).astype(np.float32),
    }
