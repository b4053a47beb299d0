"""A policy in its own process: chunk inference off the control process's interpreter.

In one process, the inference thread and the control loop share the GIL: every Python
step between the policy's kernels (an MoE policy runs hundreds of small ones per chunk)
can hold the loop thread past its tick, and the two fight over the cores. Robot stacks
serve the policy from a separate process (LeRobot's async inference, openpi's policy
server); ``PolicyProcess`` does that on one machine: ``python -m policies.control.server``
reads observations on its stdin and writes chunks on its stdout. The control process
waits for a chunk with the GIL released, so its loop thread runs on time, and the policy
computes in an interpreter of its own (whatever the parent's ``__main__``), which the
operating system schedules on whichever core is free.

Nothing is pickled: the child loads the policy from a checkpoint (safetensors and JSON)
the parent wrote, and observations and chunks travel as a JSON header plus raw array
bytes (``pack`` / ``unpack``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

_HEADER = struct.Struct("<I")  # the JSON header's length in bytes
_FRAME = struct.Struct("<4sQ")  # before every message on the pipe: a magic tag and its length
_MAGIC = b"AMPS"
MAX_MESSAGE_BYTES = 1 << 30  # a frame claiming more is a corrupt stream, not a message
_INLINE = (str, int, float, bool, type(None))


def chunk_fn(policy: Any):
    """``obs -> (H, action_dim)`` for a policy with ``predict_action_chunk`` (the VLA);
    ``(obs, prefix, weights)`` inpaints the chunk's start (real-time chunking)."""
    import torch

    def infer(obs: dict[str, Any], prefix: np.ndarray | None = None, weights: np.ndarray | None = None) -> np.ndarray:
        batch = policy.batch_from_observation(obs)
        with torch.inference_mode():
            if prefix is None:
                chunk = policy.predict_action_chunk(batch)
            else:  # real-time chunking: continue the planned actions
                chunk = policy.predict_action_chunk(batch, prefix=prefix, prefix_weights=weights)
        return chunk[0].cpu().numpy()

    return infer


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
            if value.dtype.kind not in "biufc":
                raise TypeError(f"only numeric and bool arrays can be sent, got dtype {value.dtype}")
            arrays.append(np.ascontiguousarray(value))
            return {"array": [value.dtype.str, list(value.shape)]}
        if isinstance(value, (np.bool_, np.integer, np.floating)):
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


# -- the server ----------------------------------------------------------------------


def _read_frame(stream: Any) -> bytes | None:
    """The server's read: one framed message from a blocking binary stream; None when the
    stream ends cleanly before a frame."""
    head = stream.read(_FRAME.size)
    if not head:
        return None
    if len(head) != _FRAME.size:
        raise EOFError("the stream ended inside a frame")
    magic, size = _FRAME.unpack(head)
    if magic != _MAGIC or size > MAX_MESSAGE_BYTES:
        raise ValueError(f"corrupt stream: frame {magic!r} of {size} bytes")
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"the stream ended after {len(data)} of a message's {size} bytes")
    return data


def _write_frame(stream: Any, data: bytes) -> None:
    stream.write(_FRAME.pack(_MAGIC, len(data)) + data)
    stream.flush()


def serve(checkpoint: str, torch_threads: int = 1, seed: int = 0, device: str = "cpu") -> int:
    """The server: load the policy, say ready, then answer every observation read from
    stdin with a chunk on stdout until stdin closes. A failure is answered with its
    traceback (the client raises it); the server keeps serving."""
    # Ctrl-C belongs to the client, which ends the server by closing its stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol gets its own descriptor; anything else written to fd 1 (a print, a C
    # library's message) goes to stderr instead of into the stream.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        import torch

        from policies import from_pretrained

        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        infer = chunk_fn(from_pretrained(checkpoint, device=device))
        _write_frame(out, pack({"ready": True}))
    except Exception:
        _write_frame(out, pack({"error": traceback.format_exc()}))
        return 1
    stream = sys.stdin.buffer
    while (data := _read_frame(stream)) is not None:
        try:
            request = unpack(data)
            chunk = infer(request["obs"], request.get("prefix"), request.get("weights"))
            reply = pack({"chunk": np.asarray(chunk, dtype=np.float32)})
        except Exception:
            reply = pack({"error": traceback.format_exc()})
        _write_frame(out, reply)
    return 0


# -- the client ----------------------------------------------------------------------


class ServedPolicyError(RuntimeError):
    """The served policy raised: its traceback, answered in step (the server keeps serving)."""


