"""The pretraining recipe (``make pretrain``): from nothing to an evaluated dense VLA.

Stages, in one output directory (default ``outputs/pretrain/``). Each records the
settings that produced it (``<stage>/stage.json``) and is skipped when its output is
complete for the same settings; changed settings rerun it and every stage after it, and
an interrupted run picks up where it stopped (policy training resumes from its last
checkpoint, the learning curve keeps its points):

    collect     datasets/                   demos (noisy execution, clean expert labels) and
                                            scenes (labelled frames for the perception stage)
    perception  perception/                 the scene encoder trained on object positions,
                                            probe.json (its localisation on held-out scenes)
    policy      policy/                     the policy trained on the frozen encoder's cached
                                            outputs; curve.json (success vs training minutes);
                                            policy/checkpoint/ (``from_pretrained``)
    evaluate    eval/{train,heldout}/       eval_info.json on seeds no demonstration used
    report      results.md, results.json, plots/*.png

Measured on this suite (docs/pretraining.md): control needs the cube positions to about
1 cm, which a perception stage on labelled renders reaches in minutes and the action loss
alone does not; clean labels, scenes of its own for every task and task-balanced batches
each add points on top.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.collection import CollectionJob, dataset_id_for, run_collection
from envs.datasets import dataset_path
from envs.registration import resolve_env_ids
from policies.constants import SCENE_FEATURES, SCENE_POSITIONS
from policies.data import BALANCES, ChunkDataset
from policies.evaluation import EvalConfig, evaluate
from policies.io import fingerprint, log, read_json, write_json
from policies.pretrained import from_pretrained
from policies.training import TrainConfig, resolve_device, train, training_seconds
from policies.vla.configuration_vla import vla_config
from policies.vla.modeling_vla import VLAPolicy
from policies.vla.perception import (
    PerceptionConfig,
    apply_linear_probe,
    encode_frames,
    fit_linear_probe,
    localisation_errors,
    train_scene_encoder,
)
from policies.vla.recipe_report import SPLITS, write_report

STAGES = ("collect", "perception", "policy", "evaluate", "report")
ENCODER_FIELDS = ("vision", "cameras", "image_size", "state_dim")  # with every scene_* field
ENCODER_STATE = ("model.scene_encoder.", "scene_target_norm.", "scene_state_norm.")
LIFTED_Z = 0.03  # a cube whose centre is this high is off the table (resting: z = 0.02)


@dataclass
class RecipeConfig:
    """Everything the recipe's result depends on (recorded in results.json)."""

    output_dir: str = "outputs/pretrain"
    suite: list[str] = field(default_factory=lambda: ["tabletop"])
    seed: int = 0
    workers: int = 2
    # Demonstrations: episodes per task and noise level, executed noisy, labelled clean.
    episodes_per_task: int = 50
    noise: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    # Perception frames: noisier rollouts (more varied states), scenes of their own.
    scene_episodes_per_task: int = 40
    scene_noise: list[float] = field(default_factory=lambda: [0.3, 0.6])
    # The policy.
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    perception_steps: int = 3000
    perception_batch_size: int = 128
    perception_lr: float = 2e-3
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    balance: str | None = "task"
    # Learning curve: success on ``curve_episodes`` per task (training phrasings) at
    # ``curve_points`` evenly spaced steps; the last is the final policy.
    curve_points: int = 4
    curve_episodes: int = 10
    eval_episodes: int = 50
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        positive = (
            "episodes_per_task",
            "scene_episodes_per_task",
            "perception_steps",
            "perception_batch_size",
            "steps",
            "batch_size",
            "curve_points",
            "curve_episodes",
            "eval_episodes",
            "workers",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "perception_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("noise", "scene_noise"):
            levels = getattr(self, name)
            if not levels or any(not math.isfinite(n) or n < 0 for n in levels):
                raise ValueError(f"{name} must be a non-empty list of finite values >= 0, got {levels!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance={self.balance!r}; valid choices are {BALANCES}")
        vla_config(self.preset, **self.overrides)  # names a bad preset or override now, not after collection

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / "datasets"


# -- stage bookkeeping -------------------------------------------------------------------


def _stage_settings(cfg: RecipeConfig, stage: str) -> dict[str, Any]:
    """What a stage's output depends on: its own settings and every earlier stage's."""
    data = {"suite": cfg.suite, "seed": cfg.seed, "episodes_per_task": cfg.episodes_per_task, "noise": cfg.noise}
    data |= {"scene_episodes_per_task": cfg.scene_episodes_per_task, "scene_noise": cfg.scene_noise}
    if stage == "collect":
        return data
    # The resolved policy config, not just the preset's name: a changed default reruns too.
    config = vla_config(cfg.preset, **cfg.overrides).to_dict()
    encoder = {k: v for k, v in config.items() if k.startswith("scene_") or k in ENCODER_FIELDS}
    data |= {"encoder": encoder, "perception_steps": cfg.perception_steps}
    data |= {"perception_batch_size": cfg.perception_batch_size, "perception_lr": cfg.perception_lr}
    if stage == "perception":
        return data
    data |= {"policy": config, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "balance": cfg.balance}
    data |= {"curve_points": cfg.curve_points, "curve_episodes": cfg.curve_episodes}
    if stage == "policy":
        return data
    return data | {"eval_episodes": cfg.eval_episodes}


def stage_complete(cfg: RecipeConfig, stage: str) -> bool:
    """The stage finished, with today's settings."""
    record = read_json(Path(cfg.output_dir) / stage / "stage.json")
    if record is None:
        return False
    if record.get("fingerprint") != fingerprint(_stage_settings(cfg, stage)):
        log(f"{stage}: settings changed since {Path(cfg.output_dir) / stage} was made; running it again")
        return False
    return bool(record.get("complete", True))  # records before the in-progress marker were final ones


def mark_complete(cfg: RecipeConfig, stage: str, extra: dict[str, Any] | None = None) -> None:
    settings = _stage_settings(cfg, stage)
    record = {"fingerprint": fingerprint(settings), "complete": True, "settings": settings, **(extra or {})}
    write_json(Path(cfg.output_dir) / stage / "stage.json", record)


# What each stage writes in its own directory: the only names a rerun with other settings removes.
STAGE_OUTPUTS = {
    "collect": ("stage.json",),
    "perception": ("stage.json", "checkpoint", "probe.json"),
    "policy": ("stage.json", "checkpoint", "run", "curve.json"),
    "eval": ("stage.json", *SPLITS),
}


def start_stage(cfg: RecipeConfig, stage: str) -> Path:
    """The stage's directory, marked as in progress with today's settings. A previous run's
    output with other settings, finished or not, is removed first (only what this stage
    writes); an unfinished run with the same settings is kept, to resume."""
    path = Path(cfg.output_dir) / stage
    made_with = fingerprint(_stage_settings(cfg, stage))
    record = read_json(path / "stage.json")
    if record is None or record.get("fingerprint") != made_with:
        for name in STAGE_OUTPUTS[stage]:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "stage.json", {"fingerprint": made_with, "complete": False})
    return path


