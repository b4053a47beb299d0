"""Meta-World tasks behind the same contract, and Meta-World staying optional."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs

pytest.importorskip("metaworld")


def test_every_metaworld_task_is_registered_with_an_instruction_and_mt10_is_a_suite():
    assert len(envs.METAWORLD_INSTRUCTIONS) == 50
    assert all(f"adamoe/MetaWorld-{name}" in gym.registry for name in envs.METAWORLD_INSTRUCTIONS)
    mt10 = envs.suite("mt10")
    assert len(mt10) == 10 and "adamoe/MetaWorld-reach-v3" in mt10
    assert all(name in envs.METAWORLD_INSTRUCTIONS for name in envs.MT10)


def test_metaworld_env_passes_check_env_and_follows_the_contract():
    env = gym.make("adamoe/MetaWorld-push-v3", cameras=("corner2", "gripperPOV"), render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=0)
    assert obs["pixels"]["corner2"].shape == (64, 64, 3) and obs["pixels"]["corner2"].dtype == np.uint8
    assert obs["agent_pos"].shape == (4,) and obs["agent_pos"].dtype == np.float32
    np.testing.assert_allclose(obs["agent_pos"], obs["environment_state"][:4])
    assert obs["instruction"] == info["instruction"] == "push the puck to the goal"
    _, _, _, _, info = env.step(np.zeros(4, np.float32))
    assert info["is_success"] is False
    env.close()


def test_upside_down_corner_camera_is_rotated_upright():
    from envs.rendering import CameraRenderer

    env = envs.MetaWorldEnv("reach-v3", cameras=("corner2",))
    obs, _ = env.reset(seed=0)
    raw = CameraRenderer(env._inner.model, ("corner2",), 64, 64).render(env._inner.data)["corner2"]
    np.testing.assert_array_equal(obs["pixels"]["corner2"], raw[::-1, ::-1])


def test_goal_is_visible_and_a_reset_depends_on_the_seed_alone():
    env = envs.MetaWorldEnv("push-v3", cameras=("corner2", "gripperPOV"))
    first = env.reset(seed=1)[0]
    for _ in range(5):
        env.step(env.action_space.sample())
    again = env.reset(seed=1)[0]
    other = env.reset(seed=2)[0]
    np.testing.assert_array_equal(first["environment_state"], again["environment_state"])
    for camera in ("corner2", "gripperPOV"):
        np.testing.assert_array_equal(first["pixels"][camera], again["pixels"][camera])
    assert not np.array_equal(first["environment_state"], other["environment_state"])
    assert np.linalg.norm(first["environment_state"][-3:]) > 0  # the goal is not zeroed out


@pytest.mark.parametrize("task", ["reach-v3", "pick-place-v3"])
def test_metaworld_scripted_policy_is_the_expert(task):
    env_id = f"adamoe/MetaWorld-{task}"
    env = gym.make(env_id, cameras=())
    expert = envs.make_expert(env_id)
    successes = []
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        for _ in range(300):
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            if terminated or truncated:
                break
        successes.append(info["is_success"])
    assert all(successes)


def test_noisy_metaworld_expert_labels_each_step_with_meta_worlds_clean_action():
    env_id = "adamoe/MetaWorld-reach-v3"
    env = gym.make(env_id, cameras=())
    expert = envs.make_expert(env_id, noise=0.5, seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        executed, label = expert.act_with_label(obs)
        clean = np.clip(expert.policy.get_action(obs["environment_state"].astype(np.float64)), -1.0, 1.0)
        np.testing.assert_allclose(label, clean, atol=1e-6)
        assert not np.allclose(executed, label)
        obs, *_ = env.step(executed)


def test_bad_metaworld_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="reach-v3"):
        envs.MetaWorldEnv("reach-v2")
    with pytest.raises(ValueError, match="corner2"):
        envs.MetaWorldEnv("reach-v3", cameras=("side",))


BLOCK_METAWORLD = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "metaworld" or name.startswith("metaworld."):
            raise ImportError("No module named 'metaworld' (blocked)")
sys.meta_path.insert(0, Block())
import envs, gymnasium as gym
env = gym.make("adamoe/Tabletop-PickRed-v0")
try:
    gym.make("adamoe/MetaWorld-reach-v3")
except ImportError as exc:
    print("ERROR:", exc)
"""


def test_envs_import_without_metaworld_and_asking_for_it_says_how_to_install():
    out = subprocess.run([sys.executable, "-c", BLOCK_METAWORLD], capture_output=True, text=True, check=True)
    assert "ERROR:" in out.stdout and "pip install 'adamoe[metaworld]'" in out.stdout
