"""Decision Transformers merged into one multi-task policy, over several seeds (``make
dt-merge``; ``scripts/dt_merge.py`` is its command line).

Per seed, after the merging paper (Lawson & Qureshi, arXiv 2303.07551): one common
initialisation (a multi-task DT trained briefly on every task), one specialist per task
fine-tuned from it, each specialist's diagonal Fisher on its own data, then the merges:
uniform average, Fisher-weighted average, task arithmetic and TIES (relative to the
common initialisation), and a merge into an AdaMoE body (the specialists' MLPs as routed
experts, routers fitted briefly). Every model is evaluated on every task; normalised
return is 0 for a uniformly random policy and 100 for the scripted expert at zero noise.

Writes ``<output_dir>/results.md``, ``results.json``, ``plots/normalized_return.png`` and
per seed ``seed<k>/{common, specialists/<task>, merged/<method>}`` (each a
``from_pretrained`` directory) with ``eval/*.json`` beside. Every stage records what it was
made with (its settings, the datasets, the weights it starts from) and is reused only when
those are unchanged; a change rebuilds it and everything downstream, saying so.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.collection import CollectionJob, check_reusable, dataset_id_for, run_collection
from envs.datasets import dataset_path
from envs.ids import tabletop_id
from policies.dt.merging import merge_into_moe, merge_specialists
from policies.dt.recipe import (
    build_model,
    evaluate_model,
    fisher_for,
    load_task_data,
    parse_datasets,
    references_for,
    train_common,
    train_specialist,
)
from policies.dt.training import DTTrainConfig, train_dt
from policies.io import fingerprint, read_json, stage_matches, write_json, write_text
from policies.plotting import pyplot, save_figure
from policies.pretrained import from_pretrained, weights_sha256

DEFAULT_TASKS = ("ReachRed", "PickRed", "PushRedToYellowPad", "PlaceBlueOnYellowPad")
MERGES = ("average", "fisher", "task_arithmetic", "ties", "moe")
FISHER_NORMALIZATIONS = ("none", "trace", "l2")
LABELS = {
    "specialist": "Specialists (each on its own task)",
    "common": "Common initialisation",
    "average": "Uniform average",
    "fisher": "Fisher merge",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "moe": "Merge into AdaMoE",
}


@dataclass
class MergeExperimentConfig:
    """Everything one run of the merging experiment depends on (stored in ``results.json``)."""

    output_dir: str = "outputs/dt_merge"
    root: str | None = None  # dataset root (default: <output_dir>/datasets)
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # tabletop tasks to collect
    datasets: list[str] = field(default_factory=list)  # TASK=MINARI_ID_OR_PATH instead of collecting
    episodes_per_task: int = 50  # per noise level
    noise: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    common_steps: int = 200
    specialist_steps: int = 400
    router_steps: int = 100
    batch_size: int = 32  # windows per task per step
    lr: float = 1e-3
    router_lr: float = 1e-2
    warmup_steps: int = 60
    fisher_samples: int = 256
    fisher_normalization: str = "none"
    ta_scale: float = 0.5  # task arithmetic (1 / number of tasks would equal the average)
    ties_scale: float = 1.0
    ties_density: float = 0.2
    eval_episodes: int = 20
    target_quantile: float = 0.9
    device: str = "cpu"

    def validate(self) -> None:
        if self.fisher_normalization not in FISHER_NORMALIZATIONS:
            raise ValueError(
                f"fisher_normalization={self.fisher_normalization!r}; valid choices are {FISHER_NORMALIZATIONS}"
            )
        for name in (
            "episodes_per_task",
            "common_steps",
            "specialist_steps",
            "router_steps",
            "batch_size",
            "fisher_samples",
            "eval_episodes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.seeds):
            raise ValueError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if self.noise and any(not math.isfinite(n) or n < 0 for n in self.noise):
            raise ValueError(f"noise levels must be finite and >= 0, got {list(self.noise)}")


# Two tasks and tiny budgets: the plumbing in about a minute.
QUICK = dict(
    tasks=["ReachRed", "PickRed"],
    episodes_per_task=6,
    noise=[0.0, 0.5],
    seeds=[0],
    common_steps=30,
    specialist_steps=20,
    router_steps=10,
    batch_size=8,
    fisher_samples=16,
    eval_episodes=3,
    warmup_steps=5,
)


def prepare_data(cfg: MergeExperimentConfig) -> dict[str, str]:
    """``{task: dataset id or path}``; tabletop datasets are collected when missing."""
    if cfg.datasets:
        return parse_datasets(cfg.datasets)
    env_ids = [tabletop_id(t) for t in cfg.tasks]
    ids = {env_id: dataset_id_for(env_id, "dt-state") for env_id in env_ids}
    missing = [e for e, d in ids.items() if not dataset_path(d, cfg.root).exists()]
    job = CollectionJob(
        env_ids=missing,
        episodes_per_task=cfg.episodes_per_task,
        noise_levels=tuple(cfg.noise),
        pixels=False,
        dataset_name="dt-state",
        root=cfg.root,
        workers=2,
    )
    for env_id in sorted(set(ids) - set(missing)):  # reused only when made with this run's settings
        check_reusable(ids[env_id], cfg.root, cfg.episodes_per_task, cfg.noise, job, env_id)
    if missing:
        print(f"collecting state-only datasets for {len(missing)} task(s) ...", flush=True)
        run_collection(job)
    return {d.split("/")[1]: d for d in ids.values()}


def train_config(cfg: MergeExperimentConfig, steps: int, seed: int, **kw: Any) -> DTTrainConfig:
    return DTTrainConfig(
        steps=steps,
        batch_size=cfg.batch_size,
        lr=kw.pop("lr", cfg.lr),
        warmup_steps=min(cfg.warmup_steps, steps),
        seed=seed,
        device=cfg.device,
        log_every=max(1, steps // 20),
        **kw,
    )


def stage(directory: Path, build, label: str, settings: dict[str, Any]):
    """Load ``directory`` when it was made with ``settings`` (its ``stage.json``), else build
    and save it, saying why when an older one is replaced."""
    if (directory / "model.safetensors").is_file() and stage_matches(directory, settings, f"  {label}"):
        return from_pretrained(directory)
    t0 = time.perf_counter()
    model = build()
    record = {"fingerprint": fingerprint(settings), "settings": settings}
    model.save_pretrained(directory, extra_files={"stage.json": json.dumps(record, indent=2) + "\n"})
    print(f"  {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    return model


def training_settings(config: DTTrainConfig) -> dict[str, Any]:
    """What a trained model depends on: its training settings, less where it ran."""
    return {k: v for k, v in asdict(config).items() if k != "device"}


def data_settings(cfg: MergeExperimentConfig, datasets: dict[str, str]) -> dict[str, Any]:
    collected = {} if cfg.datasets else {"episodes_per_task": cfg.episodes_per_task, "noise": list(cfg.noise)}
    return {"datasets": datasets, "root": str(cfg.root), **collected}


def evaluation(path: Path, settings: dict[str, Any], run) -> dict[str, Any]:
    """The evaluation at ``path`` when it was made with ``settings``, else ``run()`` saved there."""
    record = read_json(path)
    if record is not None and record.get("fingerprint") == fingerprint(settings):
        return record["results"]
    if record is not None:
        print(f"  eval {path.stem}: settings changed since {path} was made; evaluating again", flush=True)
    t0 = time.perf_counter()
    results = run()
    write_json(path, {"fingerprint": fingerprint(settings), "settings": settings, "results": results}, indent=1)
    print(f"  eval {path.stem}: {time.perf_counter() - t0:.1f} s", flush=True)
    return results


def run_seed(cfg: MergeExperimentConfig, seed: int, data: dict, datasets: dict[str, str], out: Path) -> dict[str, Any]:
    """One seed's stages, each rebuilt only when what it depends on changed (its settings,
    the weights it starts from: ``stage.json`` beside every checkpoint and in every
    evaluation)."""
    torch.manual_seed(seed)
    tasks = list(data)
    seed_dir = out / f"seed{seed}"
    common_config = train_config(cfg, cfg.common_steps, seed)
    common = stage(
        seed_dir / "common",
        lambda: train_common(
            build_model(data, cfg.target_quantile),
            data,
            common_config,
            seed_dir / "logs" / "common",
        ),
        "common initialisation",
        {
            "data": data_settings(cfg, datasets),
            "train": training_settings(common_config),
            "target_quantile": cfg.target_quantile,
        },
    )
    common_weights = weights_sha256(seed_dir / "common")
    specialist_config = train_config(cfg, cfg.specialist_steps, seed)
    specialists = {
        t: stage(
            seed_dir / "specialists" / t,
            lambda t=t: train_specialist(common, t, data, specialist_config, seed_dir / "logs" / t),
            f"specialist {t}",
            {"task": t, "common": common_weights, "train": training_settings(specialist_config)},
        )
        for t in tasks
    }
    fishers = {
        t: fisher_for(seed_dir / "specialists" / t, specialists[t], t, data[t], cfg.fisher_samples, seed=seed)
        for t in tasks
    }
    norm = None if cfg.fisher_normalization == "none" else cfg.fisher_normalization
    router_config = train_config(cfg, cfg.router_steps, seed, lr=cfg.router_lr, trainable="router")

    def moe() -> Any:
        model = merge_into_moe(specialists, generator=torch.Generator().manual_seed(seed))
        train_dt(model, data, router_config, seed_dir / "logs" / "moe-router")
        return model

    builders = {
        "average": lambda: merge_specialists(specialists, "average"),
        "fisher": lambda: merge_specialists(specialists, "fisher", fishers=fishers, normalization=norm),
        "task_arithmetic": lambda: merge_specialists(specialists, "task_arithmetic", base=common, scale=cfg.ta_scale),
        "ties": lambda: merge_specialists(
            specialists, "ties", base=common, scale=cfg.ties_scale, density=cfg.ties_density
        ),
        "moe": moe,
    }
    options = {
        "average": {},
        "fisher": {"normalization": cfg.fisher_normalization, "fisher_samples": cfg.fisher_samples},
        "task_arithmetic": {"scale": cfg.ta_scale},
        "ties": {"scale": cfg.ties_scale, "density": cfg.ties_density},
        "moe": {"seed": seed, "train": training_settings(router_config)},
    }
    inputs = {"common": common_weights, "specialists": {t: weights_sha256(seed_dir / "specialists" / t) for t in tasks}}
    merged = {
        m: stage(seed_dir / "merged" / m, builders[m], f"merge {m}", {"method": m, **inputs, **options[m]})
        for m in MERGES
    }

    references = references_for(common, cfg.eval_episodes, out / "references.json")
    results: dict[str, Any] = {}
    directories = {"common": seed_dir / "common"} | {f"specialist:{t}": seed_dir / "specialists" / t for t in tasks}
    directories |= {m: seed_dir / "merged" / m for m in MERGES}
    evaluations = [("common", common, tasks)] + [(f"specialist:{t}", specialists[t], [t]) for t in tasks]
    evaluations += [(m, merged[m], tasks) for m in MERGES]
    for name, model, on in evaluations:
        settings = {
            "weights": weights_sha256(directories[name]),
            "tasks": on,
            "episodes": cfg.eval_episodes,
            "references": {t: references[t] for t in on},
        }

        def run_eval(model=model, on=on) -> dict[str, Any]:
            return evaluate_model(model, on, references, cfg.eval_episodes)

        results[name] = evaluation(seed_dir / "eval" / f"{name.replace(':', '-')}.json", settings, run_eval)
    params = {
        "dense": common.num_parameters(),
        "moe_total": merged["moe"].num_parameters(),
        "moe_active": merged["moe"].num_parameters(active=True),
    }
    return {"results": results, "params": params}


def table_rows(per_seed: dict[int, dict], tasks: list[str]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{row: {task: {"normalized_return": [per seed], "success": [per seed]}}}``."""
    rows: dict[str, dict[str, dict[str, list[float]]]] = {}
    for seed_result in per_seed.values():
        res = seed_result["results"]
        for row in ("specialist", "common", *MERGES):
            for task in tasks:
                entry = res[f"specialist:{task}"][task] if row == "specialist" else res[row][task]
                cell = rows.setdefault(row, {}).setdefault(task, {"normalized_return": [], "success": []})
                cell["normalized_return"].append(entry["normalized_return"])
                cell["success"].append(entry["success"])
    return rows


