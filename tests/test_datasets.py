"""Demonstrations round-trip through Minari, and interrupted writes leave nothing loadable."""

import gymnasium as gym
import minari
import numpy as np
import pytest

import envs
from envs import datasets
from envs.collection import (
    SEEDS_PER_LEVEL,
    CollectionJob,
    collect,
    dataset_id_for,
    run_collection,
    scene_seed,
    task_index,
)
from envs.rendering import mujoco
from envs.tabletop import TabletopEnv

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


def test_stale_temporary_directories_are_invisible_and_only_abandoned_ones_are_cleaned(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    hostname, folder = socket.gethostname().replace("-", "_"), tmp_path / "tabletop" / "pick-red"
    host = f"{hostname}.{os.stat('/proc/self/ns/pid').st_ino}"  # this host and PID namespace
    stale = folder / f".tmp-demos-v0-{host}-{child.pid}-deadbeef" / "data"
    in_progress = folder / f".tmp-demos-v0-{host}-{os.getpid()}-cafebabe" / "data"  # a live writer's
    elsewhere = folder / f".tmp-demos-v0-otherhost-{child.pid}-feedface" / "data"
    container = folder / f".tmp-demos-v0-{hostname}.1-{child.pid}-0ddba11" / "data"  # same hostname, other PIDs
    for path in (stale, in_progress, elsewhere, container):
        path.mkdir(parents=True)
        (path / "metadata.json").write_text("{}")
    assert datasets.list_datasets(tmp_path) == []
    assert datasets.remove_stale_tmp(tmp_path) == 1
    assert not stale.exists() and in_progress.exists() and elsewhere.exists() and container.exists()


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


# -- labels, scene seeds and broken scenes ----------------------------------------------


def test_minari_episodes_carry_the_clean_expert_label_beside_the_executed_actions(collected, monkeypatch):
    root, _ = collected
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    ds = minari.load_dataset("tabletop/pick-red/demos-v0")
    metas = datasets.episode_metadata(ds)
    for episode, meta in zip(ds.iterate_episodes(), metas, strict=True):
        label = episode.infos["expert_action"]
        assert label.dtype == np.float32 and label.shape == (len(episode.actions), 4)
        if meta["noise"] == 0.0:
            np.testing.assert_array_equal(label, episode.actions)
        else:
            assert np.abs(label - episode.actions).max() > 0.1


def test_every_task_and_noise_level_gets_its_own_scenes(collected):
    root, _ = collected
    seeds = []
    for env_id in TASKS:
        metas = datasets.episode_metadata(datasets.load_dataset(dataset_id_for(env_id), root=root))
        # The task's index in its suite, not in the job: PickRed is tabletop task 2, job task 0.
        expected = [scene_seed(0, task_index(env_id), level, i) for level in (0, 1) for i in (0, 1)]
        assert [m["seed"] for m in metas] == expected
        seeds += [m["seed"] for m in metas]
    assert len(set(seeds)) == len(seeds) == 8
    assert task_index(TASKS[0]) == envs.TASK_LIST.index(envs.TASKS["PickRed"]) != 0


def test_scene_seeds_are_distinct_across_tasks_and_levels_and_never_evaluation_seeds():
    from policies.evaluation import EvalConfig

    tasks = len(envs.suite("metaworld"))
    seeds = [scene_seed(job, t, lv, i) for job in (0, 1) for t in range(tasks) for lv in range(3) for i in range(300)]
    assert len(set(seeds)) == len(seeds)
    # Block edges: the last index of one block and the first of the next never meet.
    edges = {scene_seed(0, 0, 0, SEEDS_PER_LEVEL - 1), scene_seed(0, 0, 1, 0), scene_seed(0, 99, 9, 0)}
    assert len(edges) == 3 and scene_seed(0, 99, 9, SEEDS_PER_LEVEL - 1) < scene_seed(1, 0, 0, 0)
    # evaluation: EvalConfig.seed + 1000 * task + i, plus the padding seeds of a last wave (+10_000)
    start = EvalConfig().seed
    evaluation = set(range(start, start + 1000 * tasks + 10_000 + 1000))
    assert evaluation.isdisjoint(seeds)
    assert min(seeds) > max(evaluation)
    with pytest.raises(ValueError, match="index"):
        scene_seed(0, 0, 0, SEEDS_PER_LEVEL)


def _break_scenes(monkeypatch, broken):
    """Scenes whose seed is in ``broken`` (all, when None) start with the red cube under the table."""
    original = TabletopEnv.reset

    def reset(self, *, seed=None, options=None):
        obs, info = original(self, seed=seed, options=options)
        if broken is None or seed in broken:
            adr = self._cube_qpos[0]
            self.data.qpos[adr : adr + 3] = (0.0, -0.05, -0.2)
            mujoco.mj_forward(self.model, self.data)
            obs = self._observation()
        return obs, info

    monkeypatch.setattr(TabletopEnv, "reset", reset)


def test_collection_replaces_a_scene_where_a_cube_left_the_table_and_reports_it(tmp_path, monkeypatch):
    env_id = "adamoe/Tabletop-ReachRed-v0"
    t = task_index(env_id)
    _break_scenes(monkeypatch, {scene_seed(0, t, 0, 1)})
    job = CollectionJob(env_ids=[env_id], episodes_per_task=3, pixels=False, root=str(tmp_path), workers=1)
    summary = run_collection(job, progress=False)[dataset_id_for(env_id)]
    assert summary["dropped"] == 1 and summary["by_noise"]["0.0"]["dropped"] == 1
    assert summary["by_noise"]["0.0"]["episodes"] == 3
    metas = datasets.episode_metadata(datasets.load_dataset(dataset_id_for(env_id), root=tmp_path))
    # Episode 1's replacement is the next seed of its own chain, index 1 + episodes_per_task.
    assert [m["seed"] for m in metas] == [scene_seed(0, t, 0, i) for i in (0, 2, 4)]
    assert all(m["success"] for m in metas)


def test_collection_gives_up_with_a_clear_error_when_every_scene_breaks(tmp_path, monkeypatch):
    _break_scenes(monkeypatch, None)
    job = CollectionJob(
        env_ids=["adamoe/Tabletop-ReachRed-v0"],
        episodes_per_task=1,
        pixels=False,
        root=str(tmp_path),
        workers=1,
        max_retries=2,
    )
    with pytest.raises(RuntimeError, match=r"cube left the table in all 3 scenes.*max_retries \(now 2\)"):
        run_collection(job, progress=False)
    assert datasets.list_datasets(tmp_path) == []


def test_collection_rejects_seed_settings_that_would_overlap_scene_blocks(tmp_path):
    def job(**kw):
        return CollectionJob(env_ids=TASKS[:1], pixels=False, root=str(tmp_path), workers=1, **kw)

    with pytest.raises(ValueError, match="seed must be >= 0"):
        run_collection(job(seed=-1), progress=False)
    with pytest.raises(ValueError, match="at most 10 noise levels"):
        run_collection(job(noise_levels=tuple(0.1 * i for i in range(11))), progress=False)
    with pytest.raises(ValueError, match="max_retries"):
        run_collection(job(episodes_per_task=SEEDS_PER_LEVEL // 2 + 1, max_retries=1), progress=False)
