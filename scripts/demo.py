"""The main job, on small built-in defaults (``make demo``).

At this stage: collect scripted-expert demonstrations for the whole tabletop suite into
Minari datasets and report each expert's success rate. Outputs go to outputs/demo/:
``results.md`` and ``results.json`` (the table), ``plots/expert_success.png``, and the
datasets under ``datasets/`` (``MINARI_DATASETS_PATH=outputs/demo/datasets`` makes
``minari.load_dataset`` see them). Datasets that already exist are reused, so a second
run only re-reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from envs import TASK_LIST  # noqa: E402
from envs.collection import CollectionJob, dataset_id_for, run_collection  # noqa: E402
from envs.datasets import dataset_path, episode_metadata, load_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--episodes-per-task", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def expert_table(root: Path) -> list[dict]:
    rows = []
    for task in TASK_LIST:
        metas = episode_metadata(load_dataset(dataset_id_for(task.env_id), root=root))
        clean = [m for m in metas if m["noise"] == 0.0]
        rows.append(
            {
                "task": task.name,
                "episodes": len(clean),
                "success_rate": float(np.mean([m["success"] for m in clean])),
                "mean_length": float(np.mean([m["length"] for m in clean])),
                "max_steps": task.max_episode_steps,
            }
        )
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| task | episodes | expert success | mean length | step limit |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        success, length = 100 * r["success_rate"], r["mean_length"]
        lines.append(f"| {r['task']} | {r['episodes']} | {success:.0f}% | {length:.0f} | {r['max_steps']} |")
    mean = float(np.mean([r["success_rate"] for r in rows]))
    lines.append(f"| **mean** | {sum(r['episodes'] for r in rows)} | **{100 * mean:.1f}%** | | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar([r["task"] for r in rows], [100 * r["success_rate"] for r in rows], color="#4c72b0")
    ax.axhline(95, color="#c44e52", linestyle="--", linewidth=1, label="95% target")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Scripted expert success per tabletop task (zero noise)")
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    root = out / "datasets"
    start = time.perf_counter()
    missing = [t.env_id for t in TASK_LIST if not dataset_path(dataset_id_for(t.env_id), root).exists()]
    if missing:
        print(f"collecting {args.episodes_per_task} expert episodes for {len(missing)} tabletop tasks -> {root}")
        job = CollectionJob(
            env_ids=missing,
            episodes_per_task=args.episodes_per_task,
            root=str(root),
            seed=args.seed,
            workers=args.workers,
        )
        run_collection(job)
    else:
        print(f"datasets already complete under {root}; reusing them")
    rows = expert_table(root)
    table = to_markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("## Scripted experts on the tabletop suite\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"expert_success": rows}, indent=2) + "\n")
    plot(rows, out / "plots" / "expert_success.png")
    print()
    print(table)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'plots' / 'expert_success.png'}")
    print(f"datasets: {root}  (MINARI_DATASETS_PATH={root} lets minari.load_dataset read them)")
    print(f"took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
