"""The demo's comparison over several seeds, with both upcycling initialisations.

    python scripts/experiment.py                       # seeds 0 1 2 (make experiment)
    python scripts/experiment.py --pretrain-per-seed   # also re-pretrain the dense policy per seed
    python scripts/experiment.py --quick               # the plumbing, tiny preset

Each seed is one run of ``scripts/demo.py``'s pipeline under ``<output-dir>/seed<s>/``
with the variants dense, vanilla (top-k MoE, paper init), adamoe (paper init) and
adamoe-preserve, fine-tuned for the same steps on the same demonstrations (collected once,
under ``<output-dir>/datasets/``). By default the seeds share one pretrained dense policy
(the shipped base), so the spread measures fine-tuning and evaluation noise around one
starting point; ``--pretrain-per-seed`` runs the pretraining recipe once per seed and the
spread includes pretraining. Writes ``results.md`` and ``results.json`` (mean and standard deviation over
seeds of every variant's success, per split) and ``plots/success_over_seeds.png``.

The Meta-World MT10 version (longer: Meta-World renders ~20x slower than the tabletop):

    python scripts/experiment.py --suite mt10 --output-dir outputs/experiment_mt10
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _pipeline():
    spec = importlib.util.spec_from_file_location("adamoe_demo_pipeline", HERE / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pipeline = _pipeline()
VARIANTS = ["dense", "vanilla", "adamoe", "adamoe-preserve"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=None, help="default outputs/experiment (outputs/experiment_quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=VARIANTS, help="variant names, or 'all' for every MoE family")
    p.add_argument("--quick", action="store_true", help="tiny preset, a few steps and episodes")
    p.add_argument("--pretrain-per-seed", action="store_true", help="pretrain the dense policy once per seed")
    p.add_argument("--suite", nargs="+", default=None, help="suite names or env ids (tabletop, mt10, ...)")
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per task and phrasing split")
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    return p.parse_args(argv)


def seed_config(base: Any, out: Path, seed: int, first: int, shared: bool) -> Any:
    cfg = replace(base, output_dir=str(out / f"seed{seed}"), seed=seed, datasets_root=str(out / "datasets"))
    if shared and seed != first:
        if base.pretrain:  # seed <first> pretrains; the others start from its base
            cfg.pretrain, cfg.pretrained = False, str(replace(base, output_dir=str(out / f"seed{first}")).base)
        cfg.eval_pretrained = False  # the same policy as seed <first>'s
    return cfg


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "values": values,
    }


PAIRED = ("success_train", "success_heldout", "demo_flow_loss")


def aggregate(runs: dict[int, dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
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


def to_markdown(rows: list[dict[str, Any]], seeds: list[int]) -> str:
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


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pipeline._plt()
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    pal = pipeline.palette([r["variant"] for r in rows])
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = replace(pipeline.PipelineConfig(), **pipeline.QUICK) if args.quick else pipeline.PipelineConfig()
    out = Path(args.output_dir or ("outputs/experiment_quick" if args.quick else "outputs/experiment"))
    given = {
        "suite": args.suite,
        "eval_episodes": args.eval_episodes,
        "finetune_steps": args.finetune_steps,
        "pretrain_steps": args.pretrain_steps,
    }
    variants = list(pipeline.KINDS) if args.variants == ["all"] else list(args.variants)
    base = replace(base, variants=variants, **{k: v for k, v in given.items() if v is not None})
    if args.pretrain_per_seed:
        base.pretrain = True
    began = time.perf_counter()
    runs = {}
    try:
        data = None  # the seeds share one collection: read it once
        for seed in args.seeds:
            cfg = seed_config(base, out, seed, args.seeds[0], shared=not args.pretrain_per_seed)
            pipeline.log(f"experiment: seed {seed} -> {cfg.output_dir}")
            if data is None or args.pretrain_per_seed:  # the cached encoder outputs are the base's
                env_ids = list(pipeline.resolve_env_ids(cfg.suite))
                pipeline.pretrain(cfg)
                pipeline.collect(cfg, env_ids)
                data = pipeline.load_data(cfg, env_ids)
            runs[seed] = pipeline.run(cfg, data)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    rows = aggregate(runs, base.variants)
    results = {
        "seeds": args.seeds,
        "shared_pretraining": not args.pretrain_per_seed,
        "config": asdict(base),
        "variants": rows,
        "machine": pipeline.machine(),
        "wall_s": time.perf_counter() - began,
    }
    pipeline.write_json(out / "results.json", results)
    table = to_markdown(rows, args.seeds)
    (out / "results.md").write_text(table + "\n")
    plot(rows, out / "plots" / "success_over_seeds.png")
    print()
    print(table)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'plots' / 'success_over_seeds.png'}")
    print(f"took {results['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
