#!/usr/bin/env python
"""The MoE families of the literature side by side on the same policy (``make families``).

    python scripts/families.py                      # every family, 200 fine-tuning steps each
    python scripts/families.py --variants dense adamoe soft --finetune-steps 100
    python scripts/families.py --update-docs        # and put the table into docs/families.md (--doc)

The same pretrained dense VLA (the shipped ``checkpoints/vla-tabletop-base``, or
``--pretrained DIR``; demonstrations of the base suite under ``outputs/families/datasets``) is
upcycled into each family and fine-tuned for the same steps on the same batches: dense,
vanilla top-k, AdaMoE, Switch (top-1, capacity 1.25, token dropping), gating dropout,
DynMoE top-any, THOR (random routing + consistency loss), SMEAR, Soft MoE, SCMoE (top-2
trained, self-contrast decoding), AdaMoE with low-rank experts (rank 32, self-guided
over the first 100 steps), and BAM (top-1 FFN experts plus soft attention
experts, with their own keys and values or sharing them). Writes the main job's table
(success per task, parameters, active parameters, ``predict_action_chunk`` latency) to
``outputs/families/results.md``; ``--update-docs`` also writes it, with the command that
produced it, between the ``families:start`` and ``families:end`` markers of
``docs/families.md``.
Any option of ``scripts/demo.py`` may be added.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.io import read_json, replace_between_markers  # noqa: E402
from policies.vla import pipeline  # noqa: E402
from policies.vla.families import KINDS  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"
START, END = "<!-- families:start -->", "<!-- families:end -->"


def with_defaults(argv: list[str]) -> list[str]:
    """The user's options over the families defaults (every family, outputs/families and its
    own datasets, on the base suite; the demo's own default base)."""
    # The families study runs on the base suite (its published table), without the main
    # job's retention check and fine-tuning curve.
    defaults = ["--output-dir", "outputs/families", "--variants", *KINDS, "--suite", "tabletop"]
    defaults += ["--retention-episodes", "0", "--curve-points", "1"]
    if "--quick" not in argv:
        defaults += ["--finetune-steps", "200"]
    given = {a for a in argv if a.startswith("--")}
    merged, i = [], 0
    while i < len(defaults):
        flag = defaults[i]
        j = i + 1
        while j < len(defaults) and not defaults[j].startswith("--"):
            j += 1
        if flag not in given:
            merged += defaults[i:j]
        i = j
    return merged + argv


def update_doc(output_dir: Path, command: str, doc: Path) -> None:
    """Replace the document's block between the markers with this run's table and command."""
    results = read_json(output_dir / "results.json")
    m, cfg = results["machine"], results["config"]
    minutes = lambda pattern: sum(read_json(p)["wall_s"] for p in output_dir.glob(pattern)) / 60
    head = (
        f"`{command}` (seed {cfg['seed']}, {cfg['eval_episodes']} episodes per task and phrasing split; "
        f"{m['cores']} cores, {m['cpu']}, torch {m['torch']}: training {minutes('runs/*/summary.json'):.0f} min "
        f"in all, evaluation {minutes('eval/**/eval_info.json'):.0f} min; stages already done are reused):"
    )
    try:
        replace_between_markers(doc, START, END, f"{head}\n\n{(output_dir / 'results.md').read_text().strip()}")
    except ValueError as err:
        raise SystemExit(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pipeline.add_arguments(p)
    p.add_argument("--update-docs", action="store_true", help="write the table into --doc, between its markers")
    p.add_argument("--doc", type=Path, default=DOC, help=f"the document --update-docs writes (default {DOC})")
    args = p.parse_args(with_defaults(argv))
    cfg = pipeline.config_from_args(args)
    pipeline.run(cfg)
    if args.update_docs:
        shown = [a for i, a in enumerate(argv) if a not in ("--update-docs", "--doc") and argv[i - 1 : i] != ["--doc"]]
        update_doc(Path(cfg.output_dir), shlex.join(["python", "scripts/families.py", *shown]), args.doc)
        print(f"wrote the table into {args.doc}")
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
