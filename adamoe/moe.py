"""The sparse Mixture-of-Experts feed-forward layer (AdaMoE and vanilla top-k)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from adamoe.config import MoEConfig
from adamoe.dispatch import dispatch
from adamoe.experts import FeedForward, FFNWeights, GroupedExperts, ffn_weights
from adamoe.routers import TopKRouter, balance_loss, router_z_loss


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
        self.experts = GroupedExperts(config.num_experts, dim, hidden, kind, activation, bias_in, bias_out)
        self.router = TopKRouter(
            dim, config.num_experts, config.top_k, config.router_init_std, config.aux_free_bias, config.bias_update_rate
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
        self.record_stats = config.record_stats
        self.aux_losses: dict[str, torch.Tensor] = {}

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
        routed = GroupedExperts.from_ffn(weights, config.num_experts, config.expert_noise_std, generator)
        layer.experts = routed
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"MoEFeedForward expects inputs with last dimension {self.dim}, got shape {tuple(x.shape)}"
            )
        cfg = self.config
        tokens = x.reshape(-1, self.dim)  # (N, D)
        route = self.router(tokens)
        weights = route.selected_probs  # (N, k)
        if self.scale_adapter is not None:
            weights = weights + self.scale_adapter(tokens).float().gather(-1, route.indices)  # AdaMoE: p_i + s_i
        elif cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        routed = dispatch(tokens, route.indices, weights.to(tokens.dtype), self.experts, cfg.backend)
        out = cfg.routed_coef * (routed if self.routed_gate is None else self.routed_gate * routed)
        if len(self.shared_experts):
            shared = sum(expert(tokens) for expert in self.shared_experts)  # FFNs act token-wise
            out = out + cfg.shared_coef * shared / len(self.shared_experts)

        self.aux_losses = {}
        if self.training:
            if cfg.balance_loss != "none":
                self.aux_losses["balance"] = balance_loss(route.probs, route.indices, cfg.balance_loss)
            if cfg.z_loss_coef > 0:
                self.aux_losses["z"] = router_z_loss(route.logits)
        if self.training and cfg.aux_free_bias:
            self.router.update_selection_bias(route.indices)
        if self.record_stats:
            self._record(route.indices, weights)
        return out.reshape(x.shape)

    @torch.no_grad()
    def _record(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        flat = indices.reshape(-1)
        self.expert_tokens += torch.bincount(flat, minlength=self.config.num_experts).to(self.expert_tokens)
        self.expert_weight_sum.index_add_(0, flat, weights.reshape(-1).to(self.expert_weight_sum))

    def reset_stats(self) -> None:
        self.expert_tokens.zero_()
        self.expert_weight_sum.zero_()

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router}, num_experts={c.num_experts}, top_k={c.top_k}, shared={c.num_shared_experts}"
