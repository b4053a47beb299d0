"""Clocks and inference executors for the control loop.

``RealClock`` is ``time.monotonic`` with a sleep that wakes on time (coarse sleep, then a
short yield-spin). ``SimClock`` is virtual time for fast-forward runs and tests: sleeping
advances it instantly, and work run "detached" (an inference) accumulates its own
virtual duration without moving the loop's time.

An executor runs one inference at a time beside the loop: ``ThreadExecutor`` in a
background daemon thread on the real clock (closing it never waits for a hung one);
``SimExecutor`` runs it on submission and makes the result available at ``submit time +
its virtual duration`` on a ``SimClock``. Either way the loop only ever polls: a tick
never waits for inference.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any


class RealClock:
    """Monotonic wall-clock time in seconds."""

    spin_s = 0.0015  # the last stretch before a deadline is a yield-spin, not a sleep

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > self.spin_s:
            time.sleep(remaining - self.spin_s)
        while time.monotonic() < deadline:
            time.sleep(0)  # releases the GIL to the inference thread while spinning


class SimClock:
    """Virtual time: ``sleep`` advances it at once; inside :meth:`detached` (an inference
    run by :class:`SimExecutor`) sleeps add to that work's own duration instead."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._local = threading.local()

    def now(self) -> float:
        return self._now + getattr(self._local, "elapsed", 0.0)

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if getattr(self._local, "detached", False):
            self._local.elapsed += seconds
        else:
            self._now += seconds

    def sleep_until(self, deadline: float) -> None:
        self.sleep(deadline - self.now())

    def advance(self, seconds: float) -> None:
        self.sleep(seconds)

    @contextmanager
    def detached(self):
        """Run work whose virtual duration is measured, not spent on the loop's time."""
        self._local.detached, self._local.elapsed = True, 0.0
        try:
            yield self._local
        finally:
            self._local.detached = False

    def take_elapsed(self) -> float:
        elapsed, self._local.elapsed = getattr(self._local, "elapsed", 0.0), 0.0
        return elapsed


class Job:
    """One inference: ``fn()`` submitted at ``submitted`` (clock time), done at ``finished``."""

    def __init__(self, submitted: float, payload: Any = None) -> None:
        self.submitted = submitted
        self.payload = payload
        self.finished: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None


class ThreadExecutor:
    """One background thread; ``poll`` returns the finished job, if any, without waiting."""

    def __init__(self, clock: RealClock, switch_interval: float | None = 1e-3, torch_threads: int | None = 1) -> None:
        self.clock = clock
        self._saved_threads = None
        if torch_threads is not None:
            import torch

            # Measured on 2 cores: a chunk of the small AdaMoE VLA takes ~85 ms on the main
            # thread, ~190 ms on a worker thread with 2 intra-op threads (its OpenMP team
            # fights the main thread's), ~66 ms on a worker with 1.
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(torch_threads)
        self._job: Job | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._saved_interval = sys.getswitchinterval()
        if switch_interval is not None:
            # The loop thread must get the GIL back within a fraction of a tick while the
            # inference thread runs Python between its kernels (default: 5 ms).
            sys.setswitchinterval(switch_interval)

    @property
    def busy(self) -> bool:
        return self._job is not None

    def submit(self, fn: Callable[[], Any], payload: Any = None) -> Job:
        if self._job is not None:
            raise RuntimeError("an inference is already running")
        job, done = Job(self.clock.now(), payload), threading.Event()

        def run() -> None:
            try:
                job.result = fn()
            except BaseException as exc:  # reported to the loop, which stops safely
                job.error = exc
            job.finished = self.clock.now()
            done.set()

        # A daemon thread: an inference that never returns cannot keep the process alive.
        self._thread = threading.Thread(target=run, name="inference", daemon=True)
        self._thread.start()
        self._job, self._done = job, done
        return job

    def poll(self) -> Job | None:
        if self._job is None or not self._done.is_set():
            return None
        job, self._job = self._job, None
        return job

    def close(self, wait_s: float = 0.1) -> None:
        """Wait up to ``wait_s`` for a running inference to finish, then stop tracking it
        (a hung one is abandoned to its daemon thread), and restore the interpreter's settings."""
        if self._job is not None and self._thread is not None:
            self._thread.join(timeout=wait_s)
        self._job = None
        sys.setswitchinterval(self._saved_interval)
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)


class SimExecutor:
    """Runs the inference at submission on a :class:`SimClock`; the result becomes
    available once the clock reaches ``submitted + the inference's virtual duration``."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self._job: Job | None = None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def submit(self, fn: Callable[[], Any], payload: Any = None) -> Job:
        if self._job is not None:
            raise RuntimeError("an inference is already running")
        job = Job(self.clock.now(), payload)
        with self.clock.detached():
            try:
                job.result = fn()
            except BaseException as exc:
                job.error = exc
            job.finished = job.submitted + self.clock.take_elapsed()
        self._job = job
        return job

    def poll(self) -> Job | None:
        if self._job is None or self._job.finished > self.clock.now():
            return None
        job, self._job = self._job, None
        return job

    def close(self, wait_s: float = 0.0) -> None:
        self._job = None


def make_executor(clock: RealClock | SimClock) -> ThreadExecutor | SimExecutor:
    return SimExecutor(clock) if isinstance(clock, SimClock) else ThreadExecutor(clock)
