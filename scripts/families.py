#!/usr/bin/env python
"""The MoE families of the literature side by side on the same policy (``make families``).

    python scripts/families.py                      # every family, 200 fine-tuning steps each
    python scripts/families.py --variants dense adamoe soft --finetune-steps 100
    python scripts/families.py --update-readme      # and put the table into README.md

The same pretrained dense VLA (the shipped ``checkpoints/vla-tabletop-base``, or
``--pretrained DIR``; demonstrations from ``outputs/demo/datasets`` when present) is
upcycled into each family and fine-tuned for the same steps on the same batches: dense,
vanilla top-k, AdaMoE, Switch (top-1, capacity 1.25, token dropping), gating dropout,
DynMoE top-any, THOR (random routing + consistency loss), SMEAR, Soft MoE, SCMoE (top-2
trained, self-contrast decoding), AdaMoE with low-rank experts (rank 32, self-guided
over the first 100 steps), and BAM (top-1 FFN experts plus soft attention
experts, with their own keys and values or sharing them). Writes the main job's table
(success per task, parameters, active parameters, ``predict_action_chunk`` latency) to
``outputs/families/results.md``; ``--update-readme`` also writes it, with the command
that produced it, between the README's ``families:start`` and ``families:end`` markers.
Any option of ``scripts/demo.py`` may be added.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo  # noqa: E402

DEMO = Path("outputs/demo")
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- families:start -->", "<!-- families:end -->"


def with_defaults(argv: list[str]) -> list[str]:
    """The user's options over the families defaults (every family, outputs/families, the
    demo's datasets when they exist; the demo's own default base)."""
    defaults = ["--output-dir", "outputs/families", "--variants", *demo.KINDS]
    if "--datasets-root" not in argv and (DEMO / "datasets").is_dir():
        defaults += ["--datasets-root", str(DEMO / "datasets")]
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


def update_readme(output_dir: Path, command: str, readme: Path) -> None:
    """Replace the README's block between the markers with this run's table and command."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme} needs one {START!r} line followed by one {END!r} line")
    results = json.loads((output_dir / "results.json").read_text())
    m, cfg = results["machine"], results["config"]
    minutes = lambda pattern: sum(json.loads(p.read_text())["wall_s"] for p in output_dir.glob(pattern)) / 60
    head = (
        f"`{command}` (seed {cfg['seed']}, {cfg['eval_episodes']} episodes per task and phrasing split; "
        f"{m['cores']} cores, {m['cpu']}, torch {m['torch']}: training {minutes('runs/*/summary.json'):.0f} min "
        f"in all, evaluation {minutes('eval/**/eval_info.json'):.0f} min; stages already done are reused):"
    )
    block = f"{START}\n{head}\n\n{(output_dir / 'results.md').read_text().strip()}\n{END}"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(before + block + after)
    tmp.replace(readme)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    readme = "--update-readme" in argv
    argv = [a for a in argv if a != "--update-readme"]
    args = with_defaults(argv)
    code = demo.main(args)
    if readme and code == 0:
        output_dir = Path(demo.parse_args(args).output_dir)
        update_readme(output_dir, shlex.join(["python", "scripts/families.py", *argv]), README)
        print(f"wrote the table into {README}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