# -- stages ------------------------------------------------------------------------------


def collect(cfg: RecipeConfig, env_ids: list[str]) -> dict[str, Any]:
    """Demonstrations (``demos``) and perception frames (``scenes``), each task's own scenes."""
    if stage_complete(cfg, "collect"):
        log(f"collect: datasets complete under {cfg.root}, reusing them")
        return read_json(Path(cfg.output_dir) / "collect" / "stage.json")["summary"]
    began = time.perf_counter()
    start_stage(cfg, "collect")  # an interrupted collection never counts as complete
    summary: dict[str, Any] = {}
    # The scenes take the next seed block: no perception frame shows a demonstration scene.
    jobs = (
        ("demos", cfg.episodes_per_task, cfg.noise, cfg.seed),
        ("scenes", cfg.scene_episodes_per_task, cfg.scene_noise, cfg.seed + 1),
    )
    for name, episodes, noise, seed in jobs:
        log(f"collect: {name}, {episodes} episodes x noise {noise} for {len(env_ids)} tasks -> {cfg.root}")
        job = CollectionJob(
            env_ids=env_ids,
            episodes_per_task=episodes,
            noise_levels=tuple(noise),
            dataset_name=name,
            root=str(cfg.root),
            seed=seed,
            workers=cfg.workers,
            overwrite=True,
        )
        summary[name] = run_collection(job, progress=cfg.progress)
    mark_complete(cfg, "collect", {"summary": summary, "wall_s": time.perf_counter() - began})
    return summary


