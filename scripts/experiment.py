"""The main job's comparison over several seeds, with a statistical verdict (``make experiment``).

    python scripts/experiment.py                       # seeds 0 1 2, 50 episodes per task and split
    python scripts/experiment.py --pretrain-per-seed   # also re-pretrain the dense base per seed
    python scripts/experiment.py --quick               # the plumbing, tiny preset
    python scripts/experiment.py --variants dense vanilla adamoe adamoe-preserve   # more variants

Each seed is one run of the main job's pipeline (``policies.vla.pipeline``) under
``<output-dir>/seed<s>/``: from the shipped base, the variants dense, vanilla (top-k MoE,
paper init) and adamoe (paper init) are fine-tuned on the new suite
(``tabletop-long``) for the same steps on the same batches, and evaluated on its training
and held-out phrasings and on the base suite (retention). The seeds share one collection
(under ``<output-dir>/datasets/``) and one pretrained base, and each evaluates on its own
scenes (seed s: 100 scene seeds per task from ``100000 + 100 s``), so the spread measures
fine-tuning and evaluation noise around one starting point; ``--pretrain-per-seed`` runs
the pretraining recipe once per seed and the spread includes pretraining.

Every variant is evaluated on the same scenes as dense in each seed, so its difference
from dense is paired. Writes ``results.md`` and ``results.json``: each variant's success
pooled over seeds with a 95% bootstrap interval over seeds and episodes, and each MoE
variant's paired difference from dense with its interval, marked significant when the
interval excludes 0; and ``plots/success_over_seeds.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.registration import resolve_env_ids  # noqa: E402
from policies.io import log, write_json, write_text  # noqa: E402
from policies.vla import pipeline  # noqa: E402
from policies.vla.families import KINDS  # noqa: E402
from policies.vla.report import aggregate_seeds, machine, plot_seeds, seeds_markdown  # noqa: E402

# Three seeds of these take about 1 h 45 min on 2 cores; each further MoE variant adds ~10 min a seed.
VARIANTS = ["dense", "vanilla", "adamoe"]
EVAL_EPISODES = 50  # per task and phrasing split, per seed
RETENTION_EPISODES = 10  # per base-suite task, per seed (120 a seed, 360 over three; short tasks, ~30 s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=None, help="default outputs/experiment (outputs/experiment_quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=VARIANTS, help="variant names, or 'all' for every MoE family")
    p.add_argument("--quick", action="store_true", help="tiny preset, a few steps and episodes")
    p.add_argument("--pretrain-per-seed", action="store_true", help="pretrain the dense policy once per seed")
    p.add_argument("--suite", nargs="+", default=None, help="the fine-tuning suite or env ids (default tabletop-long)")
    p.add_argument("--eval-episodes", type=int, default=None, help=f"per task and split (default {EVAL_EPISODES})")
    p.add_argument(
        "--retention-episodes", type=int, default=None, help=f"per base-suite task (default {RETENTION_EPISODES})"
    )
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    return p.parse_args(argv)


SCENES_PER_SEED = 100  # each seed evaluates on its own block of scenes (at most this many per task)


def seed_config(base: Any, out: Path, seed: int, first: int, shared: bool) -> Any:
    """Seed ``seed``'s run: its own fine-tuning batches and noise, and its own evaluation
    scenes (every variant of the seed on the same ones, so the comparison stays paired)."""
    cfg = replace(base, output_dir=str(out / f"seed{seed}"), seed=seed, datasets_root=str(out / "datasets"))
    cfg.eval_seed = base.eval_seed + SCENES_PER_SEED * seed
    if shared and seed != first:
        if base.pretrain:  # seed <first> pretrains; the others start from its base
            cfg.pretrain, cfg.pretrained = False, str(replace(base, output_dir=str(out / f"seed{first}")).base)
        cfg.zero_shot = False  # the same policy as seed <first>'s; its retention here is this seed's reference
    return cfg


def seed_episodes(cfg: Any) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """One seed's per-episode records: ``[variant][split]``."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, _ in pipeline.evaluated(cfg):
        for split in pipeline.EVALS:
            result = pipeline.load_eval(cfg, name, split)
            if result is not None:
                out.setdefault(name, {})[split] = result["per_episode"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = replace(pipeline.PipelineConfig(), **pipeline.QUICK) if args.quick else pipeline.PipelineConfig()
    out = Path(args.output_dir or ("outputs/experiment_quick" if args.quick else "outputs/experiment"))
    given = {
        "suite": args.suite,
        "eval_episodes": args.eval_episodes
        if args.eval_episodes is not None
        else (None if args.quick else EVAL_EPISODES),
        "retention_episodes": args.retention_episodes
        if args.retention_episodes is not None
        else (None if args.quick else RETENTION_EPISODES),
        "finetune_steps": args.finetune_steps,
        "pretrain_steps": args.pretrain_steps,
    }
    variants = list(KINDS) if args.variants == ["all"] else list(args.variants)
    # The fine-tuning curve is the demo's; over seeds only the final policies are evaluated.
    base = replace(base, variants=variants, curve_points=1, **{k: v for k, v in given.items() if v is not None})
    if args.pretrain_per_seed:
        base.pretrain = True
    for name in ("eval_episodes", "retention_episodes"):
        if getattr(base, name) > SCENES_PER_SEED:
            raise ValueError(f"--{name.replace('_', '-')} must be at most {SCENES_PER_SEED} (a seed's block of scenes)")
    if any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds must be >= 0, got {args.seeds}")
    base.validate()  # bad settings fail here, before anything is collected or trained
    began = time.perf_counter()
    runs, episodes = {}, {}
    data = reference = None  # the seeds share one collection: read it once
    for seed in args.seeds:
        cfg = seed_config(base, out, seed, args.seeds[0], shared=not args.pretrain_per_seed)
        log(f"experiment: seed {seed} -> {cfg.output_dir}")
        if data is None or args.pretrain_per_seed:  # the cached encoder outputs are the base's
            env_ids = list(resolve_env_ids(cfg.suite))
            pipeline.pretrain(cfg)
            pipeline.collect_all(cfg, env_ids)
            data, reference = pipeline.load_data(cfg, env_ids), pipeline.load_reference(cfg)
        runs[seed] = pipeline.run(cfg, data, reference)
        episodes[seed] = seed_episodes(cfg)
    rows = aggregate_seeds(episodes, base.variants)
    facts = {r["variant"]: r for r in runs[args.seeds[0]]["variants"]}
    results = {
        "seeds": args.seeds,
        "shared_pretraining": not args.pretrain_per_seed,
        "config": asdict(base),
        "variants": rows,
        "per_seed": {seed: run["variants"] for seed, run in runs.items()},
        "machine": machine(),
        "wall_s": time.perf_counter() - began,
    }
    write_json(out / "results.json", results)
    table = seeds_markdown(rows, args.seeds, facts)
    write_text(out / "results.md", table + "\n")
    plot_seeds(rows, out / "plots" / "success_over_seeds.png")
    print()
    print(table)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'plots' / 'success_over_seeds.png'}")
    print(f"took {results['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
