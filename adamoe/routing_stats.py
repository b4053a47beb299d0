"""Routing statistics: how many tokens each expert of each MoE layer received."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from torch import nn

from adamoe.moe_model import moe_layers


@contextmanager
def record_routing(model: nn.Module, reset: bool = True):
    """Record expert use of every MoE layer while the block runs; yields the model."""
    layers = moe_layers(model)
    before = {name: layer.record_stats for name, layer in layers.items()}
    for layer in layers.values():
        if reset:
            layer.reset_stats()
        layer.record_stats = True
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.record_stats = before[name]


def routing_stats(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
    """Per layer: ``tokens`` per expert, their ``share`` of all routings, the ``mean_weight``."""
    out = {}
    for name, layer in moe_layers(model).items():
        tokens = layer.expert_tokens.cpu().numpy().copy()
        total = tokens.sum()
        weight = layer.expert_weight_sum.cpu().numpy()
        out[name] = {
            "tokens": tokens,
            "share": tokens / total if total > 0 else np.zeros_like(tokens),
            "mean_weight": np.divide(weight, tokens, out=np.zeros_like(weight), where=tokens > 0),
        }
    return out


def reset_routing_stats(model: nn.Module) -> None:
    for layer in moe_layers(model).values():
        layer.reset_stats()