def _datasets(cfg: RecipeConfig, env_ids: list[str], name: str) -> list[str]:
    ids = [dataset_id_for(env_id, name) for env_id in env_ids]
    missing = [d for d in ids if not dataset_path(d, cfg.root).exists()]
    if missing:
        raise FileNotFoundError(f"datasets {missing} are missing under {cfg.root}; run the collect stage")
    return ids


def perception(cfg: RecipeConfig, env_ids: list[str]) -> Path:
    """Train the scene encoder on the scenes' object positions; probe it on held-out scenes."""
    checkpoint = Path(cfg.output_dir) / "perception" / "checkpoint"
    if stage_complete(cfg, "perception"):
        log(f"perception: {checkpoint} complete, reusing it")
        return checkpoint
    stage_began = time.perf_counter()
    out = start_stage(cfg, "perception")
    config = vla_config(cfg.preset, **cfg.overrides)
    if config.vision != "scene":
        raise ValueError(f"the recipe trains a scene encoder; preset {cfg.preset!r} has vision={config.vision!r}")
    scenes = ChunkDataset(
        _datasets(cfg, env_ids, "scenes"), 1, config.cameras, root=cfg.root, progress=cfg.progress, label="executed"
    )
    if scenes.environment_state is None:
        raise ValueError("the scenes datasets hold no environment_state: the scene encoder has no labels")
    held_out = scenes.frame_episode % 10 == 0  # every tenth episode: scenes the encoder never trains on
    fit_frames, probe_frames = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    torch.manual_seed(cfg.seed)
    policy = VLAPolicy(config).to(resolve_device(cfg.device))
    policy.set_normalization(scenes.stats())
    log(
        f"perception: scene encoder on {len(fit_frames):,} frames ({len(probe_frames):,} held out for the probe), "
        f"{cfg.perception_steps} steps x {cfg.perception_batch_size}"
    )
    began = time.perf_counter()
    logs = train_scene_encoder(
        policy,
        lambda size, rng: scenes.get(rng.choice(fit_frames, size)),
        PerceptionConfig(
            steps=cfg.perception_steps,
            batch_size=cfg.perception_batch_size,
            lr=cfg.perception_lr,
            seed=cfg.seed,
            progress=cfg.progress,
        ),
    )
    train_s = time.perf_counter() - began
    probe = probe_encoder(policy, scenes, fit_frames, probe_frames)
    probe["train_s"], probe["steps"], probe["final_loss"] = train_s, logs[-1]["step"], logs[-1]["loss"]
    write_json(out / "probe.json", probe)
    policy.save_pretrained(checkpoint)
    head = probe["encoder"]
    log(
        f"perception: {train_s / 60:.1f} min; held-out cube error, resting median "
        f"{head['resting']['median_cm']:.2f} cm (p90 {head['resting']['p90_cm']:.2f}), lifted median "
        f"{head.get('lifted', {}).get('median_cm', float('nan')):.2f} cm"
    )
    mark_complete(cfg, "perception", {"wall_s": time.perf_counter() - stage_began})
    return checkpoint


