"""The merging paper's recipe as functions the scripts share: datasets to a multi-task
model, the common initialisation, specialists, Fishers cached beside checkpoints, every
merge, and the evaluation of a model on its tasks."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adamoe import fisher_metadata, load_fisher, save_fisher
from policies.dt.configuration_dt import DecisionTransformerConfig, DTTask
from policies.dt.data import OfflineData, load_offline
from policies.dt.evaluation import EVAL_SEED, evaluate_task, normalized_return, reference_returns
from policies.dt.merging import dt_fisher
from policies.dt.modeling_dt import DecisionTransformer
from policies.dt.training import DTTrainConfig, set_state_stats, specialist_from, train_dt
from policies.io import write_json
from policies.pretrained import read_config

FISHER_NAME = "fisher.safetensors"


def parse_datasets(items: list[str]) -> dict[str, str]:
    """``["pick-red=tabletop/pick-red/dt-v0", "/data/hopper"]`` -> ``{task: id or path}``; a
    bare id or path is named after its last meaningful part."""
    out: dict[str, str] = {}
    for item in items:
        if "=" in item:
            task, name = item.split("=", 1)
        else:
            parts = [p for p in Path(item).parts if p not in ("data", "/")]
            task, name = parts[-2] if len(parts) > 1 and parts[-1].endswith("-v0") else parts[-1], item
        if task in out:
            raise ValueError(f"task {task!r} is given twice; name datasets as TASK=ID_OR_PATH")
        out[task] = name
    return out


def load_task_data(datasets: Mapping[str, str], root: str | os.PathLike | None = None) -> dict[str, OfflineData]:
    out = {}
    for task, name in datasets.items():
        try:
            out[task] = load_offline(name, root)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc}; a dataset is given as TASK=MINARI_ID_OR_PATH (or a bare id or path), "
                "e.g. pick-red=tabletop/pick-red/dt-state-v0"
            ) from exc
    return out


def task_specs(
    data: Mapping[str, OfflineData], target_quantile: float = 0.9, return_scale: float | None = None
) -> list[DTTask]:
    """One :class:`DTTask` per dataset: the return scale is the dataset's largest absolute
    return (returns-to-go then lie in [-1, 1]) unless given; the evaluation target is the
    ``target_quantile`` of the dataset's episode returns."""
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
    specs = []
    for task, d in data.items():
        returns = d.returns
        scale = return_scale or float(max(np.abs(returns).max(), 1e-6))
        specs.append(
            DTTask(
                name=task,
                state_dim=d.state_dim,
                act_dim=d.act_dim,
                return_scale=scale,
                target_return=float(np.quantile(returns, target_quantile)),
                env_id=d.env_id,
                dataset=d.name,
            )
        )
    return specs


def build_model(data: Mapping[str, OfflineData], target_quantile: float = 0.9, **config: Any) -> DecisionTransformer:
    """A fresh multi-task DT for ``data`` with its state normalisation set."""
    model = DecisionTransformer(DecisionTransformerConfig(tasks=task_specs(data, target_quantile), **config))
    set_state_stats(model, data)
    return model


def train_common(
    model: DecisionTransformer, data: Mapping[str, OfflineData], config: DTTrainConfig, output_dir: Path | None = None
) -> DecisionTransformer:
    model.config.role = "common"
    train_dt(model, data, config, output_dir)
    return model


def train_specialist(
    common: DecisionTransformer,
    task: str,
    data: Mapping[str, OfflineData],
    config: DTTrainConfig,
    output_dir: Path | None = None,
) -> DecisionTransformer:
    model = specialist_from(common, task)
    train_dt(model, {task: data[task]}, DTTrainConfig(**{**config.__dict__, "tasks": [task]}), output_dir)
    return model


def specialist_task(directory: str | os.PathLike) -> str:
    """The task a specialist checkpoint was fine-tuned on (its config's ``role``)."""
    config = read_config(directory)
    if config["type"] != DecisionTransformer.policy_type:
        raise ValueError(f"{directory} holds a {config['type']!r} policy, not a Decision Transformer")
    role = config.get("role", "")
    if not role.startswith("specialist:"):
        raise ValueError(f"{directory} is not a specialist checkpoint (role {role!r}); pass --tasks to name its task")
    return role.split(":", 1)[1]


def fisher_for(
    checkpoint: str | os.PathLike,
    model: DecisionTransformer,
    task: str,
    data: OfflineData | None,
    samples: int = 512,
    kind: str = "exact",
    seed: int = 0,
    path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The Fisher saved beside ``checkpoint`` (or at ``path``), computed and saved when absent."""
    path = Path(path) if path is not None else Path(checkpoint) / FISHER_NAME
    wanted = {"task": task, "samples": samples, "kind": kind, "seed": seed}
    if path.is_file():
        made = fisher_metadata(path)
        if data is None or all(made.get(k) == v for k, v in wanted.items()):
            return load_fisher(path)
        print(f"  Fisher {path} was computed with other settings; computing it again", flush=True)
    if data is None:
        raise FileNotFoundError(f"no Fisher at {path} and no dataset for task {task!r} to compute it from")
    fisher = dt_fisher(model, task, data, samples=samples, kind=kind, seed=seed, progress=progress)
    save_fisher(fisher, path, {**wanted, "dataset": data.name})
    return fisher


def evaluate_model(
    model: DecisionTransformer,
    tasks: list[str],
    references: Mapping[str, dict[str, float]],
    episodes: int,
    seed: int = EVAL_SEED,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per task: mean return, normalised return, success rate and the episodes."""
    out = {}
    for task in tasks:
        eps = evaluate_task(model, task, episodes=episodes, seed=seed, progress=progress)
        mean = float(np.mean([e["return"] for e in eps]))
        out[task] = {
            "return": mean,
            "normalized_return": normalized_return(mean, references[task]),
            "success": float(np.mean([e["success"] for e in eps])),
            "episodes": eps,
        }
    return out


def references_for(model: DecisionTransformer, episodes: int, cache: Path | None = None) -> dict[str, dict]:
    """Reference returns of every task over ``episodes`` (cached as JSON when ``cache`` is
    given; a cache measured over another number of episodes is measured again)."""
    if cache is not None and cache.is_file():
        refs = json.loads(cache.read_text())
        if all(refs.get(t, {}).get("episodes") == episodes for t in model.config.task_names):
            return refs
    refs = {t.name: {**reference_returns(t.env_id, episodes), "episodes": episodes} for t in model.config.tasks}
    if cache is not None:
        write_json(cache, refs)
    return refs
