"""The ``tabletop-long`` suite: long-horizon compositions of the base skills and unseen
pairings, in the same scene and contract as the base suite."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.collection import run_episode, task_index
from envs.tabletop import INSTRUCTION_CHARSET, INSTRUCTION_MAX_LENGTH
from envs.tasks import (
    CUBE_HALF,
    CUBES,
    LONG_TASK_LIST,
    MAX_INSTRUCTION_WORDS,
    TASK_LIST,
    TEMPLATES,
    LongTask,
    SceneState,
)

LONG_IDS = [t.env_id for t in LONG_TASK_LIST]
PLACE_THEN_STACK = envs.get_task("PlaceRedOnYellowPadThenStackGreenOnRed")


def test_the_suite_holds_long_tasks_of_two_and_three_stages_and_unseen_pairings():
    assert envs.suite("tabletop-long") == tuple(LONG_IDS) and len(LONG_IDS) >= 6
    assert all(env_id in gym.registry for env_id in LONG_IDS)
    stages = sorted(len(t.stages) for t in LONG_TASK_LIST)
    assert stages.count(1) >= 3 and 2 in stages and 3 in stages
    base = {(t.family, t.cube, t.target) for t in TASK_LIST}
    for task in LONG_TASK_LIST:
        if not isinstance(task, LongTask):
            assert (task.family, task.cube, task.target) not in base  # a pairing no base task uses
    assert not set(LONG_IDS) & set(envs.suite("tabletop"))
    assert envs.get_task(PLACE_THEN_STACK.slug) is PLACE_THEN_STACK


def test_every_instruction_fits_the_words_a_vla_reads_and_the_env_text_space():
    for task in LONG_TASK_LIST:
        train, heldout = task.instructions("train"), task.instructions("heldout")
        assert train and heldout and not set(train) & set(heldout)
        for text in train + heldout:
            assert len(text.split()) <= MAX_INSTRUCTION_WORDS, text
            assert len(text) <= INSTRUCTION_MAX_LENGTH and set(text) <= set(INSTRUCTION_CHARSET), text
    assert "put red on yellow then stack green on red" in PLACE_THEN_STACK.instructions("train")
    assert PLACE_THEN_STACK.instructions("heldout") == ("carry red over to yellow afterwards rest green upon red",)
    with pytest.raises(ValueError, match="at least 2 stages"):
        LongTask("Lonely", (TASK_LIST[0],))
    with pytest.raises(ValueError, match="'reach' is not a stage family"):
        LongTask("ReachThenPick", (TASK_LIST[0], TASK_LIST[2]))
    assert set(TEMPLATES) >= {t.family for t in LONG_TASK_LIST if not isinstance(t, LongTask)}


def scene(red, green, blue, grip=(0.0, 0.0, 0.2), gap=0.08, yellow=(0.1, 0.1), purple=(-0.1, 0.1)):
    """A scene state: cubes at (x, y) resting on the table, or at (x, y, z)."""
    positions = (red, green, blue)
    cubes = {c: np.array(p if len(p) == 3 else (*p, CUBE_HALF), float) for c, p in zip(CUBES, positions, strict=True)}
    return SceneState(np.array(grip, float), gap, cubes, {"yellow": np.array(yellow), "purple": np.array(purple)})


def test_success_needs_every_stage_to_hold_and_progress_counts_the_stages_in_order():
    task = PLACE_THEN_STACK
    start = scene(red=(0.0, -0.1), green=(0.05, -0.1), blue=(-0.05, -0.1))
    placed = scene(red=(0.1, 0.1), green=(0.05, -0.1), blue=(-0.05, -0.1))  # red on the yellow pad, let go
    done = scene(red=(0.1, 0.1), green=(0.1, 0.1, 3 * CUBE_HALF), blue=(-0.05, -0.1))  # green stacked on it
    stacked_off_pad = scene(red=(0.0, -0.1), green=(0.0, -0.1, 3 * CUBE_HALF), blue=(-0.05, -0.1))
    assert [task.stages_done(s) for s in (start, placed, done, stacked_off_pad)] == [0, 1, 2, 0]
    assert [task.success(s) for s in (start, placed, done, stacked_off_pad)] == [False, False, True, False]
    assert 0.0 <= task.progress(start) < 0.5 <= task.progress(placed) < 1.0 == task.progress(done)
    assert task.progress(stacked_off_pad) < 0.5  # the later stage without the earlier one counts for nothing


def test_the_env_reports_the_stages_done_in_its_info():
    env = gym.make(PLACE_THEN_STACK.env_id, cameras=())
    _, info = env.reset(seed=3)
    assert info["stages_done"] == 0 and info["num_stages"] == 2
    _, _, _, _, info = env.step(np.zeros(4, np.float32))
    assert info["stages_done"] == 0 and info["num_stages"] == 2
    assert env.spec.max_episode_steps == sum(s.max_episode_steps for s in PLACE_THEN_STACK.stages)
    _, info = gym.make("adamoe/Tabletop-PickRed-v0", cameras=()).reset(seed=3)
    assert info["stages_done"] == 0 and info["num_stages"] == 1  # every task reports them


@pytest.mark.parametrize("env_id", LONG_IDS[:1] + LONG_IDS[-1:])
def test_a_long_suite_env_passes_gymnasium_check_env(env_id):
    env = gym.make(env_id, render_mode="rgb_array", render_size=64)
    check_env(env.unwrapped, skip_render_check=False)
    env.close()


@pytest.mark.parametrize("env_id", LONG_IDS)
def test_the_expert_solves_every_stage_at_zero_noise(env_id):
    env = gym.make(env_id, cameras=())
    expert = envs.make_expert(env_id)
    for seed in range(100, 103):  # 50 hidden seeds per task are measured in docs/envs.md
        episode = run_episode(env, expert, seed=seed)
        assert episode.metadata["success"], (env_id, seed, episode.metadata)


def test_long_tasks_get_scenes_of_their_own_and_the_base_tasks_keep_theirs():
    base = [task_index(e) for e in envs.suite("tabletop")]
    long = [task_index(e) for e in LONG_IDS]
    assert base == list(range(len(base)))  # unchanged: earlier datasets stay reproducible
    assert long == list(range(len(base), len(base) + len(long)))


def test_the_experts_command_tables_success_with_intervals_and_stages(tmp_path):
    from tests.conftest import run_script

    run_script("experts.py", "--suite", LONG_IDS[0], "--episodes", "2", "--output-dir", tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| PlaceRedOnYellowPadThenStackGreenOnRed | 2 | 100.0% (2/2) |" in table
    assert "95% interval" in table and "stages done (mean)" in table
