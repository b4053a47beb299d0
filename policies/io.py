"""Files written so that an interrupted write never leaves a half file that looks whole,
and the one-line progress log every pipeline prints.

Every writer in ``policies`` and ``scripts`` goes through ``atomic_file`` (one file) or
``atomic_directory`` (a checkpoint): the data is written under a hidden temporary name
beside its destination, flushed to disk, and renamed into place, so a reader sees the old
file or the new one, never part of one. The temporary names carry the process id, so two
processes writing beside each other never touch each other's temporaries.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temporary_name(final: Path, kind: str = "") -> Path:
    # The destination's suffix stays last: savefig, imageio and numpy pick formats by it.
    return final.with_name(f".{final.stem}.tmp{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{final.suffix}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is flushed to disk
    and renamed onto ``path`` (replacing any old file in one step), on failure removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def _host() -> str:
    """This host and PID namespace: a PID names the same process only within both (two
    containers may share a hostname, each with its own PIDs). ``<hostname>.<namespace>``."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: one namespace per host
        namespace = 0
    return f"{socket.gethostname().replace('-', '_')}.{namespace}"


def _stamp() -> str:
    """Who writes a temporary: this host, PID namespace and process (a stale one can be told apart)."""
    return f"{_host()}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``final`` that killed processes of this host left behind:
    only names this module stamped with this host and PID namespace whose process no longer
    runs, so another run's write in progress (another container's included) is never
    touched. Returns what was removed."""
    final = Path(final)
    prefix, host = f".tmp-{final.name}-", _host()
    removed = []
    for path in final.parent.glob(f"{prefix}*") if final.parent.is_dir() else ():
        parts = path.name[len(prefix) :].split("-")  # [old-]host-pid-random
        was_final = parts[0] == "old"
        parts = parts[1:] if was_final else parts
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _process_alive(int(parts[1])):
            if was_final and not final.exists():  # killed between the two renames: put the old one back
                path.rename(final)
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system or the file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``final``; move it into place on success.

    Every file is flushed to disk before the move. An existing ``final`` is swapped with
    the new one in one atomic step where the system allows it (Linux), so at every moment
    the old directory or the new one is in place, and then removed; elsewhere it is moved
    aside just before. An interrupted write leaves only a host- and pid-stamped ``.tmp-*``
    directory, which :func:`remove_stale_temporaries` (run by every write) clears once its
    process is gone.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.parent / f".tmp-{final.name}-{_stamp()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync_directory(tmp)
        if final.exists() and _exchange(tmp, final):
            pass  # tmp now holds the old directory, removed below
        elif final.exists():
            old = final.parent / f".tmp-{final.name}-old-{_stamp()}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_directory(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON at ``path``, or None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of ``settings`` (JSON, keys sorted): what a stage's output was made with."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_matches(directory: str | os.PathLike, settings: dict[str, Any], what: str) -> bool:
    """Whether ``directory/stage.json`` records ``settings`` (see :func:`record_stage`); says
    so when an earlier output there was made with other settings."""
    record = read_json(Path(directory) / "stage.json")
    if record is None:
        if Path(directory).is_dir() and any(Path(directory).iterdir()):
            log(f"{what}: {directory} holds no record of the settings it was made with; running it again")
        return False
    if record.get("fingerprint") != fingerprint(settings):
        log(f"{what}: settings changed since {directory} was made; running it again")
        return False
    return True


def record_stage(directory: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Write ``directory/stage.json``: the settings an output was made with, and their hash."""
    write_json(Path(directory) / "stage.json", {"fingerprint": fingerprint(settings), "settings": settings})


def log(message: str) -> None:
    """One timestamped progress line, flushed at once (pipelines print these between bars)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def replace_between_markers(path: str | os.PathLike, start: str, end: str, block: str) -> None:
    """Replace what lies between the ``start`` and ``end`` marker lines of the text file at
    ``path`` with ``block`` (the markers stay), atomically. A file without exactly one
    ``start`` followed by one ``end`` is left as it is, with a ``ValueError`` naming it."""
    path = Path(path)
    text = path.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path} needs one {start!r} line followed by one {end!r} line")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    write_text(path, f"{before}{start}\n{block}\n{end}{after}")
