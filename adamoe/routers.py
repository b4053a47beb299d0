"""Routers (which experts run) and the losses that keep them balanced.

AdaMoE decouples *which* experts run from *how much* each contributes: the router's
softmax ``p = softmax(W_r x)`` selects the top-k experts, and a scale adapter
``s = W_s x`` (see ``moe.py``) adds to their weights. The balance loss is built from
``p`` alone, so its gradient reaches the router and never the scale adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterOutput:
    indices: torch.Tensor  # (N, k) selected experts
    probs: torch.Tensor  # (N, E) softmax over all experts (float32)
    logits: torch.Tensor  # (N, E)
    selected_probs: torch.Tensor  # (N, k) = probs gathered at indices
    keep: torch.Tensor | None = None  # (N, k) bool, top-any: which of the E candidates are active


class TopKRouter(nn.Module):
    """``p = softmax(W_r x)``, selection ``TopK(p + b, k)``; ``b`` is the optional
    aux-loss-free selection bias (DeepSeek-V3), which never enters the weights."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        init_std: float = 0.006,
        aux_free_bias: bool = False,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)  # W_r
        nn.init.normal_(self.gate.weight, std=init_std)
        self.aux_free_bias = aux_free_bias
        self.bias_update_rate = bias_update_rate
        self.register_buffer("selection_bias", torch.zeros(num_experts), persistent=aux_free_bias)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        scores = probs + self.selection_bias if self.aux_free_bias else probs
        indices = torch.topk(scores, self.top_k, dim=-1).indices
        return RouterOutput(indices, probs, logits, probs.gather(-1, indices))

    @torch.no_grad()
    def update_selection_bias(self, indices: torch.Tensor) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones."""
        load = torch.bincount(indices.reshape(-1), minlength=self.num_experts).float()
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)


def expert_fraction(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f_i: the fraction of tokens whose top-k includes expert i; ``indices`` is ``(N, k)``
    expert ids or an ``(N, E)`` boolean mask of the active experts (top-any)."""
    if indices.dtype == torch.bool:
        return indices.float().mean(0)
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).float()
    return counts / indices.shape[0]


def balance_loss(probs: torch.Tensor, indices: torch.Tensor, form: str = "mean") -> torch.Tensor:
    """AdaMoE's ``mean_i(f_i * P_i)`` or Switch Transformer's ``E * sum_i f_i * P_i``."""
    num_experts = probs.shape[-1]
    f = expert_fraction(indices, num_experts).to(probs.device)
    mean_prob = probs.mean(0)  # P_i
    if form == "mean":
        return (f * mean_prob).mean()
    if form == "switch":
        return num_experts * (f * mean_prob).sum()
    raise ValueError(f"balance loss form {form!r} is not one of ('mean', 'switch')")


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2, keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class TopAnyRouter(nn.Module):
    """DynMoE's top-any gating (Guo et al., 2024): ``s_e = sigmoid(cos(x, w_e))`` against a
    learned per-expert threshold ``sigmoid(t_e)``; a token uses every expert whose score
    clears its threshold, and its best expert when none does. The active experts' scores,
    renormalised, are the combine weights; the hard gate passes gradients to the scores
    and thresholds straight through."""

    def __init__(self, dim: int, num_experts: int, init_std: float = 0.006) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)  # rows: the experts' representations w_e
        nn.init.normal_(self.gate.weight, std=init_std)
        self.threshold = nn.Parameter(torch.zeros(num_experts))  # t_e; sigmoid(0) = 0.5

    def forward(self, x: torch.Tensor) -> RouterOutput:
        x32 = x.float()
        w = self.gate.weight.float()
        cos = (x32 @ w.T) / (x32.norm(dim=-1, keepdim=True) * w.norm(dim=-1) + 1e-6)
        scores = torch.sigmoid(cos)  # (N, E)
        margin = scores - torch.sigmoid(self.threshold.float())
        hard = margin > 0
        none = ~hard.any(-1)
        if none.any():  # at least one expert per token: its best
            hard = hard | (none.unsqueeze(-1) & (scores == scores.max(-1, keepdim=True).values))
        gate = hard.float() + margin - margin.detach()  # straight-through
        weighted = gate * scores
        weights = weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-6)
        n = x.shape[0]
        indices = torch.arange(self.num_experts, device=x.device).expand(n, -1)
        probs = scores / scores.sum(-1, keepdim=True)
        return RouterOutput(indices, probs, cos, weights, keep=hard)


class RandomRouter(nn.Module):
    """THOR (Zuo et al., 2022): no learned router; every token to a uniformly random expert
    with weight 1, in training and at inference."""

    gate = None  # nothing to initialise

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> RouterOutput:
        n = x.shape[0]
        indices = torch.randint(self.num_experts, (n, 1), device=x.device)
        probs = torch.full((n, self.num_experts), 1.0 / self.num_experts, device=x.device)
        ones = torch.ones(n, 1, device=x.device)
        return RouterOutput(indices, probs, probs.log(), ones)
