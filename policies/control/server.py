"""A policy in its own process: chunk inference off the control process's interpreter.

In one process, the inference thread and the control loop share the GIL: every Python
step between the policy's kernels (an MoE policy runs hundreds of small ones per chunk)
can hold the loop thread past its tick, and the two fight over the cores. Robot stacks
serve the policy from a separate process (LeRobot's async inference, openpi's policy
server); ``PolicyProcess`` does that on one machine. The control process sends the
observation over a pipe and waits for the chunk with the GIL released, so its loop
thread runs on time, and the policy computes on its own core with its own interpreter.

Nothing is pickled: the child loads the policy from a checkpoint (safetensors and JSON)
the parent wrote, and observations and chunks travel as a JSON header plus raw array
bytes (``pack`` / ``unpack``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import struct
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np

_HEADER = struct.Struct("<I")  # the JSON header's length in bytes
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


def _serve(checkpoint: str, conn: Any, torch_threads: int, seed: int) -> None:
    """The child: load the policy, say ready, then answer every observation with a chunk
    until the pipe closes. A failure is sent back as its message, never raised into the void."""
    try:
        import torch

        from policies import from_pretrained
        from policies.control.runner import chunk_fn

        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        infer = chunk_fn(from_pretrained(checkpoint))
        conn.send_bytes(pack({"ready": True}))
    except BaseException:  # noqa: BLE001 (reported to the parent, which raises it)
        conn.send_bytes(pack({"error": traceback.format_exc()}))
        return
    while True:
        try:
            request = unpack(conn.recv_bytes())
        except (EOFError, OSError):  # the parent closed the pipe: done
            return
        try:
            chunk = infer(request["obs"], request.get("prefix"), request.get("weights"))
            conn.send_bytes(pack({"chunk": np.asarray(chunk, dtype=np.float32)}))
        except BaseException:  # noqa: BLE001
            conn.send_bytes(pack({"error": traceback.format_exc()}))


class PolicyProcess:
    """``policy``'s chunk inference served by a child process: call it as the loop's chunk
    function, ``obs -> (H, action_dim)`` (with ``prefix, weights`` for real-time chunking).

    The child loads a copy of the policy as it is now (written to a temporary checkpoint,
    settings such as ``inference_noise_scale`` included) with ``torch_threads`` intra-op
    threads. Use it as a context manager, or call ``close``."""

    def __init__(self, policy: Any, torch_threads: int = 1, seed: int = 0, start_timeout_s: float = 300.0) -> None:
        if not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1:
            raise ValueError(f"torch_threads must be an integer >= 1, got {torch_threads!r}")
        if not hasattr(policy, "save_pretrained") or not hasattr(policy, "predict_action_chunk"):
            raise ValueError(
                f"a {type(policy).__name__} cannot be served: it needs save_pretrained and predict_action_chunk"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="policy-process-"))
        self._proc = None
        self._conn = None
        # One request at a time, each answered in order: a call abandoned by the loop (its
        # episode ended mid-inference) still takes its own reply before the next call sends.
        self._lock = threading.Lock()
        try:
            policy.save_pretrained(self._dir / "policy")
            ctx = mp.get_context("spawn")  # a fresh interpreter: no forked threads or locks
            self._conn, child = ctx.Pipe()
            args = (str(self._dir / "policy"), child, torch_threads, seed)
            self._proc = ctx.Process(target=_serve, args=args, name="policy-server", daemon=True)
            self._proc.start()
            child.close()
            if not self._conn.poll(start_timeout_s):
                raise TimeoutError(f"the policy process did not start within {start_timeout_s:g} s")
            reply = self._receive()
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
            if self._conn is None:
                raise RuntimeError("this PolicyProcess is closed")
            self._conn.send_bytes(message)
            return self._receive()["chunk"]

    def _receive(self) -> dict[str, Any]:
        try:
            reply = unpack(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            code = None if self._proc is None else self._proc.exitcode
            raise RuntimeError(f"the policy process ended (exit code {code})") from exc
        if "error" in reply:
            raise RuntimeError(f"the policy process failed:\n{reply['error']}")
        return reply

    def close(self) -> None:
        """Stop the child (it ends when its pipe closes; killed if it does not within 5 s)
        and delete the temporary checkpoint."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(timeout=5.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PolicyProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
