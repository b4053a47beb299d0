#!/usr/bin/env python
"""The MoE families of the literature side by side on the same policy (``make families``).

    python scripts/families.py                      # every family, 200 fine-tuning steps each
    python scripts/families.py --variants dense adamoe soft --finetune-steps 100

The same pretrained dense VLA (``outputs/demo/checkpoints/dense_pretrained`` when
``make demo`` has produced it, else pretrained here first, on ``outputs/demo/datasets``
when present) is upcycled into each family and fine-tuned for the same steps on the same
batches: dense, vanilla top-k, AdaMoE, Switch (top-1, capacity 1.25, token dropping),
gating dropout, DynMoE top-any, THOR (random routing + consistency loss), SMEAR, Soft MoE,
SCMoE (top-2 trained, self-contrast decoding) and AdaMoE with low-rank experts (rank 32,
self-guided over the first 100 steps). Writes the main job's table (success
per task, parameters, active parameters, ``predict_action_chunk`` latency) to
``outputs/families/results.md``. Any option of ``scripts/demo.py`` may be added.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo  # noqa: E402

DEMO = Path("outputs/demo")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = ["--output-dir", "outputs/families", "--variants", *demo.KINDS]
    pretrained = DEMO / "checkpoints" / "dense_pretrained"
    if "--pretrained" not in argv and (pretrained / "model.safetensors").is_file():
        defaults += ["--pretrained", str(pretrained)]
    if "--datasets-root" not in argv and (DEMO / "datasets").is_dir():
        defaults += ["--datasets-root", str(DEMO / "datasets")]
    given = {a for a in argv if a.startswith("--")}
    merged, i = [], 0
    while i < len(defaults):  # the user's options win over these defaults
        flag = defaults[i]
        j = i + 1
        while j < len(defaults) and not defaults[j].startswith("--"):
            j += 1
        if flag not in given:
            merged += defaults[i:j]
        i = j
    return demo.main(merged + argv)


if __name__ == "__main__":
    raise SystemExit(main())
