"""The real-time control loop, on virtual time with fake policies of a set latency (and a
short real-clock run): async hides latency, sync misses deadlines, merge rules, safety,
telemetry and bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from policies.control import (
    ActionPlan,
    ControlConfig,
    ControlLoop,
    MujocoRobot,
    RealClock,
    SafetyFilter,
    SimClock,
)

PERIOD = 0.02  # 50 Hz


class FakeRobot:
    """Records every command; observations carry the clock time."""

    def __init__(self, clock, dim: int = 4) -> None:
        self.clock = clock
        self.action_space = gym.spaces.Box(-1.0, 1.0, (dim,), np.float32)
        self.commands: list[np.ndarray] = []
        self.done = False

    def reset(self, seed=None):
        self.commands.clear()
        return self.observe()

    def observe(self):
        return {"time": np.array([self.clock.now()])}

    def act(self, action):
        self.commands.append(np.asarray(action).copy())

    def render(self):
        return None


class FakePolicy:
    """Takes ``latency`` seconds of (virtual) time; chunk ``c`` holds ``0.01 * c`` everywhere,
    so a command tells which chunk it came from; raises on call ``fail_on`` if set."""

    def __init__(self, clock, latency: float, horizon: int = 10, dim: int = 4, fail_on: int | None = None) -> None:
        self.clock, self.latency, self.horizon, self.dim, self.fail_on = clock, latency, horizon, dim, fail_on
        self.calls = 0

    def __call__(self, obs):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("inference failed (injected)")
        self.clock.sleep(self.latency)
        return np.full((self.horizon, self.dim), 0.01 * self.calls, dtype=np.float32)


def _run(latency_ticks: float, mode: str, ticks: int = 600, **config):
    clock = SimClock()
    robot = FakeRobot(clock)
    policy = FakePolicy(clock, latency_ticks * PERIOD)
    cfg = ControlConfig(rate_hz=1 / PERIOD, mode=mode, max_ticks=ticks, **config)
    result = ControlLoop(robot, policy, cfg, clock).run()
    return result, robot, policy


@pytest.mark.parametrize("latency_ticks", [0.3, 2.5, 4.9])
def test_async_hides_latency_shorter_than_the_executed_part_of_a_chunk(latency_ticks):
    result, robot, _ = _run(latency_ticks, "async", threshold=5)  # chunks of 10: 5 executed while the next infers
    s = result.summary
    assert s["starved_ticks"] == 0 and s["deadline_misses"] == 0
    assert s["ticks"] == 600 and len(robot.commands) == 600
    assert s["chunks"] >= 600 // 10
    assert s["inference_latency_ms"]["median"] == pytest.approx(1e3 * latency_ticks * PERIOD)
    assert s["jitter_ms"]["max"] < 1e-6  # virtual time: every tick exactly on schedule


def test_async_starves_only_when_latency_exceeds_what_is_planned_ahead():
    result, _, _ = _run(7.5, "async", threshold=5)
    assert result.summary["starved_ticks"] > 0
    assert result.summary["deadline_misses"] == 0  # starving holds the last action; the tick is still on time
    assert result.summary["dropped_actions"] > 0  # actions whose tick passed during inference


def test_sync_mode_stalls_and_misses_deadlines_where_async_does_not():
    sync, _, _ = _run(2.5, "sync", n_action_steps=5)
    asyn, _, _ = _run(2.5, "async", threshold=5)
    assert sync.summary["deadline_misses"] >= 2 * (sync.summary["chunks"] - 1)  # 2.5 ticks of stall per chunk
    assert asyn.summary["deadline_misses"] == 0
    assert sync.summary["jitter_ms"]["max"] > 0.2 * 1e3 * PERIOD


def test_actions_whose_tick_passed_during_inference_are_dropped():
    # Latency 3.2 ticks: a chunk computed from tick k arrives at tick k + 4, so its actions
    # for ticks k .. k + 3 are dropped and the robot executes chunk[4] at tick k + 4.
    result, robot, _ = _run(3.2, "async", ticks=200, threshold=6)
    tel = result.telemetry
    assert (tel.chunk_array("dropped")[1:] == 4).all()
    assert np.nanmin(tel.tick_array("age")[10:]) >= 4  # after the first (primed) chunk


def test_merge_rules_on_hand_made_chunks():
    old, new = np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32)
    for rule, expected in (("latest", 1.0), ("average", 0.25)):
        plan = ActionPlan(rule, average_weight=0.25)
        plan.merge(old, start_tick=10, obs_tick=10, now_tick=10)
        dropped = plan.merge(new, start_tick=12, obs_tick=12, now_tick=13)  # tick 12 already passed
        assert dropped == 1
        assert plan.pop(11)[0].tolist() == [0.0, 0.0]
        action, obs_tick = plan.pop(13)
        np.testing.assert_allclose(action, expected)
        assert obs_tick == 12
        assert plan.pop(15)[0].tolist() == [1.0, 1.0]  # beyond the old chunk: the new one alone
        assert len(plan) == 0
    plan = ActionPlan("temporal_ensemble", ensemble_m=0.5)
    for i, value in enumerate((0.0, 1.0, 2.0)):
        plan.merge(np.full((5, 1), value, np.float32), start_tick=i, obs_tick=i, now_tick=i)
    w = np.exp(-0.5 * np.arange(3))  # ACT: the oldest prediction weighs most
    np.testing.assert_allclose(plan.pop(2)[0], [(w * [0.0, 1.0, 2.0]).sum() / w.sum()], rtol=1e-6)
    assert plan.depth(3) == 4  # ticks 3 .. 6
    with pytest.raises(ValueError, match="merge rule 'newest'"):
        ActionPlan("newest")


def test_an_inference_exception_stops_the_robot_safely_and_is_reported():
    clock = SimClock()
    robot = FakeRobot(clock)
    policy = FakePolicy(clock, 1.5 * PERIOD, fail_on=3)
    cfg = ControlConfig(rate_hz=50, mode="async", max_ticks=500, threshold=5, stop_hold_ticks=4, motion_dims=(0, 1, 2))
    result = ControlLoop(robot, policy, cfg, clock).run()
    s = result.summary
    assert s["safe_stop"] and "inference failed (injected)" in s["error"]
    assert s["ticks"] < 500  # the loop ended
    held, final = robot.commands[-5:-1], robot.commands[-1]
    assert all(np.array_equal(c, held[0]) for c in held)  # held for stop_hold_ticks ticks
    np.testing.assert_array_equal(final[:3], 0.0)  # then zero motion
    assert final[3] == held[0][3]  # the gripper keeps its command (nothing is dropped)
    sync = ControlLoop(
        FakeRobot(clock), FakePolicy(clock, PERIOD / 2, fail_on=2), ControlConfig(mode="sync", max_ticks=500), clock
    ).run()
    assert sync.summary["safe_stop"] and sync.summary["ticks"] < 500


def test_safety_clamps_to_the_action_space_and_the_largest_change_per_tick():
    safety = SafetyFilter(np.full(3, -1.0), np.full(3, 1.0), max_delta=0.1)
    out = safety(np.array([5.0, -0.05, np.nan]), previous=np.array([0.95, 0.0, 0.3]))
    np.testing.assert_allclose(out, [1.0, -0.05, 0.3])
    np.testing.assert_allclose(safety(np.array([-1.0, 0.5, 0.3]), np.zeros(3)), [-0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="shape"):
        safety(np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError, match="mode='fast'"):
        ControlConfig(mode="fast").validate()
    with pytest.raises(ValueError, match="rate_hz"):
        ControlConfig(rate_hz=0.5).validate()


def test_twenty_thousand_fast_forward_ticks_do_not_grow_memory():
    clock = SimClock()
    robot = FakeRobot(clock)
    robot.act = lambda action: None  # keep no history in the fake robot itself
    samples = {}

    def probe(tick: int) -> None:
        if tick in (2_000, 20_000):
            samples[tick] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        cfg = ControlConfig(rate_hz=50, mode="async", max_ticks=20_000, threshold=5, merge="temporal_ensemble")
        result = ControlLoop(robot, FakePolicy(clock, 2.5 * PERIOD), cfg, clock).run(callback=probe)
    finally:
        tracemalloc.stop()
    assert result.summary["ticks"] == 20_000 and result.summary["starved_ticks"] == 0
    assert samples[20_000] - samples[2_000] < 64 * 1024, samples


def test_summary_json_timeline_png_and_telemetry_are_written(tmp_path):
    result, _, _ = _run(2.5, "async", ticks=300, threshold=5)
    result.save(tmp_path, ControlConfig())
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["summary"]["ticks"] == 300 and "jitter_ms" in data["summary"]
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    arrays = np.load(tmp_path / "telemetry.npz")
    assert len(arrays["tick_actual"]) == 300


def test_the_mujoco_robot_keeps_moving_with_the_clock_while_the_policy_is_silent():
    clock = SimClock()
    robot = MujocoRobot(gym.make("adamoe/Tabletop-ReachRed-v0", cameras=()), clock)
    assert robot.dt == pytest.approx(0.02)
    robot.reset(seed=0)
    start = robot.observe()["agent_pos"].copy()
    robot.act(np.array([1.0, 0.0, 0.0, -1.0]))
    clock.sleep(5 * robot.dt)  # five control steps pass without a new command
    moved = robot.observe()["agent_pos"]
    assert robot.steps == 5
    assert moved[0] > start[0] + 0.01  # the held command kept the hand moving
    robot.close()


class _HandClock:
    """Time that moves only when the test sets it."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class _StepLog(gym.Wrapper):
    """Records the action of every env step."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.actions: list[np.ndarray] = []

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        return self.env.step(action)


@pytest.mark.parametrize("first_tick_s", [0.0, 0.013, 0.0195])
def test_an_aligned_robot_steps_on_the_ticks_as_offline_evaluation_does(first_tick_s):
    """However long the first inference took, tick k observes the state after exactly k
    steps, and the command it sends (a little later in the tick) drives step k: observation,
    action, step, as offline. Unaligned, a step boundary that falls between a tick's
    observation and its command shifts every command by a step."""
    rng = np.random.default_rng(0)
    clock = _HandClock()
    log = _StepLog(gym.make("adamoe/Tabletop-ReachRed-v0", cameras=()))
    robot = MujocoRobot(log, clock)
    robot.reset(seed=0)
    clock.t = first_tick_s
    robot.align(first_tick_s)
    commands = []
    for k in range(25):
        clock.t = first_tick_s + k * PERIOD + rng.uniform(0, 3e-4)  # the tick fires a little late
        robot.observe()
        assert robot.steps == k
        clock.t += 0.0015  # the tick's own work before it commands
        commands.append(rng.uniform(-1, 1, 4).astype(np.float32))
        robot.act(commands[-1])
    np.testing.assert_array_equal(np.stack(log.actions), np.stack(commands[:24]))
    with pytest.raises(ValueError, match="finite"):
        robot.align(float("nan"))
    robot.close()


def test_the_loop_aligns_a_simulated_robot_with_its_first_tick():
    clock = SimClock()
    robot = MujocoRobot(gym.make("adamoe/Tabletop-ReachRed-v0", cameras=()), clock)
    aligned = []
    original = robot.align
    robot.align = lambda t0: (aligned.append(t0), original(t0))[1]
    policy = FakePolicy(clock, latency=0.013)  # the first chunk takes 13 ms before tick 0
    result = ControlLoop(robot, policy, ControlConfig(rate_hz=50, mode="async", max_ticks=30), clock).run(seed=0)
    assert aligned == [pytest.approx(0.013)]
    assert result.summary["ticks"] == 30 and robot.steps == 29  # tick k saw k steps; the last command is pending
    robot.close()


def test_a_real_clock_run_uses_a_background_worker_and_keeps_its_schedule():
    import time

    clock = RealClock()
    robot = FakeRobot(clock)

    def slow(obs):
        time.sleep(0.01)
        return np.zeros((10, 4), np.float32)

    result = ControlLoop(robot, slow, ControlConfig(rate_hz=50, mode="async", max_ticks=40, threshold=5), clock).run()
    s = result.summary
    assert s["ticks"] + s["deadline_misses"] >= 40 and s["chunks"] >= 4
    assert s["inference_latency_ms"]["median"] >= 10.0
    scheduled = result.telemetry.tick_array("scheduled")
    assert np.allclose(np.diff(scheduled) % 0.02, 0.0, atol=1e-9) or np.allclose(np.diff(scheduled), 0.02)


def test_control_command_runs_a_checkpoint_in_real_time_and_reports(tmp_path):
    import json

    import torch

    from policies import VLAPolicy, vla_config
    from tests.conftest import run_script

    torch.manual_seed(0)
    policy = VLAPolicy(vla_config("tiny"))
    policy.upcycle(init="paper")
    policy.save_pretrained(tmp_path / "adamoe")
    args = ["--checkpoint", tmp_path / "adamoe", "--task", "ReachRed", "--seconds", "1"]
    proc = run_script("control.py", *args, "--output-dir", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["summary"]
    assert summary["ticks"] + summary["deadline_misses"] == 50
    assert summary["chunks"] >= 2 and "success" in summary
    assert (tmp_path / "run" / "timeline.png").is_file() and "summary.json" in proc.stdout


def _tiny_policy(seed: int = 0, moe: bool = False):
    import torch

    from policies import VLAPolicy, vla_config

    torch.manual_seed(seed)
    policy = VLAPolicy(vla_config("tiny"))
    if moe:
        policy.upcycle(init="paper")
    return policy.eval()


@pytest.mark.filterwarnings("ignore:this policy's state/action normalisation statistics were never set")
def test_suite_rollouts_run_on_the_scenes_offline_evaluation_uses_and_pair_with_it():
    from policies.control.report import compare
    from policies.control.runner import run_episodes
    from policies.evaluation import EvalConfig, evaluate

    policy = _tiny_policy()
    tasks = ["adamoe/Tabletop-ReachRed-v0", "adamoe/Tabletop-PickBlue-v0"]
    config = ControlConfig(rate_hz=50, mode="async")
    realtime = run_episodes(policy, tasks, 2, config, clock=SimClock, max_episode_steps=12, progress=False)
    seeds = [(e["task"], e["seed"]) for e in realtime["per_episode"]]
    assert seeds == [("ReachRed", 100_000), ("ReachRed", 100_001), ("PickBlue", 101_000), ("PickBlue", 101_001)]
    assert all(e["robot_steps"] == 12 and e["stop_reason"] is None for e in realtime["per_episode"])
    timing = realtime["aggregated"]
    assert timing["ticks"] == sum(e["ticks"] for e in realtime["per_episode"]) > 0
    assert timing["starved_fraction"] == timing["starved_ticks"] / timing["ticks"]
    offline = evaluate(policy, tasks, EvalConfig(episodes_per_task=2, videos_per_task=0), progress=False)
    pair = compare(offline, realtime)
    assert pair["offline"]["episodes"] == pair["realtime"]["episodes"] == 4
    assert pair["difference"]["mean"] == pytest.approx(pair["realtime"]["success"] - pair["offline"]["success"])
    assert set(pair["per_task"]) == {"ReachRed", "PickBlue"}
    with pytest.raises(ValueError, match="no offline episode on the same scene"):
        compare(
            evaluate(policy, tasks[:1], EvalConfig(episodes_per_task=2, videos_per_task=0), progress=False), realtime
        )


def test_the_paired_difference_is_significant_only_when_its_interval_excludes_zero():
    from policies.control.report import compare

    offline = {"per_episode": [{"task": "T", "seed": i, "success": True} for i in range(60)]}
    worse = {"per_episode": [{"task": "T", "seed": i, "success": i % 2 == 0} for i in range(60)], "aggregated": {}}
    same = {"per_episode": [{"task": "T", "seed": i, "success": True} for i in range(60)], "aggregated": {}}
    drop = compare(offline, worse)["difference"]
    assert drop["mean"] == pytest.approx(-0.5) and drop["high"] < 0 and drop["significant"]
    assert not compare(offline, same)["difference"]["significant"]


def test_control_command_compares_checkpoints_in_real_time_with_offline_on_a_suite(tmp_path):
    from tests.conftest import run_script

    _tiny_policy().save_pretrained(tmp_path / "dense")
    _tiny_policy(moe=True).save_pretrained(tmp_path / "adamoe")
    args = ["--checkpoint", tmp_path / "dense", tmp_path / "adamoe", "--suite", "adamoe/Tabletop-ReachRed-v0"]
    sampler = ["--noise-scale", "0", "--inference-steps", "2", "--moe-backend", "loop"]  # both runs sample so
    proc = run_script("control.py", *args, *sampler, "--episodes", "1", "--output-dir", tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["policies"]) == ["dense", "adamoe"]
    for name, row in results["policies"].items():
        backend = {"dense": None, "adamoe": "loop"}[name]
        assert row["sampling"] == {"inference_noise_scale": 0.0, "num_inference_steps": 2, "moe_backend": backend}
        assert row["offline"]["episodes"] == row["realtime"]["episodes"] == 1
        assert row["timing"]["ticks"] > 0 and row["timing"]["jitter_p99_ms"] >= 0
        assert (tmp_path / "run" / name / "offline" / "eval_info.json").is_file()
        assert (tmp_path / "run" / name / "realtime.json").is_file()
    assert "| dense | 1 |" in proc.stdout and "| adamoe | 1 |" in proc.stdout
    bad = run_script("control.py", *args, "--episodes", "0", check=False)
    assert bad.returncode == 2 and "--episodes must be >= 1, got 0" in bad.stderr


@pytest.mark.filterwarnings("ignore:this policy's state/action normalisation statistics were never set")
def test_a_simulated_latency_runs_on_virtual_time_with_every_inference_taking_that_long():
    from policies.control.runner import run_episodes

    policy = _tiny_policy()
    config = ControlConfig(rate_hz=50, mode="async", threshold=8)
    run = run_episodes(
        policy, "adamoe/Tabletop-ReachRed-v0", 1, config, max_episode_steps=20, simulated_latency_s=0.06, progress=False
    )
    timing = run["aggregated"]
    assert timing["inference_latency_ms"]["median"] == pytest.approx(60.0)
    assert timing["deadline_misses"] == 0 and run["per_episode"][0]["robot_steps"] == 20
    with pytest.raises(ValueError, match="simulated_latency_s must be in"):
        run_episodes(policy, "adamoe/Tabletop-ReachRed-v0", 1, config, simulated_latency_s=-1.0)


def test_inpainting_weights_hold_the_committed_actions_and_decay_over_the_rest_of_the_plan():
    from policies.control.plan import inpainting_weights

    w = inpainting_weights(8, 3)
    assert w.shape == (8,) and (w[:3] == 1.0).all()
    assert (np.diff(w[3:]) < 0).all() and 0.0 < w[-1] < w[3] <= 1.0
    assert (inpainting_weights(4, 9) == 1.0).all()  # more committed than planned: all held


def test_the_plan_reads_the_actions_planned_ahead_without_consuming_them():
    plan = ActionPlan("latest")
    plan.merge(np.arange(12, dtype=np.float32).reshape(6, 2), start_tick=4, obs_tick=4, now_tick=4)
    ahead = plan.planned(5, limit=3)
    assert np.array_equal(ahead, [[2, 3], [4, 5], [6, 7]]) and plan.depth(4) == 6
    assert plan.planned(20, limit=3).shape == (0, 0)


@pytest.mark.filterwarnings("ignore:this policy's state/action normalisation statistics were never set")
def test_an_inpainted_chunk_ends_on_a_fully_weighted_prefix_and_stays_free_where_unweighted():
    import torch

    policy = _tiny_policy()
    obs = {
        "agent_pos": np.zeros(4, np.float32),
        "environment_state": np.zeros(25, np.float32),
        "instruction": "pick up the red cube",
        "pixels": {c: np.zeros((policy.config.image_size,) * 2 + (3,), np.uint8) for c in policy.config.cameras},
    }
    batch = policy.batch_from_observation(obs)
    noise = torch.randn(1, policy.config.chunk_size, policy.config.action_dim)
    free = policy.predict_action_chunk(batch, noise=noise)
    prefix = np.full((3, policy.config.action_dim), 0.5, np.float32)
    held = policy.predict_action_chunk(batch, noise=noise, prefix=prefix, prefix_weights=[1.0, 1.0, 1.0])
    assert torch.allclose(held[0, :3], torch.as_tensor(prefix), atol=1e-5)
    unweighted = policy.predict_action_chunk(batch, noise=noise, prefix=prefix, prefix_weights=[0.0, 0.0, 0.0])
    assert torch.allclose(unweighted, free, atol=1e-6)
    with pytest.raises(ValueError, match="prefix_weights must be 3 numbers in"):
        policy.predict_action_chunk(batch, prefix=prefix, prefix_weights=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="prefix must be"):
        policy.predict_action_chunk(batch, prefix=np.zeros((99, policy.config.action_dim), np.float32))


def test_an_inpainting_loop_hands_the_planned_actions_to_the_chunk_function():
    clock = SimClock()
    robot = FakeRobot(clock)
    seen = []

    def chunk(obs, prefix=None, weights=None):
        seen.append(None if prefix is None else (len(prefix), weights.copy()))
        clock.sleep(2 * PERIOD)
        return np.zeros((10, 4), np.float32)

    cfg = ControlConfig(rate_hz=1 / PERIOD, mode="async", threshold=8, inpaint=True, max_ticks=40)
    ControlLoop(robot, chunk, cfg, clock).run()
    assert seen[0] is None  # the first chunk has nothing to continue
    planned, weights = seen[-1]
    assert planned == 8 and (weights[:2] == 1.0).all() and weights[-1] < 1.0


@pytest.mark.filterwarnings("ignore:this policy's state/action normalisation statistics were never set")
def test_a_synchronous_suite_run_executes_as_many_actions_per_chunk_as_offline_evaluation():
    from policies.control.runner import run_episodes

    policy = _tiny_policy()
    steps = policy.config.n_action_steps
    run = run_episodes(
        policy,
        "adamoe/Tabletop-ReachRed-v0",
        1,
        ControlConfig(rate_hz=50, mode="sync"),
        clock=SimClock,
        max_episode_steps=6 * steps,
        progress=False,
    )
    episode = run["per_episode"][0]
    assert episode["robot_steps"] == 6 * steps and run["config"]["inpaint"] is False
    assert episode["chunks"] == -(-episode["ticks"] // steps)  # a chunk per n_action_steps ticks, as offline
