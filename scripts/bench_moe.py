"""The MoE layer against the dense FFN and the two common unfused implementations.

Shapes from the AdaMoE issue: the control shape (one chunk of 51 tokens, inference) and
the training shape (32 chunks, forward + backward); d = 512, FFN hidden 2048, E = 4,
top-1, one shared expert, fp32 on CPU. Rows: our layer with each dispatch backend and
with ``auto``; the dense FFN; every expert on every token then a gather (AdaMoE's
released code); a Python loop over experts with one-hot masks (Hugging Face's eager
MoE); and the bare matmuls: what the batched_mm backend multiplies, on tokens grouped
once beforehand, with no routing at all, which shows what the arithmetic alone costs.
The other families of the literature (Switch with capacity, DynMoE top-any, THOR, SMEAR,
Soft MoE, SCMoE's two routings) at the control shape, upcycled the same way, and BAM's
mixture of attention (4 soft attention experts of 8 heads, with their own or shared keys
and values) against the dense attention layer it was upcycled from and against running
the experts one by one.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

import adamoe
from adamoe import MoEConfig, MoEFeedForward

DIM, HIDDEN, EXPERTS, TOP_K = 512, 2048, 4, 1
HEADS, HEAD_DIM = 8, 64
BACKENDS = ("auto", "grouped_mm", "batched_mm", "loop", "dense")


def released_all_experts(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then gather the selected outputs (as AdaMoE's released code)."""
    tokens = x.reshape(-1, DIM)
    route = layer.router(tokens)
    weights = route.selected_probs + layer.scale_adapter(tokens).gather(-1, route.indices)
    all_out = torch.stack([layer.experts.forward_expert(tokens, e) for e in range(EXPERTS)], dim=1)  # (N, E, D)
    picked = all_out.gather(1, route.indices.unsqueeze(-1).expand(-1, -1, DIM))
    routed = (weights.unsqueeze(-1) * picked).sum(1)
    shared = layer.shared_experts[0](tokens)
    return (0.5 * shared + 0.5 * routed).reshape(x.shape)


