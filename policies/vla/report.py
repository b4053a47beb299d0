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
from policies.stats import format_difference, hierarchical_bootstrap, wilson_interval
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


def merge_expert_use(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """``expert_use`` over two sets of tasks (the new suite's, then the base suite's) as one."""
    layers = first["layers"] or second["layers"]
    return {
        "layers": layers,
        "tasks": [*first["tasks"], *second["tasks"]],
        "share": {**first["share"], **second["share"]},
        "mean_weight": {**first["mean_weight"], **second["mean_weight"]},
    }


def _tv(p: list[float], q: list[float]) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def routing_separation(use: dict[str, Any], new: list[str], old: list[str]) -> dict[str, dict[str, float | None]]:
    """Per MoE layer, how far apart routing puts the new tasks and the old ones: the mean
    total-variation distance between two tasks' expert shares, for pairs within the new
    tasks, within the old ones, and across (0: the same experts in the same shares; 1:
    disjoint experts). Routing separates the suites where ``across`` exceeds both ``within``."""

    def mean_distance(share: dict[str, list[float]], a: list[str], b: list[str]) -> float | None:
        pairs = [(x, y) for x in a for y in b if x != y and (a is not b or x < y)]
        return float(np.mean([_tv(share[x], share[y]) for x, y in pairs])) if pairs else None  # one task: none

    out = {}
    for layer in use["layers"]:
        share = {t: use["share"][t][layer] for t in use["tasks"]}
        out[layer] = {
            "within_new": mean_distance(share, new, new),
            "within_old": mean_distance(share, old, old),
            "across": mean_distance(share, new, old),
        }
    return out


def stage_reach(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per task of several stages: the share of episodes that completed at least k stages
    (at any point of the episode), for k = 1 .. stages (``eval_info.json``'s ``max_stages_done``)."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for ep in result["per_episode"]:
        if ep.get("num_stages", 1) > 1:
            by_task.setdefault(ep["task"], []).append(ep)
    return {
        task: [float(np.mean([e["max_stages_done"] >= k for e in eps])) for k in range(1, eps[0]["num_stages"] + 1)]
        for task, eps in by_task.items()
    }


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


def _rate(counts: dict[str, list[int]] | None) -> tuple[float, float, float] | None:
    """The task-mean success and the Wilson interval of the pooled episodes (tasks run the
    same number of episodes, so the two means agree)."""
    if not counts:
        return None
    k, n = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    low, high = wilson_interval(k, n)
    return k / n, low, high


def _cell(r: dict[str, Any], split: str) -> str:
    rate = _rate(r.get(f"counts_{split}"))
    if rate is None:
        value = r.get(f"success_{split}")
        return "-" if value is None else f"{100 * value:.1f}%"
    return f"{100 * rate[0]:.1f}% [{100 * rate[1]:.0f}, {100 * rate[2]:.0f}]"


def to_markdown(results: dict[str, Any]) -> str:
    """The results table (success with 95% Wilson intervals over the pooled episodes), per task,
    per stage, and how routing treats the new tasks and the old."""
    rows = results["variants"]
    splits = [s for s in ("train", "heldout", "retention") if any(f"success_{s}" in r for r in rows)]
    titles = {"train": "new tasks, train phrasing", "heldout": "new tasks, held-out phrasing"}
    titles["retention"] = "retention: base suite"
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"
    head = "| variant | init | params (total / active) | "
    head += " | ".join(f"success, {titles[s]}" for s in splits)
    head += " | chunk latency (batch 1) | flow loss, demo frames |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        params = f"{r['params_total'] / 1e6:.2f} M / {r['params_active'] / 1e6:.2f} M"
        cells = []
        for split in splits:
            cell = _cell(r, split)
            if split == "retention" and r.get("retention_change") is not None and r["variant"] != "pretrained":
                cell += f" ({100 * r['retention_change']:+.1f})"
            cells.append(cell)
        loss = r.get("demo_flow_loss")
        line = f"| {r['variant']} | {r['init'] or '-'} | {params} | " + " | ".join(cells)
        line += f" | {r['latency_ms']:.1f} ms | {'-' if loss is None else f'{loss:.4f}'} |"
        lines.append(line)
    expert = float(np.mean(list(results["expert_success"].values())))
    lines.append(f"| scripted expert | - | - | {pct(expert)} |" + " - |" * (len(splits) - 1) + " - | - |")
    if "retention" in splits:
        lines += ["", "Retention: in brackets, the change from the pretrained policy on the same base-suite scenes."]
    tasks = list(results["expert_success"])
    shown = [s for s in ("train", "heldout") if s in splits]
    lines += ["", f"Success per task ({' / '.join(titles[s].split(', ')[1] for s in shown)}):", ""]
    lines.append("| task | " + " | ".join(r["variant"] for r in rows) + " | expert |")
    lines.append("|---|" + "---:|" * (len(rows) + 1))
    for t in tasks:
        cells = [" / ".join(pct(r.get(f"per_task_{s}", {}).get(t)) for s in shown) for r in rows]
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {pct(results['expert_success'][t])} |")
    staged = {t: len(v) for r in rows for t, v in r.get("stages_train", {}).items()}
    if staged:
        lines += ["", "Stages completed (at any point) on the long tasks, training phrasings: share of episodes", ""]
        lines.append("| task | stage | " + " | ".join(r["variant"] for r in rows) + " |")
        lines.append("|---|---:|" + "---:|" * len(rows))
        for t, n in staged.items():
            for k in range(n):
                cells = [pct(r["stages_train"][t][k]) if t in r.get("stages_train", {}) else "-" for r in rows]
                lines.append(f"| {t} | {k + 1} of {n} | " + " | ".join(cells) + " |")
    separated = {n: u["separation"] for n, u in results.get("expert_use", {}).items() if "separation" in u}
    if separated:
        lines += [
            "",
            "Routing, new tasks against the base suite's: mean total-variation distance between two tasks' "
            "expert shares (within the new tasks / within the old / across; 0: the same experts, 1: disjoint)",
            "",
            "| variant | "
            + " | ".join(f"layer {_layer_index(name)}" for name in next(iter(separated.values())))
            + " |",
            "|---|" + "---:|" * len(next(iter(separated.values()))),
        ]
        for name, layers in separated.items():
            num = lambda d: "-" if d is None else f"{d:.2f}"
            cells = [f"{num(v['within_new'])} / {num(v['within_old'])} / {num(v['across'])}" for v in layers.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wrapped(task: str) -> str:
    """A long task's name over lines, one stage per line (for axis labels and titles)."""
    return task.replace("Then", "\nThen")


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
            counts = r.get("counts_train", {})
            bounds = [wilson_interval(*counts[t]) if t in counts else (np.nan, np.nan) for t in tasks]
            errors = np.array([[v - 100 * lo, 100 * hi - v] for v, (lo, hi) in zip(values, bounds, strict=True)]).T
            ax.bar(x + i * width, values, width, label=label, color=colors[r["variant"]])
            if counts:  # 95% Wilson intervals over the task's episodes
                ax.errorbar(
                    x + i * width, values, yerr=errors, fmt="none", ecolor="#333333", elinewidth=0.7, capsize=1.5
                )
        expert = [100 * results["expert_success"][t] for t in tasks]
        ax.bar(x + len(rows) * width, expert, width, label="scripted expert", color="#dddddd", edgecolor="#999999")
        ax.set_xticks(x + 0.4 - width / 2, [_wrapped(t) for t in tasks], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("success (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Success per task, training phrasings (whiskers: 95% intervals)", pad=24)
        ax.legend(fontsize=7, ncol=len(rows) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, bbox_inches="tight")


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


def plot_expert_use(name: str, use: dict[str, Any], path: Path, new: int | None = None) -> None:
    """One heatmap per MoE layer: tasks x experts, the share of routings each expert got;
    with ``new``, a line parts the first ``new`` tasks (the fine-tuning suite) from the rest
    (the base suite)."""
    plt = pyplot()
    layers, tasks = use["layers"], use["tasks"]
    if not layers or not tasks:
        return
    parted = new is not None and 0 < new < len(tasks)
    height = 1.4 + 0.28 * len(tasks) + 0.25 * parted  # inches: the title, the rows, the axis labels and note
    fig, axes = plt.subplots(1, len(layers), figsize=(1.2 + 2.0 * len(layers), height), squeeze=False)
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=(0.5 + 0.25 * parted) / height)
    for ax, layer in zip(axes[0], layers, strict=True):
        grid = np.array([use["share"][t][layer] for t in tasks])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {_layer_index(layer)}", fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])], fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks), fontsize=7)
        if parted:
            ax.axhline(new - 0.5, color="white", linewidth=2)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of tokens")
    fig.suptitle(f"Expert use per task and layer: {name}", fontsize=10, y=1 - 0.08 / height)
    if parted:
        note = "above the white line: the new tasks; below: the base suite"
        fig.text(0.45, 0.08 / height, note, ha="center", va="bottom", fontsize=8)
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Fine-tuning curves: success on the new suite (training phrasings) against step, with
    95% Wilson intervals; the pretrained policy's zero-shot success at step 0."""
    rows = [r for r in results["variants"] if r.get("curve")]
    if not rows:
        return
    plt = pyplot()
    colors = palette([r["variant"] for r in results["variants"]])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    start = next((r for r in results["variants"] if r["variant"] == "pretrained" and "counts_train" in r), None)
    for r in rows:
        points = list(r["curve"])
        if start is not None:
            counts = start["counts_train"]
            points.insert(0, {"step": 0, "successes": {t: c[0] for t, c in counts.items()}, "n": counts})
        steps, rates, lows, highs = [], [], [], []
        for point in points:
            k = sum(point["successes"].values())
            n = (
                sum(c[1] for c in point["n"].values())
                if "n" in point
                else point["episodes_per_task"] * len(point["successes"])
            )
            low, high = wilson_interval(k, n)
            steps.append(point["step"])
            rates.append(100 * k / n)
            lows.append(100 * low)
            highs.append(100 * high)
        ax.plot(steps, rates, marker="o", color=colors[r["variant"]], label=r["variant"])
        ax.fill_between(steps, lows, highs, color=colors[r["variant"]], alpha=0.12)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("success, new tasks (%)")
    ax.set_ylim(0, 102)
    ax.set_title("Fine-tuning curves (bands: 95% intervals; step 0: the pretrained base)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_stage_progress(results: dict[str, Any], path: Path) -> None:
    """Per long task: the share of episodes that completed each stage, per variant."""
    rows = [r for r in results["variants"] if r.get("stages_train")]
    tasks = list(dict.fromkeys(t for r in rows for t in r["stages_train"]))
    if not tasks:
        return
    plt = pyplot()
    colors = palette([r["variant"] for r in rows])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        n = max(len(r["stages_train"].get(task, [])) for r in rows)
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            values = [100 * v for v in r["stages_train"].get(task, [np.nan] * n)]
            ax.bar(np.arange(n) + i * width, values, width, color=colors[r["variant"]], label=r["variant"])
        ax.set_xticks(np.arange(n) + 0.4 - width / 2, [f"stage {k + 1}" for k in range(n)], fontsize=8)
        ax.set_title(_wrapped(task), fontsize=7)
        ax.set_ylim(0, 105)
    axes[0][0].set_ylabel("episodes that completed it (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Per-stage progress on the long tasks (training phrasings)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, bbox_inches="tight")


# -- over seeds (make experiment) ------------------------------------------------------


def paired_episodes(variant: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[float]:
    """Per episode, ``variant``'s success minus ``reference``'s on the same scene (matched by
    task and scene seed); an episode without its pair is an error, not a silent drop."""
    ref = {(e["task"], e["seed"]): float(e["success"]) for e in reference}
    missing = [(e["task"], e["seed"]) for e in variant if (e["task"], e["seed"]) not in ref]
    if missing or len(ref) != len(variant):
        raise ValueError(
            f"the evaluations are not paired: {len(variant)} episodes against {len(ref)}, e.g. {missing[:3]}"
        )
    return [float(e["success"]) - ref[(e["task"], e["seed"])] for e in variant]


def aggregate_seeds(
    episodes: dict[int, dict[str, dict[str, list[dict[str, Any]]]]],
    variants: list[str],
    reference: str = "dense",
    resamples: int = 10_000,
) -> list[dict[str, Any]]:
    """Success per variant and evaluation over seeds (``episodes[seed][variant][split]``: the
    per-episode records of ``eval_info.json``), with a 95% bootstrap interval over seeds and
    episodes; and each variant's paired difference from ``reference`` (the same seed, task
    and scene), with its interval. A difference is significant when its interval excludes 0."""
    seeds = sorted(episodes)
    rows = []
    for name in ["pretrained", *variants]:
        splits = sorted({split for s in seeds for split in episodes[s].get(name, {})}, key=_split_order)
        if not splits:
            continue
        row: dict[str, Any] = {"variant": name, "seeds": [s for s in seeds if name in episodes[s]]}
        for split in splits:
            groups = [
                [float(e["success"]) for e in episodes[s][name][split]]
                for s in seeds
                if split in episodes[s].get(name, {})
            ]
            row[f"success_{split}"] = hierarchical_bootstrap(groups, resamples) | {"episodes": sum(map(len, groups))}
            row[f"success_{split}"]["per_seed"] = [float(np.mean(g)) for g in groups]
            if name == reference or name == "pretrained":
                continue
            diffs = [
                paired_episodes(episodes[s][name][split], episodes[s][reference][split])
                for s in seeds
                if split in episodes[s].get(name, {}) and split in episodes[s].get(reference, {})
            ]
            if diffs:
                row.setdefault("vs_dense", {})[split] = _paired(diffs, resamples)
        forgot = [
            paired_episodes(episodes[s][name]["retention"], episodes[s]["pretrained"]["retention"])
            for s in seeds
            if name != "pretrained"
            and "retention" in episodes[s].get(name, {})
            and "retention" in episodes[s].get("pretrained", {})
        ]
        if forgot:  # retention against the starting point on the same base-suite scenes
            row["vs_pretrained_retention"] = _paired(forgot, resamples)
        rows.append(row)
    return rows


def _paired(diffs: list[list[float]], resamples: int) -> dict[str, Any]:
    d: dict[str, Any] = hierarchical_bootstrap(diffs, resamples)
    d["significant"] = bool(d["low"] > 0 or d["high"] < 0)
    d["per_seed"] = [float(np.mean(g)) for g in diffs]
    return d


def _split_order(split: str) -> int:
    return ("train", "heldout", "retention").index(split) if split in ("train", "heldout", "retention") else 3


SPLIT_TITLES = {"train": "new tasks, train phrasing", "heldout": "new tasks, held-out phrasing"}
SPLIT_TITLES["retention"] = "retention: base suite"


def seeds_markdown(rows: list[dict[str, Any]], seeds: list[int], facts: dict[str, dict[str, Any]]) -> str:
    """The over-seeds table (``aggregate_seeds``' rows; ``facts[variant]``: parameters and
    latency) and the paired table against dense, saying which differences are significant."""
    splits = sorted({k[len("success_") :] for r in rows for k in r if k.startswith("success_")}, key=_split_order)
    pct = lambda s: f"{100 * s['mean']:.1f}% [{100 * s['low']:.1f}, {100 * s['high']:.1f}]" if s else "-"
    lines = [
        f"Success over seeds {', '.join(map(str, seeds))}, pooled episodes; in brackets the 95% bootstrap "
        "interval over seeds and episodes.",
        "",
        "| variant | params (total / active) | "
        + " | ".join(f"success, {SPLIT_TITLES[s]}" for s in splits)
        + " | chunk latency (batch 1) |",
        "|---|---|" + "---:|" * (len(splits) + 1),
    ]
    for r in rows:
        f = facts.get(r["variant"], {})
        params = f"{f['params_total'] / 1e6:.2f} M / {f['params_active'] / 1e6:.2f} M" if f else "-"
        cells = [pct(r.get(f"success_{s}")) for s in splits]
        latency = f"{f['latency_ms']:.1f} ms" if f else "-"
        lines.append(f"| {r['variant']} | {params} | " + " | ".join(cells) + f" | {latency} |")
    paired = [r for r in rows if "vs_dense" in r]
    if paired:
        lines += [
            "",
            "Against dense on the same seeds and scenes (the variant's success minus dense's, in points; "
            "95% paired bootstrap interval over seeds and episodes; **bold**: significant, the interval excludes 0):",
            "",
            "| variant | " + " | ".join(SPLIT_TITLES[s] for s in splits) + " |",
            "|---|" + "---:|" * len(splits),
        ]
        for r in paired:
            cells = [format_difference(r["vs_dense"].get(s)) for s in splits]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    forgot = [r for r in rows if "vs_pretrained_retention" in r]
    if forgot:
        lines += [
            "",
            "Retention against the pretrained base on the same base-suite scenes (the variant's success minus "
            "the base's, in points; 95% paired bootstrap interval; **bold**: significant):",
            "",
            "| variant | change on the base suite |",
            "|---|---:|",
        ]
        for r in forgot:
            lines.append(f"| {r['variant']} | {format_difference(r['vs_pretrained_retention'])} |")
    return "\n".join(lines)


def plot_seeds(rows: list[dict[str, Any]], path: Path) -> None:
    """Success over seeds per variant and evaluation: bars for the pooled mean, whiskers for
    the 95% bootstrap interval, a dot per seed."""
    plt = pyplot()
    splits = sorted({k[len("success_") :] for r in rows for k in r if k.startswith("success_")}, key=_split_order)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows) * len(splits) / 2 + 2), 3.8))
    x = np.arange(len(rows))
    pal = palette([r["variant"] for r in rows])
    colors = [pal[r["variant"]] for r in rows]
    width = 0.8 / len(splits)
    hatches = {"train": None, "heldout": "//", "retention": ".."}
    for j, split in enumerate(splits):
        offset = (j - (len(splits) - 1) / 2) * width
        stats = [r.get(f"success_{split}") for r in rows]
        means = [100 * s["mean"] if s else np.nan for s in stats]
        errors = np.array(
            [[100 * (s["mean"] - s["low"]), 100 * (s["high"] - s["mean"])] if s else [0, 0] for s in stats]
        ).T
        ax.bar(
            x + offset,
            means,
            width,
            yerr=errors,
            capsize=3,
            color=colors,
            hatch=hatches.get(split),
            label=SPLIT_TITLES[split],
            edgecolor="white",
        )
        for i, s in enumerate(stats):
            values = s["per_seed"] if s else []
            ax.scatter([x[i] + offset] * len(values), [100 * v for v in values], color="black", s=8, zorder=3)
    ax.set_xticks(
        x, [r["variant"] for r in rows], rotation=45 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center"
    )
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Success over seeds (bars: pooled mean, whiskers: 95% bootstrap interval, dots: seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
