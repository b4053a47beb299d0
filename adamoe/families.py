"""The routing behaviour of each MoE family, one small object per family.

``MoEFeedForward`` owns the experts, the shared experts and the combine; a family decides
which router the layer has and how tokens reach the experts:

- token families route every token to some experts and the layer dispatches them:
  ``topk`` (vanilla: ``w_i = p_i``, optionally renormalised), ``adamoe`` (``w_i = p_i +
  s_i``, the scale adapter's ``s = W_s x`` decoupled from the router's ``p``), ``topany``
  (DynMoE: every expert over its learned threshold), ``thor`` (a random expert, weight 1);
- sequence families mix over a whole sequence instead of routing tokens: ``smear`` (one
  merged expert per sequence) and ``soft`` (Soft MoE's slots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from adamoe.config import MoEConfig
from adamoe.routers import RandomRouter, RouterOutput, TopAnyRouter, TopKRouter

if TYPE_CHECKING:
    from adamoe.moe import MoEFeedForward


class Family:
    """A family's defaults: a top-k router over ``num_experts``, its probabilities as the
    combine weights, balanced by the configured loss, ``top_k`` experts per token."""

    name = "topk"
    per_sequence = False  # mixes over sequences instead of routing tokens (smear, soft)
    balanced = True  # has a learned router for the balance and z losses to act on
    retop = True  # ``adamoe.routing_top_k`` may change its k (SCMoE decoding)
    consistency = False  # trained with THOR's two-pass consistency loss
    scale_adapter = False  # AdaMoE's W_s

    def router(self, config: MoEConfig, dim: int) -> nn.Module:
        width = self.router_width(config)
        return TopKRouter(
            dim, width, min(config.top_k, width), config.router_init_std, config.aux_free_bias, config.bias_update_rate
        )

    def router_width(self, config: MoEConfig) -> int:
        return config.num_experts

    def route(self, layer: MoEFeedForward, tokens: torch.Tensor) -> tuple[RouterOutput, torch.Tensor]:
        """The router's decision for ``tokens`` ``(N, D)`` and the selected experts'
        combine weights ``(N, k)``."""
        route = layer.router(tokens)
        if self.retop and layer.top_k_override is not None:
            route = retop(route, layer.top_k_override)
        return route, self.weights(layer, tokens, route)

    def weights(self, layer: MoEFeedForward, tokens: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        weights = route.selected_probs
        return weights / weights.sum(-1, keepdim=True) if layer.config.renormalize else weights

    def experts_per_token(self, layer: MoEFeedForward) -> float:
        return float(layer.config.top_k)


class AdaMoE(Family):
    """``w_i = p_i + s_i``: the router's probability plus the scale adapter's ``s = W_s x``,
    not renormalised (which experts and how much, decoupled)."""

    name = "adamoe"
    scale_adapter = True

    def weights(self, layer: MoEFeedForward, tokens: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        return route.selected_probs + layer.scale_adapter(tokens).float().gather(-1, route.indices)


class TopAny(Family):
    """DynMoE: every expert whose score clears its learned threshold, at least one; the
    active experts' renormalised scores are the weights (``top_k`` is ignored)."""

    name = "topany"
    retop = False

    def router(self, config: MoEConfig, dim: int) -> nn.Module:
        return TopAnyRouter(dim, config.num_experts, config.router_init_std)

    def experts_per_token(self, layer: MoEFeedForward) -> float:
        """The mean number of active experts over the routings recorded since the last reset
        (``record_routing``), or every expert, its bound, when none were."""
        seen = float(layer.tokens_seen)
        return float(layer.expert_tokens.sum()) / seen if seen > 0 else float(layer.config.num_experts)


class Thor(Family):
    """THOR: no learned router; each token to a uniformly random expert with weight 1, in
    training and at inference, trained with a two-pass consistency loss."""

    name = "thor"
    balanced = False
    retop = False
    consistency = True

    def router(self, config: MoEConfig, dim: int) -> nn.Module:
        return RandomRouter(config.num_experts)


class Smear(Family):
    """SMEAR: one expert per sequence whose parameters are the routing-weighted average of
    the experts', routed by the sequence's mean token; every expert's weights count."""

    name = "smear"
    per_sequence = True
    balanced = False
    retop = False

    def mix(self, layer: MoEFeedForward, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, D)`` sequences -> routed outputs ``(B, T, D)`` and the routing
        probabilities ``(B, E)``."""
        ex = layer.experts
        p = torch.softmax(layer.router.gate(seqs.mean(1)).float(), dim=-1).to(seqs.dtype)  # (B, E)
        w_in, w_out = torch.einsum("be,edh->bdh", p, ex.w_in), torch.einsum("be,ehd->bhd", p, ex.w_out)
        h = torch.bmm(seqs, w_in)
        if ex.b_in is not None:
            h = h + (p @ ex.b_in).unsqueeze(1)
        routed = torch.bmm(ex.hidden_act(h), w_out)
        if ex.b_out is not None:
            routed = routed + (p @ ex.b_out).unsqueeze(1)
        return routed, p.float()

    def experts_per_token(self, layer: MoEFeedForward) -> float:
        return float(layer.config.num_experts)


class Soft(Smear):
    """Soft MoE: ``slots_per_expert`` slots per expert, each a softmax-weighted mix of the
    sequence's tokens; the experts run on the slots, and every token is a softmax-weighted
    mix of the slots' outputs."""

    name = "soft"

    def router_width(self, config: MoEConfig) -> int:
        return config.num_experts * config.slots_per_expert

    def mix(self, layer: MoEFeedForward, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, ex = layer.config, layer.experts
        logits = layer.router.gate(seqs).float()  # (B, T, E * S)
        dispatch_w = torch.softmax(logits, dim=1).to(seqs.dtype)  # over tokens
        combine_w = torch.softmax(logits, dim=2).to(seqs.dtype)  # over slots
        slots = torch.einsum("bts,btd->bsd", dispatch_w, seqs)  # (B, E * S, D)
        b, s_total = slots.shape[:2]
        per_expert = slots.reshape(b, cfg.num_experts, cfg.slots_per_expert, layer.dim).transpose(0, 1)
        h = torch.einsum("ebsd,edh->ebsh", per_expert, ex.w_in)
        if ex.b_in is not None:
            h = h + ex.b_in[:, None, None]
        y = torch.einsum("ebsh,ehd->ebsd", ex.hidden_act(h), ex.w_out)
        if ex.b_out is not None:
            y = y + ex.b_out[:, None, None]
        slot_out = y.transpose(0, 1).reshape(b, s_total, layer.dim)
        return torch.einsum("bts,bsd->btd", combine_w, slot_out), combine_w.float().reshape(-1, s_total)


FAMILIES: dict[str, Family] = {f.name: f for f in (Family(), AdaMoE(), TopAny(), Thor(), Smear(), Soft())}


def family(router: str) -> Family:
    """The family of ``MoEConfig.router``."""
    if router not in FAMILIES:
        raise ValueError(f"router={router!r} is not one of {tuple(FAMILIES)}")
    return FAMILIES[router]


def retop(route: RouterOutput, k: int) -> RouterOutput:
    """The same router scores with ``k`` experts selected instead of ``top_k``."""
    if not 1 <= k <= route.probs.shape[-1]:
        raise ValueError(f"top_k override {k} is not in [1, {route.probs.shape[-1]}]")
    indices = torch.topk(route.probs, k, dim=-1).indices
    return RouterOutput(indices, route.probs, route.logits, route.probs.gather(-1, indices))
