"""A policy in its own process: chunk inference off the control process's interpreter.

In one process, the inference thread and the control loop share the GIL: every Python
step between the policy's kernels (an MoE policy runs hundreds of small ones per chunk)
can hold the loop thread past its tick, and the two fight over the cores. Robot stacks
serve the policy from a separate process (LeRobot's async inference, openpi's policy
server); ``PolicyProcess`` does that on one machine: ``python -m policies.control.server``
reads observations on its stdin and writes chunks on its stdout. The control process
waits for a chunk with the GIL released, so its loop thread runs on time, and the policy
computes on its own core with its own interpreter (whatever the parent's ``__main__``).

Nothing is pickled: the child loads the policy from a checkpoint (safetensors and JSON)
the parent wrote, and observations and chunks travel as a JSON header plus raw array
bytes (``pack`` / ``unpack``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np

_HEADER = struct.Struct("<I")  # the JSON header's length in bytes
_LENGTH = struct.Struct("<Q")  # a message's length in bytes, before it on the pipe
_INLINE = (str, int, float, bool, type(None))


def pack(message: dict[str, Any]) -> bytes:
    """``message`` (nested dicts of numpy arrays, strings, numbers, None, lists of strings)
    as bytes: a JSON header describing every array, then the arrays' raw bytes."""
    arrays: list[np.ndarray] = []

    def describe(value: Any) -> Any:
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"only string keys can be sent, got {list(value)}")
            return {"dict": {k: describe(v) for k, v in value.items()}}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"object arrays cannot be sent, got dtype {value.dtype}")
            arrays.append(np.ascontiguousarray(value))
            return {"array": [value.dtype.str, list(value.shape)]}
        if isinstance(value, np.generic):
            return {"value": value.item()}
        if isinstance(value, (list, tuple)) and all(isinstance(v, _INLINE) for v in value):
            return {"list": list(value)}
        if isinstance(value, _INLINE):
            return {"value": value}
        raise TypeError(f"cannot send a {type(value).__name__}: arrays, strings, numbers and dicts of them only")

    header = json.dumps(describe(message)).encode()
    return b"".join([_HEADER.pack(len(header)), header, *(a.tobytes() for a in arrays)])


def unpack(data: bytes) -> dict[str, Any]:
    """The inverse of ``pack``: fresh arrays, owning their memory."""
    (size,) = _HEADER.unpack_from(data)
    offset = _HEADER.size + size
    tree = json.loads(data[_HEADER.size : offset])

    def build(node: dict[str, Any]) -> Any:
        nonlocal offset
        if "dict" in node:
            return {k: build(v) for k, v in node["dict"].items()}
        if "array" in node:
            dtype, shape = np.dtype(node["array"][0]), tuple(node["array"][1])
            count = int(np.prod(shape, dtype=np.int64))
            array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
            offset += count * dtype.itemsize
            return array
        return node["list"] if "list" in node else node["value"]

    return build(tree)


def _read_message(stream: Any) -> bytes | None:
    """One length-prefixed message from ``stream``; None at a clean end of the stream."""
    head = stream.read(_LENGTH.size)
    if not head:
        return None
    if len(head) != _LENGTH.size:
        raise EOFError("the stream ended inside a message's length")
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"the stream ended after {len(data)} of a message's {size} bytes")
    return data


def _write_message(stream: Any, data: bytes) -> None:
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.flush()


def serve(checkpoint: str, torch_threads: int = 1, seed: int = 0) -> int:
    """The server: load the policy, say ready, then answer every observation read from
    stdin with a chunk on stdout until stdin closes. A failure is answered with its
    traceback (the client raises it); the server keeps serving."""

    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol's stream
    try:
        import torch

        from policies import from_pretrained
        from policies.control.runner import chunk_fn

        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        infer = chunk_fn(from_pretrained(checkpoint))
        _write_message(out, pack({"ready": True}))
    except BaseException:  # noqa: BLE001 (reported to the client, which raises it)
        _write_message(out, pack({"error": traceback.format_exc()}))
        return 1
    stream = sys.stdin.buffer
    while (data := _read_message(stream)) is not None:
        try:
            request = unpack(data)
            chunk = infer(request["obs"], request.get("prefix"), request.get("weights"))
            reply = pack({"chunk": np.asarray(chunk, dtype=np.float32)})
        except BaseException:  # noqa: BLE001
            reply = pack({"error": traceback.format_exc()})
        _write_message(out, reply)
    return 0


