"""Inputs that used to be accepted and silently wrong: each is now a clear error that
names the bad value (or, for a policy never given statistics, a loud warning)."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import adamoe
import envs  # noqa: F401
from adamoe.merging import fisher_merge
from envs.experts import ScriptedExpert
from policies import VLAPolicy, from_pretrained
from policies.vla.configuration_vla import vla_config
from tests.conftest import ROOT

BASE = ROOT / "checkpoints" / "vla-tabletop-base"


@pytest.fixture(scope="module")
def observation():
    policy = from_pretrained(BASE)
    env = gym.make("adamoe/Tabletop-PickRed-v0", cameras=policy.config.cameras, image_size=policy.config.image_size)
    obs, _ = env.reset(seed=7)
    env.close()
    return policy, obs


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_images_that_are_not_uint8_are_refused_with_the_dtype_named(observation, dtype):
    policy, obs = observation
    pixels = {k: (v / 255.0 if dtype == np.float32 else v).astype(dtype) for k, v in obs["pixels"].items()}
    bad = {**obs, "pixels": pixels}
    with pytest.raises(ValueError, match=rf"dtype {np.dtype(dtype).name}; observations carry uint8 images"):
        policy.select_action(bad)


def test_a_policy_without_normalisation_statistics_warns_once_when_it_acts(observation):
    _, obs = observation
    torch.manual_seed(0)
    fresh = VLAPolicy(vla_config("small"))
    batch = fresh.batch_from_observation(obs)
    with pytest.warns(UserWarning, match="normalisation statistics were never set"):
        fresh.predict_action_chunk(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.predict_action_chunk(batch)  # once per policy, not once per chunk


def test_a_trained_checkpoint_acts_without_the_statistics_warning(observation):
    policy, obs = observation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.predict_action_chunk(policy.batch_from_observation(obs))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expert_noise_std", float("nan")),
        ("balance_coef", float("nan")),
        ("shared_coef", float("nan")),
        ("routed_coef", float("inf")),
        ("num_experts", True),
        ("top_k", True),
    ],
)
def test_moe_config_rejects_nan_and_booleans_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        adamoe.MoEConfig(**{field: value}).validate()


def test_expert_noise_must_be_finite():
    with pytest.raises(ValueError, match="noise must be a finite number >= 0, got nan"):
        ScriptedExpert(noise=float("nan"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cameras": "front"}, r"cameras='front' is a string"),
        ({"image_size": "64"}, r"image_size must be a positive integer, got '64'"),
        ({"image_size": 100000}, r"image_size must be at most 1024"),
        ({"cameras": ("front", "front")}, r"cameras names a camera twice: \('front', 'front'\)"),
        ({"expert_widht": 64}, r"VLAConfig has no field 'expert_widht' \(did you mean 'expert_width'\?\)"),
    ],
)
def test_vla_config_types_and_ranges_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vla_config("tiny", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cameras": "front"}, r"cameras='front' is a string"),
        ({"image_size": "64"}, r"image size must be an int or \(height, width\), got '64'"),
        ({"image_size": 100000}, r"whole pixels in \[1, 1024\], got 100000"),
    ],
)
def test_the_tabletop_env_checks_cameras_and_image_size(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gym.make("adamoe/Tabletop-PickRed-v0", **kwargs)


@pytest.mark.parametrize(("bad", "message"), [(float("nan"), "NaN or inf"), (-1.0, r"negative values \(min -1\)")])
def test_a_fisher_with_nan_or_negative_entries_is_refused(bad, message):
    sd = {"w": torch.ones(3)}
    fishers = [{"w": torch.ones(3)}, {"w": torch.tensor([1.0, bad, 1.0])}]
    with pytest.raises(ValueError, match=rf"Fisher of model 1 holds {message} for 'w'"):
        fisher_merge([sd, sd], fishers)


def test_a_weights_file_given_as_a_fisher_file_is_refused(tmp_path):
    policy = VLAPolicy(vla_config("tiny"))
    out = policy.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="is not a Fisher file written by save_fisher"):
        adamoe.load_fisher(out / "model.safetensors")


def test_a_decision_transformer_without_state_statistics_warns_once_per_task():
    from policies.dt.configuration_dt import DecisionTransformerConfig, DTTask
    from policies.dt.modeling_dt import DecisionTransformer

    model = DecisionTransformer(DecisionTransformerConfig(tasks=[DTTask("reach", 3, 2)]))
    args = (torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))
    with pytest.warns(UserWarning, match="task 'reach': state statistics were never set"):
        model.get_action(*args)
    model.set_state_stats("reach", np.ones(3), np.full(3, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.get_action(*args)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: {k: v for k, v in o.items() if k != "instruction"}, r"observation has no 'instruction'"),
        (lambda o: {k: v for k, v in o.items() if k != "agent_pos"}, r"observation has no 'agent_pos'"),
        (lambda o: {**o, "instruction": 5}, r"'instruction' must be a string \(one per env\), got 5"),
        (lambda o: {**o, "instruction": ["pick", "place"]}, r"2 instructions for a batch of 1 observations"),
    ],
)
def test_an_observation_without_a_usable_instruction_or_state_is_refused_by_name(observation, change, message):
    policy, obs = observation
    with pytest.raises(ValueError, match=message):
        policy.batch_from_observation(change(obs))


def test_statistics_missing_a_feature_or_a_statistic_are_refused_by_name():
    from tests.conftest import TINY_STATS

    policy = VLAPolicy(vla_config("tiny", vision="conv"))
    with pytest.raises(ValueError, match=r"statistics are missing \['observation.state'\]"):
        policy.set_normalization({"action": TINY_STATS["action"]})
    no_std = {**TINY_STATS, "action": {k: v for k, v in TINY_STATS["action"].items() if k != "std"}}
    with pytest.raises(ValueError, match=r"statistics are missing \['std'\]"):
        policy.set_normalization(no_std)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
        ({"max_minutes": -1.0}, r"max_minutes must be a finite number > 0, or None"),
        ({"max_minutes": float("nan")}, r"max_minutes must be a finite number > 0, or None"),
    ],
)
def test_training_settings_out_of_range_are_refused_by_name(kwargs, message):
    from policies.training import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs).validate()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_merge_scale_that_is_not_finite_is_refused(method):
    weights = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="scale must be a finite number, got nan"):
        adamoe.merge([weights, weights], method, base=weights, scale=float("nan"))
