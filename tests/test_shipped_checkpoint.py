"""The shipped pretrained base (checkpoints/vla-tabletop-base): it loads, its card's hash is
its weights', and it acts on a raw observation without ever reading the privileged state."""

import hashlib
import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from policies import VLAPolicy, from_pretrained
from tests.conftest import ROOT

BASE = ROOT / "checkpoints" / "vla-tabletop-base"


def test_shipped_base_holds_config_weights_and_a_card_with_their_hash():
    files = {p.name for p in BASE.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    weights = BASE / "model.safetensors"
    assert weights.stat().st_size < 25e6
    card = (BASE / "README.md").read_text()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert re.search(r"SHA-256 `([0-9a-f]{64})`", card).group(1) == digest
    for needle in ("Command: `", "Commit: `", "Wall time", "| **mean** |"):
        assert needle in card
    config = json.loads((BASE / "config.json").read_text())
    assert config["type"] == "vla" and config["vision"] == "scene" and config["moe"] is None


def test_shipped_base_gives_finite_chunks_from_a_raw_observation():
    policy = from_pretrained(BASE)
    assert isinstance(policy, VLAPolicy)
    env = gym.make("adamoe/Tabletop-PickRed-v0", cameras=policy.config.cameras, image_size=policy.config.image_size)
    obs, _ = env.reset(seed=123)
    env.close()
    obs["environment_state"] = np.full_like(obs["environment_state"], np.nan)  # the policy must not read it
    batch = policy.batch_from_observation(obs)
    chunk = policy.predict_action_chunk(batch, noise=torch.zeros(1, policy.config.chunk_size, policy.config.action_dim))
    assert chunk.shape == (1, policy.config.chunk_size, policy.config.action_dim)
    assert torch.isfinite(chunk).all()
    policy.reset()
    action = policy.select_action(obs)
    assert action.shape == (4,) and np.isfinite(action).all()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_base_acts_towards_the_instructed_cube(split):
    """A few steps of a reach episode bring the gripper closer to the named cube."""
    policy = from_pretrained(BASE)
    env = gym.make(
        "adamoe/Tabletop-ReachBlue-v0",
        cameras=policy.config.cameras,
        image_size=policy.config.image_size,
        instruction_split=split,
    )
    obs, _ = env.reset(seed=100_001)
    torch.manual_seed(0)
    policy.reset()
    blue = slice(6, 9)
    start = np.linalg.norm(obs["agent_pos"][:3] - obs["environment_state"][blue])
    for _ in range(10):
        obs, *_ = env.step(policy.select_action(obs))
    env.close()
    assert np.linalg.norm(obs["agent_pos"][:3] - obs["environment_state"][blue]) < 0.7 * start
