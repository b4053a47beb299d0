"""Diagonal Fisher information (adamoe.fisher) and model merging (adamoe.merging)."""

import pytest
import torch
from torch import nn

from adamoe import MergePlan, fisher_diagonal, load_fisher, merge, save_fisher
from adamoe.merging import ties_merge


class TinyPolicy(nn.Module):
    """Observation -> tanh action mean, with dropout (the Fisher must switch it off)."""

    def __init__(self, obs: int = 5, act: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs, hidden), nn.GELU(), nn.Dropout(0.5), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, act)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.norm(self.body(obs))))


def mean_fn(model, batch):
    return model(batch["obs"])


def make_batches(n_batches: int = 2, size: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"obs": torch.randn(size, 5, generator=g), "action": torch.rand(size, 3, generator=g) * 2 - 1}
        for _ in range(n_batches)
    ]


def reference_fisher(model, batches, kind, sigma):
    """Plain per-sample autograd, written out: the definition the fast path must match."""
    model.eval()
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in batches:
        for i in range(batch["obs"].shape[0]):
            mu = model(batch["obs"][i : i + 1])[0]
            if kind == "exact":
                for k in range(mu.shape[0]):
                    grads = torch.autograd.grad(mu[k], list(params.values()), retain_graph=True)
                    for n, g in zip(params, grads, strict=True):
                        total[n] += g.pow(2) / sigma**2
            else:
                logp = -((batch["action"][i] - mu) ** 2).sum() / (2 * sigma**2)
                grads = torch.autograd.grad(logp, list(params.values()))
                for n, g in zip(params, grads, strict=True):
                    total[n] += g.pow(2)
            count += 1
    return {n: t / count for n, t in total.items()}


@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_fisher_matches_a_per_sample_autograd_loop(kind, method):
    torch.manual_seed(0)
    model = TinyPolicy().train()
    batches = make_batches()
    fisher = fisher_diagonal(
        model, batches, mean_fn, lambda b: b["action"], kind=kind, sigma=0.5, method=method, progress=False
    )
    assert model.training  # evaluated without dropout, handed back in training mode
    expected = reference_fisher(model, batches, kind, sigma=0.5)
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-7)


def test_exact_fisher_of_a_linear_gaussian_policy_is_the_input_second_moment():
    # mu = W x + b: d mu_k / d W_kj = x_j, so F_W[k, j] = E[x_j^2] / sigma^2 and F_b[k] = 1 / sigma^2.
    model = nn.Linear(4, 2)
    x = torch.randn(50, 4)
    fisher = fisher_diagonal(model, [x[:30], x[30:]], lambda m, b: m(b), sigma=2.0, progress=False)
    torch.testing.assert_close(fisher["weight"], (x.pow(2).mean(0) / 4.0).expand(2, 4), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["bias"], torch.full((2,), 0.25))


def test_fisher_respects_max_samples_restores_training_mode_and_selects_parameters():
    model = TinyPolicy().train()
    batches = make_batches(n_batches=3, size=4)
    some = fisher_diagonal(model, batches, mean_fn, max_samples=5, parameters=["head.weight"], progress=False)
    assert list(some) == ["head.weight"] and model.training
    first_five = [{"obs": batches[0]["obs"], "action": batches[0]["action"]}, {"obs": batches[1]["obs"][:1]}]
    torch.testing.assert_close(
        some["head.weight"], fisher_diagonal(model, first_five, mean_fn, progress=False)["head.weight"]
    )


def test_bad_fisher_arguments_name_the_value():
    model = TinyPolicy()
    with pytest.raises(ValueError, match="kind='fisherish' is not one of"):
        fisher_diagonal(model, make_batches(), mean_fn, kind="fisherish")
    with pytest.raises(ValueError, match="needs target_fn"):
        fisher_diagonal(model, make_batches(), mean_fn, kind="empirical")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        fisher_diagonal(model, make_batches(), mean_fn, sigma=0.0)
    with pytest.raises(ValueError, match="no trainable parameter named 'head.w'"):
        fisher_diagonal(model, make_batches(), mean_fn, parameters=["head.w"])
    with pytest.raises(ValueError, match="no samples"):
        fisher_diagonal(model, [], mean_fn, progress=False)


def test_fisher_files_round_trip_through_safetensors(tmp_path):
    fisher = {"a": torch.rand(3, 2), "b.c": torch.rand(4)}
    path = save_fisher(fisher, tmp_path / "fisher" / "task.safetensors", {"task": "reach", "samples": 10})
    loaded = load_fisher(path)
    assert set(loaded) == set(fisher)
    for name in fisher:
        torch.testing.assert_close(loaded[name], fisher[name])
    assert [p.name for p in path.parent.iterdir()] == ["task.safetensors"]  # no temporary file left
    with pytest.raises(FileNotFoundError, match="no Fisher file"):
        load_fisher(tmp_path / "missing.safetensors")


# -- merging ------------------------------------------------------------------------


def sd(**tensors):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def test_fisher_merge_weights_each_entry_by_its_fisher():
    models = [sd(w=[1.0, 10.0]), sd(w=[3.0, 20.0])]
    fishers = [sd(w=[1.0, 0.0]), sd(w=[3.0, 2.0])]
    merged = merge(models, "fisher", fishers=fishers, floor=1e-12)
    # entry 0: (1*1 + 3*3) / (1 + 3) = 2.5; entry 1: only model 1 has Fisher -> 20.
    torch.testing.assert_close(merged["w"], torch.tensor([2.5, 20.0]))
    # Model weights multiply the Fishers: weights (3, 1) on entry 0 -> (3*1*1 + 1*3*3) / (3 + 3) = 2.
    weighted = merge(models, "fisher", fishers=fishers, weights=[3.0, 1.0], floor=1e-12)
    assert weighted["w"][0].item() == pytest.approx(2.0)


