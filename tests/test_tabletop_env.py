"""The tabletop suite honours the observation/action contract of docs/design.md."""

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.rendering import mujoco
from envs.tasks import STATE_DIM, TASK_LIST, TASKS

TASK_IDS = [t.env_id for t in TASK_LIST]


def test_suite_has_at_least_ten_tasks_covering_every_goal_family():
    assert len(TASK_LIST) >= 10
    assert {t.family for t in TASK_LIST} == {"reach", "push", "pick", "place", "stack"}
    assert envs.suite("tabletop") == tuple(TASK_IDS)
    assert all(env_id in gym.registry for env_id in TASK_IDS)


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_env_passes_gymnasium_check_env_with_rendering(env_id):
    env = gym.make(env_id, render_mode="rgb_array", render_size=64)
    check_env(env.unwrapped, skip_render_check=False)
    env.close()


def test_observation_follows_the_contract():
    env = gym.make("adamoe/Tabletop-PickRed-v0")
    obs, info = env.reset(seed=0)
    assert set(obs) == {"pixels", "agent_pos", "environment_state", "instruction"}
    for camera in ("front", "wrist"):
        image = obs["pixels"][camera]
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert obs["agent_pos"].dtype == np.float32 and obs["agent_pos"].shape == (4,)
    assert obs["environment_state"].dtype == np.float32 and obs["environment_state"].shape == (STATE_DIM,)
    assert obs["instruction"] == info["instruction"]
    assert obs["instruction"] in TASKS["PickRed"].instructions("train")
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    _, reward, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert isinstance(info["is_success"], bool) and info["is_success"] is False
    assert -1.0 <= reward <= 0.0
    env.close()


def test_image_size_and_cameras_are_configurable_and_state_only_has_no_pixels():
    env = gym.make("adamoe/Tabletop-ReachRed-v0", cameras=("wrist",), image_size=(48, 80))
    obs, _ = env.reset(seed=0)
    assert list(obs["pixels"]) == ["wrist"] and obs["pixels"]["wrist"].shape == (48, 80, 3)
    state_only = gym.make("adamoe/Tabletop-ReachRed-v0", cameras=())
    obs, _ = state_only.reset(seed=0)
    assert "pixels" not in obs and "pixels" not in state_only.observation_space.spaces


def test_front_camera_image_is_upright():
    """The table (brown, red > blue) fills the bottom rows; the backdrop above it is grey."""
    obs, _ = gym.make("adamoe/Tabletop-ReachRed-v0").reset(seed=0)
    image = obs["pixels"]["front"].astype(float)
    bottom, top = image[-6:].mean(axis=(0, 1)), image[:4].mean(axis=(0, 1))
    assert bottom[0] - bottom[2] > 30
    assert abs(top[0] - top[2]) < 15


def test_same_seed_gives_the_same_episode():
    def rollout(seed):
        env = gym.make("adamoe/Tabletop-PlaceBlueOnYellowPad-v0")
        expert = envs.make_expert("adamoe/Tabletop-PlaceBlueOnYellowPad-v0", noise=0.2, seed=seed)
        obs, _ = env.reset(seed=seed)
        frames, states = [obs["pixels"]["front"]], [obs["environment_state"]]
        for _ in range(30):
            obs, *_ = env.step(expert.act(obs))
            frames.append(obs["pixels"]["front"])
            states.append(obs["environment_state"])
        return np.stack(frames), np.stack(states), obs["instruction"]

    a, b, c = rollout(3), rollout(3), rollout(4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[1][0], c[1][0])  # another seed, another scene


def test_initial_scene_is_randomised_from_the_env_rng():
    env = gym.make("adamoe/Tabletop-PickRed-v0", cameras=())
    starts = np.stack([env.reset(seed=s)[0]["environment_state"] for s in range(8)])
    assert np.all(starts.std(axis=0)[:2] > 0.01)  # red cube x and y vary
    cubes = starts[:, :9].reshape(8, 3, 3)
    gaps = np.linalg.norm(cubes[:, :, None, :2] - cubes[:, None, :, :2], axis=-1) + np.eye(3)
    assert gaps.min() >= 0.09 - 1e-6


def test_heldout_instructions_never_appear_in_training_phrasing():
    for task in TASK_LIST:
        train, heldout = set(task.instructions("train")), set(task.instructions("heldout"))
        assert len(train) >= 3 and len(heldout) == 1 and not train & heldout
    env = gym.make("adamoe/Tabletop-StackRedOnGreen-v0", instruction_split="heldout", cameras=())
    seen = {env.reset(seed=s)[0]["instruction"] for s in range(5)}
    assert seen == set(TASKS["StackRedOnGreen"].instructions("heldout"))


def test_tasks_share_one_scene_distribution_and_differ_only_by_instruction():
    a = gym.make("adamoe/Tabletop-PickRed-v0", cameras=()).reset(seed=11)[0]
    b = gym.make("adamoe/Tabletop-StackBlueOnRed-v0", cameras=()).reset(seed=11)[0]
    np.testing.assert_array_equal(a["environment_state"], b["environment_state"])
    assert a["instruction"] != b["instruction"]


