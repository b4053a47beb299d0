"""Which actions a policy learns from, and how tasks share a batch (policies/data.py)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from envs.datasets import write_dataset
from policies.data import ChunkDataset

SPACE = gym.spaces.Dict({"agent_pos": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)})
ACTIONS = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)


def synthetic_dataset(root, dataset_id, task, lengths, label=True, first_frame=0):
    """Episodes of ``lengths`` steps; ``agent_pos[0]`` is the frame's index over all datasets
    (from ``first_frame``), the executed action is ``0.1 + label`` so the two always differ."""
    rng = np.random.default_rng(len(dataset_id))
    episodes, metas, frame = [], [], first_frame
    for n in lengths:
        state = np.zeros((n + 1, 4), np.float32)
        state[:, 0] = np.arange(frame, frame + n + 1)
        frame += n
        clean = rng.uniform(-0.8, 0.8, (n, 4)).astype(np.float32)
        infos = {"is_success": np.zeros(n, bool)}
        if label:
            infos["expert_action"] = clean
        episodes.append(
            EpisodeBuffer(
                observations={"agent_pos": state},
                actions=clean + 0.1,
                rewards=[0.0] * n,
                terminations=[False] * n,
                truncations=[False] * (n - 1) + [True],
                infos=infos,
            )
        )
        metas.append({"task": task, "instruction": f"do {task}"})
    write_dataset(dataset_id, episodes, metas, SPACE, ACTIONS, root=root)
    return dataset_id


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunk-datasets")
    synthetic_dataset(root, "synthetic/small/demos-v0", "Small", [5])
    synthetic_dataset(root, "synthetic/large/demos-v0", "Large", [50] * 10, first_frame=5)
    synthetic_dataset(root, "synthetic/unlabelled/demos-v0", "Unlabelled", [6, 7], label=False)
    return root


def load(root, ids, **kw):
    return ChunkDataset(ids, 3, root=root, progress=False, **kw)


# -- labels ---------------------------------------------------------------------------


def test_expert_label_trains_on_the_recorded_clean_actions_and_keeps_the_executed_ones(root):
    data = load(root, ["synthetic/small/demos-v0"])
    assert data.label == "expert"
    np.testing.assert_allclose(data.executed_actions - data.actions, 0.1, atol=1e-6)
    batch = data.get(np.array([0, 4]))
    np.testing.assert_array_equal(batch["action"][0].numpy(), data.actions[0:3])
    assert set(batch) == {"observation.state", "action", "action_is_pad", "task"}


def test_executed_label_trains_on_the_executed_actions(root):
    expert = load(root, ["synthetic/small/demos-v0"])
    executed = load(root, ["synthetic/small/demos-v0"], label="executed")
    np.testing.assert_array_equal(executed.actions, expert.executed_actions)
    np.testing.assert_array_equal(executed.get(np.array([1]))["action"][0].numpy(), expert.executed_actions[1:4])


def test_action_statistics_are_those_of_the_label_trained_on(root):
    expert = load(root, ["synthetic/large/demos-v0"], label="expert")
    executed = load(root, ["synthetic/large/demos-v0"], label="executed")
    for data in (expert, executed):
        np.testing.assert_allclose(data.stats()["action"]["mean"], data.actions.mean(0), rtol=1e-5, atol=1e-6)
    shift = executed.stats()["action"]["mean"] - expert.stats()["action"]["mean"]
    np.testing.assert_allclose(shift, 0.1, atol=1e-5)


def test_dataset_without_the_clean_label_warns_once_and_falls_back_to_executed_actions(root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load(root, ["synthetic/unlabelled/demos-v0", "synthetic/small/demos-v0"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "synthetic/unlabelled/demos-v0" in messages[0] and "executed actions" in messages[0]
    unlabelled = slice(0, 13)  # its two episodes come first
    np.testing.assert_array_equal(data.actions[unlabelled], data.executed_actions[unlabelled])
    assert not np.array_equal(data.actions[13:], data.executed_actions[13:])


def test_unknown_label_is_rejected_with_the_valid_choices(root):
    with pytest.raises(ValueError, match=r"label='clean'.*'expert'.*'executed'"):
        load(root, ["synthetic/small/demos-v0"], label="clean")


# -- task-balanced sampling ---------------------------------------------------------------


def drawn_frames(data, balance, n=4000, seed=0):
    batch = data.sample(n, np.random.default_rng(seed), balance=balance)
    return batch["observation.state"][:, 0].numpy().astype(int), batch["task"]


def test_task_balance_draws_every_task_equally_often_whatever_its_size(root):
    data = load(root, ["synthetic/small/demos-v0", "synthetic/large/demos-v0"])  # 5 frames vs 500
    _, tasks = drawn_frames(data, "task")
    assert abs(tasks.count("do Small") / len(tasks) - 0.5) < 0.04
    _, uniform = drawn_frames(data, None)
    assert uniform.count("do Small") / len(uniform) < 0.03  # without balance the small task starves


def test_task_balance_draws_frames_uniformly_within_a_task(root):
    data = load(root, ["synthetic/small/demos-v0", "synthetic/large/demos-v0"])
    frames, tasks = drawn_frames(data, "task", n=8000)
    small = frames[np.array(tasks) == "do Small"]
    assert set(small) == set(range(5))
    large = frames[np.array(tasks) == "do Large"]
    per_episode = np.bincount((large - 5) // 50, minlength=10) / len(large)
    np.testing.assert_allclose(per_episode, 0.1, atol=0.025)


def test_default_sampling_stays_uniform_over_frames(root):
    data = load(root, ["synthetic/small/demos-v0", "synthetic/large/demos-v0"])
    frames, _ = drawn_frames(data, None, n=16, seed=3)
    np.testing.assert_array_equal(frames, np.random.default_rng(3).integers(0, len(data), size=16))


def test_unknown_balance_is_rejected_with_the_valid_choices(root):
    data = load(root, ["synthetic/small/demos-v0"])
    with pytest.raises(ValueError, match=r"balance='episode'.*None.*'task'"):
        data.sample(2, np.random.default_rng(0), balance="episode")
