"""The main job (``make demo``): start from the shipped pretrained dense VLA, upcycle copies
of it into AdaMoE and a vanilla top-k MoE, fine-tune those and the dense policy itself for
the same steps on the same data, evaluate all of them, and compare.

    python scripts/demo.py                    # from checkpoints/vla-tabletop-base, the whole tabletop suite
    python scripts/demo.py --pretrain         # pretrain the base from nothing first (the recipe, ~1 h)
    python scripts/demo.py --quick            # tiny preset pretrained in seconds: the plumbing in ~2 min
    python scripts/demo.py --init preserve    # upcycle so that step 0 computes the dense function

Stages, in one output directory (default outputs/demo/); each is skipped when its output
is complete, so an interrupted run picks up where it stopped (training resumes from its
last checkpoint):

    pretrain   pretrain/                      only with --pretrain: policies/vla/recipe.py
    collect    datasets/                      scripted-expert demos at several noise levels
    finetune   checkpoints/<variant>/         dense, vanilla (top-k MoE), adamoe (runs/<variant>/)
    evaluate   eval/<variant>/eval_info.json  training phrasings (+ heldout/eval_info.json)
    report     results.md, results.json, plots/*.png

The MoE variants follow AdaMoE's recipe: 4 routed experts, top-1, one shared expert,
balance loss 0.01 then 0.005 after 500 steps, router and scale adapter at twice the base
learning rate, every parameter trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import adamoe  # noqa: E402
import envs  # noqa: E402,F401  (GL backend first, registers the envs)
from envs.collection import CollectionJob, dataset_id_for, run_collection  # noqa: E402
from envs.datasets import dataset_path, episode_metadata, load_dataset  # noqa: E402
from envs.registration import METAWORLD_PREFIX, TABLETOP_PREFIX, resolve_env_ids  # noqa: E402
from policies import VLAPolicy, from_pretrained, vla_config  # noqa: E402
from policies.data import ChunkDataset  # noqa: E402
from policies.evaluation import EvalConfig, evaluate, task_name  # noqa: E402
from policies.training import TrainConfig, train  # noqa: E402
from policies.vla import parse_overrides, recipe  # noqa: E402
from policies.vla.perception import SCENE_FEATURES, SCENE_POSITIONS, encode_frames  # noqa: E402
from policies.vla.recipe import log, write_json  # noqa: E402

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "checkpoints" / "vla-tabletop-base"

# Each MoE kind as MoEConfig fields on top of (num_experts, top_k). The demo runs the
# first three; the others are the families of the literature (make families).
FAMILIES: dict[str, dict[str, Any]] = {
    "vanilla": {"router": "topk"},
    "adamoe": {"router": "adamoe"},
    "switch": {"router": "topk", "capacity_factor": 1.25, "balance_loss": "switch"},
    "gatedrop": {"router": "topk", "gating_dropout": 0.2},
    "topany": {"router": "topany"},
    "thor": {"router": "thor", "expert_noise_std": 1e-3},
    "smear": {"router": "smear"},
    "soft": {"router": "soft"},
    "scmoe": {"router": "topk", "top_k": 2, "renormalize": True},  # + self-contrast decoding
    "lowrank": {"router": "adamoe", "expert_structure": "lowrank", "structure_rank": 32, "self_guided_steps": 100},
    "bam": {"router": "topk"},  # + soft attention experts with their own keys and values
    "bam_kv": {"router": "topk"},  # + soft attention experts sharing keys and values
}
SELF_CONTRAST = {"scmoe": 0.5}  # beta of (1 + beta) * top-2 - beta * top-1 at inference
ATTENTION_EXPERTS = {"bam": {"share_kv": False}, "bam_kv": {"share_kv": True}}  # MoAConfig fields
KINDS = ("dense", *FAMILIES)
DEMO_VARIANTS = ("dense", "vanilla", "adamoe")
SPLITS = ("train", "heldout")
COLORS = {"pretrained": "#8c8c8c", "dense": "#4c72b0", "vanilla": "#dd8452", "adamoe": "#55a868"}


def color(variant: str) -> str | None:
    """A variant's colour: the main job's fixed ones, one per MoE family (``dense_long``
    and ``bam_mixed`` take dense's and bam's); None for other names (see ``palette``)."""
    import matplotlib

    kind = {"dense_long": "dense", "bam_mixed": "bam"}.get(variant, variant.split("-")[0])
    if kind in COLORS:
        return COLORS[kind]
    names = [k for k in KINDS if k not in COLORS]
    if kind in names:
        return matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](names.index(kind) % 20))
    return None


def palette(variants: list[str]) -> dict[str, str]:
    """``color`` for every variant, the names it does not know (e.g. ``specialist_*``)
    taking distinct colours of Dark2 in order."""
    import matplotlib

    out, spare = {}, 0
    for name in variants:
        out[name] = color(name)
        if out[name] is None:
            out[name] = matplotlib.colors.to_hex(matplotlib.colormaps["Dark2"](spare % 8))
            spare += 1
    return out


@dataclass
class PipelineConfig:
    """Everything one run of the comparison depends on (stored in ``results.json``)."""

    output_dir: str = "outputs/demo"
    suite: list[str] = field(default_factory=lambda: ["tabletop"])
    # Collection: episodes per task and noise level. Noisy demos show the experts
    # recovering from perturbations, which closed-loop imitation needs.
    episodes_per_task: int = 50
    noise: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    workers: int = 2
    datasets_root: str | None = None  # reuse datasets from elsewhere (default: <output_dir>/datasets)
    # Policy and training.
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    # The dense policy the comparison starts from: the shipped base, as a pi0 user starts
    # from published weights, or (``pretrain``) the recipe run here from nothing, with
    # ``pretrain_steps`` policy steps and any other RecipeConfig field in ``recipe``.
    pretrained: str | None = str(SHIPPED_BASE)
    pretrain: bool = False
    pretrain_steps: int = recipe.RecipeConfig.steps
    recipe: dict[str, Any] = field(default_factory=dict)
    finetune_steps: int = 200
    finetune_lr: float = 3e-4
    variants: list[str] = field(default_factory=lambda: list(DEMO_VARIANTS))
    init: str = "paper"
    num_experts: int = 4
    top_k: int = 1
    # Evaluation.
    eval_episodes: int = 10
    eval_pretrained: bool = True  # the starting point, on the training phrasings
    videos: int = 1
    latency_calls: int = 30
    seed: int = 0
    progress: bool = True

    @property
    def root(self) -> Path:
        return Path(self.datasets_root) if self.datasets_root else Path(self.output_dir) / "datasets"

    def validate(self) -> None:
        for name in self.variants:
            parse_variant(name, self.init)
        if self.init not in adamoe.config.INITS:
            raise ValueError(f"init={self.init!r} is not one of {adamoe.config.INITS}")
        for name in ("episodes_per_task", "batch_size", "pretrain_steps", "finetune_steps", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
                if env_id.startswith(METAWORLD_PREFIX) and not cameras <= {"corner", "corner2", "corner3", "topview"}:
                    raise ValueError(
                        f"{self.pretrained} sees the tabletop's cameras {sorted(cameras)}, not {env_id}'s: "
                        "Meta-World needs --pretrained with a policy trained on it"
                    )

    def recipe_config(self) -> recipe.RecipeConfig:
        """The pretraining recipe this run's ``--pretrain`` runs (in ``<output_dir>/pretrain``)."""
        fields = dict(
            output_dir=str(Path(self.output_dir) / "pretrain"),
            suite=list(self.suite),
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


QUICK = {
    "episodes_per_task": 2,
    "noise": [0.0],
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
    "eval_episodes": 1,
    "eval_pretrained": False,
    "videos": 0,
    "latency_calls": 5,
}


def parse_variant(name: str, default_init: str) -> tuple[str, str | None]:
    """``dense``, ``vanilla``, ``adamoe``, optionally with the upcycling init (``adamoe-preserve``)."""
    kind, _, init = name.partition("-")
    if kind not in KINDS:
        raise ValueError(f"variant {name!r}: the kind must be one of {KINDS} (optionally -paper/-preserve)")
    if kind == "dense":
        if init:
            raise ValueError(f"variant {name!r}: the dense policy has no upcycling init")
        return kind, None
    init = init or default_init
    if init not in adamoe.config.INITS:
        raise ValueError(f"variant {name!r}: init {init!r} is not one of {adamoe.config.INITS}")
    return kind, init


# -- stages ---------------------------------------------------------------------------


def collect(cfg: PipelineConfig, env_ids: list[str]) -> None:
    missing = [e for e in env_ids if not dataset_path(dataset_id_for(e), cfg.root).exists()]
    for env_id in sorted(set(env_ids) - set(missing)):
        levels = sorted({m["noise"] for m in episode_metadata(load_dataset(dataset_id_for(env_id), root=cfg.root))})
        if levels != sorted(cfg.noise):
            raise SystemExit(
                f"{dataset_path(dataset_id_for(env_id), cfg.root)} holds noise levels {levels}, this run asks for "
                f"{sorted(cfg.noise)}: choose another --output-dir, or delete that dataset to re-collect it"
            )
    if not missing:
        log(f"collect: datasets complete under {cfg.root}, reusing them")
        return
    log(f"collect: {cfg.episodes_per_task} episodes x noise {cfg.noise} for {len(missing)} tasks -> {cfg.root}")
    job = CollectionJob(
        env_ids=missing,
        episodes_per_task=cfg.episodes_per_task,
        noise_levels=tuple(cfg.noise),
        root=str(cfg.root),
        seed=cfg.seed,
        workers=cfg.workers,
    )
    run_collection(job, progress=cfg.progress)


def expert_success(cfg: PipelineConfig, env_ids: list[str]) -> dict[str, float]:
    """The scripted expert's success per task, from the noise-free demonstrations."""
    out = {}
    for env_id in env_ids:
        metas = episode_metadata(load_dataset(dataset_id_for(env_id), root=cfg.root))
        clean = [m["success"] for m in metas if m["noise"] == 0.0] or [m["success"] for m in metas]
        out[task_name(env_id)] = float(np.mean(clean))
    return out


def train_stage(
    cfg: PipelineConfig, name: str, policy: VLAPolicy, data: ChunkDataset, train_config: TrainConfig
) -> dict[str, Any]:
    """Train (resuming from runs/<name>/ when interrupted) and save checkpoints/<name>/."""
    out = Path(cfg.output_dir)
    summary = train(policy, data, train_config, out / "runs" / name, resume=True)
    policy.save_pretrained(out / "checkpoints" / name)
    write_json(out / "runs" / name / "summary.json", summary)
    return summary


def pretrain(cfg: PipelineConfig) -> Path:
    """The dense checkpoint to start from: the shipped (or given) one, or with ``--pretrain``
    the recipe run from nothing, whose demonstrations this run then reuses."""
    if not cfg.pretrain:
        log(f"pretrain: starting from {cfg.base}")
        return cfg.base
    recipe_cfg = cfg.recipe_config()
    log(f"pretrain: the recipe from nothing in {recipe_cfg.output_dir} ({recipe_cfg.steps} policy steps)")
    recipe.run(recipe_cfg)
    if cfg.datasets_root is None:
        cfg.datasets_root = str(recipe_cfg.root)  # the same demonstrations (same noise levels and seeds)
    return cfg.base


def upcycled(cfg: PipelineConfig, pretrained: Path, variant: str) -> VLAPolicy:
    """A fresh copy of the pretrained policy, upcycled as ``variant`` asks."""
    kind, init = parse_variant(variant, cfg.init)
    policy = from_pretrained(pretrained)
    if kind != "dense":
        moe = adamoe.MoEConfig(**{"num_experts": cfg.num_experts, "top_k": cfg.top_k, **FAMILIES[kind]})
        generator = torch.Generator().manual_seed(cfg.seed)
        policy.upcycle(moe, init=init, generator=generator)
        policy.config.self_contrast_beta = SELF_CONTRAST.get(kind, 0.0)
        if kind in ATTENTION_EXPERTS:
            moa = adamoe.MoAConfig(num_experts=cfg.num_experts, **ATTENTION_EXPERTS[kind])
            policy.upcycle_attention(moa, generator=generator)
    return policy


def finetune(cfg: PipelineConfig, data: ChunkDataset, pretrained: Path) -> None:
    for variant in cfg.variants:
        out = Path(cfg.output_dir) / "checkpoints" / variant
        if (out / "config.json").is_file():
            log(f"finetune {variant}: {out} exists, reusing it")
            continue
        policy = upcycled(cfg, pretrained, variant)
        counts = policy.parameter_counts()
        log(
            f"finetune {variant}: {counts['total']:,} parameters ({counts['active']:,} active), "
            f"{cfg.finetune_steps} steps x {cfg.batch_size}"
        )
        train_config = TrainConfig(
            steps=cfg.finetune_steps,
            batch_size=cfg.batch_size,
            lr=cfg.finetune_lr,
            warmup_steps=min(50, cfg.finetune_steps // 10),
            seed=cfg.seed + 1,  # the same batches and noise for every variant
            progress=cfg.progress,
        )
        summary = train_stage(cfg, variant, policy, data, train_config)
        log(f"finetune {variant}: {summary['wall_s'] / 60:.1f} min, final loss {summary['final_loss']:.4f}")


def evaluated(cfg: PipelineConfig) -> list[tuple[str, Path]]:
    out = Path(cfg.output_dir) / "checkpoints"
    first = [("pretrained", cfg.base)] if cfg.eval_pretrained else []
    return first + [(v, out / v) for v in cfg.variants]


def eval_path(cfg: PipelineConfig, name: str, split: str) -> Path:
    base = Path(cfg.output_dir) / "eval" / name
    return base if split == "train" else base / split


def evaluate_all(cfg: PipelineConfig, env_ids: list[str]) -> None:
    splits = SPLITS if all(e.startswith(TABLETOP_PREFIX) for e in env_ids) else ("train",)
    for name, checkpoint in evaluated(cfg):
        policy = None
        # The pretrained policy is the starting point, shown on the training phrasings only.
        for split in splits[:1] if name == "pretrained" else splits:
            out = eval_path(cfg, name, split)
            if (out / "eval_info.json").is_file():
                log(f"evaluate {name} ({split} phrasings): {out / 'eval_info.json'} exists")
                continue
            policy = policy or from_pretrained(checkpoint)
            torch.manual_seed(cfg.seed)
            config = EvalConfig(
                episodes_per_task=cfg.eval_episodes,
                instruction_split=split,
                videos_per_task=cfg.videos if split == "train" else 0,
            )
            result = evaluate(policy, env_ids, config, out, progress=cfg.progress)
            rate = 100 * result["aggregated"]["success_rate"]
            log(f"evaluate {name} ({split} phrasings): {rate:.1f}% in {result['wall_s']:.0f} s")


# -- measurements for the report ----------------------------------------------------------


def task_frames(data: ChunkDataset, env_ids: list[str], per_task: int, seed: int) -> dict[str, np.ndarray]:
    """Up to ``per_task`` random frame indices of each task's demonstrations."""
    rng = np.random.default_rng(seed)
    frame_task = np.asarray(data.episode_task)[data.frame_episode]
    out = {}
    for env_id in env_ids:
        idx = np.flatnonzero(frame_task == task_name(env_id))
        if len(idx) == 0:  # datasets whose metadata names tasks differently
            continue
        out[task_name(env_id)] = rng.choice(idx, size=min(per_task, len(idx)), replace=False)
    return out


def expert_use(policy: VLAPolicy, data: ChunkDataset, frames: dict[str, np.ndarray]) -> dict[str, Any]:
    """Share of each expert's routings (and its mean combine weight) per task and MoE layer,
    over every denoising step of chunks sampled from that task's demonstration frames."""
    per_task: dict[str, dict[str, list[float]]] = {}
    weight: dict[str, dict[str, list[float]]] = {}
    with torch.inference_mode():
        for task, idx in frames.items():
            batch = data.get(idx)
            with adamoe.record_routing(policy):
                torch.manual_seed(0)
                policy.predict_action_chunk(batch)
            stats = adamoe.routing_stats(policy)
            per_task[task] = {name: s["share"].tolist() for name, s in stats.items()}
            weight[task] = {name: s["mean_weight"].tolist() for name, s in stats.items()}
    layers = sorted({name for shares in per_task.values() for name in shares}, key=_layer_index)
    # mean_weight: the combine weight a selected expert got (AdaMoE: p_i + s_i; vanilla: p_i).
    return {"layers": layers, "tasks": list(per_task), "share": per_task, "mean_weight": weight}


def demo_flow_loss(policy: VLAPolicy, data: ChunkDataset, frames: dict[str, np.ndarray], seed: int) -> float:
    """The flow-matching loss on the sampled demonstration frames of every task, with the
    same flow times and noise for every policy (a paired, low-noise measure of how well a
    policy fits the demonstrations; they are training data, so not of generalisation)."""
    idx = np.concatenate(list(frames.values()))
    total = 0.0
    with torch.inference_mode():
        for i, chunk in enumerate(np.array_split(idx, -(-len(idx) // 128))):  # batches of at most 128 frames
            torch.manual_seed(seed + i)  # per batch: a policy drawing more (THOR's routing) shifts no other batch
            total += policy(data.get(chunk))[1]["flow_loss"] * len(chunk)
    return total / len(idx)


def measure_routing(policy: VLAPolicy, data: ChunkDataset, frames: dict[str, np.ndarray], per_task: int = 8) -> None:
    """Leave every MoE layer's routing statistics over a few frames of every task recorded
    (what ``experts_per_token`` and so ``parameter_counts`` read for top-any)."""
    if not adamoe.moe_layers(policy) or not frames:
        return
    idx = np.concatenate([f[:per_task] for f in frames.values()])
    with torch.inference_mode(), adamoe.record_routing(policy):
        torch.manual_seed(0)
        policy.predict_action_chunk(data.get(idx))


def _layer_index(name: str) -> int:
    digits = [int(part) for part in name.split(".") if part.isdigit()]
    return digits[0] if digits else 0


def latency(policies: dict[str, VLAPolicy], batch: dict[str, Any], calls: int) -> dict[str, float]:
    """Median ``predict_action_chunk`` time (batch 1) per policy, interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in policies}
    with torch.inference_mode():
        for policy in policies.values():
            policy.predict_action_chunk(batch)
        for _ in range(calls):
            for name, policy in policies.items():
                start = time.perf_counter()
                policy.predict_action_chunk(batch)
                samples[name].append(time.perf_counter() - start)
    return {name: float(1e3 * np.median(v)) for name, v in samples.items()}


# -- report ---------------------------------------------------------------------------


def load_eval(cfg: PipelineConfig, name: str, split: str) -> dict[str, Any] | None:
    path = eval_path(cfg, name, split) / "eval_info.json"
    return json.loads(path.read_text()) if path.is_file() else None


def report(cfg: PipelineConfig, data: ChunkDataset, env_ids: list[str], began: float) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    experts = expert_success(cfg, env_ids)
    names = [name for name, _ in evaluated(cfg)]
    policies = {name: from_pretrained(path) for name, path in evaluated(cfg)}
    frames = task_frames(data, env_ids, per_task=64, seed=cfg.seed)
    one = data.get(next(iter(frames.values()))[:1]) if frames else data.get(np.array([0]))
    one = {k: v for k, v in one.items() if k not in (SCENE_POSITIONS, SCENE_FEATURES)}  # time the encoder too
    times = latency(policies, one, cfg.latency_calls)
    for policy in policies.values():  # top-any's experts per token, for its active parameters
        measure_routing(policy, data, frames)
    rows = []
    for name in names:
        policy = policies[name]
        counts = policy.parameter_counts()
        row = {
            "variant": name,
            "init": policy.config.moe["init"] if policy.config.moe else None,
            "params_total": counts["total"],
            "params_active": counts["active"],
            "latency_ms": times[name],
            "demo_flow_loss": demo_flow_loss(policy, data, frames, cfg.seed) if frames else None,
        }
        for split in SPLITS:
            result = load_eval(cfg, name, split)
            if result is not None:
                row[f"success_{split}"] = result["aggregated"]["success_rate"]
                row[f"per_task_{split}"] = {t: r["success_rate"] for t, r in result["per_task"].items()}
        summary = out / "runs" / ("dense_pretrained" if name == "pretrained" else name) / "summary.json"
        if summary.is_file():
            row["train_wall_s"] = json.loads(summary.read_text())["wall_s"]
        rows.append(row)
    routing = {
        name: expert_use(policies[name], data, frames) for name in names if policies[name].config.moe is not None
    }
    results = {
        "config": asdict(cfg),
        "variants": rows,
        "expert_success": experts,
        "expert_use": routing,
        "machine": machine(),
        "wall_s": time.perf_counter() - began,
    }
    write_json(out / "results.json", results)
    (out / "results.md").write_text(to_markdown(results) + "\n")
    plot_success(results, out / "plots" / "success_per_task.png")
    plot_training(cfg, out / "plots" / "training_curves.png")
    for name, use in routing.items():
        plot_expert_use(name, use, out / "plots" / f"expert_use_{name}.png")
    return results


def machine() -> dict[str, Any]:
    import os
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def to_markdown(results: dict[str, Any]) -> str:
    rows = results["variants"]
    has_heldout = any("success_heldout" in r for r in rows)
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"
    head = "| variant | init | params (total / active) | success, train phrasing |"
    head += " success, held-out phrasing |" if has_heldout else ""
    head += " chunk latency (batch 1) | flow loss, demo frames |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        params = f"{r['params_total'] / 1e6:.2f} M / {r['params_active'] / 1e6:.2f} M"
        line = f"| {r['variant']} | {r['init'] or '-'} | {params} "
        line += f"| {pct(r.get('success_train'))} |"
        line += f" {pct(r.get('success_heldout'))} |" if has_heldout else ""
        loss = r.get("demo_flow_loss")
        line += f" {r['latency_ms']:.1f} ms | {'-' if loss is None else f'{loss:.4f}'} |"
        lines.append(line)
    expert = float(np.mean(list(results["expert_success"].values())))
    lines.append(f"| scripted expert | - | - | {pct(expert)} |" + (" - |" if has_heldout else "") + " - | - |")
    tasks = list(results["expert_success"])
    per_task = ["", "Success per task (training phrasings):", ""]
    per_task.append("| task | " + " | ".join(r["variant"] for r in rows) + " | expert |")
    per_task.append("|---|" + "---:|" * (len(rows) + 1))
    for t in tasks:
        cells = [pct(r.get("per_task_train", {}).get(t)) for r in rows]
        per_task.append(f"| {t} | " + " | ".join(cells) + f" | {pct(results['expert_success'][t])} |")
    return "\n".join(lines + per_task)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_success(results: dict[str, Any], path: Path) -> None:
    """Success per task: grouped bars for a few variants, a task x variant grid for many."""
    plt = _plt()
    rows = [r for r in results["variants"] if "per_task_train" in r]
    tasks = list(results["expert_success"])
    if len(rows) > 5:
        grid = np.array([[100 * r["per_task_train"].get(t, np.nan) for t in tasks] for r in rows])
        means = [100 * r["success_train"] for r in rows]
        fig, ax = plt.subplots(figsize=(2.5 + 0.75 * len(tasks), 1.2 + 0.32 * len(rows)))
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black"
            )
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{r['variant']} ({m:.0f}%)" for r, m in zip(rows, means, strict=True)])
        ax.tick_params(axis="y", labelsize=8)
        fig.colorbar(image, ax=ax, label="success (%)", shrink=0.8)
        ax.set_title("Success per task, training phrasings (scripted expert: 100% on every task)", fontsize=10)
    else:
        fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(tasks)), 3.8))
        width = 0.8 / (len(rows) + 1)
        x = np.arange(len(tasks))
        colors = palette([r["variant"] for r in rows])
        for i, r in enumerate(rows):
            values = [100 * r["per_task_train"].get(t, np.nan) for t in tasks]
            label = f"{r['variant']} ({100 * r['success_train']:.0f}%)"
            ax.bar(x + i * width, values, width, label=label, color=colors[r["variant"]])
        expert = [100 * results["expert_success"][t] for t in tasks]
        ax.bar(x + len(rows) * width, expert, width, label="scripted expert", color="#dddddd", edgecolor="#999999")
        ax.set_xticks(x + 0.4 - width / 2, tasks, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("success (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Success per task, training phrasings", pad=24)
        ax.legend(fontsize=7, ncol=len(rows) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(cfg: PipelineConfig, path: Path) -> None:
    """Flow-matching loss against step: pretraining, then each variant's fine-tuning."""
    plt = _plt()
    runs = Path(cfg.output_dir) / "runs"
    colors = palette(["dense_pretrained", *cfg.variants])
    logged = {n: r for n in colors if (r := _records(runs / n / "metrics.jsonl"))}
    panels = [(["dense_pretrained"], "pretraining (dense)"), (cfg.variants, "fine-tuning")]
    panels = [(names, title) for names, title in panels if any(n in logged for n in names)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (names, title) in zip(axes[0], panels, strict=True):
        for name in names:
            records = logged.get(name)
            if not records:
                continue
            steps = np.array([r["step"] for r in records])
            loss = np.array([r.get("flow_loss", r["loss"]) for r in records])
            k = max(1, min(10, len(loss) // 5))  # moving average over up to 10 logged points
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, label=name, color=colors[name])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss (smoothed)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=1 + len(names) // 6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_use(name: str, use: dict[str, Any], path: Path) -> None:
    """One heatmap per MoE layer: tasks x experts, the share of routings each expert got."""
    plt = _plt()
    layers, tasks = use["layers"], use["tasks"]
    if not layers or not tasks:
        return
    fig, axes = plt.subplots(1, len(layers), figsize=(1.2 + 2.0 * len(layers), 0.9 + 0.28 * len(tasks)), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        grid = np.array([use["share"][t][layer] for t in tasks])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {_layer_index(layer)}", fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks), fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of tokens")
    fig.suptitle(f"Expert use per task and layer: {name}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# -- command line -----------------------------------------------------------------------


def load_data(cfg: PipelineConfig, env_ids: list[str]) -> ChunkDataset:
    """Every task's frames as the base policy sees them: its cameras (Meta-World: the corner
    one) and chunk size, with its frozen scene encoder's outputs cached per frame (every
    variant shares that encoder, so fine-tuning never runs it)."""
    base = from_pretrained(cfg.base)
    log(f"load: {len(env_ids)} datasets")
    ids = [dataset_id_for(e) for e in env_ids]
    data = ChunkDataset(ids, base.config.chunk_size, base.config.cameras, root=cfg.root, progress=cfg.progress)
    if base.config.vision == "scene" and base.config.freeze_vision:
        # Images stay for the latency measurement, which must include the encoder.
        data.attach_frame_features(encode_frames(base, data.get, len(data)), drop_images=False)
    log(f"load: {len(data):,} frames from {data.num_episodes} episodes")
    return data


def run(cfg: PipelineConfig, data: ChunkDataset | None = None) -> dict[str, Any]:
    """Every stage; ``data``: the datasets already loaded (by ``load_data``), to skip re-reading."""
    cfg.validate()
    began = time.perf_counter()
    env_ids = list(resolve_env_ids(cfg.suite))
    pretrained = pretrain(cfg)
    collect(cfg, env_ids)
    data = data if data is not None else load_data(cfg, env_ids)
    finetune(cfg, data, pretrained)
    evaluate_all(cfg, env_ids)
    results = report(cfg, data, env_ids, began)
    print()
    print(to_markdown(results))
    out = Path(cfg.output_dir)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'plots'}/*.png")
    print(f"took {results['wall_s'] / 60:.1f} min")
    return results


def parse_args(argv: list[str] | None = None) -> PipelineConfig:
    d = PipelineConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--quick", action="store_true", help="tiny preset, a few steps and episodes (< 2 min)")
    p.add_argument("--suite", nargs="+", default=None, help="suite names or env ids (tabletop, mt10, ...)")
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
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per task and phrasing split")
    p.add_argument("--no-eval-pretrained", action="store_true", help="skip evaluating the pretrained policy")
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    cfg = replace(d, **QUICK) if args.quick else d
    if args.quick:
        cfg.output_dir = "outputs/demo_quick"
    given = {
        "output_dir": args.output_dir if args.output_dir != d.output_dir else None,
        "suite": args.suite,
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
        "eval_episodes": args.eval_episodes,
    }
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    cfg.overrides = parse_overrides(args.set)
    cfg.init, cfg.seed = args.init, args.seed
    if args.no_eval_pretrained:
        cfg.eval_pretrained = False
    if args.pretrain:
        cfg.pretrain = True
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
