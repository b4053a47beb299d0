"""A policy served from a process of its own (``policies.control.server``): the messages
cross the pipe intact and unpickled, and the served policy acts exactly as the in-process
one, in a single call and over whole real-time episodes."""

from __future__ import annotations

import os
import signal

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from policies.control import ControlConfig
from policies.control.runner import chunk_fn, run_episodes
from policies.control.server import PolicyProcess, pack, unpack

TASK = "adamoe/Tabletop-ReachRed-v0"


def _deterministic_policy(moe: bool = False):
    import torch

    from policies import VLAPolicy, vla_config
    from tests.conftest import TINY_STATS

    torch.manual_seed(0)
    policy = VLAPolicy(vla_config("tiny", inference_noise_scale=0.0))  # chunks depend on the observation only
    if moe:
        policy.upcycle(init="paper")
    policy.set_normalization(TINY_STATS)
    # Weights no fresh construction reproduces, whatever the seed: the served copy must load them.
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy.eval()


def _observation(policy):
    env = gym.make(TASK, cameras=tuple(policy.config.cameras), image_size=policy.config.image_size)
    obs, _ = env.reset(seed=3)
    env.close()
    return obs


def test_a_message_crosses_as_arrays_strings_and_numbers_without_pickle():
    message = {
        "obs": {
            "pixels": {"front": np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "wrist": np.zeros((0, 2), np.int64)},
            "agent_pos": np.array([0.5, -1.0, np.inf], np.float32),
            "instruction": "pick up the red cube",
            "names": ["a", "b"],
        },
        "step": np.int64(7),
        "weights": None,
        "scale": 0.5,
    }
    data = pack(message)
    import json
    import struct

    (size,) = struct.unpack_from("<I", data)
    assert "pixels" in json.loads(data[4 : 4 + size])["dict"]["obs"]["dict"]  # a JSON header, then raw bytes
    got = unpack(data)
    for key in ("front", "wrist"):
        assert got["obs"]["pixels"][key].dtype == message["obs"]["pixels"][key].dtype
        np.testing.assert_array_equal(got["obs"]["pixels"][key], message["obs"]["pixels"][key])
    np.testing.assert_array_equal(got["obs"]["agent_pos"], message["obs"]["agent_pos"])
    assert got["obs"]["pixels"]["front"].flags.writeable  # owns its memory
    assert got["obs"]["instruction"] == "pick up the red cube" and got["obs"]["names"] == ["a", "b"]
    assert got["step"] == 7 and got["weights"] is None and got["scale"] == 0.5
    with pytest.raises(TypeError, match="only numeric and bool arrays can be sent"):
        pack({"x": np.array([object()])})
    with pytest.raises(TypeError, match="cannot send a set"):
        pack({"x": {1, 2}})


@pytest.mark.parametrize("moe", [False, True])
def test_a_served_policy_returns_the_chunk_the_policy_computes_in_process(moe):
    policy = _deterministic_policy(moe)
    obs = _observation(policy)
    here = chunk_fn(policy)
    prefix, weights = np.full((3, 4), 0.1, np.float32), np.array([1.0, 0.5, 0.25], np.float32)
    with PolicyProcess(policy) as served:
        np.testing.assert_allclose(served(obs), here(obs), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(served(obs, prefix, weights), here(obs, prefix, weights), rtol=1e-5, atol=1e-6)


def test_a_served_policy_that_dies_or_does_not_answer_in_time_raises_and_is_not_read_again():
    policy = _deterministic_policy()
    obs = _observation(policy)
    with PolicyProcess(policy) as served:
        served._proc.kill()
        with pytest.raises(RuntimeError, match="the policy process ended"):
            served(obs)
        with pytest.raises(RuntimeError, match="closed"):
            served(obs)
    with PolicyProcess(policy, call_timeout_s=1e-4) as served:
        with pytest.raises(RuntimeError, match="did not answer within"):
            served(obs)
        with pytest.raises(RuntimeError, match="closed"):  # its reply may still come: never read
            served(obs)


def test_a_failure_in_the_served_policy_is_raised_here_with_its_message_and_the_server_keeps_serving():
    policy = _deterministic_policy()
    obs = _observation(policy)
    served = PolicyProcess(policy)
    try:
        with pytest.raises(RuntimeError, match="observation has no 'pixels'"):
            served({k: v for k, v in obs.items() if k != "pixels"})
        assert served(obs).shape == (policy.config.chunk_size, 4)
        os.kill(served._proc.pid, signal.SIGINT)  # Ctrl-C is the control process's to handle, not the server's
        assert served(obs).shape == (policy.config.chunk_size, 4)
    finally:
        served.close()
    assert not served._dir.exists()  # the temporary checkpoint is gone
    with pytest.raises(RuntimeError, match="closed"):
        served(obs)


def test_only_a_chunking_policy_with_a_checkpoint_can_be_served():
    with pytest.raises(ValueError, match="cannot be served"):
        PolicyProcess(object())
    with pytest.raises(ValueError, match="torch_threads must be an integer >= 1"):
        PolicyProcess(_deterministic_policy(), torch_threads=0)


def test_real_time_episodes_with_the_policy_in_its_own_process_equal_those_in_a_thread(monkeypatch):
    import policies.control.runner as runner

    # Virtual time (a simulated latency of two ticks) makes both runs deterministic: the
    # same chunks, actions, successes and timing, tick for tick.
    policy = _deterministic_policy()
    config = ControlConfig(rate_hz=50, mode="async", threshold=8)
    run = lambda where: run_episodes(
        policy, [TASK], 2, config, max_episode_steps=30, simulated_latency_s=0.04, inference=where, progress=False
    )
    chunks = {"thread": [], "process": []}
    here, served = runner.chunk_fn, PolicyProcess.__call__

    def recorded_here(policy):
        infer = here(policy)
        return lambda *args: chunks["thread"].append(infer(*args)) or chunks["thread"][-1]

    monkeypatch.setattr(runner, "chunk_fn", recorded_here)
    runs = {"thread": run("thread")}

    def not_here(*args):
        raise AssertionError("with inference='process' this process must not infer")

    monkeypatch.setattr(runner, "chunk_fn", not_here)  # the child imports its own, unpatched
    monkeypatch.setattr(
        PolicyProcess, "__call__", lambda self, *a: chunks["process"].append(served(self, *a)) or chunks["process"][-1]
    )
    runs["process"] = run("process")
    assert len(chunks["thread"]) == len(chunks["process"]) > 10
    np.testing.assert_allclose(np.stack(chunks["process"]), np.stack(chunks["thread"]), rtol=1e-5, atol=1e-6)
    assert runs["process"]["config"]["inference"] == "process"
    assert runs["thread"]["per_episode"] == runs["process"]["per_episode"]
    assert runs["thread"]["aggregated"] == runs["process"]["aggregated"]
    with pytest.raises(ValueError, match="inference='gpu' is not one of"):
        run_episodes(policy, [TASK], 1, config, inference="gpu")
