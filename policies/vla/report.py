"""The main job's report: measurements of fine-tuned policies (latency, expert use, fit on
the demonstrations), the results table and plots, and the aggregate over seeds."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adamoe
from envs.ids import task_name
from policies.data import ChunkDataset
from policies.plotting import pyplot, save_figure
from policies.vla.families import KINDS
from policies.vla.modeling_vla import VLAPolicy

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
    (what ``experts_per_token`` and so ``num_parameters(active=True)`` read for top-any)."""
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


def machine() -> dict[str, Any]:
    """The machine a result was measured on."""
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


def plot_success(results: dict[str, Any], path: Path) -> None:
    """Success per task: grouped bars for a few variants, a task x variant grid for many."""
    plt = pyplot()
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
    save_figure(fig, path, dpi=120)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(runs: Path, variants: list[str], path: Path) -> None:
    """Flow-matching loss against step (from ``runs/<name>/metrics.jsonl``): pretraining,
    then each variant's fine-tuning."""
    plt = pyplot()
    colors = palette(["dense_pretrained", *variants])
    logged = {n: r for n in colors if (r := _records(runs / n / "metrics.jsonl"))}
    panels = [(["dense_pretrained"], "pretraining (dense)"), (variants, "fine-tuning")]
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
    save_figure(fig, path, dpi=120)


def plot_expert_use(name: str, use: dict[str, Any], path: Path) -> None:
    """One heatmap per MoE layer: tasks x experts, the share of routings each expert got."""
    plt = pyplot()
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
    save_figure(fig, path, dpi=120, bbox_inches="tight")


# -- over seeds (make experiment) ------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "values": values,
    }


PAIRED = ("success_train", "success_heldout", "demo_flow_loss")


def aggregate_seeds(runs: dict[int, dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per variant, and, where ``dense`` ran, each variant's
    per-seed difference from it (``vs_dense``: the seeds share batches, noise and
    evaluation scenes, so the paired difference is the less noisy comparison)."""
    rows = []
    find = lambda res, name: next((r for r in res["variants"] if r["variant"] == name), None)
    for name in ["pretrained", *variants]:
        per_seed = {s: r for s, res in runs.items() if (r := find(res, name)) is not None}
        if not per_seed:
            continue
        row: dict[str, Any] = {"variant": name, "seeds": sorted(per_seed)}
        for key in PAIRED:
            values = [r[key] for r in per_seed.values() if r.get(key) is not None]
            if values:
                row[key] = _stats(values)
        if name != "dense":
            diffs = {}
            pairs = [(r, find(runs[s], "dense")) for s, r in per_seed.items()]
            for key in PAIRED:
                values = [r[key] - d[key] for r, d in pairs if d is not None and None not in (r.get(key), d.get(key))]
                if values:
                    diffs[key] = _stats(values)
            if diffs:
                row["vs_dense"] = diffs
        any_row = next(iter(per_seed.values()))
        row["params_total"], row["params_active"] = any_row["params_total"], any_row["params_active"]
        row["latency_ms"] = float(np.median([r["latency_ms"] for r in per_seed.values()]))
        rows.append(row)
    return rows


def seeds_markdown(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    """The over-seeds table (``aggregate_seeds``' rows) and the paired table against dense."""

    def cell(s: dict[str, Any] | None, percent: bool = True, sign: str = "") -> str:
        if s is None:
            return "-"
        scale, fmt, unit = (100, ".1f", "%") if percent else (1, ".4f", "")
        if len(s["values"]) == 1:
            return f"{scale * s['mean']:{sign}{fmt}}{unit} (1 seed)"
        return f"{scale * s['mean']:{sign}{fmt}} ± {scale * s['std']:{fmt}}{unit}"

    lines = [
        f"Success: mean ± sd over seeds {', '.join(map(str, seeds))}.",
        "",
        "| variant | params (total / active) | success, train phrasing | success, held-out phrasing | chunk latency "
        "| flow loss, demo frames |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        params = f"{r['params_total'] / 1e6:.2f} M / {r['params_active'] / 1e6:.2f} M"
        train, heldout = cell(r.get("success_train")), cell(r.get("success_heldout"))
        loss = cell(r.get("demo_flow_loss"), percent=False)
        lines.append(f"| {r['variant']} | {params} | {train} | {heldout} | {r['latency_ms']:.1f} ms | {loss} |")
    paired = [r for r in rows if "vs_dense" in r]
    if paired:
        lines += [
            "",
            "Against dense, seed by seed (the variant's result minus dense's in the same seed: same batches, "
            "noise and scenes), mean ± sd over seeds:",
            "",
            "| variant | success, train phrasing | success, held-out phrasing | flow loss, demo frames |",
            "|---|---:|---:|---:|",
        ]
        for r in paired:
            d = r["vs_dense"]
            cells = [cell(d.get("success_train"), sign="+"), cell(d.get("success_heldout"), sign="+")]
            cells.append(cell(d.get("demo_flow_loss"), percent=False, sign="+"))
            lines.append(f"| {r['variant']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_seeds(rows: list[dict[str, Any]], path: Path) -> None:
    """Success over seeds per variant and split: bars for the mean, whiskers for the sd, a dot per seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    pal = palette([r["variant"] for r in rows])
    colors = [pal[r["variant"]] for r in rows]
    for offset, split, hatch in ((-0.18, "train", None), (0.18, "heldout", "//")):
        means = [100 * r.get(f"success_{split}", {}).get("mean", np.nan) for r in rows]
        stds = [100 * r.get(f"success_{split}", {}).get("std", 0.0) for r in rows]
        ax.bar(x + offset, means, 0.36, yerr=stds, capsize=3, color=colors, hatch=hatch, label=f"{split} phrasing")
        for i, r in enumerate(rows):
            values = r.get(f"success_{split}", {}).get("values", [])
            ax.scatter([x[i] + offset] * len(values), [100 * v for v in values], color="black", s=8, zorder=3)
    ax.set_xticks(
        x, [r["variant"] for r in rows], rotation=45 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center"
    )
    ax.set_ylabel("mean success (%)")
    ax.set_title("Success over seeds (bars: mean, whiskers: sd, dots: seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
