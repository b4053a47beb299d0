"""The main job (``make demo``), as the AdaMoE paper runs it: start from the shipped
pretrained dense VLA (it solves the ``tabletop`` suite), fine-tune it on tasks it has never
seen (``tabletop-long``: long-horizon compositions of its skills and unseen pairings) as a
dense policy, a vanilla top-k MoE and AdaMoE, with the same steps and batches, and
compare them on the new tasks and on what they forgot of the old ones.

    python scripts/demo.py                    # from checkpoints/vla-tabletop-base (~30 min on 2 cores)
    python scripts/demo.py --pretrain         # pretrain the base from nothing first (the recipe, ~1 h)
    python scripts/demo.py --quick            # tiny preset pretrained in seconds: the plumbing in < 2 min
    python scripts/demo.py --init preserve    # upcycle so that step 0 computes the dense function

Stages, in one output directory (default outputs/demo/); each is skipped when its output
is complete and made with the same settings, so an interrupted run picks up where it
stopped (training resumes from its last checkpoint):

    pretrain   pretrain/                      only with --pretrain: policies/vla/recipe.py on the base suite
    collect    datasets/                      scripted-expert demos of the new suite at several noise
                                              levels; a few of the base suite (datasets/reference/)
    finetune   checkpoints/<variant>/         dense, vanilla (top-k MoE), adamoe (runs/<variant>/), with
                                              success measured along the way (the fine-tuning curve)
    evaluate   eval/<variant>/                the new suite: training phrasings (+ heldout/); the base
                                              suite: retention/
    report     results.md, results.json, plots/*.png

The MoE variants follow AdaMoE's recipe: 4 routed experts, top-1, one shared expert,
balance loss 0.01 then 0.005 after 500 steps, router and scale adapter at twice the base
learning rate, every parameter trained. The stages are ``policies.vla.pipeline``;
``make experiment`` repeats the comparison over seeds with intervals.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.vla import pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    pipeline.run(pipeline.parse_args(argv, __doc__))
    return 0


if __name__ == "__main__":
    from policies.cli import run_cli

    raise SystemExit(run_cli(main))
