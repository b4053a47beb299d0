"""The sparse Mixture-of-Experts feed-forward layer (AdaMoE, vanilla top-k and the other
families of ``adamoe/families.py``).

A forward routes the tokens (the family's router and combine weights), dispatches each
token to its selected experts only (``adamoe/dispatch.py``), and combines:
``routed_coef * gate * routed + shared_coef * mean(shared experts)``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from adamoe.config import MoEConfig
from adamoe.dispatch import capacity_keep, dispatch
from adamoe.experts import FeedForward, FFNWeights, GroupedExperts, StructuredExperts, ffn_weights
from adamoe.families import family
from adamoe.routers import balance_loss, router_z_loss


class MoEFeedForward(nn.Module):
    """Drop-in replacement of a dense FFN: ``(..., D) -> (..., D)``.

    After each forward, ``aux_losses`` holds this layer's ``balance`` and ``z`` losses
    (tensors in the autograd graph) for a training loop to add, see ``moe_aux_loss``.
    """

    def __init__(
        self,
        config: MoEConfig,
        dim: int,
        hidden: int,
        kind: str = "mlp",
        activation: str = "gelu",
        bias_in: bool = True,
        bias_out: bool = True,
        shared_experts: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.dim = dim
        if config.expert_structure == "dense":
            self.experts = GroupedExperts(config.num_experts, dim, hidden, kind, activation, bias_in, bias_out)
        else:
            self.experts = StructuredExperts(
                config.num_experts,
                dim,
                hidden,
                config.expert_structure,
                config.structure_rank,
                config.structure_blocks,
                ffn={"kind": kind, "activation": activation, "bias_in": bias_in, "bias_out": bias_out},
            )
        self.guide: nn.Module | None = None  # self-guided training: the dense FFN, blended out
        if config.self_guided_steps > 0:
            self.guide = FeedForward(dim, hidden, kind, activation, bias=bias_in)
            self.register_buffer("guide_step", torch.zeros((), dtype=torch.long))
        self.family = family(config.router)  # how tokens reach the experts (adamoe/families.py)
        self.router = self.family.router(config, dim)
        self.scale_adapter: nn.Linear | None = None
        if self.family.scale_adapter:
            self.scale_adapter = nn.Linear(dim, config.num_experts, bias=False)  # W_s
            nn.init.normal_(self.scale_adapter.weight, std=config.router_init_std)
        if shared_experts is not None and len(shared_experts) != config.num_shared_experts:
            raise ValueError(
                f"got {len(shared_experts)} shared experts for num_shared_experts={config.num_shared_experts}"
            )
        if shared_experts is None:
            shared_experts = [
                FeedForward(dim, hidden, kind, activation, bias=bias_in) for _ in range(config.num_shared_experts)
            ]
        self.shared_experts = nn.ModuleList(shared_experts)
        self.routed_gate = None
        if config.routed_gate_init is not None:
            self.routed_gate = nn.Parameter(torch.tensor(float(config.routed_gate_init)))
        self.register_buffer("expert_tokens", torch.zeros(config.num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer(
            "expert_weight_sum", torch.zeros(config.num_experts, dtype=torch.float64), persistent=False
        )
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.record_stats = config.record_stats
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_dropped_fraction = 0.0  # with a capacity factor: pairs dropped in the last forward
        self.gating_dropped = False  # with gating dropout: whether the last forward skipped the router
        self.top_k_override: int | None = None  # set by adamoe.routing_top_k (self-contrast decoding)

    @classmethod
    def from_dense(cls, ffn: nn.Module, config: MoEConfig, generator: torch.Generator | None = None) -> MoEFeedForward:
        """Upcycle one dense FFN: routed experts are copies of it, the shared expert is it."""
        weights: FFNWeights = ffn_weights(ffn)
        shared = [ffn] + [copy.deepcopy(ffn) for _ in range(config.num_shared_experts - 1)]
        layer = cls(
            config,
            weights.dim,
            weights.hidden,
            weights.kind,
            weights.activation,
            bias_in=weights.b_in is not None,
            bias_out=weights.b_out is not None,
            shared_experts=shared[: config.num_shared_experts],
        )
        if config.expert_structure == "dense":
            layer.experts = GroupedExperts.from_ffn(weights, config.num_experts, config.expert_noise_std, generator)
        else:
            layer.experts.init_from(weights)
        if layer.guide is not None:
            layer.guide = copy.deepcopy(ffn)
        layer._draw_router(generator)
        ref = weights.w_in
        return layer.to(device=ref.device, dtype=ref.dtype)

    @classmethod
    def from_experts(
        cls,
        ffns: list[nn.Module],
        config: MoEConfig,
        shared_experts: list[nn.Module] | None = None,
        generator: torch.Generator | None = None,
    ) -> MoEFeedForward:
        """Merge several dense FFNs of one shape into one MoE layer, FFN ``i`` becoming routed
        expert ``i`` (Branch-Train-Mix / BAM: the FFNs of models fine-tuned on different
        tasks). The router and scale adapter start at N(0, router_init_std^2) and are meant
        to be fitted on the tasks' data; ``shared_experts`` (``config.num_shared_experts`` of
        them) are used as given."""
        if len(ffns) != config.num_experts:
            raise ValueError(f"got {len(ffns)} FFNs for num_experts={config.num_experts}; give one FFN per expert")
        if config.expert_structure != "dense" or config.self_guided_steps:
            raise ValueError(
                f"from_experts copies each FFN into a dense expert: expert_structure={config.expert_structure!r} "
                f"and self_guided_steps={config.self_guided_steps} are for upcycling one FFN (from_dense)"
            )
        weights = [ffn_weights(f) for f in ffns]
        first = weights[0]
        for i, w in enumerate(weights[1:], start=1):
            same = (w.kind, w.activation, tuple(w.w_in.shape), tuple(w.w_out.shape)) == (
                first.kind,
                first.activation,
                tuple(first.w_in.shape),
                tuple(first.w_out.shape),
            )
            if not same or (w.b_in is None) != (first.b_in is None) or (w.b_out is None) != (first.b_out is None):
                raise ValueError(
                    f"FFN {i} ({w.kind}/{w.activation}, {w.dim}->{w.hidden}) does not match FFN 0 "
                    f"({first.kind}/{first.activation}, {first.dim}->{first.hidden}): experts must share one shape"
                )
        layer = cls(
            config,
            first.dim,
            first.hidden,
            first.kind,
            first.activation,
            bias_in=first.b_in is not None,
            bias_out=first.b_out is not None,
            shared_experts=shared_experts,
        )
        with torch.no_grad():
            for name in ("w_in", "b_in", "w_out", "b_out"):
                param = getattr(layer.experts, name)
                if param is not None:
                    param.copy_(torch.stack([getattr(w, name) for w in weights]))
        layer._draw_router(generator)
        return layer.to(device=first.w_in.device, dtype=first.w_in.dtype)

    @torch.no_grad()
    def _draw_router(self, generator: torch.Generator | None) -> None:
        """``W_r, W_s ~ N(0, router_init_std^2)``, drawn from ``generator``."""
        for linear in (self.router.gate, self.scale_adapter):
            if linear is not None:
                noise = torch.randn(linear.weight.shape, generator=generator)
                linear.weight.copy_(noise * self.config.router_init_std)

    def guide_alpha(self) -> float:
        """The dense FFN's share of the output under self-guided training (0 when off)."""
        if self.guide is None:
            return 0.0
        return max(0.0, 1.0 - float(self.guide_step) / self.config.self_guided_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.guide_alpha()
        if self.guide is not None and self.training:
            self.guide_step += 1
        out = self._forward_moe(x) if alpha < 1.0 else None
        if alpha <= 0.0:
            return out
        guided = self.guide(x)
        return guided if out is None else alpha * guided + (1.0 - alpha) * out

    def _forward_moe(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"MoEFeedForward expects inputs with last dimension {self.dim}, got shape {tuple(x.shape)}"
            )
        tokens = x.reshape(-1, self.dim)  # (N, D)
        self.aux_losses = {}
        if self.family.per_sequence:
            seqs = x.reshape(-1, x.shape[-2] if x.dim() > 2 else x.shape[0], self.dim)  # (B, T, D)
            routed, probs = self.family.mix(self, seqs)
            self.last_probs = probs.detach()
            routed = routed.reshape(-1, self.dim)
        else:
            routed = self._route_and_dispatch(tokens)
        out = self.config.routed_coef * (routed if self.routed_gate is None else self.routed_gate * routed)
        if len(self.shared_experts):  # FFNs act token-wise
            shared = sum(expert(tokens) for expert in self.shared_experts)
            out = out + self.config.shared_coef * shared / len(self.shared_experts)
        return out.reshape(x.shape)

    def _route_and_dispatch(self, tokens: torch.Tensor) -> torch.Tensor:
        """Route every token (its family's router and combine weights; gating dropout and a
        capacity on top), run the selected experts on their tokens, and set the aux losses."""
        cfg = self.config
        route, weights = self.family.route(self, tokens)
        indices = route.indices
        gating_dropped = self.training and cfg.gating_dropout > 0 and float(torch.rand(())) < cfg.gating_dropout
        self.gating_dropped = gating_dropped
        if gating_dropped:  # skip the router: every token to the fixed expert, weight 1
            indices = torch.full_like(route.indices[:, :1], cfg.gating_dropout_expert)
            weights = torch.ones(indices.shape, dtype=weights.dtype, device=weights.device)
        keep = None if gating_dropped else route.keep  # top-any: the active experts
        if cfg.capacity_factor is not None:
            if keep is None:
                keep = capacity_keep(indices, cfg.num_experts, cfg.capacity_factor)
            else:  # top-any: count only the active pairs against the capacity
                keep = keep & _capacity_of_active(indices, keep, cfg.num_experts, cfg.capacity_factor)
            self.last_dropped_fraction = float(1.0 - keep.float().mean())
        routed = dispatch(tokens, indices, weights.to(tokens.dtype), self.experts, cfg.backend, keep)
        if self.training and not gating_dropped and self.family.balanced:
            if cfg.balance_loss != "none":
                chosen = route.indices if route.keep is None else route.keep
                self.aux_losses["balance"] = balance_loss(route.probs, chosen, cfg.balance_loss)
            if cfg.z_loss_coef > 0:
                self.aux_losses["z"] = router_z_loss(route.logits)
        if self.training and cfg.aux_free_bias and not gating_dropped:
            self.router.update_selection_bias(route.indices)
        if self.record_stats:
            self._record(indices, weights, keep)
        return routed

    @torch.no_grad()
    def _record(self, indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Count the token-expert pairs that ran (``keep``: top-any's active experts, or the
        pairs a capacity did not drop) and the weights they got."""
        self.tokens_seen += indices.shape[0]
        if keep is not None:
            indices, weights = indices[keep], weights[keep]
        flat = indices.reshape(-1)
        self.expert_tokens += torch.bincount(flat, minlength=self.config.num_experts).to(self.expert_tokens)
        self.expert_weight_sum.index_add_(0, flat, weights.reshape(-1).to(self.expert_weight_sum))

    def reset_stats(self) -> None:
        self.expert_tokens.zero_()
        self.expert_weight_sum.zero_()
        self.tokens_seen.zero_()

    def experts_per_token(self) -> float:
        """How many routed experts' weights a token's output depends on: ``top_k`` for the
        top-k routers (THOR's is 1), every expert for SMEAR and Soft MoE (their merged
        expert and their slots mix all of them), and for top-any the mean number of active
        experts over the routings recorded since the last reset (``record_routing``), or
        every expert, its bound, when none were."""
        return self.family.experts_per_token(self)

    def inactive_parameters(self) -> float:
        """Parameters of this layer a token's output does not depend on: the routed experts
        beyond ``experts_per_token``, the self-guided dense FFN once blended out, and,
        while the guide still carries everything (``alpha = 1``: the MoE branch is not
        run), all but the guide."""
        guide = sum(p.numel() for p in self.guide.parameters()) if self.guide is not None else 0
        alpha = self.guide_alpha()
        if alpha >= 1.0:
            return float(sum(p.numel() for p in self.parameters()) - guide)
        per_expert = sum(p.numel() for p in self.experts.parameters()) / self.config.num_experts
        unused = (self.config.num_experts - self.experts_per_token()) * per_expert
        return unused + (guide if alpha <= 0.0 else 0)

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router}, num_experts={c.num_experts}, top_k={c.top_k}, shared={c.num_shared_experts}"


def _capacity_of_active(indices: torch.Tensor, active: torch.Tensor, num_experts: int, factor: float) -> torch.Tensor:
    """Capacity over the active pairs only (top-any routes a variable number per token)."""
    n = indices.shape[0]
    capacity = math.ceil(factor * int(active.sum()) / num_experts)
    by_choice = torch.where(active, indices, num_experts).T.reshape(-1)  # inactive pairs to a dummy expert
    one_hot = torch.nn.functional.one_hot(by_choice, num_experts + 1)
    position = (torch.cumsum(one_hot, 0) - 1).gather(1, by_choice.unsqueeze(1)).squeeze(1)
    return (position < capacity).reshape(-1, n).T
