"""Training a (multi-task) Decision Transformer, and the merging paper's recipe:
one common initialisation trained briefly on every task, then one specialist per task
fine-tuned from it.

Every step draws one batch of windows per trained task and runs all of them through the
shared body in one pass; the loss is the mean over tasks of the masked action MSE.
AdamW with linear warm-up to a constant rate and gradient clipping, as the DT paper.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import adamoe
from policies.dt.data import OfflineData, window_sampler
from policies.dt.modeling_dt import DecisionTransformer

TRAINABLE = ("all", "router")


@dataclass
class DTTrainConfig:
    steps: int = 2000
    batch_size: int = 64  # windows per task per step
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 0.25
    seed: int = 0
    log_every: int = 50
    device: str = "cpu"
    # "all": the shared body and the trained tasks' embeddings and heads (other tasks'
    # modules are left exactly as they are); "router": only MoE routers and scale adapters.
    trainable: str = "all"
    tasks: list[str] = field(default_factory=list)  # empty: every task of the data

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, grad_clip > 0; got {self.lr}, {self.weight_decay}, {self.grad_clip}"
            )
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r} is not one of {TRAINABLE}")


def trainable_parameters(model: DecisionTransformer, tasks: list[str], which: str) -> list[torch.nn.Parameter]:
    if which == "router":
        params = adamoe.router_parameters(model)
        if not params:
            raise ValueError("trainable='router' needs MoE layers; this model has none")
        return params
    own = tuple(f"tasks.{t}." for t in tasks)
    return [p for n, p in model.named_parameters() if not n.startswith("tasks.") or n.startswith(own)]


def set_state_stats(model: DecisionTransformer, data: Mapping[str, OfflineData]) -> None:
    """Each task's state normalisation from its dataset (done once, before any training)."""
    for task, d in data.items():
        mean, std = d.state_stats()
        model.set_state_stats(task, mean, std)


def train_dt(
    model: DecisionTransformer,
    data: Mapping[str, OfflineData],
    config: DTTrainConfig,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``data`` (``{task: dataset}``) in place; returns the logged rows.

    With ``output_dir``, every logged row is appended to ``metrics.jsonl`` there.
    """
    config.validate()
    tasks = config.tasks or list(data)
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"no data for task {missing[0]!r}; data has {sorted(data)}")
    for t in tasks:
        model.config.task(t)  # raises on a task the model does not have
    device = torch.device(config.device)
    model.to(device).train()
    samplers = {t: window_sampler(model, t, data[t]) for t in tasks}
    params = trainable_parameters(model, tasks, config.trainable)
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 1.0))
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    log_path = None
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(output_dir) / "metrics.jsonl"
        log_path.unlink(missing_ok=True)  # this run's curve, not appended to an earlier run's
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train DT ({','.join(tasks)})"[:60], disable=not progress)
    step = 0
    try:
        for step in bar:
            batches = {t: s.sample(config.batch_size, rng, device) for t, s in samplers.items()}
            loss, logs = model.action_loss(batches, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            if step % config.log_every == 0 or step == config.steps - 1:
                row = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm), **logs}
                row.update(lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - start)
                history.append(row)
                bar.set_postfix(loss=f"{row['action_loss']:.4f}")
                if log_path is not None:
                    with log_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    except KeyboardInterrupt as exc:
        raise KeyboardInterrupt(
            f"DT training interrupted at step {step} of {config.steps}; a DT saves only when it finishes "
            "(minutes), so the same command run again starts it over"
        ) from exc
    finally:
        for p, flag in zip(frozen, flags, strict=True):
            p.requires_grad_(flag)
        model.eval()
    return history


def train_config_dict(config: DTTrainConfig) -> dict[str, Any]:
    return asdict(config)


def specialist_from(common: DecisionTransformer, task: str) -> DecisionTransformer:
    """A copy of the common initialisation marked as ``task``'s specialist (to be fine-tuned)."""
    model = copy.deepcopy(common)
    model.config.task(task)
    model.config.role = f"specialist:{task}"
    return model
