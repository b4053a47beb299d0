"""Checkpoints as ``config.json`` + ``model.safetensors`` (the LeRobot / Hugging Face shape),
and a registry keyed by the config's ``type`` tag; directories are written atomically
(``policies.io.atomic_directory``).

Nothing on the load path unpickles: configs are JSON, tensors are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import adamoe
from policies.io import atomic_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"  # every file the save wrote, with its size and SHA-256
POLICIES: dict[str, type[PretrainedPolicy]] = {}


def register_policy(type_name: str):
    """Class decorator: ``from_pretrained`` builds this class for configs tagged ``type_name``."""

    def wrap(cls: type[PretrainedPolicy]) -> type[PretrainedPolicy]:
        POLICIES[type_name] = cls
        cls.policy_type = type_name
        return cls

    return wrap


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_state_dict_checked(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``module`` exactly: a missing, unexpected or mis-shaped tensor
    raises a ``ValueError`` that names it."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{source} is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"{source} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )
    module.load_state_dict(tensors, strict=True)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (nothing is unpickled); a damaged file is a
    ``ValueError`` naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): it is truncated or damaged") from exc


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a policy checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): the checkpoint is damaged") from exc
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{path} has no 'type' tag; known policy types are {sorted(POLICIES)}")
    return config


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(checkpoint: str | os.PathLike) -> str:
    """Which weights a checkpoint holds: the SHA-256 of its weights file as its manifest
    records it (hashed here for a checkpoint without one); ``"missing"`` when there are none.
    Pipelines fingerprint their stages with it."""
    manifest = Path(checkpoint) / MANIFEST_NAME
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("files", {}).get(WEIGHTS_NAME)
        if entry is not None:
            return entry["sha256"]
    weights = Path(checkpoint) / WEIGHTS_NAME
    return sha256(weights) if weights.is_file() else "missing"


def write_manifest(directory: str | os.PathLike, names: list[str]) -> None:
    """``manifest.json``: each of ``names`` (files in ``directory``) with its size and SHA-256."""
    directory = Path(directory)
    files = {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256(directory / n)} for n in sorted(names)}
    (directory / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=2) + "\n")


def verify_checkpoint(directory: str | os.PathLike, names: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME)) -> None:
    """Check ``names`` against the checkpoint's manifest: a changed size or hash (a
    corrupted or replaced file) raises a ``ValueError`` naming the file. A checkpoint
    written before manifests existed has none and is not checked."""
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return
    files = json.loads(manifest.read_text()).get("files", {})
    for name in names:
        expected, path = files.get(name), directory / name
        if expected is None or not path.is_file():
            continue
        if path.stat().st_size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise ValueError(
                f"{path} does not match its SHA-256 in {MANIFEST_NAME} (expected {expected['sha256'][:16]}...): "
                "the file is corrupted or was replaced; pass verify=False to load it anyway"
            )


def check_destination(directory: str | os.PathLike, overwrite: bool) -> None:
    """A save may replace a checkpoint (with ``overwrite``), never anything else. Commands
    call it before their work starts, so a refused save costs nothing."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; a checkpoint is saved as a directory: choose a folder path")
    contents = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if not contents:
        return
    config = directory / CONFIG_NAME
    try:
        ours = config.is_file() and json.loads(config.read_text()).get("type") in POLICIES
    except (ValueError, AttributeError):
        ours = False
    if not ours:
        shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
        raise FileExistsError(
            f"{directory} is not empty and is not a policy checkpoint (it holds {shown}); saving would "
            "delete what is there: choose a new or empty folder"
        )
    if not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint; pass overwrite=True (--overwrite) to replace")


class PretrainedPolicy(nn.Module):
    """Base of every policy: ``save_pretrained`` / ``from_pretrained`` and the action queue API."""

    policy_type = "base"
    config_class: type

    def num_parameters(self, active: bool = False) -> int:
        """Parameters in all, or (``active=True``) those one token's output depends on: a
        routed MoE layer counts ``experts_per_token`` of its experts, soft attention experts
        all run so all count (``adamoe.active_parameters``)."""
        return adamoe.active_parameters(self) if active else sum(p.numel() for p in self.parameters())

    def save_pretrained(
        self, directory: str | os.PathLike, extra_files: dict[str, str] | None = None, overwrite: bool = True
    ) -> Path:
        """Write ``config.json``, ``model.safetensors``, ``extra_files`` and a
        ``manifest.json`` of their hashes into ``directory``, atomically. An existing
        checkpoint there (a ``config.json`` with a known ``type``, and the files beside it)
        is replaced only with ``overwrite``; a file path, or a folder that is not a
        checkpoint, is refused, so nothing is deleted that a save did not write."""
        directory = Path(directory)
        check_destination(directory, overwrite)
        with atomic_directory(directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            save_tensors(self.state_dict(), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            write_manifest(tmp, [CONFIG_NAME, WEIGHTS_NAME, *(extra_files or {})])
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> PretrainedPolicy:
        """Load a checkpoint; ``verify`` checks its files against ``manifest.json`` first
        (off for very large files, at your own risk)."""
        if verify:
            verify_checkpoint(directory)
        data = read_config(directory)
        if data["type"] != cls.policy_type:
            raise ValueError(f"{directory} holds a {data['type']!r} policy, not a {cls.policy_type!r} one")
        policy = cls(cls.config_class.from_dict(data))
        weights = Path(directory) / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        load_state_dict_checked(policy, read_weights(weights), str(weights))
        return policy.to(device).eval()


def from_pretrained(
    directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> PretrainedPolicy:
    """Load any policy checkpoint, dispatching on its ``type`` tag (``verify``: see
    :meth:`PretrainedPolicy.from_pretrained`)."""
    kind = read_config(directory)["type"]
    if kind not in POLICIES:
        raise ValueError(f"unknown policy type {kind!r} in {directory}; known policy types are {sorted(POLICIES)}")
    return POLICIES[kind].from_pretrained(directory, device, verify=verify)