def fmt(values: list[float], scale: float = 1.0) -> str:
    v = np.asarray(values) * scale
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def report(cfg: MergeExperimentConfig, per_seed: dict[int, dict], tasks: list[str], out: Path, refs: dict) -> dict:
    rows = table_rows(per_seed, tasks)
    seeds = sorted(per_seed)
    mean_nr = {
        r: [float(np.mean([rows[r][t]["normalized_return"][i] for t in tasks])) for i in range(len(seeds))]
        for r in rows
    }
    mean_sr = {r: [float(np.mean([rows[r][t]["success"][i] for t in tasks])) for i in range(len(seeds))] for r in rows}
    diff = np.array(mean_nr["fisher"]) - np.array(mean_nr["average"])
    summary = {
        "fisher_minus_uniform_per_seed": diff.tolist(),
        "fisher_minus_uniform_mean": float(diff.mean()),
        "fisher_beats_uniform_seeds": int((diff > 0).sum()),
        "seeds": seeds,
    }
    params = per_seed[seeds[0]]["params"]
    lines = [
        f"Normalised return (0 = uniformly random actions, 100 = scripted expert at zero noise, on the same "
        f"evaluation scenes) and success rate, {cfg.eval_episodes} episodes per task, mean ± std over seeds "
        f"{seeds}.",
        "",
        "| model | " + " | ".join(tasks) + " | mean normalised return | mean success |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    for r in ("specialist", "common", *MERGES):
        cells = [f"{fmt(rows[r][t]['normalized_return'])} ({fmt(rows[r][t]['success'], 100)}%)" for t in tasks]
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + f" | **{fmt(mean_nr[r])}** | {fmt(mean_sr[r], 100)}% |")
    lines += [
        "",
        "Cells: normalised return (success %). Reference returns per task (random / expert): "
        + ", ".join(f"{t} {refs[t]['random']:.1f} / {refs[t]['expert']:.1f}" for t in tasks)
        + ".",
        f"Fisher merge minus uniform average, mean normalised return per seed: "
        f"{', '.join(f'{d:+.1f}' for d in diff)} (mean {diff.mean():+.1f}; Fisher ahead on "
        f"{summary['fisher_beats_uniform_seeds']} of {len(seeds)} seeds).",
        f"Parameters: dense DT {params['dense']:,}; merged AdaMoE DT {params['moe_total']:,} total, "
        f"{params['moe_active']:,} active per token.",
    ]
    md = "\n".join(lines) + "\n"
    result = {
        "tasks": tasks,
        "seeds": seeds,
        "references": refs,
        "rows": rows,
        "mean_normalized_return": mean_nr,
        "mean_success": mean_sr,
        "summary": summary,
        "params": params,
        "config": asdict(cfg),
    }
    write_text(out / "results.md", md)
    write_json(out / "results.json", result, indent=1)
    plot(rows, tasks, mean_nr, out / "plots" / "normalized_return.png")
    print(md)
    return result


