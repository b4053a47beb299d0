#!/usr/bin/env python
"""Decision Transformers merged into one multi-task policy, over several seeds.

    python scripts/dt_merge.py                  # = make dt-merge: 4 tabletop tasks, seeds 0 1 2
    python scripts/dt_merge.py --quick          # 2 tasks, tiny budgets: a smoke run in ~1 minute
    python scripts/dt_merge.py --dataset hopper=mujoco/hopper/medium-v0 --dataset ...  # any Minari data

Per seed, after the merging paper (Lawson & Qureshi, arXiv 2303.07551): one common
initialisation (a multi-task DT trained briefly on every task), one specialist per task
fine-tuned from it, each specialist's diagonal Fisher on its own data, then the merges:
uniform average, Fisher-weighted average, task arithmetic and TIES (relative to the
common initialisation), and a merge into an AdaMoE body (the specialists' MLPs as routed
experts, routers fitted briefly). Every model is evaluated on every task; normalised
return is 0 for a uniformly random policy and 100 for the scripted expert at zero noise.

Writes ``<output-dir>/results.md``, ``results.json``, ``plots/normalized_return.png`` and
per seed ``seed<k>/{common, specialists/<task>, merged/<method>}`` (each a
``from_pretrained`` directory) with ``eval.json`` beside. Every stage skips outputs that
are already complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.collection import CollectionJob, dataset_id_for, run_collection  # noqa: E402
from envs.datasets import dataset_path  # noqa: E402
from policies import from_pretrained  # noqa: E402
from policies.dt.merging import merge_into_moe, merge_specialists  # noqa: E402
from policies.dt.recipe import (  # noqa: E402
    build_model,
    evaluate_model,
    fisher_for,
    load_task_data,
    parse_datasets,
    references_for,
    train_common,
    train_specialist,
)
from policies.dt.training import DTTrainConfig, train_dt  # noqa: E402

DEFAULT_TASKS = ("ReachRed", "PickRed", "PushRedToYellowPad", "PlaceBlueOnYellowPad")
MERGES = ("average", "fisher", "task_arithmetic", "ties", "moe")
LABELS = {
    "specialist": "Specialists (each on its own task)",
    "common": "Common initialisation",
    "average": "Uniform average",
    "fisher": "Fisher merge",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "moe": "Merge into AdaMoE",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="outputs/dt_merge")
    p.add_argument("--root", default=None, help="dataset root (default: <output-dir>/datasets)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="tabletop tasks to collect and merge")
    p.add_argument("--dataset", action="append", default=[], help="TASK=MINARI_ID_OR_PATH instead of collecting")
    p.add_argument("--episodes-per-task", type=int, default=50, help="per noise level")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--common-steps", type=int, default=200)
    p.add_argument("--specialist-steps", type=int, default=400)
    p.add_argument("--router-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="windows per task per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--router-lr", type=float, default=1e-2)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--fisher-samples", type=int, default=256)
    p.add_argument("--fisher-normalization", default="none", choices=["none", "trace", "l2"])
    p.add_argument(
        "--ta-scale", type=float, default=0.5, help="task arithmetic scale (1/n tasks would equal the average)"
    )
    p.add_argument("--ties-scale", type=float, default=1.0)
    p.add_argument("--ties-density", type=float, default=0.2)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--target-quantile", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="2 tasks, tiny budgets")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks = args.tasks if args.tasks != list(DEFAULT_TASKS) else ["ReachRed", "PickRed"]
        args.episodes_per_task, args.noise, args.seeds = 6, [0.0, 0.5], args.seeds[:1]
        args.common_steps, args.specialist_steps, args.router_steps = 30, 20, 10
        args.batch_size, args.fisher_samples, args.eval_episodes, args.warmup_steps = 8, 16, 3, 5
    return args


def prepare_data(args: argparse.Namespace) -> dict[str, str]:
    """``{task: dataset id or path}``; tabletop datasets are collected when missing."""
    if args.dataset:
        return parse_datasets(args.dataset)
    env_ids = [f"adamoe/Tabletop-{t}-v0" for t in args.tasks]
    ids = {env_id: dataset_id_for(env_id, "dt-state") for env_id in env_ids}
    missing = [e for e, d in ids.items() if not dataset_path(d, args.root).exists()]
    if missing:
        print(f"collecting state-only datasets for {len(missing)} task(s) ...", flush=True)
        run_collection(
            CollectionJob(
                env_ids=missing,
                episodes_per_task=args.episodes_per_task,
                noise_levels=tuple(args.noise),
                pixels=False,
                dataset_name="dt-state",
                root=args.root,
                workers=2,
            )
        )
    return {d.split("/")[1]: d for d in ids.values()}


def train_config(args: argparse.Namespace, steps: int, seed: int, **kw: Any) -> DTTrainConfig:
    return DTTrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=kw.pop("lr", args.lr),
        warmup_steps=min(args.warmup_steps, steps),
        seed=seed,
        device=args.device,
        log_every=max(1, steps // 20),
        **kw,
    )


def stage(directory: Path, build, label: str):
    """Load ``directory`` if complete, else build and save it."""
    if (directory / "model.safetensors").is_file():
        return from_pretrained(directory)
    t0 = time.perf_counter()
    model = build()
    model.save_pretrained(directory)
    print(f"  {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    return model


def run_seed(args: argparse.Namespace, seed: int, data: dict, out: Path) -> dict[str, Any]:
    torch.manual_seed(seed)
    tasks = list(data)
    seed_dir = out / f"seed{seed}"
    common = stage(
        seed_dir / "common",
        lambda: train_common(
            build_model(data, args.target_quantile),
            data,
            train_config(args, args.common_steps, seed),
            seed_dir / "logs" / "common",
        ),
        "common initialisation",
    )
    specialists = {
        t: stage(
            seed_dir / "specialists" / t,
            lambda t=t: train_specialist(
                common, t, data, train_config(args, args.specialist_steps, seed), seed_dir / "logs" / t
            ),
            f"specialist {t}",
        )
        for t in tasks
    }
    fishers = {
        t: fisher_for(seed_dir / "specialists" / t, specialists[t], t, data[t], args.fisher_samples, seed=seed)
        for t in tasks
    }
    norm = None if args.fisher_normalization == "none" else args.fisher_normalization

    def moe() -> Any:
        model = merge_into_moe(specialists, generator=torch.Generator().manual_seed(seed))
        train_dt(
            model,
            data,
            train_config(args, args.router_steps, seed, lr=args.router_lr, trainable="router"),
            seed_dir / "logs" / "moe-router",
        )
        return model

    builders = {
        "average": lambda: merge_specialists(specialists, "average"),
        "fisher": lambda: merge_specialists(specialists, "fisher", fishers=fishers, normalization=norm),
        "task_arithmetic": lambda: merge_specialists(specialists, "task_arithmetic", base=common, scale=args.ta_scale),
        "ties": lambda: merge_specialists(
            specialists, "ties", base=common, scale=args.ties_scale, density=args.ties_density
        ),
        "moe": moe,
    }
    merged = {m: stage(seed_dir / "merged" / m, builders[m], f"merge {m}") for m in MERGES}

    references = references_for(common, args.eval_episodes, out / "references.json")
    results: dict[str, Any] = {}
    evaluations = [("common", common, tasks)] + [(f"specialist:{t}", specialists[t], [t]) for t in tasks]
    evaluations += [(m, merged[m], tasks) for m in MERGES]
    for name, model, on in evaluations:
        path = seed_dir / "eval" / f"{name.replace(':', '-')}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
            continue
        t0 = time.perf_counter()
        results[name] = evaluate_model(model, on, references, args.eval_episodes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(results[name], indent=1))
        os.replace(tmp, path)
        print(f"  eval {name}: {time.perf_counter() - t0:.1f} s", flush=True)
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


def report(args: argparse.Namespace, per_seed: dict[int, dict], tasks: list[str], out: Path, refs: dict) -> dict:
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
        f"evaluation scenes) and success rate, {args.eval_episodes} episodes per task, mean ± std over seeds "
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
        "args": vars(args),
    }
    for name, text in (("results.md", md), ("results.json", json.dumps(result, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(rows, tasks, mean_nr, out / "plots" / "normalized_return.png")
    print(md)
    return result


def plot(rows: dict, tasks: list[str], mean_nr: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    args.root = args.root or str(out / "datasets")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    t0 = time.perf_counter()
    datasets = prepare_data(args)
    data = load_task_data(datasets, args.root)
    for d in data.values():
        s = d.summary()
        print(
            f"{s['dataset']}: {s['episodes']} episodes, {s['steps']} steps, return "
            f"{s['return_min']:.1f} .. {s['return_max']:.1f}",
            flush=True,
        )
    per_seed = {}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        per_seed[seed] = run_seed(args, seed, data, out)
    refs = json.loads((out / "references.json").read_text())
    result = report(args, per_seed, list(data), out, refs)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min -> {out / 'results.md'}")
    return result


if __name__ == "__main__":
    main()
