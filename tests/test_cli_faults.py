"""Every command-line tool answers bad input with one ``error:`` line and exit status 2,
never a traceback (``--debug`` shows one), and refuses before doing any work."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import run_script

CUDA = torch.cuda.is_available()

PROBES = {
    "merge.py": [
        ["--checkpoints", "no/such/dir", "--method", "fisher", "--output", "out"],
        ["--checkpoints", "a", "b", "--tasks", "one", "--method", "average", "--output", "out"],
        ["--checkpoints", "a", "--method", "blend", "--output", "out"],
        [
            "--checkpoints",
            "checkpoints/vla-tabletop-base",
            "checkpoints/vla-tabletop-base",
            "--method",
            "average",
            "--output",
            "out",
        ],
    ],
    "train_vla.py": [
        ["--preset", "huge"],
        ["--set", "depth=deep"],
        ["--steps", "many"],
        ["--set", "expert_widht=64"],
        ["--suite", "no-such-suite"],
    ],
    "control.py": [
        ["--checkpoint", "no/such/dir"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--rate", "0"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--mode", "turbo"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--noise-scale", "-1"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--inference-steps", "0"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--moe-backend", "fastest"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--inference", "gpu"],
    ],
    "collect.py": [
        ["--suite", "no-such-suite", "--episodes-per-task", "1"],
        ["--episodes-per-task", "0"],
        ["--noise", "-1"],
        ["--image-size", "0", "--root", "out"],
    ],
    "train_dt.py": [
        ["--dataset", "foo", "--output-dir", "out"],
        ["--dataset", "pick-red=no/such/dataset-v0", "--output-dir", "out"],
        ["--dataset", "pick-red=x", "--dataset", "pick-red=y", "--output-dir", "out"],
    ],
    "demo.py": [
        ["--preset", "huge"],
        ["--variants", "dense-paper"],
        ["--pretrained", "no/such/dir"],
    ],
    "evaluate_vla.py": [
        ["--checkpoint", "no/such/dir"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--episodes", "1", "--suite", "no-such-suite"],
        ["--checkpoint", "checkpoints/vla-tabletop-base", "--splits", "test"],
    ],
    "experiment.py": [
        ["--variants", "bogus", "--output-dir", "out"],
        ["--seeds", "-1", "--output-dir", "out"],
        ["--eval-episodes", "0", "--output-dir", "out"],
    ],
    "dt_merge.py": [
        ["--seeds", "-1", "--output-dir", "out"],
        ["--fisher-samples", "0", "--output-dir", "out"],
        ["--tasks", "FlyToTheMoon", "--output-dir", "out"],
    ],
    "pretrain.py": [
        ["--steps", "0", "--output-dir", "out"],
        ["--suite", "no-such-suite", "--output-dir", "out"],
        ["--set", "expert_widht=64", "--output-dir", "out"],
    ],
    "families.py": [
        ["--variants", "bogus", "--output-dir", "out"],
        ["--eval-episodes", "0", "--output-dir", "out"],
        ["--suite", "no-such-suite", "--output-dir", "out"],
    ],
    "bam.py": [
        ["--groups", "one=ReachRed", "--output-dir", "out"],
        ["--groups", "a=ReachPurple", "b=PickRed", "--output-dir", "out"],
        ["--groups", "a", "b=PickRed", "--output-dir", "out"],
    ],
    "experts.py": [
        ["--episodes", "0", "--output-dir", "out"],
        ["--suite", "no-such-suite", "--output-dir", "out"],
        ["--first-seed", "-1", "--output-dir", "out"],
    ],
    "bench.py": [
        ["--only", "nothing"],
        ["--repeats", "0"],
        ["--repeats", "many"],
    ],
}
for section in ("control", "envs", "fisher", "moe", "perception", "vla"):  # each refuses before measuring
    PROBES[f"bench_{section}.py"] = [["--repeats", "0"], ["--repeats", "many"], ["--json", "."]]
if not CUDA:
    PROBES["train_vla.py"].append(["--device", "cuda"])
    PROBES["evaluate_vla.py"].append(["--checkpoint", "checkpoints/vla-tabletop-base", "--device", "cuda"])

CASES = [(script, args) for script, probes in PROBES.items() for args in probes]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run as a user runs it, two processes at a time (each is mostly start-up)."""
    root = tmp_path_factory.mktemp("cli")

    def run(index: int):
        script, args = CASES[index]
        args = [str(root / str(index)) if a == "out" else a for a in args]  # nothing lands in the repository
        return run_script(script, *args, check=False)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return list(pool.map(run, range(len(CASES))))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{s}:{' '.join(a)}" for s, a in CASES])
def test_bad_input_is_one_error_line_and_exit_status_2(index, outcomes):
    proc = outcomes[index]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_cuda_on_a_cpu_only_build_says_so():
    if CUDA:
        pytest.skip("this machine has CUDA")
    proc = run_script("train_vla.py", "--device", "cuda", check=False)
    assert proc.returncode == 2 and "CUDA is not available here" in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    args = ["--checkpoints", "no/such/dir", "--method", "fisher", "--output", tmp_path / "o", "--debug"]
    proc = run_script("merge.py", *args, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_missing_dt_dataset_names_the_task_equals_id_form(tmp_path):
    proc = run_script("train_dt.py", "--dataset", "foo", "--output-dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "TASK=MINARI_ID_OR_PATH" in proc.stderr


def test_bad_env_options_are_refused_before_collection_starts(tmp_path):
    proc = run_script("collect.py", "--image-size", "0", "--root", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "whole pixels in [1, 1024], got 0" in proc.stderr
    assert "collect:" not in proc.stderr  # no progress bar: nothing was started


def test_merging_policies_that_are_not_decision_transformers_says_so():
    base = "checkpoints/vla-tabletop-base"
    proc = run_script("merge.py", "--checkpoints", base, base, "--method", "average", "--output", "unused", check=False)
    assert proc.returncode == 2 and "holds a 'vla' policy, not a Decision Transformer" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--repeats", "many"], "invalid int value: 'many'"),
        (["--json", "FOLDER"], "is a folder; give the path of the file to write"),
    ],
)
def test_a_benchmark_section_refuses_bad_flags_before_measuring(argv, message, tmp_path, capsys):
    from policies.benchmark import section_main

    ran = []
    argv = [str(tmp_path) if a == "FOLDER" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        section_main(lambda **kw: ran.append(kw) or [], "a section", argv)
    assert exit_.value.code == 2 and not ran
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0]