def plot(rows: dict, tasks: list[str], mean_nr: dict, path: Path) -> None:
    plt = pyplot()
    order = ["specialist", "common", *MERGES]
    groups = [*tasks, "mean"]
    width = 0.8 / len(order)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(groups)), 4.5))
    for i, r in enumerate(order):
        values = [np.mean(rows[r][t]["normalized_return"]) for t in tasks] + [np.mean(mean_nr[r])]
        errors = [np.std(rows[r][t]["normalized_return"]) for t in tasks] + [np.std(mean_nr[r])]
        x = np.arange(len(groups)) + (i - (len(order) - 1) / 2) * width
        ax.bar(x, values, width, yerr=errors, label=LABELS[r], capsize=2)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=10)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_ylabel("normalised return (0 random, 100 expert)")
    ax.set_title("Decision Transformer specialists merged into one multi-task policy")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def run(cfg: MergeExperimentConfig) -> dict:
    """Every stage for every seed, then the report; returns what ``results.json`` holds."""
    cfg.validate()
    out = Path(cfg.output_dir)
    cfg.root = cfg.root or str(out / "datasets")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    t0 = time.perf_counter()
    datasets = prepare_data(cfg)
    data = load_task_data(datasets, cfg.root)
    for d in data.values():
        s = d.summary()
        print(
            f"{s['dataset']}: {s['episodes']} episodes, {s['steps']} steps, return "
            f"{s['return_min']:.1f} .. {s['return_max']:.1f}",
            flush=True,
        )
    per_seed = {}
    for seed in cfg.seeds:
        print(f"seed {seed}", flush=True)
        per_seed[seed] = run_seed(cfg, seed, data, datasets, out)
    refs = json.loads((out / "references.json").read_text())
    result = report(cfg, per_seed, list(data), out, refs)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min -> {out / 'results.md'}")
    return result
