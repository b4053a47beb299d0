"""The main job (``make demo``): start from the shipped pretrained dense VLA, upcycle copies
of it into AdaMoE and a vanilla top-k MoE, fine-tune those and the dense policy itself for
the same steps on the same data, evaluate all of them, and compare.

    python scripts/demo.py                    # from checkpoints/vla-tabletop-base, the whole tabletop suite
    python scripts/demo.py --pretrain         # pretrain the base from nothing first (the recipe, ~30 min)
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
learning rate, every parameter trained. The stages are ``policies.vla.pipeline``.
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
