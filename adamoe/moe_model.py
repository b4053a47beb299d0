"""Model-wide operations over every MoE layer of a model: finding them, their auxiliary
losses for a training loop, the router parameters (trained at their own rate), the
parameters one token depends on, THOR's consistency weight, and SCMoE's temporary top-k."""

from __future__ import annotations

import torch
from torch import nn

from adamoe.attention import MixtureOfAttention
from adamoe.moe import MoEFeedForward


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFeedForward)}


def active_parameters(model: nn.Module) -> int:
    """The parameters of ``model`` one token's output depends on: every parameter but each
    MoE layer's ``inactive_parameters`` (unchosen routed experts, a blended-out guide)."""
    total = sum(p.numel() for p in model.parameters())
    return total - round(sum(layer.inactive_parameters() for layer in moe_layers(model).values()))


def moe_aux_loss(model: nn.Module, step: int = 0) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The weighted auxiliary loss of the last forward, averaged over MoE layers.

    Returns ``(loss or None, logs)``; the balance weight follows each layer's schedule
    (``MoEConfig.balance_weight(step)``), the z-loss weight its ``z_loss_coef``.
    """
    total, logs, balance, z = None, {}, [], []
    for layer in moe_layers(model).values():
        cfg, aux = layer.config, layer.aux_losses
        terms = []
        if "balance" in aux:
            balance.append(aux["balance"].detach())
            terms.append(cfg.balance_weight(step) * aux["balance"])
        if "z" in aux:
            z.append(aux["z"].detach())
            terms.append(cfg.z_loss_coef * aux["z"])
        if terms:
            term = sum(terms)
            total = term if total is None else total + term
    layers = len(moe_layers(model))
    if total is not None:
        total = total / layers
    if balance:
        logs["balance_loss"] = float(torch.stack(balance).mean())
    if z:
        logs["z_loss"] = float(torch.stack(z).mean())
    return total, logs


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every router and scale adapter, attention experts' routers included
    (AdaMoE trains them at 2x the base rate)."""
    params = []
    for layer in moe_layers(model).values():
        params.extend(layer.router.parameters())
        if layer.scale_adapter is not None:
            params.extend(layer.scale_adapter.parameters())
    for module in model.modules():
        if isinstance(module, MixtureOfAttention):
            params.extend(module.router.parameters())
    return params


def consistency_coef(model: nn.Module) -> float:
    """The weight of THOR's consistency loss for ``model`` (0 when it has no THOR layer):
    a training loop runs two forward passes and adds this times the mean squared
    difference of their outputs (symmetric) to the mean of their losses."""
    coefs = [m.config.consistency_coef for m in moe_layers(model).values() if m.family.consistency]
    return max(coefs) if coefs else 0.0


class routing_top_k:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Within ``with routing_top_k(model, k):`` every top-k MoE layer of ``model`` selects
    ``k`` experts (SCMoE's strong and weak routings at inference)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        self.layers = [m for m in moe_layers(model).values() if m.family.retop]
        if not self.layers:
            raise ValueError("the model has no top-k MoE layer whose routing could be changed")
        self.k = k

    def __enter__(self):
        self.saved = [m.top_k_override for m in self.layers]
        for m in self.layers:
            m.top_k_override = self.k
        return self

    def __exit__(self, *exc) -> None:
        for m, saved in zip(self.layers, self.saved, strict=True):
            m.top_k_override = saved
