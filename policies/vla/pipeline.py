"""The main job as a library, on the protocol of the AdaMoE paper: start from a pretrained
dense VLA (the shipped base, which solves the ``tabletop`` suite), collect demonstrations
of tasks it has never seen (``tabletop-long``: long-horizon compositions of its skills and
unseen pairings), upcycle copies of it into MoE variants, fine-tune every variant for the
same steps on the same batches, evaluate each on the new suite (training and held-out
phrasings) and on the base suite (retention: what fine-tuning made it forget), and report
(``make demo`` is ``scripts/demo.py``, a command line over ``run``).

Stages, in one output directory (default ``outputs/demo/``); each is skipped when its
output is complete and was made with the same settings, so an interrupted run picks up
where it stopped (training resumes from its last checkpoint):

    pretrain   pretrain/                      only with ``pretrain``: the recipe on the base suite
    collect    datasets/                      scripted-expert demos of the new suite at several noise
                                              levels, and a few of the base suite (datasets/reference/)
    finetune   checkpoints/<variant>/         dense, vanilla (top-k MoE), adamoe (runs/<variant>/),
                                              with success measured along the way (runs/<variant>/curve.json)
    evaluate   eval/<variant>/<split>/        train and heldout phrasings of the new suite; retention
                                              (the base suite, training phrasings)
    report     results.md, results.json, plots/*.png (policies/vla/report.py)

The MoE variants follow AdaMoE's recipe: 4 routed experts, top-1, one shared expert,
balance loss 0.01 then 0.005 after 500 steps, router and scale adapter at twice the base
learning rate, every parameter trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adamoe
import envs  # noqa: F401  (GL backend first, registers the envs)
from envs.collection import (
    COLLECTION_KEY,
    CollectionJob,
    check_reusable,
    collection_metadata,
    dataset_id_for,
    run_collection,
)
from envs.datasets import dataset_path, episode_metadata, load_dataset
from envs.ids import is_metaworld, is_tabletop, task_name
from envs.registration import resolve_env_ids
from policies.constants import SCENE_FEATURES, SCENE_POSITIONS
from policies.data import ChunkDataset
from policies.evaluation import EvalConfig, evaluate
from policies.io import log, read_json, record_stage, stage_matches, write_json, write_text
from policies.pretrained import from_pretrained, weights_sha256
from policies.training import TrainConfig, train, training_seconds
from policies.vla import recipe
from policies.vla.configuration_vla import parse_overrides, vla_config
from policies.vla.families import DEMO_VARIANTS, KINDS, parse_variant, upcycle_as
from policies.vla.modeling_vla import VLAPolicy
from policies.vla.perception import encode_frames
from policies.vla.report import (
    demo_flow_loss,
    expert_use,
    latency,
    machine,
    measure_routing,
    merge_expert_use,
    plot_curves,
    plot_expert_use,
    plot_stage_progress,
    plot_success,
    plot_training,
    routing_separation,
    stage_reach,
    task_frames,
    to_markdown,
)

# The shipped dense base (checkpoints/vla-tabletop-base), which the main job starts from.
SHIPPED_BASE = Path(__file__).resolve().parents[2] / "checkpoints" / "vla-tabletop-base"


# Evaluations: the new suite on its training and held-out phrasings; retention on the base suite.
SPLITS = ("train", "heldout")
EVALS = ("train", "heldout", "retention")


@dataclass
class PipelineConfig:
    """Everything one run of the comparison depends on (stored in ``results.json``)."""

    output_dir: str = "outputs/demo"
    # The fine-tuning suite (new tasks) and the suite the base was pretrained on: --pretrain's
    # recipe runs on it, and it measures retention and routing on the old tasks.
    suite: list[str] = field(default_factory=lambda: ["tabletop-long"])
    base_suite: list[str] = field(default_factory=lambda: ["tabletop"])
    # Collection: episodes per task and noise level. Noisy demos show the experts
    # recovering from perturbations, which closed-loop imitation needs.
    episodes_per_task: int = 50
    noise: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    reference_episodes: int = 2  # noise-free base-suite demos per task: frames for routing on the old tasks
    workers: int = 2
    datasets_root: str | None = None  # reuse datasets from elsewhere (default: <output_dir>/datasets)
    # Policy and training.
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    # The dense policy the comparison starts from: the shipped base, as a pi0 user starts
    # from published weights, or (``pretrain``) the recipe run here from nothing on the
    # base suite, with ``pretrain_steps`` policy steps and any other RecipeConfig field in ``recipe``.
    pretrained: str | None = str(SHIPPED_BASE)
    pretrain: bool = False
    pretrain_steps: int = recipe.RecipeConfig.steps
    recipe: dict[str, Any] = field(default_factory=dict)
    finetune_steps: int = 1000
    finetune_lr: float = 3e-4
    variants: list[str] = field(default_factory=lambda: list(DEMO_VARIANTS))
    init: str = "paper"
    num_experts: int = 4
    top_k: int = 1
    # The fine-tuning curve of ``curve_variants``: success at ``curve_points`` evenly spaced
    # steps (the last is the final evaluation), ``curve_episodes`` per task on the training
    # phrasings at the others (and the pretrained policy's zero-shot success at step 0).
    curve_points: int = 3
    curve_episodes: int = 5
    curve_variants: list[str] = field(default_factory=lambda: ["dense"])
    # Evaluation.
    eval_episodes: int = 10  # per task of the new suite and phrasing split
    retention_episodes: int = 5  # per task of the base suite (0: no retention check)
    eval_pretrained: bool = True  # the starting point: its retention reference, and (zero_shot) the new suite
    zero_shot: bool = True  # the pretrained policy on the new suite too (training phrasings)
    # Evaluation scenes: task i's episode j is seed eval_seed + 1000 * i + j (no demonstration's).
    eval_seed: int = 100_000
    videos: int = 1
    latency_calls: int = 30
    seed: int = 0
    progress: bool = True

    @property
    def root(self) -> Path:
        return Path(self.datasets_root) if self.datasets_root else Path(self.output_dir) / "datasets"

    @property
    def reference_root(self) -> Path:
        """The base suite's few noise-free demonstrations (routing on the old tasks)."""
        return self.root / "reference"

    def validate(self) -> None:
        for name in [*self.variants, *self.curve_variants]:
            parse_variant(name, self.init)
        if self.init not in adamoe.config.INITS:
            raise ValueError(f"init={self.init!r} is not one of {adamoe.config.INITS}")
        for name in (
            "episodes_per_task",
            "batch_size",
            "pretrain_steps",
            "finetune_steps",
            "eval_episodes",
            "curve_points",
            "curve_episodes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_seed < 0:
            raise ValueError(f"eval_seed must be >= 0, got {self.eval_seed}")
        for name in ("retention_episodes", "reference_episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")
        if self.curve_points > self.finetune_steps:
            raise ValueError(
                f"curve_points={self.curve_points} must be at most finetune_steps={self.finetune_steps} "
                "(one evaluation per point, at distinct steps)"
            )
        resolve_env_ids(self.suite)  # an unknown suite or task fails before any work
        resolve_env_ids(self.base_suite)
        vla_config(self.preset, **self.overrides)  # a bad preset or override fails before any work
        if self.pretrain:
            self.recipe_config().validate()
        elif not self.pretrained or not (Path(self.pretrained) / "config.json").is_file():
            raise ValueError(
                f"no pretrained checkpoint at {self.pretrained}: pass --pretrained DIR, or --pretrain to "
                f"pretrain one from nothing (`make pretrain` makes the shipped one)"
            )
        else:
            base = json.loads((Path(self.pretrained) / "config.json").read_text())
            if self.overrides or self.preset != base.get("preset", self.preset):
                raise ValueError(
                    f"--preset {self.preset!r} / --set {self.overrides} shape a policy pretrained here; the run "
                    f"starts from {self.pretrained} (preset {base.get('preset')!r}): add --pretrain, or drop them"
                )
            cameras = set(base.get("cameras", ()))
            for env_id in resolve_env_ids(self.suite):
                if is_metaworld(env_id) and not cameras <= {"corner", "corner2", "corner3", "topview"}:
                    raise ValueError(
                        f"{self.pretrained} sees the tabletop's cameras {sorted(cameras)}, not {env_id}'s: "
                        "Meta-World needs --pretrained with a policy trained on it"
                    )

    def recipe_config(self) -> recipe.RecipeConfig:
        """The pretraining recipe this run's ``--pretrain`` runs on the base suite (in
        ``<output_dir>/pretrain``)."""
        fields = dict(
            output_dir=str(Path(self.output_dir) / "pretrain"),
            suite=list(self.base_suite),
            seed=self.seed,
            workers=self.workers,
            episodes_per_task=self.episodes_per_task,
            noise=list(self.noise),
            preset=self.preset,
            overrides=dict(self.overrides),
            steps=self.pretrain_steps,
            batch_size=self.batch_size,
            eval_episodes=self.eval_episodes,
            progress=self.progress,
        )
        return recipe.RecipeConfig(**{**fields, **self.recipe})

    @property
    def base(self) -> Path:
        """The dense checkpoint the comparison starts from."""
        if self.pretrain:
            return Path(self.recipe_config().output_dir) / "policy" / "checkpoint"
        return Path(self.pretrained)

    def curve_steps(self) -> list[int]:
        """The steps the fine-tuning curve measures success at (the last: ``finetune_steps``)."""
        n = self.curve_points
        return sorted({round(self.finetune_steps * (i + 1) / n) for i in range(n)})


# --quick: the plumbing of every stage in under 2 minutes (a tiny policy pretrained in
# seconds, two tasks of each suite: one long task and one unseen pairing).
QUICK = {
    "suite": ["adamoe/Tabletop-PlaceRedOnYellowPadThenStackGreenOnRed-v0", "adamoe/Tabletop-StackGreenOnBlue-v0"],
    "base_suite": ["adamoe/Tabletop-ReachRed-v0", "adamoe/Tabletop-PickBlue-v0"],
    "episodes_per_task": 2,
    "noise": [0.0],
    "reference_episodes": 1,
    "preset": "tiny",
    "pretrain": True,
    "recipe": {
        key: recipe.QUICK[key]
        for key in (
            "scene_episodes_per_task",
            "scene_noise",
            "perception_steps",
            "perception_batch_size",
            "curve_episodes",
        )
    }
    | {"curve_points": 1},
    "batch_size": 8,
    "pretrain_steps": 30,
    "finetune_steps": 10,
    "curve_points": 2,
    "curve_episodes": 1,
    "curve_variants": list(DEMO_VARIANTS),
    "eval_episodes": 1,
    "retention_episodes": 1,
    "eval_pretrained": False,
    "videos": 0,
    "latency_calls": 5,
}


def collect(
    cfg: PipelineConfig,
    env_ids: list[str],
    root: Path | None = None,
    episodes: int | None = None,
    noise: list[float] | None = None,
) -> None:
    """Demonstrations of ``env_ids`` under ``root`` (default: the run's datasets, with its
    episode count and noise levels); datasets already there are reused when they were
    collected with the same settings, and refused otherwise."""
    root = cfg.root if root is None else root
    episodes = cfg.episodes_per_task if episodes is None else episodes
    noise = list(cfg.noise if noise is None else noise)
    missing = [e for e in env_ids if not dataset_path(dataset_id_for(e), root).exists()]
    job = CollectionJob(
        env_ids=missing,
        episodes_per_task=episodes,
        noise_levels=tuple(noise),
        root=str(root),
        seed=cfg.seed,
        workers=cfg.workers,
    )
    for env_id in sorted(set(env_ids) - set(missing)):  # reused only when made with this run's settings
        check_reusable(dataset_id_for(env_id), root, episodes, noise, job, env_id)
    if not missing:
        log(f"collect: datasets complete under {root}, reusing them")
        return
    log(f"collect: {episodes} episodes x noise {noise} for {len(missing)} tasks -> {root}")
    run_collection(job, progress=cfg.progress)


def old_tasks(cfg: PipelineConfig) -> list[str]:
    """The base suite's tasks that the fine-tuning suite does not hold."""
    new = set(resolve_env_ids(cfg.suite))
    return [e for e in resolve_env_ids(cfg.base_suite) if e not in new]


def collect_all(cfg: PipelineConfig, env_ids: list[str]) -> None:
    """The new suite's demonstrations, and a few noise-free ones of the old tasks (frames
    that show how the fine-tuned policies route them)."""
    collect(cfg, env_ids)
    if cfg.reference_episodes and old_tasks(cfg):
        collect(cfg, old_tasks(cfg), cfg.reference_root, cfg.reference_episodes, [0.0])


def expert_success(cfg: PipelineConfig, env_ids: list[str]) -> dict[str, float]:
    """The scripted expert's success per task, from the noise-free demonstrations."""
    out = {}
    for env_id in env_ids:
        metas = episode_metadata(load_dataset(dataset_id_for(env_id), root=cfg.root))
        clean = [m["success"] for m in metas if m["noise"] == 0.0] or [m["success"] for m in metas]
        out[task_name(env_id)] = float(np.mean(clean))
    return out


def train_stage(
    cfg: PipelineConfig,
    name: str,
    settings: dict[str, Any],
    build: Callable[[], VLAPolicy],
    data: ChunkDataset,
    train_config: TrainConfig,
    curve: Callable[[VLAPolicy, int], dict[str, Any]] | None = None,
    curve_steps: list[int] | None = None,
) -> dict[str, Any] | None:
    """Train ``build()`` into checkpoints/<name>/ unless it is there, made with ``settings``
    (everything the result depends on, recorded in runs/<name>/stage.json). Training resumes
    from runs/<name>/ when an earlier run with the same settings was interrupted; an earlier
    run's state, curve and checkpoint made with other settings are removed, never resumed or
    reused. ``curve(policy, step)``, when given, measures the policy at each of ``curve_steps``
    before the last (training pauses there and carries on exactly; runs/<name>/curve.json keeps
    the points across interruptions). Returns the training summary, or None when the
    checkpoint was reused."""
    out = Path(cfg.output_dir)
    run_dir, checkpoint = out / "runs" / name, out / "checkpoints" / name
    what = f"train {name}"
    same = stage_matches(run_dir, settings, what)
    if same and (checkpoint / "config.json").is_file():
        log(f"{what}: {checkpoint} exists, reusing it")
        return None
    if not same:
        for stale in (run_dir / "checkpoints", checkpoint, run_dir / "curve.json"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.is_file():
                stale.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    record_stage(run_dir, settings)  # before training: a resumed run is checked against it
    policy = build().train()
    log(
        f"{what}: {policy.num_parameters():,} parameters ({policy.num_parameters(active=True):,} active), "
        f"{train_config.steps} steps x {train_config.batch_size}"
    )
    points = read_json(run_dir / "curve.json") or []
    for step in (curve_steps or [])[:-1] if curve is not None else []:
        if any(p["step"] == step for p in points):
            continue
        train(policy, data, train_config, run_dir, resume=True, stop_at=step)
        points.append({"step": step, **curve(policy, step)})
        write_json(run_dir / "curve.json", points)
    summary = train(policy, data, train_config, run_dir, resume=True)
    summary["wall_s"] = training_seconds(run_dir / "metrics.jsonl")  # every segment's, not the last one's
    policy.save_pretrained(checkpoint, overwrite=True)
    write_json(run_dir / "summary.json", summary)
    log(f"{what}: {summary['wall_s'] / 60:.1f} min, final loss {summary['final_loss']:.4f}")
    return summary


def pretrain(cfg: PipelineConfig) -> Path:
    """The dense checkpoint to start from: the shipped (or given) one, or with ``--pretrain``
    the recipe run from nothing on the base suite."""
    if not cfg.pretrain:
        log(f"pretrain: starting from {cfg.base}")
        return cfg.base
    recipe_cfg = cfg.recipe_config()
    log(f"pretrain: the recipe from nothing in {recipe_cfg.output_dir} ({recipe_cfg.steps} policy steps)")
    recipe.run(recipe_cfg)
    return cfg.base


def upcycled(cfg: PipelineConfig, pretrained: Path, variant: str) -> VLAPolicy:
    """A fresh copy of the pretrained policy, upcycled as ``variant`` asks."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return upcycle_as(from_pretrained(pretrained), variant, cfg.init, cfg.num_experts, cfg.top_k, generator)


def datasets_record(root: str | os.PathLike, env_ids: list[str]) -> dict[str, Any]:
    """What the demonstrations of ``env_ids`` under ``root`` are, for a stage's fingerprint:
    each dataset's collection record (its episode count when it has none)."""
    out = {}
    for env_id in sorted(env_ids):
        dataset_id = dataset_id_for(env_id)
        made = collection_metadata(dataset_id, root).get(COLLECTION_KEY)
        out[dataset_id] = made if made is not None else {"episodes": len(load_dataset(dataset_id, root=root))}
    return out


def finetune_settings(cfg: PipelineConfig, pretrained: Path, variant: str) -> dict[str, Any]:
    """Everything a fine-tuned variant depends on: a change reruns it."""
    tasks = sorted(resolve_env_ids(cfg.suite))
    return {
        "tasks": tasks,
        "base": weights_sha256(pretrained),
        "variant": variant,
        "init": cfg.init,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "data": {"root": str(cfg.root), "episodes_per_task": cfg.episodes_per_task, "noise": list(cfg.noise)},
        "train": {"steps": cfg.finetune_steps, "batch_size": cfg.batch_size, "lr": cfg.finetune_lr, "seed": cfg.seed},
        "curve": {"steps": cfg.curve_steps(), "episodes_per_task": cfg.curve_episodes, "scenes": cfg.eval_seed}
        if variant in cfg.curve_variants
        else None,
    }


def curve_point(cfg: PipelineConfig, env_ids: list[str]) -> Callable[[VLAPolicy, int], dict[str, Any]]:
    """Success on ``curve_episodes`` per task (training phrasings) for the fine-tuning curve;
    the global random state is left as it was (training's own is in its checkpoint)."""

    def measure(policy: VLAPolicy, step: int) -> dict[str, Any]:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            config = EvalConfig(episodes_per_task=cfg.curve_episodes, seed=cfg.eval_seed, videos_per_task=0)
            result = evaluate(policy, env_ids, config, progress=False)
        successes = {t: round(r["success_rate"] * r["episodes"]) for t, r in result["per_task"].items()}
        rate = result["aggregated"]["success_rate"]
        log(f"curve: step {step}: {100 * rate:.1f}% over {cfg.curve_episodes} episodes per task")
        return {"success": rate, "episodes_per_task": cfg.curve_episodes, "successes": successes}

    return measure


def finetune(cfg: PipelineConfig, data: ChunkDataset, pretrained: Path, env_ids: list[str]) -> None:
    for variant in cfg.variants:
        train_config = TrainConfig(
            steps=cfg.finetune_steps,
            batch_size=cfg.batch_size,
            lr=cfg.finetune_lr,
            warmup_steps=min(50, cfg.finetune_steps // 10),
            seed=cfg.seed + 1,  # the same batches and noise for every variant
            progress=cfg.progress,
        )
        settings = finetune_settings(cfg, pretrained, variant)
        train_stage(
            cfg,
            variant,
            settings,
            lambda v=variant: upcycled(cfg, pretrained, v),
            data,
            train_config,
            curve=curve_point(cfg, env_ids) if variant in cfg.curve_variants else None,
            curve_steps=cfg.curve_steps(),
        )


def evaluated(cfg: PipelineConfig) -> list[tuple[str, Path]]:
    out = Path(cfg.output_dir) / "checkpoints"
    first = [("pretrained", cfg.base)] if cfg.eval_pretrained else []
    return first + [(v, out / v) for v in cfg.variants]


def eval_path(cfg: PipelineConfig, name: str, split: str) -> Path:
    base = Path(cfg.output_dir) / "eval" / name
    return base if split == "train" else base / split


def evaluations(cfg: PipelineConfig, name: str, env_ids: list[str]) -> list[tuple[str, list[str], EvalConfig]]:
    """What ``name`` is evaluated on: (split, tasks, settings). The new suite on both
    phrasing splits (the pretrained policy: training phrasings, zero-shot), and the base
    suite on its training phrasings (retention) when ``retention_episodes``."""
    tabletop = all(is_tabletop(e) for e in env_ids)
    splits = SPLITS if tabletop else ("train",)
    if name == "pretrained":
        splits = ("train",) if cfg.zero_shot else ()
    out = []
    for split in splits:
        videos = cfg.videos if split == "train" else 0
        config = EvalConfig(
            episodes_per_task=cfg.eval_episodes, seed=cfg.eval_seed, instruction_split=split, videos_per_task=videos
        )
        out.append((split, env_ids, config))
    if cfg.retention_episodes:
        config = EvalConfig(episodes_per_task=cfg.retention_episodes, seed=cfg.eval_seed, videos_per_task=0)
        out.append(("retention", list(resolve_env_ids(cfg.base_suite)), config))
    return out


def evaluate_all(cfg: PipelineConfig, env_ids: list[str]) -> None:
    for name, checkpoint in evaluated(cfg):
        policy = None
        for split, tasks, config in evaluations(cfg, name, env_ids):
            out = eval_path(cfg, name, split)
            settings = {
                "weights": weights_sha256(checkpoint),
                "tasks": list(tasks),
                "episodes_per_task": config.episodes_per_task,
                "split": config.instruction_split,
                "seed": cfg.seed,
                "scenes": config.seed,
                "batching": {"max_envs": config.max_envs, "skip_finished": config.skip_finished},
            }
            if (out / "eval_info.json").is_file() and stage_matches(out, settings, f"evaluate {name} ({split})"):
                log(f"evaluate {name} ({split}): {out / 'eval_info.json'} exists")
                continue
            policy = policy or from_pretrained(checkpoint)
            torch.manual_seed(cfg.seed)
            result = evaluate(policy, tasks, config, out, progress=cfg.progress)
            record_stage(out, settings)
            rate = 100 * result["aggregated"]["success_rate"]
            log(f"evaluate {name} ({split}): {rate:.1f}% in {result['wall_s']:.0f} s")


def load_eval(cfg: PipelineConfig, name: str, split: str) -> dict[str, Any] | None:
    return read_json(eval_path(cfg, name, split) / "eval_info.json")


def _successes(result: dict[str, Any]) -> dict[str, list[int]]:
    """Per task: [successes, episodes]."""
    return {t: [round(r["success_rate"] * r["episodes"]), r["episodes"]] for t, r in result["per_task"].items()}


def report(
    cfg: PipelineConfig, data: ChunkDataset, env_ids: list[str], began: float, reference: ChunkDataset | None = None
) -> dict[str, Any]:
    """Measure every evaluated policy (parameters, latency, fit, expert use on the new and
    the old tasks), gather the evaluations and curves, and write results.json, results.md
    and the plots."""
    out = Path(cfg.output_dir)
    experts = expert_success(cfg, env_ids)
    names = [name for name, _ in evaluated(cfg)]
    policies = {name: from_pretrained(path) for name, path in evaluated(cfg)}
    frames = task_frames(data, env_ids, per_task=64, seed=cfg.seed)
    old_frames = task_frames(reference, old_tasks(cfg), per_task=64, seed=cfg.seed) if reference is not None else {}
    one = data.get(next(iter(frames.values()))[:1]) if frames else data.get(np.array([0]))
    one = {k: v for k, v in one.items() if k not in (SCENE_POSITIONS, SCENE_FEATURES)}  # time the encoder too
    times = latency(policies, one, cfg.latency_calls)
    for policy in policies.values():  # top-any's experts per token, for its active parameters
        measure_routing(policy, data, frames)
    rows = []
    for name in names:
        policy = policies[name]
        row = {
            "variant": name,
            "init": policy.config.moe["init"] if policy.config.moe else None,
            "params_total": policy.num_parameters(),
            "params_active": policy.num_parameters(active=True),
            "latency_ms": times[name],
            "demo_flow_loss": demo_flow_loss(policy, data, frames, cfg.seed) if frames else None,
        }
        for split in EVALS:
            result = load_eval(cfg, name, split)
            if result is not None:
                row[f"success_{split}"] = result["aggregated"]["success_rate"]
                row[f"per_task_{split}"] = {t: r["success_rate"] for t, r in result["per_task"].items()}
                row[f"counts_{split}"] = _successes(result)
                if split != "retention":
                    row[f"stages_{split}"] = stage_reach(result)
        summary = read_json(out / "runs" / ("dense_pretrained" if name == "pretrained" else name) / "summary.json")
        if summary is not None:
            row["train_wall_s"] = summary["wall_s"]
        curve = read_json(out / "runs" / name / "curve.json")
        if curve is not None and "counts_train" in row:  # the last point is the final evaluation
            final = {
                "step": cfg.finetune_steps,
                "success": row["success_train"],
                "episodes_per_task": cfg.eval_episodes,
                "successes": {t: c[0] for t, c in row["counts_train"].items()},
            }
            row["curve"] = [p for p in curve if p["step"] < cfg.finetune_steps] + [final]
        rows.append(row)
    reference_row = next((r for r in rows if r["variant"] == "pretrained"), None)
    if reference_row is not None and "success_retention" in reference_row:
        for row in rows:
            if "success_retention" in row:
                row["retention_change"] = row["success_retention"] - reference_row["success_retention"]
    routing = {}
    for name in names:
        if policies[name].config.moe is None:
            continue
        use = expert_use(policies[name], data, frames)
        if old_frames:
            use = merge_expert_use(use, expert_use(policies[name], reference, old_frames))
            use["separation"] = routing_separation(use, list(frames), list(old_frames))
        routing[name] = use
    results = {
        "config": asdict(cfg),
        "variants": rows,
        "expert_success": experts,
        "expert_use": routing,
        "machine": machine(),
        "wall_s": time.perf_counter() - began,
    }
    write_json(out / "results.json", results)
    write_text(out / "results.md", to_markdown(results) + "\n")
    plot_success(results, out / "plots" / "success_per_task.png")
    plot_training(out / "runs", cfg.variants, out / "plots" / "training_curves.png")
    plot_curves(results, out / "plots" / "finetuning_curves.png")
    plot_stage_progress(results, out / "plots" / "stage_progress.png")
    for name, use in routing.items():
        plot_expert_use(name, use, out / "plots" / f"expert_use_{name}.png", new=len(frames))
    return results


def load_data(cfg: PipelineConfig, env_ids: list[str], root: Path | None = None) -> ChunkDataset:
    """Every task's frames as the base policy sees them: its cameras (Meta-World: the corner
    one) and chunk size, with its frozen scene encoder's outputs cached per frame (every
    variant shares that encoder, so fine-tuning never runs it)."""
    base = from_pretrained(cfg.base)
    root = cfg.root if root is None else root
    log(f"load: {len(env_ids)} datasets from {root}")
    ids = [dataset_id_for(e) for e in env_ids]
    data = ChunkDataset(ids, base.config.chunk_size, base.config.cameras, root=root, progress=cfg.progress)
    if base.config.vision == "scene" and base.config.freeze_vision:
        # Images stay for the latency measurement, which must include the encoder.
        data.attach_frame_features(encode_frames(base, data.get, len(data)), drop_images=False)
    log(f"load: {len(data):,} frames from {data.num_episodes} episodes")
    return data


def load_reference(cfg: PipelineConfig) -> ChunkDataset | None:
    """The old tasks' reference frames (None without them)."""
    if not cfg.reference_episodes or not old_tasks(cfg):
        return None
    return load_data(cfg, old_tasks(cfg), cfg.reference_root)


def run(cfg: PipelineConfig, data: ChunkDataset | None = None, reference: ChunkDataset | None = None) -> dict[str, Any]:
    """Every stage; ``data`` / ``reference``: the datasets already loaded (by ``load_data`` /
    ``load_reference``), to skip re-reading."""
    cfg.validate()
    began = time.perf_counter()
    env_ids = list(resolve_env_ids(cfg.suite))
    pretrained = pretrain(cfg)
    collect_all(cfg, env_ids)
    data = data if data is not None else load_data(cfg, env_ids)
    finetune(cfg, data, pretrained, env_ids)
    evaluate_all(cfg, env_ids)
    reference = reference if reference is not None else load_reference(cfg)
    results = report(cfg, data, env_ids, began, reference)
    print()
    print(to_markdown(results))
    out = Path(cfg.output_dir)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'plots'}/*.png")
    print(f"took {results['wall_s'] / 60:.1f} min")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The main job's command-line options (``config_from_args`` reads them)."""
    d = PipelineConfig()
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--quick", action="store_true", help="tiny preset, two tasks per suite, a few steps (< 2 min)")
    p.add_argument("--suite", nargs="+", default=None, help=f"the fine-tuning suite or env ids (default {d.suite})")
    p.add_argument(
        "--base-suite",
        nargs="+",
        default=None,
        help=f"the base's suite: retention, --pretrain (default {d.base_suite})",
    )
    p.add_argument("--episodes-per-task", type=int, default=None, help="demos per task and noise level")
    p.add_argument("--noise", type=float, nargs="+", default=None, help="expert action-noise levels")
    p.add_argument("--datasets-root", default=None, help="reuse datasets under this root")
    p.add_argument("--preset", default=None, help="VLA preset: tiny, small, base")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="VLAConfig overrides")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--pretrained", default=None, help=f"the dense checkpoint to start from (default {SHIPPED_BASE})")
    p.add_argument("--pretrain", action="store_true", help="pretrain the dense base from nothing first (the recipe)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="policy steps of --pretrain's recipe")
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--finetune-lr", type=float, default=None)
    p.add_argument("--variants", nargs="+", default=None, help=f"of {list(KINDS)} (+ -paper / -preserve)")
    p.add_argument("--init", default=d.init, choices=adamoe.config.INITS, help="upcycling initialisation")
    p.add_argument("--curve-points", type=int, default=None, help="steps the fine-tuning curve measures success at")
    p.add_argument("--curve-episodes", type=int, default=None, help="episodes per task at each earlier curve point")
    p.add_argument(
        "--curve-variants", nargs="*", default=None, help=f"variants with a curve (default {d.curve_variants})"
    )
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per task and phrasing split")
    p.add_argument("--retention-episodes", type=int, default=None, help="episodes per base task (0: no retention)")
    p.add_argument("--no-eval-pretrained", action="store_true", help="skip evaluating the pretrained policy")
    p.add_argument("--seed", type=int, default=d.seed)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The run ``add_arguments``' options ask for: the defaults (or ``QUICK``'s with
    ``--quick``) with every given option on top."""
    d = PipelineConfig()
    cfg = replace(d, **QUICK) if args.quick else d
    if args.quick:
        cfg.output_dir = "outputs/demo_quick"
    given = {
        "output_dir": args.output_dir if args.output_dir != d.output_dir else None,
        "suite": args.suite,
        "base_suite": args.base_suite,
        "episodes_per_task": args.episodes_per_task,
        "noise": args.noise,
        "datasets_root": args.datasets_root,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "pretrain_steps": args.pretrain_steps,
        "pretrained": args.pretrained,
        "finetune_steps": args.finetune_steps,
        "finetune_lr": args.finetune_lr,
        "variants": args.variants,
        "curve_points": args.curve_points,
        "curve_episodes": args.curve_episodes,
        "curve_variants": args.curve_variants,
        "eval_episodes": args.eval_episodes,
        "retention_episodes": args.retention_episodes,
    }
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    cfg.overrides = parse_overrides(args.set)
    cfg.init, cfg.seed = args.init, args.seed
    if args.no_eval_pretrained:
        cfg.eval_pretrained = False
    if args.pretrain:
        cfg.pretrain = True
    return cfg


def parse_args(argv: list[str] | None = None, description: str | None = None) -> PipelineConfig:
    """``add_arguments`` and ``config_from_args`` in one call."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return config_from_args(p.parse_args(argv))
