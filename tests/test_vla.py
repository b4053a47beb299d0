"""The pi0-style VLA policy: attention mask, KV cache, checkpoints, upcycling, bad input."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import adamoe
import policies
from adamoe import MoAConfig, MoEConfig
from policies import VLAPolicy, vla_config
from policies.tokenizer import encode
from policies.vla import mix_specialists
from policies.vla.model import (
    attention_mask,
    block_ids,
    flow_matching_loss,
    sample_time,
    time_embedding,
    velocity,
)
from tests.conftest import TINY_STATS


def make_policy(seed=0, **overrides):
    torch.manual_seed(seed)
    policy = VLAPolicy(vla_config("tiny", **overrides))
    stats = TINY_STATS
    policy.set_normalization(stats)
    return policy.eval()


def make_batch(policy, size=3, seed=1, tasks=None):
    g = torch.Generator().manual_seed(seed)
    c = policy.config
    batch = {
        f"observation.images.{cam}": torch.rand(size, 3, c.image_size, c.image_size, generator=g) for cam in c.cameras
    }
    batch["observation.state"] = torch.randn(size, c.state_dim, generator=g) * 0.1
    batch["task"] = tasks or ["pick up the red cube", "stack the blue cube on the red one", "reach"][:size]
    batch["action"] = torch.rand(size, c.chunk_size, c.action_dim, generator=g) * 2 - 1
    batch["action_is_pad"] = torch.zeros(size, c.chunk_size, dtype=torch.bool)
    return batch


def env_observation(policy, rng=None):
    rng = rng or np.random.default_rng(0)
    size = policy.config.image_size
    return {
        "pixels": {cam: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for cam in policy.config.cameras},
        "agent_pos": rng.normal(size=4).astype(np.float32) * 0.1,
        "environment_state": np.zeros(25, dtype=np.float32),
        "instruction": "lift the red cube off the table",
    }


# -- the math -----------------------------------------------------------------------


def test_block_mask_is_pi0s_prefix_state_action_pattern():
    prefix, chunk = 4, 3
    blocks = block_ids(prefix, chunk)
    assert blocks.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    key_valid = torch.tensor([[True, True, True, False, True, True, True, True]])  # prefix token 3 is padding
    mask = attention_mask(blocks, blocks, key_valid)[0, 0]
    allowed = lambda q: set(torch.nonzero(mask[q]).flatten().tolist())
    for q in range(prefix):  # the prefix sees only the (valid) prefix
        assert allowed(q) == {0, 1, 2}
    assert allowed(4) == {0, 1, 2, 4}  # the state token: prefix and itself
    for q in range(5, 8):  # actions: everything valid, each other included
        assert allowed(q) == {0, 1, 2, 4, 5, 6, 7}


def test_flow_time_follows_beta_and_stays_in_range():
    torch.manual_seed(0)
    t = sample_time(200_000, (1.5, 1.0), 0.001)
    assert t.min() > 0.001 - 1e-7 and t.max() <= 1.0
    # Beta(1.5, 1) has mean 0.6; squashed into (0.001, 1): 0.6 * 0.999 + 0.001.
    assert t.mean().item() == pytest.approx(0.6 * 0.999 + 0.001, abs=3e-3)


def test_time_embedding_is_sinusoidal_with_geometric_periods():
    emb = time_embedding(torch.tensor([0.0, 0.25]), 8, 4e-3, 4.0)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    period = 4e-3 * (4.0 / 4e-3) ** (torch.arange(4, dtype=torch.float64) / 3)
    torch.testing.assert_close(emb[1, :4], torch.sin(2 * torch.pi * 0.25 / period).float())


def test_flow_matching_loss_ignores_padded_steps_for_both_parameterisations():
    noise, actions, t = torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.tensor([0.5])
    output = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    is_pad = torch.tensor([[False, False, True]])
    for prediction in ("velocity", "actions"):
        loss = flow_matching_loss(output, noise, actions, is_pad, t, prediction)
        assert loss.item() == pytest.approx((1 + 4) / 2)


def test_action_prediction_is_the_velocity_loss_weighted_by_t_squared():
    g = torch.Generator().manual_seed(0)
    actions, noise = torch.randn(5, 4, 2, generator=g), torch.randn(5, 4, 2, generator=g)
    t = torch.rand(5, generator=g) * 0.9 + 0.1
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    a_hat = actions + 0.1 * torch.randn(5, 4, 2, generator=g)
    v_hat = velocity(a_hat, x_t, t, "actions")
    per_sample_v = (v_hat - (noise - actions)).pow(2).mean((1, 2))
    per_sample_a = (a_hat - actions).pow(2).mean((1, 2))
    torch.testing.assert_close(per_sample_a, per_sample_v * t**2)
    # An exact clean-chunk prediction integrates to the chunk: one Euler step from t lands on it.
    torch.testing.assert_close(x_t - t[:, None, None] * velocity(actions, x_t, t, "actions"), actions)


def test_tokenizer_gives_a_word_the_same_token_in_any_sentence():
    ids, grams, valid = encode(["pick up the red cube", "lift the Red block!"], max_words=8)
    assert ids.shape == (2, 8) and grams.shape == (2, 8, 24)
    assert valid.sum(1).tolist() == [5, 4]
    assert ids[0, 3] == ids[1, 2]  # "red" (case and punctuation ignored)
    assert ids[0, 2] == ids[1, 1]  # "the"
    assert ids[0, 4] != ids[1, 3]  # "cube" vs "block"


def test_tokenizer_never_fails_and_shares_subwords_between_related_words():
    ids, grams, valid = encode(["zx9 qüark ☃ blocks", "", "a " * 40], max_words=16)
    assert valid[0].sum() == 3 and valid[1].sum() == 0 and valid[2].sum() == 16
    block, blocks = encode(["block", "blocks"], max_words=1)[1][:, 0]
    shared = set(block.tolist()) & set(blocks.tolist()) - {0}
    assert len(shared) >= 5  # "<bl", "blo", "loc", "ock", "<blo", ...
    with pytest.raises(ValueError, match="strings"):
        encode([3])


def test_token_ids_are_stable_across_processes():
    import os
    import subprocess
    import sys

    code = "from policies.tokenizer import encode; print(encode('stack the blue cube')[0][0, :4].tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}  # str hashes differ; our ids must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str(encode("stack the blue cube")[0][0, :4].tolist())


# -- sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("upcycled", [False, True])
def test_cached_and_uncached_sampling_give_the_same_actions(upcycled):
    policy = make_policy()
    if upcycled:
        policy.upcycle(MoEConfig(num_experts=4, top_k=1, router_init_std=0.5), init="paper")
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, 4, generator=torch.Generator().manual_seed(2))
    cached = policy.predict_action_chunk(batch, noise=noise, use_cache=True)
    uncached = policy.predict_action_chunk(batch, noise=noise, use_cache=False)
    assert cached.shape == (3, policy.config.chunk_size, 4)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_sampling_starts_from_noise_of_the_configured_scale(scale):
    policy = make_policy()
    policy.config.inference_noise_scale = scale
    batch = make_batch(policy)
    torch.manual_seed(5)
    sampled = policy.predict_action_chunk(batch)
    torch.manual_seed(5)  # the same draw, scaled by hand, through the explicit-noise path
    noise = scale * torch.randn(3, policy.config.chunk_size, 4)
    torch.testing.assert_close(sampled, policy.predict_action_chunk(batch, noise=noise))
    if scale == 0.0:  # deterministic: every call gives the same chunk
        torch.testing.assert_close(policy.predict_action_chunk(batch), sampled)


def test_a_noise_scale_outside_its_range_is_refused_by_name():
    for bad in (-0.1, float("nan"), 11.0, True):
        with pytest.raises(ValueError, match="inference_noise_scale must be a number in"):
            vla_config("tiny", inference_noise_scale=bad)


def test_actions_depend_on_the_instruction():
    policy = make_policy()
    batch = make_batch(policy, size=2, tasks=["pick up the red cube", "pick up the blue cube"])
    batch = {k: (v[:1].expand(2, *v.shape[1:]) if torch.is_tensor(v) else v) for k, v in batch.items()}
    noise = torch.zeros(2, policy.config.chunk_size, 4)
    out = policy.predict_action_chunk(batch, noise=noise)
    assert not torch.allclose(out[0], out[1])


def test_select_action_executes_n_action_steps_of_each_chunk_then_replans():
    policy = make_policy()
    calls = []
    original = policy.predict_action_chunk

    def spy(batch, **kw):
        calls.append(1)
        return original(batch, **kw)

    policy.predict_action_chunk = spy
    obs = env_observation(policy)
    actions = [policy.select_action(obs) for _ in range(5)]
    n = policy.config.n_action_steps
    assert len(calls) == -(-5 // n)
    assert all(a.shape == (4,) and a.dtype == np.float32 for a in actions)
    policy.reset()
    policy.select_action(obs)
    assert len(calls) == -(-5 // n) + 1


def test_select_action_takes_a_vector_envs_batch():
    policy = make_policy()
    rng = np.random.default_rng(0)
    obs = [env_observation(policy, rng) for _ in range(3)]
    stacked = {
        "pixels": {c: np.stack([o["pixels"][c] for o in obs]) for c in policy.config.cameras},
        "agent_pos": np.stack([o["agent_pos"] for o in obs]),
        "instruction": tuple(o["instruction"] for o in obs),
    }
    assert policy.select_action(stacked).shape == (3, 4)


def test_preserve_upcycling_keeps_the_dense_policys_actions():
    dense = make_policy()
    moe = copy.deepcopy(dense)
    report = moe.upcycle(MoEConfig(num_experts=4, top_k=1), init="preserve")
    assert report.names == [f"layers.{i}.mlp" for i in range(dense.config.depth)]
    batch = make_batch(dense)
    noise = torch.randn(3, dense.config.chunk_size, 4)
    torch.testing.assert_close(
        moe.predict_action_chunk(batch, noise=noise), dense.predict_action_chunk(batch, noise=noise)
    )
    assert moe.num_parameters() > moe.num_parameters(active=True) > dense.num_parameters()
    assert dense.num_parameters(active=True) == dense.num_parameters()


def test_training_loss_includes_the_moe_balance_loss_when_upcycled():
    policy = make_policy()
    policy.upcycle(MoEConfig(num_experts=4, top_k=1), init="paper")
    policy.train()
    loss, logs = policy(make_batch(policy), step=0)
    assert "balance_loss" in logs and loss.item() > logs["flow_loss"]
    loss.backward()
    layer = policy.model.action_expert.layers[0].mlp
    assert layer.router.gate.weight.grad.abs().sum() > 0


# -- soft attention experts (BAM) and mixing specialists -----------------------------


@pytest.mark.parametrize("share_kv", [False, True])
def test_upcycling_attention_keeps_the_dense_policys_actions(share_kv):
    dense = make_policy()
    moa = copy.deepcopy(dense)
    report = moa.upcycle_attention(
        MoAConfig(num_experts=3, share_kv=share_kv, router_init_std=1.0, expert_noise_std=0.0)
    )
    assert report["layers"] == [f"model.action_expert.layers.{i}.attention_experts" for i in range(2)]
    assert report["params_after"] > report["params_before"] == dense.num_parameters()
    batch = make_batch(dense)
    noise = torch.randn(3, dense.config.chunk_size, 4)
    torch.testing.assert_close(
        moa.predict_action_chunk(batch, noise=noise), dense.predict_action_chunk(batch, noise=noise)
    )
    assert moa.num_parameters(active=True) == moa.num_parameters()  # soft routing: every attention expert runs


def _bam_policy(share_kv=False):
    policy = make_policy()
    policy.upcycle(MoEConfig(num_experts=4, top_k=1, router_init_std=0.5), init="paper")
    policy.upcycle_attention(MoAConfig(num_experts=3, share_kv=share_kv, router_init_std=0.5, expert_noise_std=0.2))
    return policy


@pytest.mark.parametrize("share_kv", [False, True])
def test_attention_experts_give_the_same_actions_with_and_without_the_prefix_cache(share_kv):
    policy = _bam_policy(share_kv)
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, 4, generator=torch.Generator().manual_seed(2))
    cached = policy.predict_action_chunk(batch, noise=noise, use_cache=True)
    uncached = policy.predict_action_chunk(batch, noise=noise, use_cache=False)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_attention_experts_train_with_their_routers_in_the_router_group(tmp_path):
    policy = _bam_policy().train()
    loss, _ = policy(make_batch(policy), step=0)
    loss.backward()
    moa = policy.model.action_expert.layers[1].attention_experts
    assert moa.router.weight.grad.abs().sum() > 0 and moa.q_proj.weight.grad.abs().sum() > 0
    assert any(p is moa.router.weight for p in adamoe.router_parameters(policy))
    policy.eval().save_pretrained(tmp_path / "ckpt")
    loaded = policies.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.attention_moe["config"]["num_experts"] == 3
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, 4)
    torch.testing.assert_close(
        loaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )


def _specialists(n=2):
    base = make_policy()
    out = []
    for i in range(n):  # branch: copies of one policy, moved apart as fine-tuning would
        policy = copy.deepcopy(base)
        with torch.no_grad():
            g = torch.Generator().manual_seed(10 + i)
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.append(policy)
    return out


def test_mixing_specialists_makes_each_one_an_expert_and_averages_the_rest(tmp_path):
    specialists = _specialists(3)
    mixed = mix_specialists(specialists)
    assert mixed.config.moe["init"] == "specialists" and mixed.config.attention_moe is not None
    for e, spec in enumerate(specialists):
        for depth, layer in enumerate(mixed.model.action_expert.layers):
            dense = spec.model.action_expert.layers[depth]
            q, k, v, o = layer.attention_experts.expert_projections(e)
            torch.testing.assert_close(q.weight, dense.q_proj.weight)
            torch.testing.assert_close(k.weight, dense.k_proj.weight)
            torch.testing.assert_close(v.weight, dense.v_proj.weight)
            torch.testing.assert_close(o.weight, dense.o_proj.weight)
            expert_in = layer.mlp.experts.w_in[e]
            torch.testing.assert_close(expert_in, adamoe.ffn_weights(dense.mlp).w_in)
    mean = lambda get: torch.stack([get(s) for s in specialists]).mean(0)
    torch.testing.assert_close(
        mixed.model.prefix_layers[0].q_proj.weight, mean(lambda s: s.model.prefix_layers[0].q_proj.weight)
    )
    torch.testing.assert_close(
        mixed.model.action_expert.layers[0].input_norm.weight,
        mean(lambda s: s.model.action_expert.layers[0].input_norm.weight),
    )
    mixed.save_pretrained(tmp_path / "mixed")
    loaded = policies.from_pretrained(tmp_path / "mixed")
    batch = make_batch(mixed)
    noise = torch.randn(3, mixed.config.chunk_size, 4)
    torch.testing.assert_close(
        loaded.predict_action_chunk(batch, noise=noise), mixed.predict_action_chunk(batch, noise=noise)
    )


def test_mixing_copies_of_one_policy_attention_only_changes_nothing():
    policy = make_policy()
    mixed = mix_specialists([policy, copy.deepcopy(policy)], mix_ffn=False)
    assert mixed.config.moe is None
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, 4)
    torch.testing.assert_close(
        mixed.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )


def test_mixing_rejects_mismatched_or_upcycled_specialists():
    a, b = _specialists(2)
    other = make_policy(depth=3)
    with pytest.raises(ValueError, match=r"specialist 1 differs from specialist 0 in \['depth'\]"):
        mix_specialists([a, other])
    b.upcycle(MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="specialist 1 is already upcycled"):
        mix_specialists([a, b])
    with pytest.raises(ValueError, match="moe_config.num_experts=4 but there are 2 specialists"):
        mix_specialists([a, copy.deepcopy(a)], moe_config=MoEConfig(num_experts=4))
    with pytest.raises(ValueError, match="at least 2 specialists"):
        mix_specialists([a])
    with pytest.raises(ValueError, match="specialist 1 is a str, not a VLAPolicy"):
        mix_specialists([a, "b"])
    with pytest.raises(ValueError, match="self_guided_steps=10 are for upcycling one FFN"):
        mix_specialists([a, copy.deepcopy(a)], moe_config=MoEConfig(num_experts=2, self_guided_steps=10))
    restated = copy.deepcopy(a)
    restated.action_norm.std.mul_(2)
    with pytest.raises(ValueError, match=r"specialist 1's normalisation statistics \(action_norm\) differ"):
        mix_specialists([a, restated])
    layer = a.model.action_expert.layers[0]
    wrong = adamoe.MixtureOfAttention(MoAConfig(num_experts=2), layer.q_proj.in_features, 4, 4)
    with pytest.raises(
        ValueError, match=r"\(dim, heads, head_dim\) = \(32, 4, 4\) do not fit this layer's \(32, 2, 8\)"
    ):
        layer.upcycle_attention(wrong)
    biased = adamoe.MixtureOfAttention(MoAConfig(num_experts=2), layer.q_proj.in_features, 2, 8, bias=True)
    with pytest.raises(ValueError, match=r"has no biases; the attention experts have bias \{'qkv': True, 'o': False\}"):
        layer.upcycle_attention(biased)
    with pytest.raises(ValueError, match="attention_moe must be None or a dict with a 'config' dict"):
        policies.VLAConfig(attention_moe={"layers": []})


# -- checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("init", [None, "paper", "preserve"])
def test_save_and_load_round_trip_rebuilds_the_exact_policy(tmp_path, init):
    policy = make_policy()
    if init:
        policy.upcycle(MoEConfig(num_experts=4, top_k=2), init=init)
        with torch.no_grad():  # move off the initialisation so the check means something
            for p in policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
    policy.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "manifest.json", "model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["type"] == "vla" and config["preset"] == "tiny"
    assert (config["moe"] is None) == (init is None)
    loaded = policies.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, VLAPolicy)
    assert len(adamoe.moe_layers(loaded)) == (0 if init is None else policy.config.depth)
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, 4)
    torch.testing.assert_close(
        loaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )
    torch.testing.assert_close(loaded.action_norm.std, policy.action_norm.std)


def test_checkpoint_with_a_missing_or_misshaped_tensor_names_it(tmp_path):
    make_policy().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").unlink()  # hand-edited weights: as a checkpoint from before manifests
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(weights))
    missing = dict(tensors)
    del missing["model.text.embed.weight"]
    save_file(missing, str(weights))
    with pytest.raises(ValueError, match="missing tensor 'model.text.embed.weight'"):
        policies.from_pretrained(tmp_path / "ckpt")
    misshaped = dict(tensors)
    misshaped["action_norm.std"] = torch.ones(5)
    save_file(misshaped, str(weights))
    with pytest.raises(ValueError, match=r"'action_norm.std' has shape \(5,\)"):
        policies.from_pretrained(tmp_path / "ckpt")


def test_unknown_policy_type_lists_the_known_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"type": "diffusion"}))
    with pytest.raises(ValueError, match=r"unknown policy type 'diffusion'.*'vla'"):
        policies.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown VLAConfig fields.*width"):
        policies.VLAConfig.from_dict({"type": "vla", "width": 3})
    with pytest.raises(ValueError, match="unknown VLA preset 'huge'"):
        vla_config("huge")


def test_save_pretrained_replaces_a_checkpoint_atomically(tmp_path, monkeypatch):
    policy = make_policy()
    policy.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(policies.pretrained, "save_tensors", broken)
    with torch.no_grad():
        policy.model.text.embed.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        policy.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# -- bad input ------------------------------------------------------------------------


def test_missing_camera_wrong_image_shape_and_nan_state_are_value_errors():
    policy = make_policy()
    obs = env_observation(policy)
    no_wrist = {**obs, "pixels": {"front": obs["pixels"]["front"]}}
    with pytest.raises(ValueError, match="missing camera 'wrist'"):
        policy.select_action(no_wrist)
    small = {**obs, "pixels": {**obs["pixels"], "front": obs["pixels"]["front"][:32, :32]}}
    with pytest.raises(ValueError, match=r"'front' image must be \(64, 64, 3\)"):
        policy.select_action(small)
    nan = {**obs, "agent_pos": np.array([0.0, np.nan, 0.0, 0.0], dtype=np.float32)}
    with pytest.raises(ValueError, match="NaN"):
        policy.select_action(nan)
    batch = make_batch(policy)
    batch["observation.state"] = torch.ones(3, 5)
    with pytest.raises(ValueError, match=r"observation.state must have shape \(B, 4\)"):
        policy.predict_action_chunk(batch)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="n_action_steps=12 exceeds chunk_size=10"):
        vla_config("small", n_action_steps=12)
    with pytest.raises(ValueError, match="image_size=60 must be a multiple of patch=32"):
        vla_config("small", image_size=60)
    with pytest.raises(ValueError, match="normalization='zscore'"):
        vla_config("small", normalization="zscore")


def test_tokenizer_batches_equal_the_rows_encoded_alone_and_hand_out_copies():
    texts = ["pick up the red cube", "stack the blue cube on the red one", "pick up the red cube"]
    ids, grams, valid = encode(texts)
    for row, text in enumerate(texts):
        one = encode(text)
        torch.testing.assert_close(ids[row], one[0][0])
        torch.testing.assert_close(grams[row], one[1][0])
        torch.testing.assert_close(valid[row], one[2][0])
    ids[0].zero_()
    assert encode(texts[0])[0].count_nonzero() == 5  # the cache was not touched


def test_word_augmentation_keeps_order_drops_words_and_only_acts_in_training():
    from policies.tokenizer import augment

    ids, grams, valid = encode(["stack the blue cube on the red one", "pick up the red cube"])
    torch.manual_seed(0)
    same = augment(ids, grams, valid, 0.0, 0)
    for a, b in zip(same, (ids, grams, valid), strict=True):
        torch.testing.assert_close(a, b)
    for seed in range(20):
        torch.manual_seed(seed)
        out_ids, out_grams, out_valid = augment(ids, grams, valid, 0.4, 3)
        for row in range(2):
            kept = out_ids[row][out_valid[row]].tolist()
            original = ids[row][valid[row]].tolist()
            assert 1 <= len(kept) <= len(original)
            it = iter(original)
            assert all(word in it for word in kept)  # a subsequence: order kept
            first = int(out_valid[row].nonzero()[0])
            assert first <= 3 and out_valid[row][first : first + len(kept)].all()  # contiguous after the shift
            for col in out_valid[row].nonzero().flatten().tolist():  # each word keeps its own n-grams
                source = original.index(int(out_ids[row, col]))
                torch.testing.assert_close(out_grams[row, col], grams[row, source])
    policy = make_policy(word_dropout=0.5, word_position_jitter=3)
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.action_dim)
    torch.testing.assert_close(
        policy.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )


def test_unknown_word_insertion_keeps_every_word_in_order_and_fits_the_row():
    from policies.tokenizer import augment, insert_unknown

    texts = ["stack the blue cube on the red one", "pick up the red block and set it down on the yellow target"]
    ids, grams, valid = encode(texts)
    torch.manual_seed(0)
    for a, b in zip(insert_unknown(ids, grams, valid, 0.0, 4096), (ids, grams, valid), strict=True):
        torch.testing.assert_close(a, b)  # rate 0: the rows unchanged
    inserted = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_ids, out_grams, out_valid = insert_unknown(ids, grams, valid, 0.5, 4096)
        assert out_ids.shape == ids.shape and out_grams.shape == grams.shape
        for row in range(2):
            original = ids[row][valid[row]].tolist()
            count = int(out_valid[row].sum())
            assert out_valid[row][:count].all()  # contiguous from the first column
            words = out_ids[row, :count].tolist()
            it = iter(words)
            assert all(word in it for word in original)  # every word kept, in order
            inserted += count - len(original)
            cols = iter(range(count))
            for source, word in enumerate(original):  # each kept word keeps its own n-grams
                col = next(c for c in cols if out_ids[row, c] == word)
                torch.testing.assert_close(out_grams[row, col], grams[row, source])
    assert inserted > 40  # ~half the gaps of the short row (the long one has 3 free columns)
    for seed in range(50):  # after position jitter (words starting late) nothing spills or is lost
        torch.manual_seed(seed)
        shifted = augment(ids, grams, valid, 0.0, 3)
        out_ids, out_grams, out_valid = insert_unknown(*shifted, 0.5, 4096)
        for row in range(2):
            words = out_ids[row][out_valid[row]].tolist()
            it = iter(words)
            assert all(word in it for word in ids[row][valid[row]].tolist())
        new = out_valid & ~torch.isin(out_ids, ids[valid])
        counts = (out_grams[new] != 0).sum(-1)  # an unknown word carries 3 to 12 n-grams
        assert ((counts >= 3) & (counts <= 12)).all()
    short = encode(texts, max_ngrams=2)  # fewer n-gram slots than an unknown word would use
    assert (insert_unknown(*short, 0.5, 4096)[1] != 0).sum(-1).max() <= 2


def test_fractional_word_positions_are_the_same_for_any_padding_and_span_first_to_last():
    from policies.vla.model import fraction_features

    _, _, valid = encode(["push the red cube onto the yellow pad", "reach"], max_words=16)
    wide = fraction_features(valid)
    narrow = fraction_features(valid[:, :9])
    torch.testing.assert_close(wide[:, :9], narrow)
    # first word at fraction 0 (sin 0, cos 1), last at 1 (sin(pi k) = 0, cos = (-1)^k)
    k = wide.shape[-1] // 2
    torch.testing.assert_close(wide[0, 0, k:], torch.ones(k))
    torch.testing.assert_close(wide[0, 7, k:], torch.tensor([(-1.0) ** i for i in range(1, k + 1)]))
    torch.testing.assert_close(wide[0, 7, :k], torch.zeros(k), atol=1e-6, rtol=0)
    torch.testing.assert_close(wide[1, 0, k:], torch.ones(k))  # a one-word instruction: fraction 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"word_positions": "fraction"},
        {"word_positions": "learned", "word_insertion": 0.0},
        {"word_positions": "none"},
        {"text_tokens": 3},
    ],
)
def test_language_variants_ignore_padding_and_train(overrides):
    policy = make_policy(**overrides)
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.action_dim)
    chunk = policy.predict_action_chunk(batch, noise=noise)
    policy.config.max_words = 24  # more padding columns change nothing
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=noise), chunk)
    policy.train()
    loss, _ = policy(batch)
    loss.backward()
    assert torch.isfinite(loss)
    reads_words = policy.model.text.embed.weight.grad
    assert reads_words is not None and reads_words.abs().sum() > 0


def test_language_settings_are_validated_and_old_configs_load_with_learned_positions():
    with pytest.raises(ValueError, match="word_positions='sentence' is not one of"):
        vla_config("tiny", word_positions="sentence")
    with pytest.raises(ValueError, match="word_insertion must be in"):
        vla_config("tiny", word_insertion=1.5)
    with pytest.raises(ValueError, match="text_tokens must be an integer >= 0"):
        vla_config("tiny", text_tokens=-1)
    with pytest.raises(ValueError, match="needs prefix_width divisible by num_heads"):
        vla_config("tiny", text_tokens=2, prefix_width=33)
    data = vla_config("tiny").to_dict()
    del data["word_positions"], data["word_insertion"], data["text_tokens"]
    old = policies.VLAConfig.from_dict(data)
    assert old.word_positions == "learned" and old.word_insertion == 0.0 and old.text_tokens == 0


def test_a_checkpoint_saved_before_the_language_settings_loads_with_its_learned_positions(tmp_path):
    policy = make_policy(word_positions="learned", word_insertion=0.0)
    policy.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("word_positions", "word_insertion", "text_tokens"):
        del config[key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    (tmp_path / "old" / "manifest.json").unlink()  # that old checkpoint had none
    loaded = policies.from_pretrained(tmp_path / "old")
    assert loaded.config.word_positions == "learned" and loaded.model.text_pos is not None
    batch = make_batch(policy)
    noise = torch.randn(3, policy.config.chunk_size, policy.config.action_dim)
    torch.testing.assert_close(
        loaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
    )


class _ChunkingStub:
    """A deterministic chunking policy (no sampling noise): each chunk heads the hand toward a
    point that depends on the observed state, so its episodes differ per scene."""

    def __init__(self, steps: int = 2, horizon: int = 5) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(n_action_steps=steps, cameras=(), image_size=8)
        self.horizon = horizon
        self._queue: list = []

    def eval(self):
        return self

    def reset(self) -> None:
        self._queue.clear()

    def batch_from_observation(self, obs):
        return obs

    def predict_action_chunk(self, obs):
        import torch

        pos = torch.as_tensor(np.asarray(obs["agent_pos"]), dtype=torch.float32)
        target = torch.tensor([0.1, 0.0, 0.15])
        move = torch.clamp(10 * (target - pos[:, :3]), -1, 1)
        grip = torch.ones(len(pos), 1) * torch.sign(pos[:, :1].sum(dim=1, keepdim=True))
        return torch.cat([move, grip], dim=1)[:, None].repeat(1, self.horizon, 1)

    def select_action(self, obs):  # the plain path: one queue for the whole batch
        if not self._queue:
            chunk = self.predict_action_chunk(obs)[:, : self.config.n_action_steps].numpy()
            self._queue.extend(chunk.transpose(1, 0, 2))
        return self._queue.pop(0)


def test_evaluation_that_skips_finished_episodes_matches_stepping_the_whole_batch():
    from policies.evaluation import EvalConfig, evaluate

    tasks = ["adamoe/Tabletop-ReachRed-v0", "adamoe/Tabletop-PlaceRedOnYellowPadThenStackGreenOnRed-v0"]
    results = {}
    for skip in (True, False):
        config = EvalConfig(episodes_per_task=6, max_envs=4, videos_per_task=0, skip_finished=skip)
        results[skip] = evaluate(_ChunkingStub(), tasks, config, progress=False)["per_episode"]
    assert results[True] == results[False]
    lengths = [e["length"] for e in results[True]]
    assert len(set(lengths)) > 1  # episodes of one wave ended at different steps: some were skipped
