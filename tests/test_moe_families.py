"""Other MoE families from the literature as options of the layer, each against a plain
per-token reference: Switch capacity with token dropping, gating dropout."""

from __future__ import annotations

import pytest
import torch

from adamoe import MoEConfig, MoEFeedForward
from adamoe.dispatch import capacity_keep


def _layer(**overrides) -> MoEFeedForward:
    torch.manual_seed(0)
    options = {"num_experts": 4, "top_k": 1, "num_shared_experts": 0, "router": "topk", "routed_coef": 1.0}
    config = MoEConfig(**{**options, **overrides})
    layer = MoEFeedForward(config, dim=16, hidden=32)
    if layer.router.gate is not None:
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)  # decisive routing
    return layer


def _reference_keep(indices: torch.Tensor, num_experts: int, factor: float) -> torch.Tensor:
    """First choices before second choices, tokens in order, until an expert is full."""
    n, k = indices.shape
    capacity = -(-int(factor * n * k * 1000) // (num_experts * 1000))  # ceil, integer arithmetic
    used = [0] * num_experts
    keep = torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        for i in range(n):
            e = int(indices[i, j])
            if used[e] < capacity:
                keep[i, j] = True
                used[e] += 1
    return keep


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_keeps_first_choices_first_and_tokens_in_order(k, factor):
    g = torch.Generator().manual_seed(k)
    indices = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(37)])
    torch.testing.assert_close(capacity_keep(indices, 4, factor), _reference_keep(indices, 4, factor))


@pytest.mark.parametrize("backend", ["batched_mm", "grouped_mm", "loop", "dense"])
def test_switch_with_capacity_drops_overflowing_tokens_exactly(backend):
    layer = _layer(capacity_factor=0.75, backend=backend).eval()
    x = torch.randn(40, 16)
    out = layer(x)
    route = layer.router(x)
    keep = _reference_keep(route.indices, 4, 0.75)
    assert 0 < layer.last_dropped_fraction == pytest.approx(1 - keep.float().mean().item())
    for i in range(40):
        e = int(route.indices[i, 0])
        expected = route.selected_probs[i, 0] * layer.experts.forward_expert(x[i : i + 1], e)[0]
        expected = expected if keep[i, 0] else torch.zeros(16)
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)


def test_a_large_capacity_factor_is_dropless():
    x = torch.randn(40, 16)
    dropless = _layer().eval()(x)
    roomy = _layer(capacity_factor=4.0).eval()
    torch.testing.assert_close(roomy(x), dropless)
    assert roomy.last_dropped_fraction == 0.0


def test_gating_dropout_sends_every_token_to_the_fixed_expert_in_training_only():
    layer = _layer(gating_dropout=1.0, gating_dropout_expert=2, num_shared_experts=1, shared_coef=0.5)
    x = torch.randn(12, 16)
    out = layer.train()(x)
    expected = layer.experts.forward_expert(x, 2) + 0.5 * layer.shared_experts[0](x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert layer.aux_losses == {}  # the router did not run, so no balance loss this step
    route = layer.router(x)
    eval_out = layer.eval()(x)
    ref = torch.stack(
        [
            route.selected_probs[i, 0] * layer.experts.forward_expert(x[i : i + 1], int(route.indices[i, 0]))[0]
            for i in range(12)
        ]
    ) + 0.5 * layer.shared_experts[0](x)
    torch.testing.assert_close(eval_out, ref, rtol=1e-5, atol=1e-6)


def test_every_configurable_router_has_one_family_object():
    from adamoe.config import ROUTERS
    from adamoe.families import FAMILIES, family

    assert set(FAMILIES) == set(ROUTERS)
    for name in ROUTERS:
        layer = MoEFeedForward(MoEConfig(router=name, top_k=1), 8, 16)
        assert layer.family is family(name) and (layer.scale_adapter is not None) == (name == "adamoe")
    with pytest.raises(ValueError, match="router='switch' is not one of"):
        family("switch")


def test_bad_family_options_name_the_value():
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoEConfig(capacity_factor=0.0)
    with pytest.raises(ValueError, match="gating_dropout must be in"):
        MoEConfig(gating_dropout=1.5)
    with pytest.raises(ValueError, match="gating_dropout_expert must be an expert index"):
        MoEConfig(num_experts=4, gating_dropout_expert=4)


def _expert(layer: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    return layer.experts.forward_expert(x, e)


def test_top_any_uses_every_expert_over_its_threshold_and_at_least_one():
    layer = _layer(router="topany", num_shared_experts=0)
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)
    with torch.no_grad():
        layer.router.threshold.copy_(torch.tensor([0.0, 0.3, -0.3, 5.0]))  # expert 3 practically never clears
    x = torch.randn(30, 16)
    out = layer.eval()(x)
    w = layer.router.gate.weight
    for i in range(30):
        cos = torch.nn.functional.cosine_similarity(x[i : i + 1], w, dim=-1)
        scores = torch.sigmoid(cos)
        active = scores > torch.sigmoid(layer.router.threshold)
        if not active.any():
            active = scores == scores.max()
        weights = torch.where(active, scores, torch.zeros_like(scores))
        weights = weights / weights.sum()
        expected = sum(weights[e] * _expert(layer, e, x[i : i + 1])[0] for e in range(4) if active[e])
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
    counts = layer.router(x).keep.sum(-1)
    assert counts.min() >= 1 and counts.max() > 1  # top-any: a varying number of experts per token


def test_routing_stats_count_only_the_pairs_that_ran_and_give_experts_per_token():
    from adamoe import record_routing, routing_stats

    layer = _layer(router="topany")
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)
    with torch.no_grad():
        layer.router.threshold.copy_(torch.tensor([0.0, 0.3, -0.3, 5.0]))
    x = torch.randn(30, 16)
    assert layer.experts_per_token() == 4.0  # nothing recorded yet: the bound
    with record_routing(layer):
        layer.eval()(x)
    keep = layer.router(x).keep
    stats = routing_stats(torch.nn.ModuleDict({"moe": layer}))["moe"]
    assert stats["tokens"].tolist() == keep.sum(0).tolist()  # inactive candidates are not counted
    assert layer.experts_per_token() == pytest.approx(keep.sum().item() / 30)
    assert 1.0 < layer.experts_per_token() < 4.0
    switch = _layer(capacity_factor=0.5)
    with record_routing(switch):
        switch.eval()(x)
    assert switch.expert_tokens.sum() == pytest.approx((1 - switch.last_dropped_fraction) * 30)
    assert _layer(router="smear").experts_per_token() == _layer(router="soft").experts_per_token() == 4.0
    assert _layer(top_k=2).experts_per_token() == 2.0


