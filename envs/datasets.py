"""Minari datasets: written atomically, read by id or by path.

A dataset lives at ``<root>/<dataset_id>/data`` exactly where ``minari.load_dataset``
looks when ``MINARI_DATASETS_PATH=<root>``. It is first written under a hidden
temporary directory beside its final place and renamed into place only when complete,
so an interrupted write never leaves anything that loads as a dataset.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_storage import MinariStorage

DEFAULT_ROOT = Path("outputs") / "datasets"
TMP_PREFIX = ".tmp-"


def _host() -> str:
    """This host and PID namespace (``<hostname>.<namespace>``): a PID names the same process
    only within both. (``policies.io`` stamps checkpoints' temporaries the same way.)"""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: one namespace per host
        namespace = 0
    return f"{socket.gethostname().replace('-', '_')}.{namespace}"


def _owner() -> str:
    """This host and process, in every temporary's name (``.tmp-<name>-<host>-<pid>-<random>``)."""
    return f"{_host()}-{os.getpid()}"


def _abandoned(path: Path) -> bool:
    """A temporary written by a process of this host and PID namespace that no longer runs;
    a name without such an owner is never judged (another container's, another tool's)."""
    parts = path.name.split("-")
    if len(parts) < 4 or not parts[-2].isdigit() or parts[-3] != _host():
        return False
    try:
        os.kill(int(parts[-2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def dataset_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$MINARI_DATASETS_PATH``, else ``outputs/datasets``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else DEFAULT_ROOT


def dataset_path(dataset_id: str, root: str | os.PathLike | None = None) -> Path:
    return dataset_root(root) / dataset_id


def write_dataset(
    dataset_id: str,
    episodes: Sequence[EpisodeBuffer],
    episode_metadata: Sequence[dict[str, Any]],
    observation_space: gym.Space,
    action_space: gym.Space,
    env_spec: gym.envs.registration.EnvSpec | None = None,
    root: str | os.PathLike | None = None,
    description: str = "",
    algorithm_name: str = "scripted-expert",
    jpeg: bool = False,
    overwrite: bool = False,
    extra_metadata: dict[str, Any] | None = None,
) -> minari.MinariDataset:
    """Write ``episodes`` as the Minari dataset ``dataset_id`` under ``root``, atomically.

    ``episode_metadata`` holds one flat dict per episode (task, instruction, noise...),
    stored as the episode's attributes and read back by :func:`episode_metadata`.
    Images are stored exactly, gzip-compressed inside HDF5 (any HDF5 reader, Minari's
    included, decompresses them transparently); ``jpeg=True`` selects Minari's own lossy
    JPEG encoding instead. ``extra_metadata`` (JSON values) joins Minari's dataset
    metadata, read back by :func:`read_dataset_metadata`.
    """
    minari.dataset.minari_dataset.parse_dataset_id(dataset_id)  # raises on a malformed id
    if len(episodes) != len(episode_metadata):
        raise ValueError(f"{len(episodes)} episodes but {len(episode_metadata)} metadata entries")
    if not episodes:
        raise ValueError(f"dataset {dataset_id!r} would have no episodes")
    final = dataset_path(dataset_id, root).resolve()  # Minari's size check breaks on relative paths
    if final.exists() and not overwrite:
        raise FileExistsError(f"dataset {dataset_id!r} already exists at {final}; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{_owner()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        storage = MinariStorage.new(
            tmp / "data",
            observation_space=observation_space,
            action_space=action_space,
            env_spec=env_spec,
            jpeg_encoding=jpeg,
        )
        storage.update_metadata(
            {
                "dataset_id": dataset_id,
                "algorithm_name": algorithm_name,
                "author": {"adamoe"},
                "description": description,
                "minari_version": importlib.metadata.version("minari"),
                "requirements": [f"mujoco=={importlib.metadata.version('mujoco')}"],
                **(extra_metadata or {}),
            }
        )
        with _gzip_images():
            storage.update_episodes(list(episodes))
        storage.update_episode_metadata([dict(m) for m in episode_metadata])
        _move_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return minari.MinariDataset(final / "data")


def read_dataset_metadata(dataset_id: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The dataset's Minari metadata (``metadata.json``, read as JSON, no data loaded)."""
    path = dataset_path(dataset_id, root) / "data" / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset {dataset_id!r} at {path.parent.parent}")
    return json.loads(path.read_text())


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; a ``final`` already there is set aside
    first and removed after. (``policies.io.atomic_directory`` does the same for
    checkpoints; ``envs`` does not import ``policies``.)"""
    old = final.parent / f"{TMP_PREFIX}{final.name}-old-{_owner()}-{uuid.uuid4().hex[:8]}" if final.exists() else None
    if old is not None:
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _gzip_images(level: int = 4):
    """Have Minari's writer gzip every image array (uint8, 4-d) it creates.

    Minari writes arrays uncompressed; 64x64 renders of the tabletop compress ~40x
    losslessly at gzip level 4 and read back as fast as raw (measured), which turns a
    1.2 GB demo collection into ~30 MB. The patch lives only for one write.
    """
    original = h5py.Group.create_dataset

    def create_dataset(self, name, shape=None, dtype=None, data=None, **kwds):
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and "compression" not in kwds:
            kwds.update(compression="gzip", compression_opts=level)
        return original(self, name, shape, dtype, data, **kwds)

    h5py.Group.create_dataset = create_dataset
    try:
        yield
    finally:
        h5py.Group.create_dataset = original


def remove_stale_tmp(root: str | os.PathLike | None = None) -> int:
    """Delete half-written datasets left by interrupted runs of this host (their process is
    gone); another run's write in progress is never touched. Returns how many."""
    base = dataset_root(root)
    stale = [p for p in base.rglob(f"{TMP_PREFIX}*") if p.is_dir() and _abandoned(p)] if base.exists() else []
    removed = 0
    for path in stale:
        name = path.name[len(TMP_PREFIX) :]
        final = path.parent / name.rsplit("-old-", 1)[0] if "-old-" in name else None
        if final is not None and not final.exists():  # killed between the two renames: put it back
            path.rename(final)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def load_dataset(name: str | os.PathLike, root: str | os.PathLike | None = None) -> minari.MinariDataset:
    """A Minari dataset by id (looked up under ``root``, then in Minari's own root) or by path."""
    path = Path(name)
    for candidate in (path / "data", path, dataset_path(str(name), root) / "data"):
        if (candidate / "metadata.json").is_file():
            return minari.MinariDataset(candidate)
    try:
        return minari.load_dataset(str(name))
    except (FileNotFoundError, ValueError) as exc:
        local = sorted(list_datasets(root))
        raise FileNotFoundError(
            f"no Minari dataset {str(name)!r} under {dataset_root(root)} or Minari's root; local datasets: {local}"
        ) from exc


def list_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Ids of the complete datasets under ``root``."""
    base = dataset_root(root)
    if not base.exists():
        return []
    ids = []
    for meta in base.rglob("data/metadata.json"):
        rel = meta.parent.parent.relative_to(base)
        if not any(part.startswith(".") for part in rel.parts):
            ids.append(rel.as_posix())
    return sorted(ids)


def episode_metadata(dataset: minari.MinariDataset) -> list[dict[str, Any]]:
    """Per-episode metadata (task, instruction, noise...) in episode order, as plain Python values."""
    out = []
    for meta in dataset.storage.get_episode_metadata(dataset.episode_indices):
        out.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in meta.items()})
    return out


def iter_episodes(dataset: minari.MinariDataset) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(EpisodeData, metadata) pairs in episode order."""
    metas = episode_metadata(dataset)
    yield from zip(dataset.iterate_episodes(), metas, strict=True)
