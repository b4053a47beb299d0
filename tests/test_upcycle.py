"""Upcycling dense models, ours and foreign ones, into MoE models."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adamoe
from adamoe import MoEConfig, MoEFeedForward


class Block(nn.Module):
    def __init__(self, dim=16, hidden=48, kind="mlp", activation="gelu"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = adamoe.FeedForward(dim, hidden, kind, activation)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyModel(nn.Module):
    def __init__(self, kind="mlp", activation="gelu"):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(kind=kind, activation=activation) for _ in range(3)))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


@pytest.mark.parametrize("kind,activation", [("mlp", "gelu"), ("gated", "silu"), ("gated", "gelu_tanh")])
def test_preserve_init_reproduces_the_dense_output(kind, activation):
    torch.manual_seed(0)
    dense = TinyModel(kind, activation)
    moe = copy.deepcopy(dense)
    report = adamoe.upcycle(moe, MoEConfig(num_experts=4, top_k=1), init="preserve")
    assert report.names == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(moe(x), dense(x), atol=0, rtol=0)


def test_preserve_init_still_learns_every_part():
    torch.manual_seed(0)
    model = TinyModel()
    adamoe.upcycle(model, init="preserve")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 16), torch.randn(32, 3)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    layer = model.blocks[0].mlp
    assert layer.routed_gate.item() != 0.0
    assert layer.experts.w_in.grad.abs().sum() > 0 and layer.router.gate.weight.grad.abs().sum() > 0


def test_paper_init_copies_the_ffn_into_every_expert_and_draws_small_routers():
    torch.manual_seed(0)
    model = TinyModel()
    dense_ffn = copy.deepcopy(model.blocks[1].mlp)
    adamoe.upcycle(model, MoEConfig(num_experts=8), init="paper", generator=torch.Generator().manual_seed(0))
    layer = model.blocks[1].mlp
    assert isinstance(layer, MoEFeedForward) and layer.config.shared_coef == 0.5 and layer.routed_gate is None
    for e in range(8):
        torch.testing.assert_close(layer.experts.w_in[e], dense_ffn.fc1.weight.T)
        torch.testing.assert_close(layer.experts.b_in[e], dense_ffn.fc1.bias)
        torch.testing.assert_close(layer.experts.w_out[e], dense_ffn.fc2.weight.T)
        torch.testing.assert_close(layer.experts.b_out[e], dense_ffn.fc2.bias)
    torch.testing.assert_close(layer.shared_experts[0].fc1.weight, dense_ffn.fc1.weight)
    for w in (layer.router.gate.weight, layer.scale_adapter.weight):
        assert w.shape == (8, 16) and 0.004 < w.std().item() < 0.008


def test_expert_noise_perturbs_each_copy_differently():
    model = TinyModel()
    adamoe.upcycle(model, MoEConfig(expert_noise_std=0.01), generator=torch.Generator().manual_seed(0))
    w = model.blocks[0].mlp.experts.w_in
    assert not torch.equal(w[0], w[1])
    assert (w[0] - w[1]).std().item() == pytest.approx(0.01 * 2**0.5, rel=0.1)


def test_upcycled_model_saves_and_reloads_as_upcycled(tmp_path):
    torch.manual_seed(0)
    model = TinyModel("gated", "silu")
    report = adamoe.upcycle(model, MoEConfig(top_k=2), init="preserve")
    with torch.no_grad():  # move off the dense function so the check means something
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = TinyModel("gated", "silu")
    adamoe.upcycle(fresh, MoEConfig.from_dict(report.config.to_dict()), init="paper")
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_target_by_regex_type_and_callable():
    for target in (r"blocks\.[02]\.mlp$", adamoe.FeedForward, lambda name, m: name == "blocks.1.mlp"):
        model = TinyModel()
        report = adamoe.upcycle(model, target=target)
        assert len(report.layers) in (1, 2, 3)
        assert all(isinstance(model.get_submodule(n), MoEFeedForward) for n in report.names)
    assert adamoe.upcycle(TinyModel(), target=r"blocks\.[02]\.mlp$").names == ["blocks.0.mlp", "blocks.2.mlp"]


def test_sequential_ffn_with_dropout_is_recognised():
    model = nn.Sequential(nn.LayerNorm(16))
    model.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate="tanh"), nn.Dropout(0.0), nn.Linear(32, 16))
    model.eval()
    dense_out = model(torch.ones(2, 16))
    report = adamoe.upcycle(model, init="preserve")
    assert report.layers[0].activation == "gelu_tanh"
    torch.testing.assert_close(model(torch.ones(2, 16)), dense_out)


def test_report_counts_total_and_active_parameters():
    model = TinyModel()
    report = adamoe.upcycle(model, MoEConfig(num_experts=4, top_k=1, num_shared_experts=1))
    layer = report.layers[0]
    ffn = 16 * 48 + 48 + 48 * 16 + 16
    assert layer.dense_params == ffn
    routers = 2 * 4 * 16
    assert layer.moe_params == ffn + 4 * ffn + routers
    assert layer.active_params == ffn + ffn + routers
    assert "blocks.0.mlp" in str(report)


def test_no_match_lists_the_modules_that_read_as_ffns():
    with pytest.raises(ValueError, match="blocks.0.mlp"):
        adamoe.upcycle(TinyModel(), target="attention")
    with pytest.raises(ValueError, match="'sideways'.*paper"):
        adamoe.upcycle(TinyModel(), init="sideways")
    with pytest.raises(ValueError, match="num_shared_experts >= 1"):
        adamoe.upcycle(TinyModel(), MoEConfig(num_shared_experts=0), init="preserve")


def test_router_parameters_are_the_routers_and_scale_adapters():
    model = TinyModel()
    adamoe.upcycle(model)
    params = adamoe.router_parameters(model)
    assert len(params) == 6 and all(p.shape == (4, 16) for p in params)


transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gemma():
    cfg = transformers.GemmaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        hidden_activation="gelu_pytorch_tanh",
    )
    return transformers.GemmaForCausalLM(cfg)


@pytest.mark.parametrize("build,activation", [(_llama, "silu"), (_gemma, "gelu_tanh")])
def test_huggingface_model_upcycled_with_preserve_keeps_its_logits(build, activation):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    report = adamoe.upcycle(model, MoEConfig(num_experts=4, top_k=1), init="preserve")
    assert report.names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(layer.kind == "gated" and layer.activation == activation for layer in report.layers)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_huggingface_model_upcycled_with_paper_init_trains():
    torch.manual_seed(0)
    model = _llama()
    adamoe.upcycle(model, MoEConfig(num_experts=4, top_k=1), init="paper")
    model.train()
    ids = torch.randint(0, 64, (2, 10))
    out = model(ids, labels=ids)
    aux, logs = adamoe.moe_aux_loss(model, step=0)
    (out.loss + aux).backward()
    layer = model.model.layers[0].mlp
    assert layer.router.gate.weight.grad is not None and logs["balance_loss"] > 0


def test_gpt2_conv1d_mlp_reads_as_an_ffn_with_input_major_weights():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GPT2MLP(64, transformers.GPT2Config(n_embd=16)).eval()
    weights = adamoe.experts.ffn_weights(mlp)
    assert (weights.kind, weights.activation, tuple(weights.w_in.shape)) == ("mlp", "gelu_tanh", (16, 64))
    x = torch.randn(5, 16)
    ref = adamoe.experts.ACTIVATIONS["gelu_tanh"](x @ weights.w_in + weights.b_in) @ weights.w_out + weights.b_out
    torch.testing.assert_close(mlp(x), ref)
    layer = MoEFeedForward.from_dense(mlp, MoEConfig())
    assert layer.experts.hidden == 64


def test_from_experts_makes_each_ffn_one_routed_expert():
    torch.manual_seed(0)
    ffns = [adamoe.experts.FeedForward(8, 16, "mlp", "gelu") for _ in range(3)]
    config = MoEConfig(num_experts=3, top_k=3, num_shared_experts=0, router="topk", routed_coef=1.0)
    layer = MoEFeedForward.from_experts(ffns, config, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(10, 8)
    probs = torch.softmax(layer.router.gate(x).float(), dim=-1)
    expected = sum(probs[:, i : i + 1] * ffn(x) for i, ffn in enumerate(ffns))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    for i, ffn in enumerate(ffns):
        torch.testing.assert_close(layer.experts.w_in[i], ffn.fc1.weight.T)
    with pytest.raises(ValueError, match="got 2 FFNs for num_experts=3"):
        MoEFeedForward.from_experts(ffns[:2], config)
    wider = adamoe.experts.FeedForward(8, 32, "mlp", "gelu")
    with pytest.raises(ValueError, match="FFN 2 .* does not match FFN 0"):
        MoEFeedForward.from_experts([*ffns[:2], wider], config)