def test_an_entry_with_zero_fisher_everywhere_falls_back_to_the_average():
    models = [sd(w=[1.0, 4.0]), sd(w=[3.0, 8.0])]
    fishers = [sd(w=[0.0, 1.0]), sd(w=[0.0, 1.0])]
    merged = merge(models, "fisher", fishers=fishers)
    assert torch.isfinite(merged["w"]).all()
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 6.0]))
    with pytest.raises(ValueError, match="floor must be > 0"):
        merge(models, "fisher", fishers=fishers, floor=0.0)


def test_trace_normalisation_stops_one_model_dominating_by_scale():
    models = [sd(w=[0.0, 0.0]), sd(w=[1.0, 1.0])]
    fishers = [sd(w=[1.0, 1.0]), sd(w=[1000.0, 1000.0])]
    raw = merge(models, "fisher", fishers=fishers)
    normalized = merge(models, "fisher", fishers=fishers, normalization="trace")
    assert raw["w"][0].item() == pytest.approx(1000 / 1001)
    torch.testing.assert_close(normalized["w"], torch.tensor([0.5, 0.5]))
    l2 = merge(models, "fisher", fishers=fishers, normalization="l2")
    torch.testing.assert_close(l2["w"], torch.tensor([0.5, 0.5]))


def test_uniform_average_task_arithmetic_and_ties_on_hand_made_tensors():
    base = sd(w=[0.0, 0.0, 0.0, 0.0])
    a = sd(w=[1.0, -2.0, 0.1, 4.0])
    b = sd(w=[3.0, 2.0, -0.1, 0.0])
    torch.testing.assert_close(merge([a, b])["w"], torch.tensor([2.0, 0.0, 0.0, 2.0]))
    torch.testing.assert_close(
        merge([a, b], "task_arithmetic", base=base, scale=0.5)["w"], torch.tensor([2.0, 0.0, 0.0, 2.0])
    )
    # TIES, density 0.5: a keeps {4, -2}, b keeps {3, 2}. Signs: [+, 0 -> sum -2+2=0, -, +].
    # Entry 0: only b (3); entry 1: sum 0 -> sign 0, nothing agrees -> 0; entry 3: only a (4).
    merged = ties_merge([a, b], base, density=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([3.0, 0.0, 0.0, 4.0]))
    with pytest.raises(ValueError, match="density must be in"):
        ties_merge([a, b], base, density=0.0)


def test_the_plan_merges_shared_blocks_and_keeps_task_heads():
    models = [sd(**{"blocks.0.w": [1.0], "head.w": [5.0]}), sd(**{"blocks.0.w": [3.0], "head.w": [7.0]})]
    merged = merge(models, plan=MergePlan(merge=[r"^blocks\."]))
    assert set(merged) == {"blocks.0.w"}
    merged = merge(models, plan=MergePlan(keep=[r"^head\."]))
    assert set(merged) == {"blocks.0.w"} and merged["blocks.0.w"].item() == 2.0
    with pytest.raises(ValueError, match="selects no parameters"):
        merge(models, plan=MergePlan(merge=[r"^nothing"]))


def test_mismatched_models_name_the_first_mismatch():
    a = sd(**{"blocks.0.w": [1.0, 2.0], "blocks.1.w": [1.0]})
    wide = sd(**{"blocks.0.w": [1.0, 2.0, 3.0], "blocks.1.w": [1.0]})
    with pytest.raises(ValueError, match=r"'blocks.0.w' has shape \(2,\) in model 0 but \(3,\) in model 1"):
        merge([a, wide])
    missing = sd(**{"blocks.0.w": [1.0, 2.0]})
    with pytest.raises(ValueError, match="'blocks.1.w' is in model 0 but missing from model 1"):
        merge([a, missing])
    with pytest.raises(ValueError, match="the Fisher of model 1 has no entry for parameter 'blocks.1.w'"):
        merge([a, a], "fisher", fishers=[a, missing])
    with pytest.raises(ValueError, match="method='soup' is not one of"):
        merge([a, a], "soup")
    with pytest.raises(ValueError, match="needs base"):
        merge([a, a], "ties")


def test_merging_real_modules_gives_a_loadable_state_dict():
    torch.manual_seed(0)
    models = [TinyPolicy() for _ in range(3)]
    fishers = [fisher_diagonal(m, make_batches(1, 8, seed=i), mean_fn, progress=False) for i, m in enumerate(models)]
    plan = MergePlan(keep=[r"^head\."])
    merged = merge([m.state_dict() for m in models], "fisher", fishers=fishers, plan=plan)
    target = TinyPolicy()
    target.load_state_dict({**models[0].state_dict(), **merged})
    for name, value in merged.items():
        stacked = torch.stack([m.state_dict()[name] for m in models])
        assert (value >= stacked.min(0).values - 1e-6).all() and (value <= stacked.max(0).values + 1e-6).all()
    assert "head.weight" not in merged and "body.0.weight" in merged
