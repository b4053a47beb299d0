"""Suites step as one vector env; locomotion helpers give D4RL-normalised scores."""

import numpy as np
import pytest

import envs


def test_suite_runs_as_one_async_vector_env_with_correct_instructions():
    ids = ["adamoe/Tabletop-PickRed-v0", "adamoe/Tabletop-StackBlueOnRed-v0"]
    vec = envs.make_vector_env(ids, num_envs_per_task=1, asynchronous=True)
    try:
        obs, info = vec.reset(seed=0)
        assert obs["pixels"]["front"].shape == (2, 64, 64, 3)
        assert obs["instruction"][0] in envs.TASKS["PickRed"].instructions("train")
        assert obs["instruction"][1] in envs.TASKS["StackBlueOnRed"].instructions("train")
        obs, reward, terminated, truncated, info = vec.step(np.zeros((2, 4), np.float32))
        assert reward.shape == (2,) and info["is_success"].dtype == bool
    finally:
        vec.close()


def test_sync_vector_env_over_the_whole_suite():
    vec = envs.make_vector_env("tabletop", asynchronous=False, cameras=())
    obs, _ = vec.reset(seed=0)
    assert obs["agent_pos"].shape == (len(envs.TASK_LIST), 4)
    vec.close()
    with pytest.raises(ValueError, match="num_envs_per_task"):
        envs.make_vector_env("tabletop", num_envs_per_task=0)


def test_normalised_score_uses_d4rl_references():
    hopper = envs.get_locomotion("hopper")
    assert envs.normalized_score("hopper", hopper.random_return) == pytest.approx(0.0)
    assert envs.normalized_score("hopper", hopper.expert_return) == pytest.approx(100.0)
    np.testing.assert_allclose(
        envs.normalized_score("halfcheetah", np.array([-280.178953, 12135.0])), [0.0, 100.0], atol=1e-9
    )


@pytest.mark.parametrize("name,obs_dim,act_dim", [("halfcheetah", 17, 6), ("hopper", 11, 3), ("walker2d", 17, 6)])
def test_locomotion_envs_are_gymnasium_v5_state_only(name, obs_dim, act_dim):
    env = envs.make_locomotion_env(name)
    assert env.spec.id.endswith("-v5")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_dim,) and env.action_space.shape == (act_dim,)
    env.close()


def test_unknown_locomotion_task_lists_valid_ones():
    with pytest.raises(ValueError, match="halfcheetah"):
        envs.get_locomotion("ant")