class PolicyProcess:
    """``policy``'s chunk inference served by a child process: call it as the loop's chunk
    function, ``obs -> (H, action_dim)`` (with ``prefix, weights`` for real-time chunking).

    The child (``python -m policies.control.server``, in a session of its own, talking over
    its stdin and stdout) loads a copy of the policy as it is now, written to a temporary
    checkpoint (settings such as ``inference_noise_scale`` included), on the policy's
    device, with ``torch_threads`` intra-op threads, its sampling seeded with ``seed``
    (default: torch's current seed here). A call that takes longer than ``call_timeout_s``,
    a child that dies and a corrupt reply all raise ``RuntimeError`` and end the child: a
    broken stream is never read again. Use it as a context manager, or call ``close``."""

    def __init__(
        self,
        policy: Any,
        torch_threads: int = 1,
        seed: int | None = None,
        start_timeout_s: float = 300.0,
        call_timeout_s: float = 60.0,
    ) -> None:
        if not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1:
            raise ValueError(f"torch_threads must be an integer >= 1, got {torch_threads!r}")
        for name, value in (("start_timeout_s", start_timeout_s), ("call_timeout_s", call_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if not hasattr(policy, "save_pretrained") or not hasattr(policy, "predict_action_chunk"):
            raise ValueError(
                f"a {type(policy).__name__} cannot be served: it needs save_pretrained and predict_action_chunk"
            )
        import torch

        self.call_timeout_s = float(call_timeout_s)
        self._dir = Path(tempfile.mkdtemp(prefix="policy-process-"))
        self._proc: subprocess.Popen | None = None
        # One request at a time, each answered in order: a call abandoned by the loop (its
        # episode ended mid-inference) still takes its own reply before the next call sends.
        self._lock = threading.Lock()
        try:
            policy.save_pretrained(self._dir / "policy")
            device = next((str(p.device) for p in policy.parameters()), "cpu")
            seed = torch.initial_seed() if seed is None else int(seed)
            root = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            command = [sys.executable, "-m", "policies.control.server", str(self._dir / "policy")]
            command += ["--torch-threads", str(torch_threads), "--seed", str(seed), "--device", device]
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "bufsize": 0}
            self._proc = subprocess.Popen(command, env=env, start_new_session=True, **pipes)
            with self._lock:
                reply = self._receive(self._proc, start_timeout_s)
            if not reply.get("ready"):
                raise RuntimeError(f"the policy process sent {sorted(reply)} instead of 'ready'")
        except BaseException:
            self.close()
            raise

    def __call__(self, obs: dict[str, Any], prefix: np.ndarray | None = None, weights: np.ndarray | None = None):
        request: dict[str, Any] = {"obs": obs}
        if prefix is not None:
            request["prefix"] = np.asarray(prefix, np.float32)
        if weights is not None:
            request["weights"] = np.asarray(weights, np.float32)
        message = pack(request)
        if not self._lock.acquire(timeout=self.call_timeout_s):
            raise RuntimeError(f"the policy process is still busy with an earlier call after {self.call_timeout_s:g} s")
        try:
            proc = self._proc
            if proc is None:
                raise RuntimeError("this PolicyProcess is closed")
            try:
                self._send(proc, message)
                return self._receive(proc, self.call_timeout_s)["chunk"]
            except ServedPolicyError:  # answered in step: the server goes on
                raise
            except BaseException:  # the stream may be out of step now: never read it again
                self._end(proc)
                raise
        finally:
            self._lock.release()

    @staticmethod
    def _send(proc: subprocess.Popen, data: bytes) -> None:
        view = memoryview(_FRAME.pack(_MAGIC, len(data)) + data)
        try:
            while view:
                view = view[os.write(proc.stdin.fileno(), view) :]
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"the policy process ended (exit code {proc.poll()})") from exc

    @staticmethod
    def _receive(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s

        def read(n: int) -> bytes:
            parts, left = [], n
            while left:
                wait = deadline - time.monotonic()
                try:
                    ready = wait > 0 and select.select([proc.stdout], [], [], wait)[0]
                    part = os.read(proc.stdout.fileno(), min(left, 1 << 20)) if ready else None
                except (OSError, ValueError) as exc:  # closed under us
                    raise RuntimeError("the policy process's pipe was closed") from exc
                if part is None:
                    raise RuntimeError(f"the policy process did not answer within {timeout_s:g} s")
                if not part:
                    raise RuntimeError(f"the policy process ended (exit code {proc.poll()})")
                parts.append(part)
                left -= len(part)
            return b"".join(parts)

        magic, size = _FRAME.unpack(read(_FRAME.size))
        if magic != _MAGIC or size > MAX_MESSAGE_BYTES:
            raise RuntimeError(f"the policy process sent a corrupt frame ({magic!r}, {size} bytes)")
        reply = unpack(read(size))
        if "error" in reply:
            raise ServedPolicyError(f"the policy process failed:\n{reply['error']}")
        return reply

    def _end(self, proc: subprocess.Popen) -> None:
        """Stop ``proc`` for good (its stdin closed, then killed if it lingers)."""
        if self._proc is proc:
            self._proc = None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the child (it ends when its stdin closes; killed if it does not within 5 s)
        and delete the temporary checkpoint. A call still in flight ends with an error."""
        proc = self._proc
        if proc is not None:
            self._end(proc)  # a reader blocked on its pipe sees the end of the stream
            if self._lock.acquire(timeout=1.0):  # nobody reads the pipe any more: close it
                try:
                    proc.stdout.close()
                finally:
                    self._lock.release()
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
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    raise SystemExit(serve(args.checkpoint, args.torch_threads, args.seed, args.device))