def test_top_any_thresholds_learn_through_the_straight_through_gate():
    layer = _layer(router="topany").train()
    layer(torch.randn(20, 16)).pow(2).sum().backward()
    assert layer.router.threshold.grad is not None and layer.router.threshold.grad.abs().sum() > 0
    assert "balance" in layer.aux_losses


def test_smear_runs_one_merged_expert_per_sequence():
    layer = _layer(router="smear")
    x = torch.randn(3, 7, 16)
    out = layer.eval()(x)
    ex = layer.experts
    for b in range(3):
        p = torch.softmax(layer.router.gate(x[b].mean(0)), dim=-1)
        w_in = sum(p[e] * ex.w_in[e] for e in range(4))
        b_in = sum(p[e] * ex.b_in[e] for e in range(4))
        w_out = sum(p[e] * ex.w_out[e] for e in range(4))
        b_out = sum(p[e] * ex.b_out[e] for e in range(4))
        expected = torch.nn.functional.gelu(x[b] @ w_in + b_in) @ w_out + b_out
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


def test_soft_moe_mixes_tokens_into_slots_and_slots_back_into_tokens():
    layer = _layer(router="soft", slots_per_expert=2)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    x = torch.randn(2, 5, 16)
    out = layer.eval()(x)
    for b in range(2):
        logits = layer.router.gate(x[b])  # (T, E * S)
        dispatch_w, combine_w = torch.softmax(logits, dim=0), torch.softmax(logits, dim=1)
        slots = dispatch_w.T @ x[b]  # (E * S, D)
        slot_out = torch.stack([_expert(layer, s // 2, slots[s : s + 1])[0] for s in range(8)])
        torch.testing.assert_close(out[b], combine_w @ slot_out, rtol=1e-5, atol=1e-5)


def test_every_family_upcycles_and_trains():
    from torch import nn

    import adamoe

    for overrides in (
        {"router": "topany"},
        {"router": "smear"},
        {"router": "soft", "slots_per_expert": 2},
        {"router": "topk", "capacity_factor": 1.0},
        {"router": "adamoe", "gating_dropout": 0.5},
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Sequential())
        model.mlp = adamoe.FeedForward(16, 32)
        adamoe.upcycle(model, MoEConfig(num_experts=4, top_k=1, **overrides), target=r"^mlp$")
        x = torch.randn(2, 6, 16)
        loss = model.mlp(model[0](x)).pow(2).mean()
        aux, _ = adamoe.moe_aux_loss(model)
        (loss + (aux if aux is not None else 0)).backward()
        trained = [p.grad is not None for p in adamoe.router_parameters(model)]
        assert all(trained) != model.mlp.gating_dropped, overrides  # a gating-dropped step skips the router
        assert model.mlp.experts.w_in.grad is not None


def test_thor_sends_each_token_to_one_random_expert_with_weight_one():
    layer = _layer(router="thor")
    x = torch.randn(50, 16)
    out = layer.eval()(x)
    every = torch.stack([_expert(layer, e, x) for e in range(4)])  # (E, N, D)
    distance = (every - out.unsqueeze(0)).abs().amax(-1)  # (E, N)
    assert (distance.min(0).values < 1e-5).all()  # each token is exactly one expert's output
    chosen = distance.argmin(0)
    assert len(set(chosen.tolist())) == 4  # random over all experts, at inference too
    assert list(layer.router.parameters()) == []  # no learned router


def _tiny_policy(moe: MoEConfig | None = None, **overrides):
    from policies import VLAPolicy, vla_config

    torch.manual_seed(0)
    policy = VLAPolicy(vla_config("tiny", **overrides))
    if moe is not None:
        policy.upcycle(moe, init="paper", generator=torch.Generator().manual_seed(0))
    return policy


def _vla_batch(policy, b: int = 2) -> dict:
    c = policy.config
    g = torch.Generator().manual_seed(1)
    batch = {
        f"observation.images.{cam}": torch.rand(b, 3, c.image_size, c.image_size, generator=g) for cam in c.cameras
    }
    batch["observation.state"] = torch.randn(b, c.state_dim, generator=g)
    batch["task"] = ["pick up the red cube"] * b
    batch["action"] = torch.randn(b, c.chunk_size, c.action_dim, generator=g)
    batch["action_is_pad"] = torch.zeros(b, c.chunk_size, dtype=torch.bool)
    return batch


def test_thor_policies_train_with_the_two_pass_consistency_loss():
    import adamoe

    policy = _tiny_policy(MoEConfig(router="thor", consistency_coef=0.5, expert_noise_std=0.05)).train()
    assert adamoe.consistency_coef(policy) == 0.5
    loss, logs = policy(_vla_batch(policy))
    assert logs["consistency_loss"] > 0  # two passes routed differently
    loss.backward()
    assert policy.model.action_expert.layers[0].mlp.experts.w_in.grad is not None
    assert adamoe.consistency_coef(_tiny_policy(MoEConfig())) == 0.0


def test_self_contrast_combines_strong_and_weak_routing_as_specified():
    import adamoe

    moe = MoEConfig(router="topk", top_k=1, expert_noise_std=0.05)
    policy = _tiny_policy(moe).eval()
    torch.nn.init.normal_(policy.model.action_expert.layers[0].mlp.router.gate.weight, std=0.5)
    batch = _vla_batch(policy)
    noise = torch.randn(
        2, policy.config.chunk_size, policy.config.action_dim, generator=torch.Generator().manual_seed(3)
    )
    with adamoe.routing_top_k(policy, 2):
        strong = policy.predict_action_chunk(batch, noise=noise, num_steps=1)
    with adamoe.routing_top_k(policy, 1):
        weak = policy.predict_action_chunk(batch, noise=noise, num_steps=1)
    assert not torch.allclose(strong, weak)
    policy.config.self_contrast_beta = 0.5
    contrast = policy.predict_action_chunk(batch, noise=noise, num_steps=1)
    torch.testing.assert_close(contrast, 1.5 * strong - 0.5 * weak, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="self_contrast_beta must be >= 0"):
        from policies import vla_config

        vla_config("tiny", self_contrast_beta=-1.0)


def test_every_family_of_the_comparison_upcycles_a_policy_that_trains_and_reloads(tmp_path):
    from policies import from_pretrained
    from policies.vla.families import FAMILIES, SELF_CONTRAST
    from policies.vla.pipeline import PipelineConfig, upcycled

    _tiny_policy().save_pretrained(tmp_path / "dense")
    cfg = PipelineConfig(output_dir=str(tmp_path))
    for kind in FAMILIES:
        policy = upcycled(cfg, tmp_path / "dense", kind).train()
        loss, _ = policy(_vla_batch(policy))
        loss.backward()
        policy.eval().save_pretrained(tmp_path / kind)
        loaded = from_pretrained(tmp_path / kind)
        assert loaded.config.moe["config"] == policy.config.moe["config"], kind
        assert loaded.config.self_contrast_beta == SELF_CONTRAST.get(kind, 0.0)
        if kind != "thor":  # THOR routes at random at inference too
            noise = torch.randn(1, policy.config.chunk_size, policy.config.action_dim)
            batch = _vla_batch(policy, b=1)
            torch.testing.assert_close(
                loaded.predict_action_chunk(batch, noise=noise), policy.predict_action_chunk(batch, noise=noise)
            )


def test_resmoe_compression_is_a_barycenter_plus_low_rank_residuals_with_its_error_reported():
    import adamoe

    torch.manual_seed(0)
    dense = adamoe.FeedForward(16, 32)
    layer = MoEFeedForward.from_dense(dense, MoEConfig(num_experts=4, expert_noise_std=0.05))
    x = torch.randn(20, 16)
    full = adamoe.compress_experts(layer, rank=16, tokens=x)  # full rank: exact
    torch.testing.assert_close(full.weight("w_in"), layer.experts.w_in, rtol=1e-4, atol=1e-5)
    assert full.report["weight_rel_error"] < 1e-5 and full.report["output_rel_error"] < 1e-5
    torch.testing.assert_close(full.barycenter["w_out"], layer.experts.w_out.mean(0))
    errors = [adamoe.compress_experts(layer, rank=r, tokens=x).report for r in (1, 4, 8)]
    assert errors[0]["weight_rel_error"] > errors[1]["weight_rel_error"] > errors[2]["weight_rel_error"] > 0
    small = adamoe.compress_experts(layer, rank=1)
    e, d, h = 4, 16, 32
    assert small.num_parameters() == (d * h + h * d) + e * (d + h) * 2 + e * (h + d)  # bars, factors, biases
    assert small.report["compression"] > 2
    before = layer.experts.w_in.clone()
    small.apply_to(layer)  # the reconstruction, for evaluating the compressed policy
    assert not torch.equal(layer.experts.w_in, before)
    torch.testing.assert_close(layer.experts.w_in, small.weight("w_in"))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        adamoe.compress_experts(layer, rank=0)


@pytest.mark.parametrize("structure", ["lowrank", "blockdiag"])
def test_structured_experts_start_from_the_dense_ffn_and_store_only_their_factors(structure):
    import adamoe

    torch.manual_seed(0)
    dense = adamoe.FeedForward(16, 32)
    exact = {"structure_rank": 16} if structure == "lowrank" else {"structure_blocks": 1}
    layer = MoEFeedForward.from_dense(dense, MoEConfig(expert_structure=structure, **exact))
    x = torch.randn(9, 16)
    for e in range(4):  # full rank / one block: every expert is the dense FFN
        torch.testing.assert_close(layer.experts.forward_expert(x, e), dense(x), rtol=1e-4, atol=1e-5)
    small = {"structure_rank": 2} if structure == "lowrank" else {"structure_blocks": 4}
    compact = MoEFeedForward.from_dense(adamoe.FeedForward(16, 32), MoEConfig(expert_structure=structure, **small))
    dense_experts = adamoe.GroupedExperts(4, 16, 32)
    assert sum(p.numel() for p in compact.experts.parameters()) < sum(p.numel() for p in dense_experts.parameters())
    assert compact.experts.w_in.shape == (4, 16, 32)  # assembled for the dispatch backends
    w = compact.experts.w_in[0]
    if structure == "blockdiag":
        assert (w[:4, 8:] == 0).all() and (w[:4, :8] != 0).any()
    else:
        assert torch.linalg.matrix_rank(w) == 2
    compact(torch.randn(2, 5, 16)).sum().backward()
    assert all(p.grad is not None for p in compact.experts.parameters())


def test_self_guided_training_blends_the_dense_ffn_out_on_schedule():
    import adamoe

    torch.manual_seed(0)
    dense = adamoe.FeedForward(16, 32)
    layer = MoEFeedForward.from_dense(
        dense, MoEConfig(expert_structure="lowrank", structure_rank=2, self_guided_steps=4)
    ).train()
    x = torch.randn(6, 16)
    guide_params = sum(p.numel() for p in layer.guide.parameters())
    routed = sum(p.numel() for p in layer.experts.parameters()) * 3 / 4  # top-1 of 4
    everything = sum(p.numel() for p in layer.parameters())
    assert layer.inactive_parameters() == everything - guide_params  # step 0: the MoE branch does not run
    torch.testing.assert_close(layer(x), dense(x))  # step 0: alpha = 1, the dense path alone
    layer(x)  # step 1
    alpha = layer.guide_alpha()
    assert alpha == pytest.approx(0.5)
    assert layer.inactive_parameters() == pytest.approx(routed)  # both paths shape the output
    expected = 0.5 * dense(x) + 0.5 * layer._forward_moe(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer(x)
    assert layer.guide_alpha() == 0.0
    torch.testing.assert_close(layer(x), layer._forward_moe(x))  # guided out: the structured MoE alone
    assert layer.inactive_parameters() == pytest.approx(routed + guide_params)
    state = layer.state_dict()
    assert int(state["guide_step"]) == 5 and "experts.w_in_u" in state and "experts.w_in" not in state
