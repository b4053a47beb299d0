"""The sparse Mixture-of-Experts feed-forward layer (AdaMoE and vanilla top-k)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from adamoe.config import TOKEN_ROUTERS, MoEConfig
from adamoe.dispatch import capacity_keep, dispatch
from adamoe.experts import FeedForward, FFNWeights, GroupedExperts, StructuredExperts, ffn_weights
from adamoe.routers import RandomRouter, TopAnyRouter, TopKRouter, balance_loss, router_z_loss


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
                kind,
                activation,
                bias_in,
                bias_out,
                config.expert_structure,
                config.structure_rank,
                config.structure_blocks,
            )
        self.guide: nn.Module | None = None  # self-guided training: the dense FFN, blended out
        if config.self_guided_steps > 0:
            self.guide = FeedForward(dim, hidden, kind, activation, bias=bias_in)
            self.register_buffer("guide_step", torch.zeros((), dtype=torch.long))
        if config.router == "topany":
            self.router = TopAnyRouter(dim, config.num_experts, config.router_init_std)
        elif config.router == "thor":
            self.router = RandomRouter(config.num_experts)
        else:
            width = config.num_experts * (config.slots_per_expert if config.router == "soft" else 1)
            self.router = TopKRouter(
                dim,
                width,
                min(config.top_k, width),
                config.router_init_std,
                config.aux_free_bias,
                config.bias_update_rate,
            )
        self.scale_adapter: nn.Linear | None = None
        if config.router == "adamoe":
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
        with torch.no_grad():  # W_r, W_s ~ N(0, router_init_std^2), drawn from the generator
            for linear in (layer.router.gate, layer.scale_adapter):
                if linear is not None:
                    noise = torch.randn(linear.weight.shape, generator=generator)
                    linear.weight.copy_(noise * config.router_init_std)
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
            for linear in (layer.router.gate, layer.scale_adapter):
                if linear is not None:
                    noise = torch.randn(linear.weight.shape, generator=generator)
                    linear.weight.copy_(noise * config.router_init_std)
        return layer.to(device=first.w_in.device, dtype=first.w_in.dtype)

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
        cfg = self.config
        tokens = x.reshape(-1, self.dim)  # (N, D)
        if cfg.router not in TOKEN_ROUTERS:
            return self._forward_sequences(x)
        route = self.router(tokens)
        if self.top_k_override is not None and cfg.router in ("adamoe", "topk"):
            route = _retop(route, self.top_k_override)
        indices = route.indices
        weights = route.selected_probs  # (N, k)
        if self.scale_adapter is not None:
            weights = weights + self.scale_adapter(tokens).float().gather(-1, route.indices)  # AdaMoE: p_i + s_i
        elif cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        gating_dropped = self.training and cfg.gating_dropout > 0 and float(torch.rand(())) < cfg.gating_dropout
        self.gating_dropped = gating_dropped
        if gating_dropped:  # skip the router: every token to the fixed expert, weight 1
            indices = torch.full_like(route.indices[:, :1], cfg.gating_dropout_expert)
            weights = torch.ones(indices.shape, dtype=weights.dtype, device=weights.device)
        keep = None if gating_dropped else route.keep  # top-any: the active experts
        if cfg.capacity_factor is not None:
            over = capacity_keep(indices, cfg.num_experts, cfg.capacity_factor) if keep is None else None
            if over is None:  # top-any: count only the active pairs against the capacity
                over = _capacity_of_active(indices, keep, cfg.num_experts, cfg.capacity_factor)
                keep = keep & over
            else:
                keep = over
            self.last_dropped_fraction = float(1.0 - keep.float().mean())
        routed = dispatch(tokens, indices, weights.to(tokens.dtype), self.experts, cfg.backend, keep)
        out = cfg.routed_coef * (routed if self.routed_gate is None else self.routed_gate * routed)
        if len(self.shared_experts):
            shared = sum(expert(tokens) for expert in self.shared_experts)  # FFNs act token-wise
            out = out + cfg.shared_coef * shared / len(self.shared_experts)

        self.aux_losses = {}
        if self.training and not gating_dropped and cfg.router != "thor":  # THOR has no router to balance
            if cfg.balance_loss != "none":
                chosen = route.indices if route.keep is None else route.keep
                self.aux_losses["balance"] = balance_loss(route.probs, chosen, cfg.balance_loss)
            if cfg.z_loss_coef > 0:
                self.aux_losses["z"] = router_z_loss(route.logits)
        if self.training and cfg.aux_free_bias and not gating_dropped:
            self.router.update_selection_bias(route.indices)
        if self.record_stats:
            self._record(indices, weights, keep)
        return out.reshape(x.shape)

    def _shared(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if not len(self.shared_experts):
            return None
        return self.config.shared_coef * sum(e(tokens) for e in self.shared_experts) / len(self.shared_experts)

    def _forward_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """SMEAR and Soft MoE: mixing over a sequence ``(..., T, D)``."""
        cfg = self.config
        seqs = x.reshape(-1, x.shape[-2] if x.dim() > 2 else x.shape[0], self.dim)  # (B, T, D)
        ex = self.experts
        if cfg.router == "smear":
            logits = self.router.gate(seqs.mean(1))  # (B, E): route each sequence by its mean token
            p = torch.softmax(logits.float(), dim=-1).to(x.dtype)
            w_in, w_out = torch.einsum("be,edh->bdh", p, ex.w_in), torch.einsum("be,ehd->bhd", p, ex.w_out)
            h = torch.bmm(seqs, w_in)
            if ex.b_in is not None:
                h = h + (p @ ex.b_in).unsqueeze(1)
            routed = torch.bmm(ex.hidden_act(h), w_out)
            if ex.b_out is not None:
                routed = routed + (p @ ex.b_out).unsqueeze(1)
            probs = p.float()
        else:  # soft: slots mix tokens, experts run on slots, tokens mix slots
            logits = self.router.gate(seqs).float()  # (B, T, E * S)
            dispatch_w = torch.softmax(logits, dim=1).to(x.dtype)  # over tokens
            combine_w = torch.softmax(logits, dim=2).to(x.dtype)  # over slots
            slots = torch.einsum("bts,btd->bsd", dispatch_w, seqs)  # (B, E * S, D)
            b, s_total = slots.shape[:2]
            per_expert = slots.reshape(b, cfg.num_experts, cfg.slots_per_expert, self.dim).transpose(0, 1)
            h = torch.einsum("ebsd,edh->ebsh", per_expert, ex.w_in)
            if ex.b_in is not None:
                h = h + ex.b_in[:, None, None]
            y = torch.einsum("ebsh,ehd->ebsd", ex.hidden_act(h), ex.w_out)
            if ex.b_out is not None:
                y = y + ex.b_out[:, None, None]
            slot_out = y.transpose(0, 1).reshape(b, s_total, self.dim)
            routed = torch.einsum("bts,bsd->btd", combine_w, slot_out)
            probs = combine_w.float().reshape(-1, s_total)
        out = cfg.routed_coef * (routed if self.routed_gate is None else self.routed_gate * routed)
        shared = self._shared(seqs.reshape(-1, self.dim))
        if shared is not None:
            out = out + shared.reshape(out.shape)
        self.aux_losses = {}
        self.last_probs = probs.detach()
        return out.reshape(x.shape)

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
        cfg = self.config
        if cfg.router in ("smear", "soft"):
            return float(cfg.num_experts)
        if cfg.router == "topany":
            seen = float(self.tokens_seen)
            return float(self.expert_tokens.sum()) / seen if seen > 0 else float(cfg.num_experts)
        return float(cfg.top_k)

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


def _retop(route, k: int):
    """The same router scores with ``k`` experts selected instead of ``top_k``."""
    from adamoe.routers import RouterOutput

    if not 1 <= k <= route.probs.shape[-1]:
        raise ValueError(f"top_k override {k} is not in [1, {route.probs.shape[-1]}]")
    indices = torch.topk(route.probs, k, dim=-1).indices
    return RouterOutput(indices, route.probs, route.logits, route.probs.gather(-1, indices))
