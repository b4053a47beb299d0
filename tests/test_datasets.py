"""Demonstrations round-trip through Minari, and interrupted writes leave nothing loadable."""

import gymnasium as gym
import minari
import numpy as np
import pytest

import envs
from envs import datasets
from envs.collection import CollectionJob, collect, dataset_id_for, run_collection

TASKS = ["adamoe/Tabletop-PickRed-v0", "adamoe/Tabletop-ReachBlue-v0"]


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    job = CollectionJob(env_ids=TASKS, episodes_per_task=2, noise_levels=(0.0, 0.3), root=str(root), workers=1)
    summary = run_collection(job, progress=False)
    return root, summary


def test_minari_load_dataset_reads_what_we_write(collected, monkeypatch):
    root, summary = collected
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert set(minari.list_local_datasets()) == {dataset_id_for(t) for t in TASKS}
    ds = minari.load_dataset("tabletop/pick-red/demos-v0")
    assert ds.total_episodes == 4
    episode = ds[0]
    n = len(episode.actions)
    assert episode.actions.shape == (n, 4) and episode.actions.dtype == np.float32
    assert episode.observations["pixels"]["front"].shape == (n + 1, 64, 64, 3)
    assert episode.observations["agent_pos"].shape == (n + 1, 4)
    assert len(episode.observations["instruction"]) == n + 1
    assert episode.rewards.shape == episode.terminations.shape == episode.truncations.shape == (n,)
    assert summary["tabletop/pick-red/demos-v0"]["by_noise"]["0.0"]["success_rate"] == 1.0


def test_episode_metadata_records_task_instruction_and_noise(collected):
    root, _ = collected
    ds = datasets.load_dataset("tabletop/pick-red/demos-v0", root=root)
    metas = datasets.episode_metadata(ds)
    assert [m["noise"] for m in metas] == [0.0, 0.0, 0.3, 0.3]
    assert all(m["task"] == "PickRed" and m["env_id"] == TASKS[0] for m in metas)
    for episode, meta in datasets.iter_episodes(ds):
        assert meta["instruction"] == episode.observations["instruction"][0]
        assert meta["instruction"] in envs.TASKS["PickRed"].instructions("train")
        assert meta["length"] == len(episode.actions)


def test_replaying_recorded_actions_reproduces_the_recorded_states(collected):
    root, _ = collected
    ds = datasets.load_dataset("tabletop/pick-red/demos-v0", root=root)
    meta = datasets.episode_metadata(ds)[2]
    episode = ds[2]
    env = gym.make(TASKS[0])
    obs, _ = env.reset(seed=meta["seed"])
    np.testing.assert_array_equal(obs["pixels"]["wrist"], episode.observations["pixels"]["wrist"][0])
    for action in episode.actions:
        obs, *_ = env.step(action)
    np.testing.assert_allclose(obs["environment_state"], episode.observations["environment_state"][-1], atol=1e-6)


def test_images_are_stored_exactly_not_jpeg(collected):
    root, _ = collected
    ds = datasets.load_dataset(root / "tabletop/reach-blue/demos-v0")
    episode, meta = next(datasets.iter_episodes(ds))
    obs, _ = gym.make(TASKS[1]).reset(seed=meta["seed"])
    np.testing.assert_array_equal(obs["pixels"]["front"], episode.observations["pixels"]["front"][0])


def test_recovered_environment_is_the_collection_env(collected):
    root, _ = collected
    env = datasets.load_dataset("tabletop/reach-blue/demos-v0", root=root).recover_environment()
    assert env.spec.id == TASKS[1]


def test_existing_dataset_is_not_overwritten_without_asking(collected):
    root, _ = collected
    job = CollectionJob(env_ids=TASKS[:1], episodes_per_task=1, root=str(root), workers=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        run_collection(job, progress=False)


def test_interrupted_write_leaves_no_loadable_dataset(tmp_path, monkeypatch):
    from minari.dataset._storages.hdf5_storage import HDF5Storage

    episodes = collect(TASKS[1], seeds=[0], env_kwargs={"cameras": ()})
    env = gym.make(TASKS[1], cameras=())

    def crash(self, episodes):
        raise KeyboardInterrupt("simulated interruption halfway through the write")

    monkeypatch.setattr(HDF5Storage, "update_episodes", crash)
    with pytest.raises(KeyboardInterrupt):
        datasets.write_dataset(
            "tabletop/reach-blue/broken-v0",
            [e.buffer for e in episodes],
            [e.metadata for e in episodes],
            env.observation_space,
            env.action_space,
            root=tmp_path,
        )
    assert datasets.list_datasets(tmp_path) == []
    assert not (tmp_path / "tabletop/reach-blue/broken-v0").exists()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    assert minari.list_local_datasets() == {}
    with pytest.raises(FileNotFoundError):
        minari.load_dataset("tabletop/reach-blue/broken-v0")


def test_stale_temporary_directories_are_invisible_and_cleaned(tmp_path):
    stale = tmp_path / "tabletop" / "pick-red" / ".tmp-demos-v0-deadbeef" / "data"
    stale.mkdir(parents=True)
    (stale / "metadata.json").write_text("{}")
    assert datasets.list_datasets(tmp_path) == []
    assert datasets.remove_stale_tmp(tmp_path) == 1
    assert not stale.exists()


def test_loading_a_missing_dataset_names_it_and_lists_local_ones(collected):
    root, _ = collected
    with pytest.raises(FileNotFoundError, match="tabletop/pick-blue/demos-v0") as err:
        datasets.load_dataset("tabletop/pick-blue/demos-v0", root=root)
    assert "tabletop/pick-red/demos-v0" in str(err.value)


def test_collection_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="episodes_per_task"):
        run_collection(CollectionJob(env_ids=TASKS, episodes_per_task=0, root=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="noise"):
        run_collection(CollectionJob(env_ids=TASKS, noise_levels=(-1.0,), root=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="unknown env or suite"):
        run_collection(CollectionJob(env_ids=["nope"], root=str(tmp_path)), progress=False)
