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

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.collection import CollectionJob, dataset_id_for, run_collection
from envs.datasets import dataset_path
from envs.registration import resolve_env_ids
from policies.data import BALANCES, ChunkDataset
from policies.evaluation import EvalConfig, evaluate
from policies.pretrained import from_pretrained
from policies.training import TrainConfig, resolve_device, train
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

STAGES = ("collect", "perception", "policy", "evaluate", "report")
SPLITS = ("train", "heldout")
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


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


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


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_complete(cfg: RecipeConfig, stage: str) -> bool:
    """The stage finished, with today's settings."""
    record = read_json(Path(cfg.output_dir) / stage / "stage.json")
    if record is None:
        return False
    if record.get("fingerprint") != _fingerprint(_stage_settings(cfg, stage)):
        log(f"{stage}: settings changed since {Path(cfg.output_dir) / stage} was made; running it again")
        return False
    return bool(record.get("complete", True))  # records before the in-progress marker were final ones


def mark_complete(cfg: RecipeConfig, stage: str, extra: dict[str, Any] | None = None) -> None:
    settings = _stage_settings(cfg, stage)
    record = {"fingerprint": _fingerprint(settings), "complete": True, "settings": settings, **(extra or {})}
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
    fingerprint = _fingerprint(_stage_settings(cfg, stage))
    record = read_json(path / "stage.json")
    if record is None or record.get("fingerprint") != fingerprint:
        for name in STAGE_OUTPUTS[stage]:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "stage.json", {"fingerprint": fingerprint, "complete": False})
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
    predicted = policy.scene_target_norm.unnormalize(torch.from_numpy(probe["observation.scene.positions"])).numpy()
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
    weights = fit_linear_probe(fit["observation.scene.features"], targets)
    read_out = apply_linear_probe(weights, probe["observation.scene.features"]).reshape(true.shape)
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
        minutes = _training_minutes(out / "run" / "metrics.jsonl")
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


def _training_minutes(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    # elapsed_s restarts at every resumed segment: sum each segment's last value.
    total, previous = 0.0, 0.0
    for record in records:
        if record["elapsed_s"] < previous:
            total += previous
        previous = record["elapsed_s"]
    return (total + previous) / 60


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


# -- statistics and the report -----------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sound near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def success_table(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task and split: successes, episodes, rate, 95% interval; plus the task mean."""
    table: dict[str, dict[str, Any]] = {}
    for split, result in results.items():
        episodes = result["per_episode"]
        for task in result["per_task"]:
            outcomes = [e["success"] for e in episodes if e["task"] == task]
            k, n = int(sum(outcomes)), len(outcomes)
            table.setdefault(task, {})[split] = {
                "successes": k,
                "episodes": n,
                "rate": k / n,
                "ci95": wilson_interval(k, n),
            }
        rows = [table[t][split] for t in result["per_task"]]
        k, n = sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows)
        # The mean over tasks of per-task rates; its interval is the pooled episodes' Wilson
        # interval (exact for equal episodes per task, as every evaluation here runs).
        mean = float(np.mean([r["rate"] for r in rows]))
        table.setdefault("mean", {})[split] = {
            "successes": k,
            "episodes": n,
            "rate": mean,
            "ci95": wilson_interval(k, n),
        }
    return table


def stage_times(cfg: RecipeConfig) -> dict[str, float]:
    """Each stage's wall time when it ran (from its stage.json; a rerun that reused the
    stage reports the run that made it), and their sum."""
    out = Path(cfg.output_dir)
    times = {}
    for stage in ("collect", "perception", "policy", "eval"):
        record = read_json(out / stage / "stage.json") or {}
        if "wall_s" in record:
            times[stage] = float(record["wall_s"])
        elif stage == "eval":  # made before stage times were recorded: the evaluations' own
            walls = [read_json(out / "eval" / s / "eval_info.json") for s in SPLITS]
            times[stage] = float(sum(w.get("wall_s", 0.0) for w in walls if w))
    times["total"] = sum(times.values())
    return times


def write_report(cfg: RecipeConfig, env_ids: list[str]) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    timings = stage_times(cfg)
    results = {split: read_json(out / "eval" / split / "eval_info.json") for split in SPLITS}
    table = success_table(results)
    probe = read_json(out / "perception" / "probe.json")
    curve = read_json(out / "policy" / "curve.json") or []
    report = {
        "config": asdict(cfg),
        "success": table,
        "probe": probe,
        "curve": curve,
        "timings_s": timings,
    }
    write_json(out / "results.json", report)
    tmp = out / ".results.md.tmp"
    tmp.write_text(results_markdown(report))
    tmp.replace(out / "results.md")
    plot_report(report, out / "plots")
    return report


def _pct(row: dict[str, Any]) -> str:
    low, high = row["ci95"]
    return f"{100 * row['rate']:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


SPLIT_NAMES = {"train": "training phrasings", "heldout": "held-out phrasings"}