class PolicyProcess:
    """``policy``'s chunk inference served by a child process: call it as the loop's chunk
    function, ``obs -> (H, action_dim)`` (with ``prefix, weights`` for real-time chunking).

    The child (``python -m policies.control.server``, talking over its stdin and stdout)
    loads a copy of the policy as it is now, written to a temporary checkpoint (settings
    such as ``inference_noise_scale`` included), with ``torch_threads`` intra-op threads.
    Use it as a context manager, or call ``close``."""

    def __init__(self, policy: Any, torch_threads: int = 1, seed: int = 0, start_timeout_s: float = 300.0) -> None:
        if not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1:
            raise ValueError(f"torch_threads must be an integer >= 1, got {torch_threads!r}")
        if not hasattr(policy, "save_pretrained") or not hasattr(policy, "predict_action_chunk"):
            raise ValueError(
                f"a {type(policy).__name__} cannot be served: it needs save_pretrained and predict_action_chunk"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="policy-process-"))
        self._proc: subprocess.Popen | None = None
        # One request at a time, each answered in order: a call abandoned by the loop (its
        # episode ended mid-inference) still takes its own reply before the next call sends.
        self._lock = threading.Lock()
        try:
            policy.save_pretrained(self._dir / "policy")
            root = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            command = [sys.executable, "-m", "policies.control.server", str(self._dir / "policy")]
            command += ["--torch-threads", str(torch_threads), "--seed", str(seed)]
            self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            ready = threading.Event()
            watchdog = threading.Timer(start_timeout_s, lambda: None if ready.is_set() else self._proc.kill())
            watchdog.daemon = True
            watchdog.start()
            try:
                reply = self._receive()
            finally:
                ready.set()
                watchdog.cancel()
            if not reply.get("ready"):
                raise RuntimeError(f"the policy process sent {sorted(reply)} instead of 'ready'")
        except BaseException:
            self.close()
            raise

    def __call__(self, obs: dict[str, Any], prefix: np.ndarray | None = None, weights: np.ndarray | None = None):
        request: dict[str, Any] = {"obs": obs}
        if prefix is not None:
            request.update(prefix=np.asarray(prefix, np.float32), weights=np.asarray(weights, np.float32))
        message = pack(request)
        with self._lock:
            if self._proc is None:
                raise RuntimeError("this PolicyProcess is closed")
            try:
                _write_message(self._proc.stdin, message)
            except (BrokenPipeError, OSError) as exc:
                raise RuntimeError(f"the policy process ended (exit code {self._proc.poll()})") from exc
            return self._receive()["chunk"]

    def _receive(self) -> dict[str, Any]:
        try:
            data = _read_message(self._proc.stdout)
        except (EOFError, OSError, ValueError) as exc:
            data, cause = None, exc
        else:
            cause = None
        if data is None:
            raise RuntimeError(f"the policy process ended (exit code {self._proc.wait()})") from cause
        reply = unpack(data)
        if "error" in reply:
            raise RuntimeError(f"the policy process failed:\n{reply['error']}")
        return reply

    def close(self) -> None:
        """Stop the child (it ends when its stdin closes; killed if it does not within 5 s)
        and delete the temporary checkpoint."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PolicyProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Serve a policy checkpoint's chunks over stdin and stdout.")
    parser.add_argument("checkpoint")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    raise SystemExit(serve(args.checkpoint, args.torch_threads, args.seed))