def probe_encoder(
    policy: VLAPolicy, data: ChunkDataset, fit_frames: np.ndarray, probe_frames: np.ndarray, max_fit: int = 20_000
) -> dict[str, Any]:
    """How well the encoder localises the cubes on ``probe_frames`` (scenes it never trained
    on): its own position head, and a linear probe fitted on the features of (up to
    ``max_fit``) ``fit_frames``, each as median / p90 error per axis, resting vs lifted."""
    groups = policy.config.scene_objects
    cubes = [i for i, g in enumerate(groups) if len(g) == 3]
    columns = [sum(len(g) for g in groups[:i]) + j for i in cubes for j in range(3)]
    state_columns = [groups[i][j] for i in cubes for j in range(3)]
    probe = encode_frames(policy, lambda idx: data.get(probe_frames[idx]), len(probe_frames))
    predicted = policy.scene_target_norm.unnormalize(torch.from_numpy(probe[SCENE_POSITIONS])).numpy()
    true = data.environment_state[probe_frames][:, state_columns].reshape(len(probe_frames), len(cubes), 3)
    lifted = true[..., 2] > LIFTED_Z
    result: dict[str, Any] = {
        "encoder": localisation_errors(predicted[:, columns].reshape(true.shape), true, lifted),
        "frames": int(len(probe_frames)),
    }
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(fit_frames, min(max_fit, len(fit_frames)), replace=False))
    fit = encode_frames(policy, lambda idx: data.get(subset[idx]), len(subset))
    targets = data.environment_state[subset][:, state_columns]
    weights = fit_linear_probe(fit[SCENE_FEATURES], targets)
    read_out = apply_linear_probe(weights, probe[SCENE_FEATURES]).reshape(true.shape)
    result["linear_probe"] = localisation_errors(read_out, true, lifted)
    return result


class BalancedSampler:
    """The training loop's dataset interface, drawing batches balanced as the recipe says."""

    def __init__(self, data: ChunkDataset, balance: str | None) -> None:
        self.data, self.balance = data, balance

    def sample(self, batch_size: int, rng: np.random.Generator, shift: int = 0) -> dict[str, Any]:
        return self.data.sample(batch_size, rng, shift, balance=self.balance)


def train_policy(cfg: RecipeConfig, env_ids: list[str], perception_checkpoint: Path) -> Path:
    """Train the policy on the demos with the encoder frozen and its outputs cached per frame,
    evaluating along the way for the learning curve."""
    out = Path(cfg.output_dir) / "policy"
    checkpoint = out / "checkpoint"
    if stage_complete(cfg, "policy"):
        log(f"policy: {checkpoint} complete, reusing it")
        return checkpoint
    stage_began = time.perf_counter()
    out = start_stage(cfg, "policy")
    # Today's config (a changed policy setting reruns this stage, not perception), with the
    # trained scene encoder and the statistics it was trained in.
    torch.manual_seed(cfg.seed)  # the policy's initial weights: those the perception stage saved beside its encoder
    policy = VLAPolicy(vla_config(cfg.preset, **cfg.overrides))
    encoder = from_pretrained(perception_checkpoint)
    trained = {k: v for k, v in encoder.state_dict().items() if k.startswith(ENCODER_STATE)}
    policy.load_state_dict(trained, strict=False)
    demos = ChunkDataset(
        _datasets(cfg, env_ids, "demos"),
        policy.config.chunk_size,
        policy.config.cameras,
        root=cfg.root,
        progress=cfg.progress,
    )
    policy.set_normalization(demos.stats(), scene=False)
    began = time.perf_counter()
    if policy.config.freeze_vision:  # a frozen encoder's outputs are a function of the frame
        demos.attach_frame_features(encode_frames(policy, demos.get, len(demos)))
    encode_s = time.perf_counter() - began
    log(f"policy: encoder outputs cached for {len(demos):,} frames in {encode_s:.0f} s")
    train_config = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        image_shift=0,  # the frozen encoder saw unshifted frames; its cached outputs are exact
        seed=cfg.seed,
        device=cfg.device,
        progress=cfg.progress,
        save_every=max(1, cfg.steps // cfg.curve_points),
    )
    curve_path = out / "curve.json"
    curve = read_json(curve_path) or []
    points = sorted({round(cfg.steps * (i + 1) / cfg.curve_points) for i in range(cfg.curve_points)})
    data = BalancedSampler(demos, cfg.balance)
    for point in points:
        if any(p["step"] == point for p in curve):
            continue
        summary = train(policy, data, train_config, out / "run", resume=True, stop_at=point)
        minutes = training_seconds(out / "run" / "metrics.jsonl") / 60
        torch.manual_seed(cfg.seed)
        result = evaluate(
            policy, env_ids, EvalConfig(episodes_per_task=cfg.curve_episodes, videos_per_task=0), progress=False
        )
        success = result["aggregated"]["success_rate"]
        curve.append({"step": point, "minutes": minutes, "success": success, "loss": summary["final_loss"]})
        write_json(curve_path, curve)
        log(f"policy: step {point} ({minutes:.1f} training min): {100 * success:.1f}% success on the curve episodes")
    # The last point's weights (loaded from the run's checkpoint when every curve point was
    # already measured before an interruption).
    train(policy, data, train_config, out / "run", resume=True)
    policy.save_pretrained(checkpoint)
    mark_complete(cfg, "policy", {"encode_s": encode_s, "wall_s": time.perf_counter() - stage_began})
    return checkpoint