def success_markdown(table: dict[str, dict[str, Any]]) -> str:
    """The per-task success table (every split present) with 95% intervals."""
    splits = list(table["mean"])
    lines = ["| task | " + " | ".join(SPLIT_NAMES.get(s, s) for s in splits) + " |", "|---" * (1 + len(splits)) + "|"]
    for task, row in table.items():
        if task != "mean":
            lines.append(f"| {task} | " + " | ".join(_pct(row[s]) for s in splits) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_pct(table['mean'][s])}**" for s in splits) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(report: dict[str, Any]) -> str:
    table, probe, curve = report["success"], report["probe"], report["curve"]
    lines = [
        "# Pretrained dense VLA",
        "",
        "Success per task with a 95% Wilson interval, on seeds no demonstration used.",
        "",
    ]
    lines += success_markdown(table).splitlines()
    if probe:
        lines += ["", "## Perception probe", "", "Cube position error (cm) on held-out scenes.", ""]
        lines += [
            "| read-out | cubes | frames | median | p90 | x median | y median | z median |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for reader in ("encoder", "linear_probe"):
            for kind, row in probe[reader].items():
                lines.append(
                    f"| {reader.replace('_', ' ')} | {kind} | {row['count']:,} | {row['median_cm']:.2f} | "
                    f"{row['p90_cm']:.2f} | {row['x_median_cm']:.2f} | {row['y_median_cm']:.2f} | "
                    f"{row['z_median_cm']:.2f} |"
                )
    if curve:
        lines += [
            "",
            "## Learning curve",
            "",
            "| step | training minutes | success (curve episodes) |",
            "|---|---|---|",
        ]
        lines += [f"| {p['step']} | {p['minutes']:.1f} | {100 * p['success']:.1f}% |" for p in curve]
    timings = report["timings_s"]
    if timings:
        lines += ["", "## Wall time", "", "| stage | minutes |", "|---|---|"]
        lines += [f"| {k} | {v / 60:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    table = {k: v for k, v in report["success"].items() if k != "mean"}
    tasks = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(tasks)), 3.6))
    x = np.arange(len(tasks))
    for offset, split, color in ((-0.2, "train", "#4c72b0"), (0.2, "heldout", "#dd8452")):
        rates = np.array([table[t][split]["rate"] for t in tasks])
        low = rates - np.array([table[t][split]["ci95"][0] for t in tasks])
        high = np.array([table[t][split]["ci95"][1] for t in tasks]) - rates
        ax.bar(
            x + offset,
            100 * rates,
            0.4,
            yerr=100 * np.stack([low, high]),
            capsize=2,
            color=color,
            label=f"{split} phrasings",
        )
    ax.set_xticks(x, tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 105)
    ax.axhline(90, color="#888", linestyle=":", linewidth=1)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, directory / "success_per_task.png")
    if report["curve"]:
        fig, ax = plt.subplots(figsize=(4.8, 3.4))
        minutes = [p["minutes"] for p in report["curve"]]
        ax.plot(minutes, [100 * p["success"] for p in report["curve"]], marker="o", color="#4c72b0")
        for p in report["curve"]:
            ax.annotate(
                f"{p['step']}",
                (p["minutes"], 100 * p["success"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, -10),
            )
        ax.set_xlabel("policy training (minutes)")
        ax.set_ylabel("success (%), training phrasings")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, directory / "learning_curve.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


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

SHIPPED_FILES = ("config.json", "model.safetensors", "README.md", "results.json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def ship(cfg: RecipeConfig, report: dict[str, Any], destination: str | Path, command: str) -> Path:
    """Copy the recipe's checkpoint to ``destination`` with a model card (the command, the
    commit, the wall time, the results, the weights' SHA-256). Refuses a folder holding
    anything but a shipped checkpoint's files."""
    from policies.pretrained import atomic_directory

    destination = Path(destination)
    if destination.exists():
        foreign = sorted(p.name for p in destination.iterdir() if p.name not in SHIPPED_FILES)
        if not destination.is_dir() or foreign:
            raise ValueError(
                f"{destination} holds files a shipped checkpoint does not ({foreign}); choose another folder"
            )
    source = Path(cfg.output_dir) / "policy" / "checkpoint"
    weights = source / "model.safetensors"
    digest = sha256(weights)
    card = model_card(report, command, digest, weights.stat().st_size)
    with atomic_directory(destination) as tmp:
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(source / name, tmp / name)
        (tmp / "README.md").write_text(card)
        (tmp / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return destination


def model_card(report: dict[str, Any], command: str, digest: str, size: int) -> str:
    timings = report["timings_s"]
    body = results_markdown(report).split("\n", 2)[2]  # the tables, without the title
    return (
        "# Dense VLA, pretrained on the tabletop suite\n\n"
        "The pi0-style VLA (`policies.VLAPolicy`, preset "
        f"`{report['config']['preset']}`) after `make pretrain`: a scene encoder trained on rendered, "
        "labelled frames, then the policy on scripted-expert demonstrations (clean labels, "
        "task-balanced batches). It reads the cameras, `agent_pos` and the instruction only.\n\n"
        "```python\nfrom policies import from_pretrained\n"
        'policy = from_pretrained("checkpoints/vla-tabletop-base")\n```\n\n'
        f"- Command: `{command}`\n"
        f"- Commit: `{_commit()}`\n"
        f"- Wall time: {timings.get('total', float('nan')) / 60:.1f} min on the machine that made it "
        f"(stages: {', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items() if k != 'total')} min)\n"
        f"- `model.safetensors`: {size / 1e6:.1f} MB, SHA-256 `{digest}`\n"
        "- Reproduce the table: `python scripts/evaluate_vla.py --checkpoint checkpoints/vla-tabletop-base "
        f"--episodes {report['config']['eval_episodes']}`\n\n"
        f"{body}"
    )
