"""The MoE layer against a plain per-token reference, for every router and backend."""

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adamoe
from adamoe import MoEConfig, MoEFeedForward
from adamoe.dispatch import BACKENDS, Routing

D, H = 16, 32
BACKEND_NAMES = ["grouped_mm", "batched_mm", "loop", "dense"]
ROUTINGS = [("adamoe", False), ("topk", False), ("topk", True)]


def reference_forward(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, with no sorting, batching or gathering."""
    cfg, ex = layer.config, layer.experts
    outputs = []
    for token in x.reshape(-1, D):
        logits = layer.router.gate.weight @ token
        p = torch.softmax(logits, dim=0)
        chosen = torch.topk(p, cfg.top_k).indices.tolist()
        y = torch.zeros(D)
        total = sum(p[i] for i in chosen)
        for i in chosen:
            w = p[i]
            if cfg.router == "adamoe":
                w = w + layer.scale_adapter.weight[i] @ token
            elif cfg.renormalize:
                w = w / total
            h = token @ ex.w_in[i] + (ex.b_in[i] if ex.b_in is not None else 0)
            if ex.kind == "gated":
                h = ex._act(h[:H]) * h[H:]
            else:
                h = ex._act(h)
            y = y + w * (h @ ex.w_out[i] + (ex.b_out[i] if ex.b_out is not None else 0))
        gate = layer.routed_gate if layer.routed_gate is not None else 1.0
        out = cfg.routed_coef * gate * y
        if len(layer.shared_experts):
            shared = sum(e(token) for e in layer.shared_experts) / len(layer.shared_experts)
            out = out + cfg.shared_coef * shared
        outputs.append(out)
    return torch.stack(outputs).reshape(x.shape)


def make_layer(router="adamoe", renormalize=False, kind="mlp", top_k=2, num_experts=4, shared=1, seed=0, **kw):
    torch.manual_seed(seed)
    dense = adamoe.FeedForward(D, H, kind=kind, activation="silu" if kind == "gated" else "gelu")
    cfg = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=shared,
        router=router,
        renormalize=renormalize,
        router_init_std=0.5,
        expert_noise_std=0.05,
        **kw,
    )
    return MoEFeedForward.from_dense(dense, cfg, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("router,renormalize", ROUTINGS)
@pytest.mark.parametrize("kind", ["mlp", "gated"])
def test_forward_and_gradients_match_the_per_token_reference(backend, router, renormalize, kind):
    layer = make_layer(router, renormalize, kind, backend=backend)
    x = torch.randn(2, 7, D, requires_grad=True)
    out = layer(x)
    ref_layer = make_layer(router, renormalize, kind)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_forward(ref_layer, x_ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for (name, p), (_, p_ref) in zip(layer.named_parameters(), ref_layer.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


def test_all_backends_agree_on_a_larger_batch():
    layer = make_layer(top_k=1, num_experts=8)
    x = torch.randn(300, D)
    outs = []
    for backend in BACKEND_NAMES:
        layer.config.backend = backend
        outs.append(layer(x))
    for a, b in itertools.combinations(outs, 2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_top_k_equal_to_all_experts_is_the_dense_softmax_mixture():
    layer = make_layer("topk", top_k=4, num_experts=4, shared=0, routed_coef=1.0)
    x = torch.randn(9, D)
    p = torch.softmax(x @ layer.router.gate.weight.T, dim=-1)
    mixture = sum(p[:, [i]] * layer.experts.forward_expert(x, i) for i in range(4))
    torch.testing.assert_close(layer(x), mixture, atol=1e-5, rtol=1e-5)


def test_balance_loss_gradient_reaches_the_router_and_not_the_scale_adapter():
    layer = make_layer("adamoe").train()
    layer(torch.randn(20, D))
    layer.aux_losses["balance"].backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert layer.scale_adapter.weight.grad is None or layer.scale_adapter.weight.grad.abs().sum() == 0
    assert layer.experts.w_in.grad is None


def test_balance_loss_forms_on_hand_made_routing():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    indices = torch.tensor([[0], [1], [0], [3]])
    f = torch.tensor([0.5, 0.25, 0.0, 0.25])
    big_p = probs.mean(0)
    torch.testing.assert_close(adamoe.balance_loss(probs, indices, "mean"), (f * big_p).mean())
    torch.testing.assert_close(adamoe.balance_loss(probs, indices, "switch"), 4 * (f * big_p).sum())
    uniform = torch.full((4, 4), 0.25)
    assert adamoe.balance_loss(uniform, torch.arange(4)[:, None], "switch").item() == pytest.approx(1.0)


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(adamoe.router_z_loss(logits), expected)


def test_balance_coefficient_schedule_follows_the_paper():
    cfg = MoEConfig()
    assert cfg.balance_weight(0) == 0.01 and cfg.balance_weight(499) == 0.01 and cfg.balance_weight(500) == 0.005
    assert MoEConfig(balance_loss="none").balance_weight(0) == 0.0


def test_aux_loss_is_averaged_over_layers_with_the_schedule():
    model = nn.Sequential(
        make_layer(seed=1),
        make_layer(seed=2),
    ).train()
    model(torch.randn(10, D))
    loss, logs = adamoe.moe_aux_loss(model, step=600)
    balances = [m.aux_losses["balance"].detach() for m in model]
    torch.testing.assert_close(loss, 0.005 * (balances[0] + balances[1]) / 2)
    assert logs["balance_loss"] == pytest.approx(float((balances[0] + balances[1]) / 2))


def test_aux_free_bias_moves_selection_towards_balance_without_changing_weights():
    layer = make_layer("topk", top_k=1, aux_free_bias=True, bias_update_rate=0.05, balance_loss="none").train()
    x = torch.randn(400, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.gate.weight.normal_(std=0.3)
        layer.router.gate.weight[0, 0] += 1.5  # a skewed router: expert 0 takes most tokens
    first = torch.bincount(layer.router(x).indices.reshape(-1), minlength=4)
    for _ in range(60):
        layer(x)
    later = torch.bincount(layer.router(x).indices.reshape(-1), minlength=4)
    assert first.max() > 200 and later.max() < 140
    route = layer.router(x)
    torch.testing.assert_close(route.selected_probs, route.probs.gather(-1, route.indices))


def test_routing_statistics_count_tokens_and_weights():
    layer = make_layer(top_k=2)
    model = nn.Sequential(layer)
    with adamoe.record_routing(model):
        model(torch.randn(25, D))
    stats = adamoe.routing_stats(model)["0"]
    assert stats["tokens"].sum() == 50 and stats["share"].sum() == pytest.approx(1.0)
    assert layer.record_stats is False
    adamoe.reset_routing_stats(model)
    assert adamoe.routing_stats(model)["0"]["tokens"].sum() == 0


def _routing(indices, num_experts):
    indices = torch.as_tensor(indices).reshape(-1, 1) if torch.as_tensor(indices).dim() == 1 else indices
    return Routing(indices, torch.ones(indices.shape, dtype=torch.float32), num_experts)


def test_auto_backend_choice_by_shape_load_dtype_and_k():
    layer = make_layer(top_k=1)
    x = torch.randn(4, D)
    small = _routing([0, 1, 2, 3], 4)
    assert adamoe.select_backend("auto", x, layer.experts, small) == "batched_mm"  # small groups on CPU
    balanced = _routing(torch.arange(400) % 4, 4)
    assert adamoe.select_backend("auto", torch.randn(400, D), layer.experts, balanced) == "batched_mm"
    skewed = _routing(torch.cat([torch.zeros(300, dtype=torch.long), torch.arange(100) % 4]), 4)
    assert adamoe.select_backend("auto", torch.randn(400, D), layer.experts, skewed) == "grouped_mm"
    assert (
        adamoe.select_backend("auto", x.double(), layer.experts.double(), _routing(torch.zeros(400).long(), 4))
        == "loop"
    )
    everything = Routing(torch.arange(4).repeat(4, 1), torch.ones(4, 4), 4)
    assert adamoe.select_backend("auto", x, layer.experts, everything) == "dense"
    with pytest.raises(ValueError, match="grouped_mm.*float64"):
        adamoe.select_backend("grouped_mm", x.double(), layer.experts.double(), small)
    with pytest.raises(ValueError, match="'fast'.*valid backends"):
        adamoe.select_backend("fast", x, layer.experts, small)
    assert set(BACKENDS) == {"grouped_mm", "batched_mm", "loop", "dense"}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backends_handle_idle_experts_and_empty_batches(backend):
    layer = make_layer(top_k=1, num_experts=4, backend=backend)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 10.0  # every token with x[0] > 0 goes to expert 2
    x = torch.randn(12, D).abs().requires_grad_(True)
    out = layer(x)
    torch.testing.assert_close(out, reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.all(layer.experts.w_in.grad[[0, 1, 3]] == 0) and layer.experts.w_in.grad[2].abs().sum() > 0
    assert layer(torch.randn(0, D)).shape == (0, D)


@pytest.mark.parametrize("backend", ["grouped_mm", "batched_mm", "loop"])
def test_bfloat16_backends_track_the_float32_reference(backend):
    layer = make_layer(top_k=2, num_experts=4, backend=backend)
    x = torch.randn(40, D)
    ref = reference_forward(layer, x)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_float64_layer_matches_the_reference_without_grouped_mm():
    layer = make_layer(top_k=1).double()
    x = torch.randn(5, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_shared_experts": -1}, "num_shared_experts"),
        ({"router": "switch"}, "router='switch'.*adamoe"),
        ({"backend": "cuda"}, "backend"),
        ({"balance_coef": -1.0}, "balance_coef"),
    ],
)
def test_bad_configuration_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_mismatched_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="last dimension 16"):
        make_layer()(torch.randn(3, D + 1))


def test_config_round_trips_through_a_dict_and_rejects_unknown_fields():
    cfg = MoEConfig(num_experts=8, top_k=2, router="topk", renormalize=True)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_expert"):
        MoEConfig.from_dict({"num_expert": 4})


def test_moe_layer_state_dict_round_trips_through_safetensors(tmp_path):
    layer = make_layer(top_k=2)
    save_file(layer.state_dict(), tmp_path / "moe.safetensors")
    fresh = make_layer(top_k=2, seed=99)
    fresh.load_state_dict(load_file(tmp_path / "moe.safetensors"))
    x = torch.randn(6, D)
    torch.testing.assert_close(fresh(x), layer(x))
