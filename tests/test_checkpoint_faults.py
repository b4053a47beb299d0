"""Checkpoints never lose data: a save refuses what is not its own, corrupted weights are
caught on load, and only provably stale temporaries are cleaned."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import adamoe
from policies import VLAPolicy, from_pretrained
from policies.io import atomic_directory, remove_stale_temporaries
from policies.vla.configuration_vla import vla_config


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return VLAPolicy(vla_config("tiny"))


def test_a_save_into_a_folder_holding_other_files_is_refused_and_deletes_nothing(policy, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match=r"not a policy checkpoint \(it holds data.csv, notes.txt\)"):
        policy.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_save_onto_a_file_is_refused_and_the_file_is_kept(policy, tmp_path):
    first = policy.save_pretrained(tmp_path / "ckpt")
    target = first / "config.json"
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="is a file"):
        policy.save_pretrained(target)
    assert target.is_file() and target.read_bytes() == before


def test_replacing_a_checkpoint_needs_overwrite_and_keeps_only_the_new_files(policy, tmp_path):
    out = policy.save_pretrained(tmp_path / "ckpt", extra_files={"train.json": "{}"})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        policy.save_pretrained(out, overwrite=False)
    policy.save_pretrained(out, overwrite=True)  # train.json was this checkpoint's own file
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # nothing left beside it


def test_a_flipped_bit_in_the_weights_is_caught_on_load_and_named(policy, tmp_path):
    out = policy.save_pretrained(tmp_path / "ckpt")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's data: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors does not match its SHA-256 in manifest.json"):
        from_pretrained(out)
    assert isinstance(from_pretrained(out, verify=False), VLAPolicy)  # the explicit escape hatch


def test_a_damaged_weights_file_or_config_is_a_clear_error_naming_the_file(policy, tmp_path):
    out = policy.save_pretrained(tmp_path / "ckpt")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: not a safetensors file any more
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file .* truncated"):
        from_pretrained(out, verify=False)
    out = policy.save_pretrained(tmp_path / "ckpt2")
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .*: the checkpoint is damaged"):
        from_pretrained(out, verify=False)
    fisher = adamoe.save_fisher({"w": torch.ones(3)}, tmp_path / "fisher.safetensors")
    fisher.write_bytes(fisher.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"fisher.safetensors is not a readable safetensors file"):
        adamoe.load_fisher(fisher)


def test_a_checkpoint_without_a_manifest_still_loads(policy, tmp_path):
    out = policy.save_pretrained(tmp_path / "ckpt")
    (out / "manifest.json").unlink()
    loaded = from_pretrained(out)
    for a, b in zip(loaded.state_dict().values(), policy.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_manifest_lists_every_file_the_save_wrote(policy, tmp_path):
    out = policy.save_pretrained(tmp_path / "ckpt", extra_files={"merge.json": "{}"})
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.json", "merge.json", "model.safetensors"]
    assert files["model.safetensors"]["bytes"] == (out / "model.safetensors").stat().st_size


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def this_host() -> tuple[str, str]:
    """How temporaries name this host and PID namespace, and the same hostname in another
    PID namespace (another container), where the same PID is another process."""
    hostname = socket.gethostname().replace("-", "_")
    return f"{hostname}.{os.stat('/proc/self/ns/pid').st_ino}", f"{hostname}.1"


def test_only_temporaries_of_dead_processes_on_this_host_are_cleaned(tmp_path):
    host, other_namespace = this_host()
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".tmp-ckpt-{host}-{dead}-0123abcd"
    stale_old = tmp_path / f".tmp-ckpt-old-{host}-{dead}-0123abce"
    running = tmp_path / f".tmp-ckpt-{host}-{alive}-0123abcf"
    elsewhere = tmp_path / f".tmp-ckpt-otherhost-{dead}-0123abd0"
    other_name = tmp_path / f".tmp-ckpt2-{host}-{dead}-0123abd1"
    container = tmp_path / f".tmp-ckpt-{other_namespace}-{dead}-0123abd2"  # its PID means nothing here
    (tmp_path / "ckpt").mkdir()  # the swap completed: the set-aside old copy is garbage
    for path in (stale, stale_old, running, elsewhere, other_name, container):
        path.mkdir()
    removed = remove_stale_temporaries(tmp_path / "ckpt")
    assert sorted(removed) == sorted([stale, stale_old])
    assert running.exists() and elsewhere.exists() and other_name.exists() and container.exists()


def test_an_interrupted_directory_write_leaves_a_stamped_temporary_that_the_next_write_clears(tmp_path):
    script = (
        "import os, sys\n"
        "from policies.io import atomic_directory\n"
        f"with atomic_directory({str(tmp_path / 'ckpt')!r}) as tmp:\n"
        "    (tmp / 'half').write_text('x')\n"
        "    os._exit(1)\n"  # killed mid-write
    )
    subprocess.run([sys.executable, "-c", script], check=False, cwd=os.getcwd())
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-ckpt-")]
    assert len(left) == 1 and not (tmp_path / "ckpt").exists()
    with atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "whole").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_save_killed_between_its_two_renames_gets_the_old_checkpoint_back(tmp_path):
    host, _ = this_host()
    old = tmp_path / f".tmp-ckpt-old-{host}-{_dead_pid()}-0123abcd"  # the previous checkpoint, set aside
    old.mkdir()
    (old / "config.json").write_text("{}")
    assert remove_stale_temporaries(tmp_path / "ckpt") == []
    assert (tmp_path / "ckpt" / "config.json").is_file() and not old.exists()
