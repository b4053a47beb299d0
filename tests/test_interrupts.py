"""Ctrl-C in a long command: one line, exit status 130, and a state the same command resumes
from (``policies.cli`` for the message, ``policies.training`` for the step it saves)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envs.collection import CollectionJob, run_collection
from tests.conftest import ROOT, ctrl_c_enabled_in_child, run_script

TASK = "adamoe/Tabletop-ReachRed-v0"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    run_collection(CollectionJob(env_ids=[TASK], episodes_per_task=2, root=str(root), workers=1), progress=False)
    return root


def interrupt_once(args: list, ready: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Start ``scripts/<args[0]>``, send it SIGINT once ``ready`` exists, and wait for it."""
    command = [sys.executable, str(ROOT / "scripts" / args[0]), *map(str, args[1:])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Its own process group, which Ctrl-C in a terminal signals as a whole (workers included).
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, preexec_fn=ctrl_c_enabled_in_child, **pipes)
    deadline = time.monotonic() + timeout
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"{args[0]} ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_ctrl_c_mid_training_saves_the_finished_step_and_the_same_command_resumes_from_it(datasets, tmp_path):
    out = tmp_path / "run"
    args = ["train_vla.py", "--suite", TASK, "--root", datasets, "--preset", "tiny", "--set", "vision=conv"]
    args += ["--batch-size", "4", "--steps", "100000", "--output-dir", out]
    said = one_interrupt_line(interrupt_once(args, out / "metrics.jsonl"))
    step = int(said.split("after step ")[1].split(",")[0])
    state = json.loads((out / "checkpoints" / "last" / "training_state" / "state.json").read_text())
    assert state["step"] == step >= 10  # the step it finished, not the last periodic save (every 500)

    again = run_script(*args, "--max-minutes", "0.05")  # the same run, told to stop soon after resuming
    assert f"at step {step} of 100000" in again.stderr + again.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] > step  # one curve, no repeated steps


def one_interrupt_line(proc: subprocess.CompletedProcess, resumes: bool = True) -> str:
    """The one ``interrupted:`` line of a run stopped by Ctrl-C (exit status 130, no traceback)."""
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    said = [line.split("interrupted:", 1)[1] for line in proc.stderr.splitlines() if "interrupted:" in line]
    assert len(said) == 1, proc.stderr[-2000:]
    assert resumes == ("run the same command again to resume" in said[0]), said[0]
    return said[0]


def test_ctrl_c_mid_collection_keeps_the_finished_datasets_and_the_same_command_collects_the_rest(tmp_path):
    from envs.collection import dataset_id_for
    from envs.datasets import dataset_path, load_dataset

    # A short task first, whose dataset is the signal to interrupt; long ones after it.
    tasks = [TASK, "adamoe/Tabletop-StackRedOnGreen-v0", "adamoe/Tabletop-StackBlueOnRed-v0"]
    paths = [dataset_path(dataset_id_for(t), tmp_path) for t in tasks]
    args = ["collect.py", "--suite", *tasks, "--episodes-per-task", "30", "--root", tmp_path, "--workers", "2"]
    one_interrupt_line(interrupt_once(args, paths[0]))
    kept = {p: p.stat().st_mtime_ns for p in paths if p.exists()}
    assert 1 <= len(kept) < len(tasks)  # the first finished, the last had not
    again = run_script(*args)
    assert f"{len(kept)} of {len(tasks)} datasets already collected with these settings, kept" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not written again
    for task in tasks:
        assert load_dataset(dataset_id_for(task), root=tmp_path).total_episodes == 30
    proc = run_script(*args[:-4], "--episodes-per-task", "31", "--root", tmp_path, check=False)
    assert proc.returncode == 2 and "episodes_per_task 30 there, 31 asked" in proc.stderr


def test_ctrl_c_mid_dt_training_says_the_command_starts_over_and_a_rerun_needs_no_cleanup(tmp_path):
    from envs.collection import dataset_id_for
    from envs.datasets import dataset_path

    job = CollectionJob(env_ids=[TASK], episodes_per_task=2, pixels=False, root=str(tmp_path), workers=1)
    run_collection(job, progress=False)
    data = f"reach-red={dataset_path(dataset_id_for(TASK), tmp_path)}"
    out = tmp_path / "dt"
    small = ["--batch-size", "4", "--hidden-size", "16", "--n-layer", "1", "--context-length", "4"]
    said = one_interrupt_line(
        interrupt_once(
            ["train_dt.py", "--dataset", data, "--output-dir", out, *small, "--steps", "100000"],
            tmp_path / "dt-logs" / "metrics.jsonl",
        ),
        resumes=False,
    )
    assert "DT training interrupted at step" in said and "starts it over" in said
    assert not out.exists()  # nothing half-saved
    run_script("train_dt.py", "--dataset", data, "--output-dir", out, *small, "--steps", "3", "--log-every", "1")
    steps = [json.loads(line)["step"] for line in (tmp_path / "dt-logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # this run's curve only, not appended to the interrupted one
    proc = run_script("train_dt.py", "--dataset", data, "--output-dir", out, *small, check=False)
    assert proc.returncode == 2 and "already holds a checkpoint; pass overwrite=True (--overwrite)" in proc.stderr
    assert "DT training" not in proc.stderr + proc.stdout and "train DT" not in proc.stderr  # refused before training
