"""Mixture of attention (BAM): soft attention experts against a plain per-expert reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adamoe import MixtureOfAttention, MoAConfig

DIM, HEADS, HEAD_DIM = 24, 3, 8


def _attention(seed: int, bias: bool = False) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    inner = HEADS * HEAD_DIM
    return (
        nn.Linear(DIM, inner, bias=bias),
        nn.Linear(DIM, inner, bias=bias),
        nn.Linear(DIM, inner, bias=bias),
        nn.Linear(inner, DIM, bias=bias),
    )


def _plain(projections, x, mask=None, kv=None) -> torch.Tensor:
    """One dense multi-head attention layer, written out."""
    q, k, v, o = projections
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, -1, HEADS, HEAD_DIM).transpose(1, 2)
    keys, values = split(k(x)), split(v(x))
    if kv is not None:
        keys, values = torch.cat([kv[0], keys], 2), torch.cat([kv[1], values], 2)
    scores = split(q(x)) @ keys.transpose(-1, -2) / HEAD_DIM**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, -1) @ values
    return o(out.transpose(1, 2).reshape(b, t, -1))


def _reference(layer: MixtureOfAttention, x, mask=None, kv=None) -> torch.Tensor:
    """sum_e p_e(x) * attention_e(x): every expert run on its own, mixed per token."""
    probs = torch.softmax(layer.router(x), -1)
    experts = [_plain(layer.expert_projections(e), x, mask, kv) for e in range(layer.num_experts)]
    return sum(probs[..., e : e + 1] * y for e, y in enumerate(experts))


def _mixture(share_kv: bool, bias: bool = False, experts: int = 4) -> MixtureOfAttention:
    config = MoAConfig(num_experts=experts, share_kv=share_kv, router_init_std=0.5)
    layer = MixtureOfAttention.from_specialists([_attention(s, bias) for s in range(experts)], HEADS, config)
    return layer.eval()


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_heads_match_each_expert_run_on_its_own_and_mixed_by_the_router(share_kv, bias):
    layer = _mixture(share_kv, bias)
    x = torch.randn(2, 7, DIM)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share_kv", [False, True])
def test_masks_and_keys_from_another_stream_reach_every_expert(share_kv):
    layer = _mixture(share_kv)
    x = torch.randn(2, 5, DIM)
    kv = (torch.randn(2, HEADS, 6, HEAD_DIM), torch.randn(2, HEADS, 6, HEAD_DIM))
    mask = torch.rand(2, 1, 5, 11) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(layer(x, mask, kv), _reference(layer, x, mask, kv), rtol=1e-5, atol=1e-5)


def _expert_views(layer: MixtureOfAttention, e: int):
    """Expert ``e``'s projections as functions of views of the fused parameters, so
    gradients flow back to them (``expert_projections`` returns detached copies)."""
    h, d, n, dim = HEADS, HEAD_DIM, layer.num_experts, DIM

    def part(proj, experts):
        j = e if experts > 1 else 0
        w = proj.weight.reshape(h, experts, d, dim)[:, j].reshape(h * d, dim)
        b = None if proj.bias is None else proj.bias.reshape(h, experts, d)[:, j].reshape(h * d)
        return lambda x: F.linear(x, w, b)

    w_o = layer.o_proj.weight.reshape(dim, h, n, d)[:, :, e].reshape(dim, h * d)
    b_o = None if layer.o_bias is None else layer.o_bias[e]
    kv = layer.kv_experts
    return part(layer.q_proj, n), part(layer.k_proj, kv), part(layer.v_proj, kv), lambda a: F.linear(a, w_o, b_o)


@pytest.mark.parametrize("share_kv", [False, True])
def test_gradients_match_the_reference(share_kv):
    layer = _mixture(share_kv, bias=True).train()
    x = torch.randn(2, 6, DIM, requires_grad=True)
    params = [x, *layer.parameters()]
    fast = torch.autograd.grad(layer(x).square().sum(), params)
    probs = torch.softmax(layer.router(x), -1)
    ref_out = sum(probs[..., e : e + 1] * _plain(_expert_views(layer, e), x) for e in range(layer.num_experts))
    ref = torch.autograd.grad(ref_out.square().sum(), params)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("share_kv", [False, True])
def test_upcycling_one_dense_layer_computes_its_attention_whatever_the_router_says(share_kv):
    dense = _attention(7, bias=True)
    config = MoAConfig(num_experts=4, share_kv=share_kv, router_init_std=1.0, expert_noise_std=0.0)
    layer = MixtureOfAttention.from_dense(dense, HEADS, config)
    x = torch.randn(3, 9, DIM)
    assert layer.last_probs is None
    torch.testing.assert_close(layer(x), _plain(dense, x), rtol=1e-5, atol=1e-6)
    assert layer.last_probs.std() > 0.01  # the router is far from uniform, and it does not matter


def test_expert_noise_makes_upcycled_copies_differ():
    dense = _attention(3)
    layer = MixtureOfAttention.from_dense(
        dense, HEADS, MoAConfig(num_experts=2, expert_noise_std=0.01), torch.Generator().manual_seed(0)
    )
    a, b = layer.expert_projections(0), layer.expert_projections(1)
    assert not torch.equal(a[0].weight, b[0].weight)
    assert torch.allclose(a[0].weight, dense[0].weight, atol=0.01)


@pytest.mark.parametrize("share_kv", [False, True])
def test_equal_copies_give_the_router_no_gradient_and_the_default_noise_does(share_kv):
    dense, x = _attention(4), torch.randn(2, 6, DIM)

    def router_grad(noise_std: float) -> torch.Tensor:
        config = MoAConfig(num_experts=3, share_kv=share_kv, router_init_std=0.5, expert_noise_std=noise_std)
        layer = MixtureOfAttention.from_dense(dense, HEADS, config, torch.Generator().manual_seed(0))
        layer(x).pow(2).sum().backward()
        return layer.router.weight.grad

    assert MoAConfig().expert_noise_std > 0
    torch.testing.assert_close(router_grad(0.0), torch.zeros(3, DIM), atol=1e-6, rtol=0)
    assert router_grad(MoAConfig().expert_noise_std).abs().max() > 1e-4


def test_specialists_are_taken_as_they_are_whatever_the_noise_setting():
    specialists = [_attention(s) for s in range(2)]
    layer = MixtureOfAttention.from_specialists(specialists, HEADS, MoAConfig(num_experts=2, expert_noise_std=0.5))
    for e, spec in enumerate(specialists):
        for got, want in zip(layer.expert_projections(e), spec, strict=True):
            torch.testing.assert_close(got.weight, want.weight)


def test_specialists_become_experts_and_shared_keys_and_values_are_their_average():
    specialists = [_attention(s, bias=True) for s in range(3)]
    separate = MixtureOfAttention.from_specialists(specialists, HEADS, MoAConfig(num_experts=3))
    shared = MixtureOfAttention.from_specialists(specialists, HEADS, MoAConfig(num_experts=3, share_kv=True))
    for e, spec in enumerate(specialists):
        for got, want in zip(separate.expert_projections(e), spec, strict=True):
            torch.testing.assert_close(got.weight, want.weight)
            torch.testing.assert_close(got.bias, want.bias)
        q, k, v, o = shared.expert_projections(e)
        torch.testing.assert_close(q.weight, spec[0].weight)
        torch.testing.assert_close(o.weight, spec[3].weight)
        torch.testing.assert_close(k.weight, torch.stack([s[1].weight for s in specialists]).mean(0))
        torch.testing.assert_close(v.bias, torch.stack([s[2].bias for s in specialists]).mean(0))
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in separate.parameters())


def test_a_router_that_picks_one_specialist_reproduces_its_attention():
    specialists = [_attention(s) for s in range(3)]
    layer = MixtureOfAttention.from_specialists(specialists, HEADS, MoAConfig(num_experts=3))
    x = torch.randn(2, 5, DIM)
    with torch.no_grad():  # logits 0, 0, 1e4 for every input with a positive feature sum
        layer.router.weight.zero_()
        layer.router.weight[2] = 1e4
    x = x.abs() + 0.1
    torch.testing.assert_close(layer(x), _plain(specialists[2], x), rtol=1e-5, atol=1e-6)


def test_the_fast_path_uses_one_attention_call_over_all_expert_heads(monkeypatch):
    layer = _mixture(share_kv=True)
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    )
    layer(torch.randn(1, 4, DIM))
    assert calls == [torch.Size([1, HEADS * 4, 4, HEAD_DIM])]


def test_mismatched_specialists_and_bad_configs_are_named():
    a, b = _attention(0), _attention(1)
    b = (nn.Linear(DIM, 2 * HEADS * HEAD_DIM), b[1], b[2], b[3])
    with pytest.raises(ValueError, match="attention 1"):
        MixtureOfAttention.from_specialists([a, b], HEADS, MoAConfig(num_experts=2))
    with pytest.raises(ValueError, match="one per expert"):
        MixtureOfAttention.from_specialists([a], HEADS, MoAConfig(num_experts=2))
    with pytest.raises(ValueError, match="do not split into 5 heads"):
        MixtureOfAttention.from_dense(a, 5, MoAConfig(num_experts=2))
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1, got 0"):
        MoAConfig(num_experts=0)
    with pytest.raises(ValueError, match="router_init_std must be a number >= 0, got 'big'"):
        MoAConfig(router_init_std="big")
    lopsided = (nn.Linear(DIM, HEADS * HEAD_DIM, bias=True), *_attention(2)[1:])
    with pytest.raises(ValueError, match=r"a bias or none, got bias \{'q': True, 'k': False, 'v': False\}"):
        MixtureOfAttention.from_dense(lopsided, HEADS, MoAConfig(num_experts=2))
    with pytest.raises(ValueError, match="unknown MoAConfig fields \\['top_k'\\]"):
        MoAConfig.from_dict({"top_k": 2})
    with pytest.raises(ValueError, match=r"expects \(B, T, 24\) inputs"):
        _mixture(False)(torch.randn(4, DIM))
