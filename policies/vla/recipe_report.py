"""The pretraining recipe's report and shipping: success per task with 95% intervals, the
perception probe, the learning curve, stage times (``results.md``, ``results.json``,
``plots/``), and ``ship``, which copies the checkpoint with its model card."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.io import atomic_directory, read_json, write_json, write_text
from policies.plotting import pyplot, save_figure
from policies.pretrained import sha256, write_manifest
from policies.stats import wilson_interval

if TYPE_CHECKING:
    from policies.vla.recipe import RecipeConfig

SPLITS = ("train", "heldout")


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
    write_text(out / "results.md", results_markdown(report))
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
    plt = pyplot()
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
    save_figure(fig, directory / "success_per_task.png")
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
        save_figure(fig, directory / "learning_curve.png")


SHIPPED_FILES = ("config.json", "model.safetensors", "manifest.json", "README.md", "results.json")


def _commit() -> str:
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
        write_manifest(tmp, ["config.json", "model.safetensors"])
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
