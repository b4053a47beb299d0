"""The VLA's scene encoder: cameras + proprioception -> where every object is.

pi0 starts from a vision-language model pretrained on the web; this policy's analogue is
a perception stage trained first on rendered scenes, with labels the simulator gives for
free (object positions). Measured on the tabletop suite: control needs object positions
to about 1 cm, and an end-to-end conv stem trained by the action loss alone sits at
1.5-2.5 cm after ten minutes, so the policy never finds the cube it was told about. A
small CNN trained directly on positions gets below 1 cm in minutes.

The encoder, per camera (each its own weights, since a fixed front view and a moving
wrist view see different things): a stride-2 3x3 convolution over RGB and two coordinate
channels (CoordConv), two more 3x3 convolutions with BatchNorm, then ``keypoints``
spatial-softmax points (the expected image position of a learned feature: sub-cell
precision on a coarse map, Levine et al. 2016) and the channel means. An MLP over every
camera's points and means and the proprioception (the wrist camera moves with the
gripper, and a held cube moves with it) gives ``features``, and a linear head predicts
the standardised object positions from them.

The policy turns the predicted positions into one token per object (with its position
relative to the gripper, the geometry the expert acts on) plus one token of ``features``
(whatever else the encoder saw). Frozen after its stage, the encoder's outputs are a
pure function of each frame, so training the policy can cache them once per frame
(:func:`encode_frames`) instead of running the CNN at every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from policies.constants import SCENE_FEATURES, SCENE_POSITIONS

# A frame's encoder outputs, as batch keys (cached by ``encode_frames`` or computed from images).


def coordinates(n: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``(n, 2, h, w)``: each pixel's x and y in [-1, 1]."""
    ys = torch.linspace(-1.0, 1.0, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=like.device, dtype=like.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # (2, h, w)
    return grid.expand(n, 2, h, w)


def spatial_softmax(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``(N, K, h, w)`` logits -> ``(N, K, 2)``: each map's expected (x, y) in [-1, 1]."""
    n, k, h, w = logits.shape
    weights = torch.softmax(rearrange(logits, "n k h w -> n k (h w)") * temperature.exp(), dim=-1)
    grid = rearrange(coordinates(1, h, w, logits)[0], "c h w -> (h w) c")
    return weights @ grid


class CameraStem(nn.Module):
    """One camera's image ``(N, 3, S, S)`` in [0, 1] -> ``(N, 2 * keypoints + channels[-1])``."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...], keypoints: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 5  # RGB + (x, y)
        for c, s in zip(channels, strides, strict=True):
            layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.keypoint_logits = nn.Conv2d(c_in, keypoints, 1)
        self.temperature = nn.Parameter(torch.zeros(()))  # log scale of the softmax

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        x = self.convs(torch.cat([images * 2.0 - 1.0, coordinates(n, h, w, images)], dim=1))
        points = spatial_softmax(self.keypoint_logits(x), self.temperature)  # (N, K, 2)
        return torch.cat([points.flatten(1), x.mean(dim=(2, 3))], dim=1)


class SceneEncoder(nn.Module):
    """Images ``(B, cams, 3, S, S)`` and normalised state ``(B, state_dim)`` ->
    ``(positions (B, out_dim) standardised, features (B, hidden))``."""

    def __init__(
        self,
        cameras: int,
        state_dim: int,
        out_dim: int,
        channels: tuple[int, ...] = (32, 32, 64),
        strides: tuple[int, ...] = (2, 2, 1),
        keypoints: int = 16,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.stems = nn.ModuleList(CameraStem(channels, strides, keypoints) for _ in range(cameras))
        per_camera = 2 * keypoints + channels[-1]
        self.mlp = nn.Sequential(
            nn.Linear(cameras * per_camera + state_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
        )
        self.head = nn.Linear(hidden, out_dim)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for stem in self.stems:
            nn.init.zeros_(stem.temperature)

    def forward(self, images: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen = [stem(images[:, i]) for i, stem in enumerate(self.stems)]
        features = self.mlp(torch.cat([*seen, state], dim=1))
        return self.head(features), features


def scene_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 on standardised positions: robust to the rare frame where a cube is hidden."""
    return F.smooth_l1_loss(predicted, target, beta=0.1)


# -- the perception stage: train the encoder on labelled frames -------------------------


@dataclass
class PerceptionConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    max_minutes: float | None = None
    seed: int = 0
    log_every: int = 50
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")


def train_scene_encoder(
    policy: Any,
    sample: Callable[[int, np.random.Generator], dict[str, Any]],
    config: PerceptionConfig | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``policy``'s scene encoder alone on batches from ``sample(batch_size, rng)``
    (images, ``observation.state`` and ``observation.environment_state``); returns the log."""
    config = config or PerceptionConfig()
    config.validate()
    encoder = policy.model.scene_encoder
    params = list(encoder.parameters())
    frozen = [not p.requires_grad for p in params]
    encoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    encoder.train()
    logs: list[dict[str, float]] = []
    began = time.perf_counter()
    bar = tqdm(range(config.steps), desc="perception", unit="step", disable=not config.progress)
    running = None
    for step in bar:
        factor = min(1.0, (step + 1) / config.warmup_steps)
        factor *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        batch = sample(config.batch_size, rng)
        predicted, _ = policy.encode_scene(batch, grad=True)
        loss = scene_loss(predicted, policy.scene_target(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            entry = {"step": step + 1, "loss": running, "minutes": (time.perf_counter() - began) / 60}
            logs.append(entry)
            bar.set_postfix(loss=f"{running:.4f}")
            if on_log is not None:
                on_log(entry)
        if config.max_minutes is not None and time.perf_counter() - began > 60 * config.max_minutes:
            break
    bar.close()
    encoder.eval()
    for p, was_frozen in zip(params, frozen, strict=True):
        p.requires_grad_(not was_frozen)
    return logs


@torch.no_grad()
def encode_frames(
    policy: Any, get: Callable[[np.ndarray], dict[str, Any]], num_frames: int, batch_size: int = 512
) -> dict[str, np.ndarray]:
    """The encoder's outputs for frames ``0 .. num_frames - 1`` (``get(indices)`` gives their
    batch): ``{SCENE_POSITIONS: (N, out), SCENE_FEATURES: (N, hidden)}``, in eval mode."""
    was_training = policy.training
    policy.eval()
    out: dict[str, list[np.ndarray]] = {SCENE_POSITIONS: [], SCENE_FEATURES: []}
    for start in tqdm(range(0, num_frames, batch_size), desc="encode frames", unit="batch", leave=False):
        batch = get(np.arange(start, min(start + batch_size, num_frames)))
        positions, features = policy.encode_scene(batch)
        out[SCENE_POSITIONS].append(positions.cpu().numpy())
        out[SCENE_FEATURES].append(features.cpu().numpy())
    policy.train(was_training)
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


# -- the probe: can a read-out of the encoder's output recover every cube? -------------


def fit_linear_probe(features: np.ndarray, targets: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Ridge regression ``[features, 1] @ W ~ targets``; returns ``W`` ``(F + 1, T)``."""
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype(np.float64)
    gram = x.T @ x + ridge * len(x) * np.eye(x.shape[1])
    return np.linalg.solve(gram, x.T @ targets.astype(np.float64))


def apply_linear_probe(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    return np.concatenate([features, np.ones((len(features), 1))], axis=1) @ weights


def localisation_errors(
    predicted: np.ndarray, true: np.ndarray, lifted: np.ndarray, axes: Sequence[str] = ("x", "y", "z")
) -> dict[str, dict[str, float]]:
    """Median and 90th-percentile error (cm) of cube positions ``(N, cubes, 3)``, overall and
    per axis, for cubes resting on the table and lifted or held cubes (``lifted (N, cubes)``)."""
    error = np.abs(predicted - true) * 100.0  # cm, (N, cubes, 3)
    distance = np.linalg.norm(predicted - true, axis=-1) * 100.0
    out: dict[str, dict[str, float]] = {}
    for name, mask in (("resting", ~lifted), ("lifted", lifted)):
        if not mask.any():
            continue
        row = {
            "count": int(mask.sum()),
            "median_cm": float(np.median(distance[mask])),
            "p90_cm": float(np.percentile(distance[mask], 90)),
        }
        for i, axis in enumerate(axes):
            row[f"{axis}_median_cm"] = float(np.median(error[..., i][mask]))
            row[f"{axis}_p90_cm"] = float(np.percentile(error[..., i][mask], 90))
        out[name] = row
    return out