def test_step_limit_truncates_the_episode():
    env = gym.make("adamoe/Tabletop-ReachRed-v0", cameras=())
    env.reset(seed=0)
    steps, terminated, truncated = 0, False, False
    while not (terminated or truncated):
        *_, terminated, truncated, _ = env.step(np.array([0.0, 0.0, 1.0, 0.0], np.float32))
        steps += 1
    assert truncated and not terminated and steps == TASKS["ReachRed"].max_episode_steps


def test_success_terminates_with_zero_reward():
    env = gym.make("adamoe/Tabletop-ReachRed-v0", cameras=())
    expert = envs.make_expert("adamoe/Tabletop-ReachRed-v0")
    obs, _ = env.reset(seed=0)
    for _ in range(60):
        obs, reward, terminated, truncated, info = env.step(expert.act(obs))
        if terminated:
            break
    assert terminated and info["is_success"] and reward == 0.0


def test_unknown_task_error_lists_the_valid_names():
    with pytest.raises(ValueError, match="PickRed") as err:
        envs.TabletopEnv("PickPurple")
    assert "PickPurple" in str(err.value)
    with pytest.raises(ValueError, match="valid"):
        envs.resolve_env_ids(["adamoe/Tabletop-Nope-v0"])
    with pytest.raises(ValueError, match="tabletop"):
        envs.suite("tabletopp")


@pytest.mark.parametrize(
    "action", [np.zeros(3), np.zeros((1, 4)), np.array([0.0, np.nan, 0.0, 0.0]), np.array([np.inf, 0, 0, 0])]
)
def test_bad_action_raises_value_error(action):
    env = envs.TabletopEnv("PickRed", cameras=())
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)


def test_bad_constructor_arguments_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match="'side'.*front"):
        envs.TabletopEnv("PickRed", cameras=("side",))
    with pytest.raises(ValueError, match="'val'.*train"):
        envs.TabletopEnv("PickRed", instruction_split="val")
    with pytest.raises(ValueError, match="human"):
        envs.TabletopEnv("PickRed", render_mode="human")


def test_fast_render_settings_are_applied():
    env = envs.TabletopEnv("PickRed")
    env.reset(seed=0)
    q = env.model.vis.quality
    assert q.offsamples == 0 and q.shadowsize == 0 and q.numquads == 1
    flags = env._camera_renderer._scene.flags
    assert not flags[envs.rendering.mujoco.mjtRndFlag.mjRND_SHADOW]
    assert not flags[envs.rendering.mujoco.mjtRndFlag.mjRND_REFLECTION]
    env.close()


def test_mujoco_gl_defaults_to_egl_and_in_thread_rasterising_without_a_display():
    unset = ("MUJOCO_GL", "DISPLAY", "PYOPENGL_PLATFORM", "LP_NUM_THREADS")
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    code = "import envs, os; print(os.environ['MUJOCO_GL'], os.environ['LP_NUM_THREADS'])"
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["egl", "0"]
    clean["LP_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["egl", "2"]


def test_mujoco_gl_keeps_the_users_choice_and_a_display(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert envs.rendering.ensure_gl_backend() == "osmesa"
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setenv("DISPLAY", ":0")
    assert envs.rendering.ensure_gl_backend() is None


def _teleport_cube(env, cube_index: int, position) -> None:
    u = env.unwrapped
    adr = u._cube_qpos[cube_index]
    u.data.qpos[adr : adr + 3] = position
    u.data.qvel[:] = 0.0
    mujoco.mj_forward(u.model, u.data)


@pytest.mark.parametrize(
    "position",
    [(0.0, -0.05, -0.2), (0.45, -0.05, 0.02), (0.0, -0.33, 0.02), (0.0, 0.36, 0.02)],
    ids=["fallen-below-the-top", "past-the-right-edge", "past-the-front-edge", "past-the-back-edge"],
)
def test_cube_off_the_table_terminates_the_episode_and_says_why(position):
    env = gym.make("adamoe/Tabletop-PickRed-v0", cameras=())
    env.reset(seed=0)
    _teleport_cube(env, 1, position)
    *_, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert terminated and not truncated
    assert info["termination_reason"] == "cube_off_table" and info["is_success"] is False


def test_cube_near_the_edge_but_on_the_table_does_not_end_the_episode():
    env = gym.make("adamoe/Tabletop-PickRed-v0", cameras=())
    env.reset(seed=0)
    _teleport_cube(env, 1, (0.37, -0.05, 0.02))  # the table top ends at x = 0.4
    *_, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert not terminated and not truncated and info["termination_reason"] is None


def test_termination_reason_is_none_until_success_ends_the_episode():
    env = gym.make("adamoe/Tabletop-ReachRed-v0", cameras=())
    expert = envs.make_expert("adamoe/Tabletop-ReachRed-v0")
    obs, _ = env.reset(seed=0)
    reasons = []
    for _ in range(60):
        obs, _, terminated, _, info = env.step(expert.act(obs))
        reasons.append(info["termination_reason"])
        if terminated:
            break
    assert terminated and reasons[-1] == "success" and set(reasons[:-1]) == {None}


def test_cube_off_the_table_ends_the_episode_even_without_terminating_on_success():
    env = gym.make("adamoe/Tabletop-ReachRed-v0", cameras=(), terminate_on_success=False)
    env.reset(seed=0)
    _teleport_cube(env, 0, (0.0, -0.05, -0.2))
    *_, terminated, _, info = env.step(np.zeros(4, np.float32))
    assert terminated and info["termination_reason"] == "cube_off_table"
