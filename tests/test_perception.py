"""The VLA's scene encoder: its stage, the cached path against the images path, the probe,
and the pretraining recipe's stages."""

import json

import numpy as np
import pytest
import torch

from policies import VLAPolicy, from_pretrained, vla_config
from policies.data import ChunkDataset
from policies.stats import wilson_interval
from policies.vla import recipe
from policies.vla.perception import (
    SCENE_FEATURES,
    SCENE_POSITIONS,
    PerceptionConfig,
    apply_linear_probe,
    encode_frames,
    fit_linear_probe,
    localisation_errors,
    spatial_softmax,
    train_scene_encoder,
)
from tests.conftest import TINY_STATS

STATS = TINY_STATS


def make_policy(seed=0, **overrides):
    torch.manual_seed(seed)
    policy = VLAPolicy(vla_config("tiny", **overrides))
    policy.set_normalization(STATS)
    return policy.eval()


def make_batch(policy, size=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = policy.config
    batch = {
        f"observation.images.{cam}": torch.rand(size, 3, c.image_size, c.image_size, generator=g) for cam in c.cameras
    }
    batch["observation.state"] = torch.randn(size, c.state_dim, generator=g) * 0.1
    batch["observation.environment_state"] = torch.rand(size, 25, generator=g) * 0.2
    batch["task"] = ["pick up the red cube"] * size
    batch["action"] = torch.rand(size, c.chunk_size, c.action_dim, generator=g) * 2 - 1
    batch["action_is_pad"] = torch.zeros(size, c.chunk_size, dtype=torch.bool)
    return batch


def test_spatial_softmax_finds_a_single_bright_cell():
    logits = torch.full((1, 1, 5, 5), -1e4)
    logits[0, 0, 1, 3] = 0.0  # row 1 (y), column 3 (x)
    points = spatial_softmax(logits, torch.zeros(()))
    torch.testing.assert_close(points[0, 0], torch.tensor([0.5, -0.5]))


def test_cached_encoder_outputs_give_exactly_the_chunk_the_images_give():
    policy = make_policy()
    batch = make_batch(policy)
    cached = encode_frames(
        policy, lambda idx: {k: v[idx] if not isinstance(v, list) else v for k, v in batch.items()}, 5, 2
    )
    without_images = {k: v for k, v in batch.items() if not k.startswith("observation.images.")}
    without_images[SCENE_POSITIONS] = torch.from_numpy(cached[SCENE_POSITIONS])
    without_images[SCENE_FEATURES] = torch.from_numpy(cached[SCENE_FEATURES])
    noise = torch.randn(5, policy.config.chunk_size, policy.config.action_dim)
    torch.testing.assert_close(
        policy.predict_action_chunk(without_images, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )
    torch.manual_seed(3)
    loss_images, _ = policy.train()(batch)
    torch.manual_seed(3)
    loss_cached, _ = policy(without_images)
    torch.testing.assert_close(loss_cached, loss_images)


def test_a_frozen_encoder_stays_fixed_while_the_policy_trains():
    policy = make_policy().train()
    assert not policy.model.scene_encoder.training  # BatchNorm keeps its statistics
    before = {k: v.clone() for k, v in policy.model.scene_encoder.state_dict().items()}
    loss, _ = policy(make_batch(policy))
    loss.backward()
    assert all(p.grad is None for p in policy.model.scene_encoder.parameters())
    assert policy.model.object_in[0].weight.grad.abs().sum() > 0
    for key, value in policy.model.scene_encoder.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_training_the_scene_encoder_fits_object_positions_and_leaves_the_policy_alone():
    policy = make_policy()
    batch = make_batch(policy, size=16)
    target = policy.scene_target(batch)
    before = torch.nn.functional.mse_loss(policy.encode_scene(batch)[0], target).item()
    policy_weights = policy.model.object_in[0].weight.clone()
    logs = train_scene_encoder(
        policy,
        lambda size, rng: batch,
        PerceptionConfig(steps=200, batch_size=16, lr=3e-3, warmup_steps=5, progress=False),
    )
    after = torch.nn.functional.mse_loss(policy.encode_scene(batch)[0], target).item()
    assert after < 0.5 * before and len(logs) >= 1
    torch.testing.assert_close(policy.model.object_in[0].weight, policy_weights)
    assert not any(p.requires_grad for p in policy.model.scene_encoder.parameters())  # frozen again


def test_setting_the_policys_statistics_keeps_a_trained_encoders_scales():
    policy = make_policy()
    batch = make_batch(policy)
    positions = policy.encode_scene(batch)[0]
    shifted = {k: {s: np.asarray(v) + 1.0 for s, v in stats.items()} for k, stats in STATS.items()}
    policy.set_normalization(shifted, scene=False)
    torch.testing.assert_close(policy.encode_scene(batch)[0], positions)
    torch.testing.assert_close(policy.state_norm.mean, torch.ones(4))
    policy.set_normalization(shifted)
    assert not torch.allclose(policy.encode_scene(batch)[0], positions)


def test_scene_vision_needs_environment_state_statistics_and_names_bad_indices():
    policy = VLAPolicy(vla_config("tiny"))
    without = {k: v for k, v in STATS.items() if k != "observation.environment_state"}
    with pytest.raises(ValueError, match="environment_state"):
        policy.set_normalization(without)
    wide = VLAPolicy(vla_config("tiny", scene_objects=((0, 1, 2), (30, 31))))
    with pytest.raises(ValueError, match="index 31 is out of range"):
        wide.set_normalization(STATS)
    with pytest.raises(ValueError, match="vision='retina' is not one of"):
        vla_config("tiny", vision="retina")
    with pytest.raises(ValueError, match="scene_objects"):
        vla_config("tiny", scene_objects=((0, 1, 2, 3),))


def test_scene_policy_round_trips_through_a_checkpoint(tmp_path):
    policy = make_policy()
    batch = make_batch(policy)
    noise = torch.randn(5, policy.config.chunk_size, policy.config.action_dim)
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(
        loaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )


def test_localisation_errors_report_resting_and_lifted_cubes_apart():
    true = np.zeros((4, 2, 3))
    predicted = true.copy()
    predicted[:, 0, 0] = 0.01  # cube 0: 1 cm off in x
    predicted[:, 1, 2] = 0.03  # cube 1: 3 cm off in z
    lifted = np.array([[False, True]] * 4)
    errors = localisation_errors(predicted, true, lifted)
    assert errors["resting"]["count"] == 4 and errors["resting"]["median_cm"] == pytest.approx(1.0)
    assert errors["resting"]["x_median_cm"] == pytest.approx(1.0) and errors["resting"]["z_median_cm"] == 0.0
    assert errors["lifted"]["median_cm"] == pytest.approx(3.0) and errors["lifted"]["z_p90_cm"] == pytest.approx(3.0)


def test_linear_probe_recovers_a_linear_read_out():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 8))
    weights = rng.normal(size=(8, 3))
    targets = features @ weights + 0.5
    fitted = fit_linear_probe(features, targets, ridge=1e-9)
    np.testing.assert_allclose(apply_linear_probe(fitted, features), targets, atol=1e-5)


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=1e-3) and high == pytest.approx(0.9565, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_attached_frame_features_replace_the_images_in_batches(tmp_path):
    from envs.collection import CollectionJob, dataset_id_for, run_collection

    task = "adamoe/Tabletop-ReachRed-v0"
    run_collection(CollectionJob(env_ids=[task], episodes_per_task=1, root=str(tmp_path), workers=1), progress=False)
    data = ChunkDataset([dataset_id_for(task)], 4, ("front", "wrist"), root=tmp_path, progress=False)
    features = {SCENE_FEATURES: np.arange(len(data) * 2, dtype=np.float32).reshape(len(data), 2)}
    with pytest.raises(ValueError, match="rows"):
        data.attach_frame_features({SCENE_FEATURES: features[SCENE_FEATURES][:-1]})
    data.attach_frame_features(features)
    batch = data.sample(3, np.random.default_rng(0), shift=4, balance="task")
    assert not any(k.startswith("observation.images.") for k in batch)
    rows = batch[SCENE_FEATURES].numpy()
    np.testing.assert_array_equal(rows[:, 1] - rows[:, 0], np.ones(3))


@pytest.fixture(scope="module")
def quick_recipe(tmp_path_factory):
    cfg = recipe.RecipeConfig(
        **{**recipe.QUICK, "output_dir": str(tmp_path_factory.mktemp("pretrain")), "progress": False}
    )
    cfg.suite = ["adamoe/Tabletop-ReachRed-v0", "adamoe/Tabletop-PickBlue-v0"]
    return cfg, recipe.run(cfg)


def test_quick_recipe_runs_every_stage_and_writes_its_report(quick_recipe):
    cfg, report = quick_recipe
    out = recipe.Path(cfg.output_dir)
    for path in ("results.md", "results.json", "plots/success_per_task.png", "plots/learning_curve.png"):
        assert (out / path).is_file(), path
    assert set(report["success"]) == {"ReachRed", "PickBlue", "mean"}
    assert report["success"]["mean"]["train"]["episodes"] == 2 * cfg.eval_episodes
    assert [p["step"] for p in report["curve"]] == [15, 30]
    assert {"resting"} <= set(report["probe"]["encoder"]) and "linear_probe" in report["probe"]
    policy = from_pretrained(out / "policy" / "checkpoint")
    assert policy.config.vision == "scene" and policy.config.preset == "tiny"


def test_recipe_stages_are_skipped_when_complete_and_rerun_when_settings_change(quick_recipe, capsys):
    cfg, _ = quick_recipe
    out = recipe.Path(cfg.output_dir)
    weights = (out / "policy" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    recipe.run(cfg)
    assert (out / "policy" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == weights
    assert "reusing" in capsys.readouterr().out
    assert recipe.stage_complete(cfg, "policy")
    changed = recipe.RecipeConfig(**{**json.loads(json.dumps(cfg.__dict__)), "steps": 40})
    assert recipe.stage_complete(changed, "perception") and not recipe.stage_complete(changed, "policy")


def test_recipe_rejects_bad_settings_before_collecting(tmp_path):
    with pytest.raises(ValueError, match="unknown VLA preset 'huge'"):
        recipe.run(recipe.RecipeConfig(output_dir=str(tmp_path), preset="huge"))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        recipe.run(recipe.RecipeConfig(output_dir=str(tmp_path), steps=0))
    assert list(tmp_path.iterdir()) == []


def test_a_config_saved_before_scene_vision_existed_loads_as_the_conv_policy_it_was():
    config = vla_config("tiny", vision="conv").to_dict()
    del config["vision"]
    assert policies_config_from(config).vision == "conv"
    with pytest.raises(ValueError, match="scene_aux_dim=25 reads out the conv stem"):
        vla_config("tiny", scene_aux_dim=25)


def policies_config_from(data):
    from policies import VLAConfig

    return VLAConfig.from_dict(data)


def test_an_interrupted_stage_is_not_complete_and_other_settings_clear_only_its_outputs(tmp_path):
    cfg = recipe.RecipeConfig(**{**recipe.QUICK, "output_dir": str(tmp_path), "progress": False})
    mine = tmp_path / "policy" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("a user's file")
    recipe.start_stage(cfg, "policy")
    (tmp_path / "policy" / "curve.json").write_text("[]")
    assert not recipe.stage_complete(cfg, "policy")  # started, never finished
    recipe.start_stage(cfg, "policy")  # same settings: kept, to resume
    assert (tmp_path / "policy" / "curve.json").exists()
    changed = recipe.RecipeConfig(**{**recipe.QUICK, "output_dir": str(tmp_path), "steps": 31})
    recipe.start_stage(changed, "policy")
    assert not (tmp_path / "policy" / "curve.json").exists() and mine.read_text() == "a user's file"
    with pytest.raises(ValueError, match="balance='tasks'"):
        recipe.RecipeConfig(output_dir=str(tmp_path), balance="tasks").validate()
