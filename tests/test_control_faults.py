"""The control loop's fault paths: every fault ends in the same safe stop (hold, then zero
motion) with its reason in the summary, in both modes, and ``run()`` returns on time
whatever the inference worker does."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from policies.control import ControlConfig, ControlLoop, RealClock, SimClock
from tests.test_control import PERIOD, FakePolicy, FakeRobot

MOTION = (0, 1, 2)  # the gripper (dim 3) keeps its command in a safe stop


def _config(mode: str, **overrides) -> ControlConfig:
    settings = dict(rate_hz=1 / PERIOD, mode=mode, max_ticks=400, threshold=5, stop_hold_ticks=3, motion_dims=MOTION)
    return ControlConfig(**{**settings, **overrides})


def _assert_safe_stop(robot: FakeRobot, summary: dict, reason: str, hold: int = 3) -> None:
    assert summary["safe_stop"] and summary["stop_reason"] == reason, summary["error"]
    assert summary["ticks"] < 400  # the run ended early
    assert all(np.isfinite(c).all() for c in robot.commands)  # nothing non-finite reached the robot
    held, final = robot.commands[-hold - 1 : -1], robot.commands[-1]
    assert all(np.array_equal(c, held[0]) for c in held)  # held for stop_hold_ticks ticks
    np.testing.assert_array_equal(final[list(MOTION)], 0.0)  # then zero motion
    assert final[3] == held[0][3]


class ScriptedPolicy(FakePolicy):
    """A fake policy whose calls listed in ``bad`` return ``bad[call]`` instead of a chunk."""

    def __init__(self, clock, bad: dict[int, np.ndarray], latency: float = 1.5 * PERIOD) -> None:
        super().__init__(clock, latency)
        self.bad = bad

    def __call__(self, obs):
        chunk = super().__call__(obs)
        return self.bad.get(self.calls, chunk)


NAN_CHUNK = np.full((10, 4), np.nan, np.float32)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_non_finite_chunks_are_discarded_counted_and_stop_the_robot_after_max_bad_chunks_in_a_row(mode):
    clock = SimClock()
    robot = FakeRobot(clock)
    policy = ScriptedPolicy(clock, {c: NAN_CHUNK for c in range(3, 100)})
    result = ControlLoop(robot, policy, _config(mode, max_bad_chunks=3), clock).run()
    s = result.summary
    _assert_safe_stop(robot, s, "nonfinite_chunks")
    assert s["nonfinite_chunks"] == 3 and "3 chunks in a row held NaN or inf" in s["error"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_single_non_finite_chunk_is_discarded_and_the_run_goes_on(mode):
    clock = SimClock()
    robot = FakeRobot(clock)
    inf_chunk = np.full((10, 4), np.inf, np.float32)
    result = ControlLoop(robot, ScriptedPolicy(clock, {3: inf_chunk}), _config(mode, max_ticks=100), clock).run()
    s = result.summary
    assert not s["safe_stop"] and s["stop_reason"] is None and s["nonfinite_chunks"] == 1
    assert s["ticks"] + s["deadline_misses"] >= 100
    assert all(np.isfinite(c).all() for c in robot.commands)
    assert not any(np.allclose(c, 0.03) for c in robot.commands)  # chunk 3 never reached the robot


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_chunk_of_the_wrong_shape_stops_the_robot_safely_in_both_modes(mode):
    clock = SimClock()
    robot = FakeRobot(clock)
    policy = ScriptedPolicy(clock, {3: np.zeros((10, 7), np.float32)})
    result = ControlLoop(robot, policy, _config(mode), clock).run()
    _assert_safe_stop(robot, result.summary, "bad_chunk")
    assert "(H, 4)" in result.summary["error"] and "(10, 7)" in result.summary["error"]


def test_the_watchdog_stops_a_hung_async_inference_within_its_configured_time():
    clock = SimClock()
    robot = FakeRobot(clock)

    class Hangs(FakePolicy):
        def __call__(self, obs):
            chunk = super().__call__(obs)
            if self.calls >= 3:
                self.clock.sleep(3600.0)  # an inference that does not come back for an hour
            return chunk

    watchdog = 0.3
    result = ControlLoop(robot, Hangs(clock, PERIOD), _config("async", watchdog_s=watchdog), clock).run()
    s = result.summary
    _assert_safe_stop(robot, s, "watchdog")
    assert "watchdog: 0.300 s" in s["error"]
    # The last good chunk (call 2) arrived by tick ~15; the stop starts within the watchdog
    # time after it (plus one tick of resolution) and ends stop_hold_ticks later.
    chunk_finished = result.telemetry.chunk_array("finished")
    stop_started = s["ticks"] - 1 - 3
    assert stop_started * PERIOD <= chunk_finished[-1] + watchdog + PERIOD
    assert s["ticks"] < 40


def test_the_default_watchdog_is_four_chunk_lengths():
    cfg = ControlConfig(rate_hz=50)
    assert cfg.watchdog(10) == pytest.approx(4 * 10 * 0.02)
    assert cfg.watchdog(None) == cfg.first_chunk_s  # no chunk seen yet: the cold-start allowance
    assert ControlConfig(rate_hz=50, watchdog_s=0.5).watchdog(10) == 0.5


def test_a_real_clock_run_returns_on_time_while_the_policy_hangs():
    release = threading.Event()

    def hangs(obs):
        release.wait()  # never returns during the run
        return np.zeros((10, 4), np.float32)

    clock = RealClock()
    robot = FakeRobot(clock)
    cfg = _config("async", max_ticks=1000, prime=False, first_chunk_s=0.2)
    began = time.monotonic()
    try:
        result = ControlLoop(robot, hangs, cfg, clock).run()
    finally:
        release.set()
    wall = time.monotonic() - began
    assert wall < 1.5, f"run() took {wall:.2f} s"  # 0.2 s watchdog + 3 held ticks + a zero-motion tick
    assert result.summary["stop_reason"] == "watchdog"
    np.testing.assert_array_equal(robot.commands[-1][list(MOTION)], 0.0)


def test_a_first_inference_that_hangs_is_a_clear_error_before_the_robot_moves():
    release = threading.Event()

    def hangs(obs):
        release.wait()
        return np.zeros((10, 4), np.float32)

    clock = RealClock()
    robot = FakeRobot(clock)
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"first_chunk_s=0.2"):
            ControlLoop(robot, hangs, _config("async", first_chunk_s=0.2), clock).run()
    finally:
        release.set()
    assert time.monotonic() - began < 1.5
    assert robot.commands == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_robot_that_raises_on_act_ends_the_run_with_a_reported_safe_stop(mode):
    clock = SimClock()

    class Faulty(FakeRobot):
        def act(self, action):
            if len(self.commands) == 20:
                self.commands.append(None)  # the refused command
                raise OSError("joint 2 controller offline")
            super().act(action)

    robot = Faulty(clock)
    result = ControlLoop(robot, FakePolicy(clock, PERIOD), _config(mode), clock).run()
    s = result.summary
    assert s["safe_stop"] and s["stop_reason"] == "robot_error"
    assert "robot.act raised OSError: joint 2 controller offline" in s["error"]
    np.testing.assert_array_equal(robot.commands[-1][list(MOTION)], 0.0)  # the one zero-motion command
    assert s["ticks"] == 21


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_request_stop_stops_the_robot_safely_at_the_next_tick(mode):
    clock = SimClock()
    robot = FakeRobot(clock)
    loop = ControlLoop(robot, FakePolicy(clock, PERIOD), _config(mode), clock)

    def callback(ticks: int) -> None:
        if ticks == 30:
            loop.request_stop()

    result = loop.run(callback=callback)
    _assert_safe_stop(robot, result.summary, "stop_requested")
    assert result.summary["ticks"] == 30 + 3 + 1
    assert not loop.run().summary["safe_stop"]  # a new run starts afresh


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stop_hold_ticks", -1),
        ("max_bad_chunks", 0),
        ("watchdog_s", 0.0),
        ("watchdog_s", float("nan")),
        ("rate_hz", float("nan")),
        ("max_ticks", True),
        ("first_chunk_s", "1"),
    ],
)
def test_bad_control_settings_name_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=field):
        ControlConfig(**{field: value}).validate()


def test_ctrl_c_during_a_real_clock_run_is_a_safe_stop_not_a_traceback():
    import os
    import signal

    from policies.control import stop_on_interrupt

    clock = RealClock()
    robot = FakeRobot(clock)
    loop = ControlLoop(robot, lambda obs: np.zeros((10, 4), np.float32), _config("async", max_ticks=1000), clock)
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
    previous = signal.getsignal(signal.SIGINT)
    with stop_on_interrupt(loop):
        timer.start()
        result = loop.run()
    timer.join()
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is restored
    _assert_safe_stop(robot, result.summary, "stop_requested")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stop_that_reaches_max_ticks_while_holding_still_ends_in_zero_motion(mode):
    clock = SimClock()
    robot = FakeRobot(clock)
    loop = ControlLoop(robot, FakePolicy(clock, PERIOD), _config(mode, max_ticks=100, stop_hold_ticks=5), clock)
    result = loop.run(callback=lambda ticks: loop.request_stop() if ticks == 80 else None)
    assert result.summary["stop_reason"] == "stop_requested"
    np.testing.assert_array_equal(robot.commands[-1][list(MOTION)], 0.0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_chunk_numpy_cannot_read_and_a_failing_robot_observe_are_safe_stops(mode):
    import torch

    clock = SimClock()
    robot = FakeRobot(clock)
    grad = torch.zeros(10, 4, requires_grad=True)
    result = ControlLoop(robot, ScriptedPolicy(clock, {3: grad}), _config(mode), clock).run()
    assert result.summary["stop_reason"] == "bad_chunk"
    np.testing.assert_array_equal(robot.commands[-1][list(MOTION)], 0.0)

    class Blind(FakeRobot):
        def observe(self):
            if len(self.commands) == 10:
                raise OSError("camera unplugged")
            return super().observe()

    blind = Blind(clock)
    result = ControlLoop(blind, FakePolicy(clock, PERIOD), _config(mode), clock).run()
    assert result.summary["stop_reason"] == "loop_error" and "camera unplugged" in result.summary["error"]
    np.testing.assert_array_equal(blind.commands[-1][list(MOTION)], 0.0)


def test_motion_dims_outside_the_action_are_refused_up_front():
    clock = SimClock()
    with pytest.raises(ValueError, match=r"motion_dims=\(0, 7\)"):
        ControlLoop(FakeRobot(clock), FakePolicy(clock, PERIOD), _config("sync", motion_dims=(0, 7)), clock)
