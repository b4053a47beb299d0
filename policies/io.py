"""Files written so that an interrupted write never leaves a half file that looks whole,
and the one-line progress log every pipeline prints.

Every writer in ``policies`` and ``scripts`` goes through ``atomic_file`` (one file) or
``atomic_directory`` (a checkpoint): the data is written under a hidden temporary name
beside its destination, flushed to disk, and renamed into place, so a reader sees the old
file or the new one, never part of one. The temporary names carry the process id, so two
processes writing beside each other never touch each other's temporaries.
"""

from __future__ import annotations

import json
import os
import shutil
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


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``final``; rename it into place on success.

    An interrupted write leaves only a ``.tmp-*`` directory, never a half-written
    ``final``; an existing ``final`` is replaced only once the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        if final.exists():
            old = final.parent / f".tmp-{final.name}-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON at ``path``, or None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


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
