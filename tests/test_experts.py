"""Scripted experts solve every task, and their noise spreads the data's quality."""

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.collection import run_episode
from envs.tasks import TASK_LIST

EPISODES = 20  # per task in CI (seeds 100..119); `make demo` measures 50 more (seeds 0..49)


@pytest.mark.parametrize("env_id", [t.env_id for t in TASK_LIST])
def test_expert_solves_its_task_at_zero_noise(env_id):
    env = gym.make(env_id, cameras=())
    expert = envs.make_expert(env_id)
    episodes = [run_episode(env, expert, seed=100 + i) for i in range(EPISODES)]
    assert all(ep.metadata["success"] for ep in episodes), [ep.metadata for ep in episodes]


def test_noise_lowers_returns_and_changes_actions():
    env_id = "adamoe/Tabletop-PlaceRedOnPurplePad-v0"
    env = gym.make(env_id, cameras=())
    clean = [run_episode(env, envs.make_expert(env_id), seed=s).metadata["return"] for s in range(4)]
    noisy_expert = envs.make_expert(env_id, noise=0.6, random_action_prob=0.2, seed=0)
    noisy = [run_episode(env, noisy_expert, seed=s, noise=0.6).metadata["return"] for s in range(4)]
    assert np.mean(noisy) < np.mean(clean)


def test_expert_actions_stay_in_the_action_space():
    env_id = "adamoe/Tabletop-PushRedToYellowPad-v0"
    env = gym.make(env_id, cameras=())
    expert = envs.make_expert(env_id, noise=2.0, seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(20):
        action = expert.act(obs)
        assert action.dtype == np.float32 and action.shape == (4,) and np.all(np.abs(action) <= 1.0)
        obs, *_ = env.step(action)


def test_make_expert_rejects_unknown_ids_and_bad_noise():
    with pytest.raises(ValueError, match="no scripted expert"):
        envs.make_expert("HalfCheetah-v5")
    with pytest.raises(ValueError, match="valid tasks"):
        envs.make_expert("adamoe/Tabletop-PickPurple-v0")
    with pytest.raises(ValueError, match="noise"):
        envs.make_expert("adamoe/Tabletop-PickRed-v0", noise=-0.1)
    with pytest.raises(ValueError, match="random_action_prob"):
        envs.make_expert("adamoe/Tabletop-PickRed-v0", random_action_prob=1.5)


def test_clean_label_is_what_the_noise_free_expert_does_in_each_visited_state():
    env_id = "adamoe/Tabletop-PickRed-v0"
    env = gym.make(env_id, cameras=())
    noisy = envs.make_expert(env_id, noise=0.5, random_action_prob=0.2, seed=0)
    clean = envs.make_expert(env_id)  # shadows the noisy run: same observations, no noise
    obs, _ = env.reset(seed=0)
    differs = False
    for _ in range(40):
        executed, label = noisy.act_with_label(obs)
        np.testing.assert_array_equal(label, clean.act(obs))
        assert label.dtype == np.float32 and label.shape == (4,) and np.all(np.abs(label) <= 1.0)
        differs |= not np.array_equal(executed, label)
        obs, *_ = env.step(executed)
    assert differs


def test_act_executes_the_same_action_as_act_with_label():
    env_id = "adamoe/Tabletop-PushRedToYellowPad-v0"
    env = gym.make(env_id, cameras=())
    a, b = (envs.make_expert(env_id, noise=0.3, random_action_prob=0.1, seed=3) for _ in range(2))
    obs, _ = env.reset(seed=0)
    for _ in range(20):
        action = a.act(obs)
        np.testing.assert_array_equal(action, b.act_with_label(obs)[0])
        obs, *_ = env.step(action)


def test_run_episode_records_the_clean_label_beside_the_executed_action():
    env_id = "adamoe/Tabletop-ReachBlue-v0"
    env = gym.make(env_id, cameras=())
    episode = run_episode(env, envs.make_expert(env_id, noise=0.4, seed=0), seed=1, noise=0.4)
    label = episode.buffer.infos["expert_action"]
    assert label.dtype == np.float32 and label.shape == episode.buffer.actions.shape
    assert not np.array_equal(label, episode.buffer.actions)
    clean = run_episode(env, envs.make_expert(env_id), seed=1)
    np.testing.assert_array_equal(clean.buffer.infos["expert_action"], clean.buffer.actions)