def evaluate_policy(cfg: RecipeConfig, env_ids: list[str], checkpoint: Path) -> dict[str, Any]:
    """Success per task on both phrasing splits, ``eval_episodes`` per task each."""
    base = Path(cfg.output_dir) / "eval"
    if stage_complete(cfg, "eval"):
        log(f"evaluate: {base} complete, reusing it")
        return {split: read_json(base / split / "eval_info.json") for split in SPLITS}
    began = time.perf_counter()
    start_stage(cfg, "eval")
    policy = from_pretrained(checkpoint, device=resolve_device(cfg.device))
    results = {}
    for split in SPLITS:
        config = EvalConfig(episodes_per_task=cfg.eval_episodes, instruction_split=split, videos_per_task=1)
        torch.manual_seed(cfg.seed)  # the sampler's noise: the same table from the same checkpoint
        results[split] = evaluate(policy, env_ids, config, base / split, progress=cfg.progress)
        log(f"evaluate: {split} phrasings {100 * results[split]['aggregated']['success_rate']:.1f}%")
    mark_complete(cfg, "eval", {"wall_s": time.perf_counter() - began})
    return results


# -- the whole recipe --------------------------------------------------------------------


def run(cfg: RecipeConfig) -> dict[str, Any]:
    """Every stage in order; returns the report (also in ``results.json``)."""
    cfg.validate()
    env_ids = resolve_env_ids(cfg.suite)
    began = time.perf_counter()
    collect(cfg, env_ids)
    perception_checkpoint = perception(cfg, env_ids)
    checkpoint = train_policy(cfg, env_ids, perception_checkpoint)
    evaluate_policy(cfg, env_ids, checkpoint)
    report = write_report(cfg, env_ids)
    mean = report["success"]["mean"]
    log(
        f"done in {(time.perf_counter() - began) / 60:.1f} min: {100 * mean['train']['rate']:.1f}% "
        f"(training phrasings), {100 * mean['heldout']['rate']:.1f}% (held-out); "
        f"report in {Path(cfg.output_dir) / 'results.md'}"
    )
    return report


QUICK: dict[str, Any] = {
    "output_dir": "outputs/pretrain_quick",
    "episodes_per_task": 2,
    "noise": [0.0],
    "scene_episodes_per_task": 2,
    "scene_noise": [0.3],
    "preset": "tiny",
    "perception_steps": 20,
    "perception_batch_size": 16,
    "steps": 30,
    "batch_size": 8,
    "curve_points": 2,
    "curve_episodes": 1,
    "eval_episodes": 2,
}