def eager_mask_loop(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """A Python loop over experts with one-hot masks (as Hugging Face's eager MoE)."""
    tokens = x.reshape(-1, DIM)
    route = layer.router(tokens)
    weights = route.selected_probs + layer.scale_adapter(tokens).gather(-1, route.indices)
    routed = torch.zeros_like(tokens)
    mask = F.one_hot(route.indices, EXPERTS).permute(2, 1, 0)  # (E, k, N)
    for e in range(EXPERTS):
        slot, token = torch.where(mask[e])
        if token.numel():
            out = layer.experts.forward_expert(tokens[token], e) * weights[token, slot, None]
            routed.index_add_(0, token, out)
    shared = layer.shared_experts[0](tokens)
    return (0.5 * shared + 0.5 * routed).reshape(x.shape)


def bare_matmuls(layer: MoEFeedForward, x: torch.Tensor):
    """The same matmuls as the batched_mm backend with the routing taken out: the shared
    FFN on all tokens and one bmm per projection over the experts' token groups, padded
    and built once outside the timed call."""
    tokens = x.reshape(-1, DIM)
    experts = layer.experts
    with torch.no_grad():
        indices = layer.router(tokens).indices[:, 0]
        groups = [tokens[indices == e] for e in range(EXPERTS)]
        buffer = torch.zeros(EXPERTS, max(len(g) for g in groups), DIM)  # (E, C, D)
        for e, group in enumerate(groups):
            buffer[e, : len(group)] = group

    def run(_: torch.Tensor) -> None:
        layer.shared_experts[0](tokens)
        h = experts.hidden_act(torch.baddbmm(experts.b_in.unsqueeze(1), buffer, experts.w_in))
        torch.baddbmm(experts.b_out.unsqueeze(1), h, experts.w_out)

    return run


# The other MoE families at the control shape (inference), each with the same shared expert.
FAMILIES = {
    "Switch top-1, capacity 1.25": {"router": "topk", "capacity_factor": 1.25},
    "DynMoE top-any": {"router": "topany"},
    "THOR (random expert)": {"router": "thor"},
    "SMEAR (merged expert)": {"router": "smear"},
    "Soft MoE (1 slot per expert)": {"router": "soft"},
    "SCMoE (top-2 and top-1 passes)": {"router": "topk", "top_k": 2, "renormalize": True},
    "AdaMoE, low-rank experts (rank 64)": {"expert_structure": "lowrank", "structure_rank": 64},
}


def _self_contrast(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    strong = layer(x)
    layer.top_k_override = 1
    try:
        weak = layer(x)
    finally:
        layer.top_k_override = None
    return 1.5 * strong - 0.5 * weak


def _attention(projections, x: torch.Tensor) -> torch.Tensor:
    """A dense multi-head self-attention layer from its q, k, v, o projections."""
    q, k, v, o = projections
    split = lambda y: y.view(x.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q(x)), split(k(x)), split(v(x)))
    return o(out.transpose(1, 2).reshape(x.shape))


def attention_cases() -> dict[str, object]:
    """Control-shape callables: dense attention, BAM's soft experts (fused), and the same
    experts run one by one and mixed (the plain reference the fused path is tested against)."""
    inner = HEADS * HEAD_DIM
    dense = tuple(torch.nn.Linear(a, b, bias=False) for a, b in ((DIM, inner),) * 3 + ((inner, DIM),))
    cases = {"dense attention (8 heads)": lambda x: _attention(dense, x)}
    for share in (False, True):
        moa = adamoe.MixtureOfAttention.from_dense(dense, HEADS, adamoe.MoAConfig(num_experts=EXPERTS, share_kv=share))
        name = "BAM, 4 soft attention experts" + (", shared KV" if share else "")
        cases[name] = moa
    experts = [moa.expert_projections(e) for e in range(EXPERTS)]  # the last one, plainly

    def one_by_one(x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(moa.router(x), -1)
        return sum(probs[..., e : e + 1] * _attention(experts[e], x) for e in range(EXPERTS))

    cases["BAM, 4 soft attention experts, shared KV, one by one (reference)"] = one_by_one
    return cases


def _time(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    dense = adamoe.FeedForward(DIM, HIDDEN, "mlp", "gelu")
    config = MoEConfig(num_experts=EXPERTS, top_k=TOP_K)  # the paper's initialisation
    layer = MoEFeedForward.from_dense(copy.deepcopy(dense), config, torch.Generator().manual_seed(0))
    layers = {}
    for backend in BACKENDS:
        layers[backend] = copy.deepcopy(layer)
        layers[backend].config.backend = backend
    control = torch.randn(1, 51, DIM)
    train = torch.randn(32, 51, DIM)

    def infer(fn):
        def run_once():
            with torch.inference_mode():
                fn(control)

        return run_once

    def fwd_bwd(fn, module):
        def run_once():
            module.zero_grad(set_to_none=True)
            fn(train).square().mean().backward()

        return run_once

    ref = layers["loop"]
    control_cases = {"dense FFN": infer(dense)}
    train_cases = {"dense FFN": fwd_bwd(dense, dense)}
    for backend, mod in layers.items():
        control_cases[f"AdaMoE ({backend})"] = infer(mod)
        train_cases[f"AdaMoE ({backend})"] = fwd_bwd(mod, mod)
    control_cases["all experts (released code)"] = infer(lambda x: released_all_experts(ref, x))
    control_cases["expert loop with masks (HF eager)"] = infer(lambda x: eager_mask_loop(ref, x))
    control_cases["bare matmuls (no routing)"] = infer(bare_matmuls(ref, control))
    for name, overrides in FAMILIES.items():  # each family's layer, upcycled from the same FFN the same way
        family = MoEFeedForward.from_dense(
            copy.deepcopy(dense), MoEConfig(**{"num_experts": EXPERTS, "top_k": TOP_K, **overrides}), torch.Generator()
        ).eval()
        if name.startswith("SCMoE"):  # strong (top-2) and weak (top-1) routing, both per call
            control_cases[f"family {name}"] = infer(lambda x, f=family: _self_contrast(f, x))
        else:
            control_cases[f"family {name}"] = infer(family)
    for name, fn in attention_cases().items():
        control_cases[name] = infer(fn)
    train_cases["all experts (released code)"] = fwd_bwd(lambda x: released_all_experts(ref, x), ref)
    train_cases["expert loop with masks (HF eager)"] = fwd_bwd(lambda x: eager_mask_loop(ref, x), ref)

    iters_control, iters_train = (10, 1) if quick else (40, 3)
    samples = {("control", k): [] for k in control_cases} | {("train", k): [] for k in train_cases}
    for fn in list(control_cases.values()) + list(train_cases.values()):
        fn()  # warm-up
    for _ in range(repeats):  # interleaved, so drifting machine load hits every case alike
        for name, fn in control_cases.items():
            samples[("control", name)].append(_time(fn, iters_control))
        for name, fn in train_cases.items():
            samples[("train", name)].append(_time(fn, iters_train))

    rows = []
    for (shape, name), values in samples.items():
        label = "control 1x51 inference" if shape == "control" else "train 32x51 fwd+bwd"
        rows.append(
            {
                "benchmark": "moe_layer",
                "case": f"{label}: {name}",
                "metric": "median_ms",
                "value": 1e3 * float(np.median(values)),
                "unit": "ms",
            }
        )

    def ratio(shape, a, b, what):
        r = np.array(samples[(shape, a)]) / np.array(samples[(shape, b)])
        rows.append(
            {"benchmark": "moe_layer", "case": what, "metric": "ratio", "value": float(np.median(r)), "unit": "x"}
        )

    ours = "AdaMoE (auto)"
    ratio("control", ours, "dense FFN", "control: AdaMoE auto / dense FFN (target <= 2.3)")
    ratio("control", "bare matmuls (no routing)", "dense FFN", "control: bare matmuls / dense FFN")
    ratio("control", ours, "bare matmuls (no routing)", "control: AdaMoE auto / bare matmuls (routing overhead)")
    ratio("control", "all experts (released code)", ours, "control: all experts / AdaMoE auto (target >= 2)")
    ratio("control", "expert loop with masks (HF eager)", ours, "control: HF eager / AdaMoE auto")
    bam = "BAM, 4 soft attention experts"
    ratio("control", bam, "dense attention (8 heads)", "control: BAM attention experts / dense attention")
    ratio("control", f"{bam}, shared KV", "dense attention (8 heads)", "control: BAM shared KV / dense attention")
    ratio(
        "control",
        f"{bam}, shared KV, one by one (reference)",
        f"{bam}, shared KV",
        "control: BAM one by one / fused",
    )
    ratio("train", ours, "dense FFN", "train: AdaMoE auto / dense FFN (target <= 2.5)")
    ratio("train", "all experts (released code)", ours, "train: all experts / AdaMoE auto")
    return rows


if __name__ == "__main__":
    from policies.benchmark import section_main

    raise SystemExit(section_main(run, __doc__))
