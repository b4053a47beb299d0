"""Upcycling: replace the dense FFNs of a trained model with MoE layers initialised from them.

``init="paper"`` is AdaMoE's recipe: routed experts are copies of the FFN (optional
noise), the shared expert is the FFN itself, ``W_r`` and ``W_s`` are drawn from
N(0, 0.006^2), and the layer returns 0.5 * shared + 0.5 * routed, which perturbs the
pretrained function at step 0. ``init="preserve"`` sets the shared coefficient to 1
and puts a zero-initialised learnable gate on the routed branch, so the upcycled
model computes exactly the dense model's function until fine-tuning moves the gate.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from adamoe.config import INITS, MoEConfig
from adamoe.experts import ffn_weights
from adamoe.moe import MoEFeedForward

Target = str | type | tuple[type, ...] | Callable[[str, nn.Module], bool] | None
# Default target: a module whose name or class says it is the feed-forward block.
DEFAULT_NAME_PATTERN = re.compile(r"(^|\.)(mlp|ffn|feed_forward|feedforward)$")


@dataclass
class ReplacedLayer:
    name: str
    kind: str
    activation: str
    dim: int
    hidden: int
    dense_params: int
    moe_params: int
    active_params: int


@dataclass
class UpcycleReport:
    """What ``upcycle`` replaced; ``config`` is the effective per-layer config (save it)."""

    init: str
    config: MoEConfig
    layers: list[ReplacedLayer] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def to_dict(self) -> dict:
        return {
            "init": self.init,
            "config": self.config.to_dict(),
            "layers": [dataclasses.asdict(x) for x in self.layers],
        }

    def __str__(self) -> str:
        lines = [f"upcycled {len(self.layers)} FFN(s) with init={self.init!r}:"]
        for x in self.layers:
            lines.append(
                f"  {x.name}: {x.kind}/{x.activation} {x.dim}->{x.hidden}, params {x.dense_params:,} -> "
                f"{x.moe_params:,} ({x.active_params:,} active per token)"
            )
        return "\n".join(lines)


def _matcher(target: Target) -> Callable[[str, nn.Module], bool]:
    if target is None:
        return lambda name, module: bool(DEFAULT_NAME_PATTERN.search(name)) and _is_ffn(module)
    if isinstance(target, str):
        pattern = re.compile(target)
        return lambda name, module: bool(pattern.search(name))
    if isinstance(target, type) or (isinstance(target, tuple) and all(isinstance(t, type) for t in target)):
        return lambda name, module: isinstance(module, target)
    if callable(target):
        return target
    raise TypeError(f"target must be None, a regex string, a module type or a callable, got {target!r}")


def _is_ffn(module: nn.Module) -> bool:
    try:
        ffn_weights(module)
    except ValueError:
        return False
    return True


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def effective_config(config: MoEConfig, init: str) -> MoEConfig:
    """The per-layer config an initialisation implies (``preserve`` fixes the coefficients)."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    if init == "paper":
        return dataclasses.replace(config)
    if config.num_shared_experts < 1:
        raise ValueError("init='preserve' needs num_shared_experts >= 1: the shared expert carries the dense function")
    return dataclasses.replace(config, shared_coef=1.0, routed_gate_init=0.0)


def upcycle(
    model: nn.Module,
    config: MoEConfig | None = None,
    target: Target = None,
    init: str = "paper",
    generator: torch.Generator | None = None,
) -> UpcycleReport:
    """Replace every FFN of ``model`` matched by ``target`` with an MoE layer, in place.

    ``target``: ``None`` (modules named ``mlp``/``ffn``/``feed_forward`` that read as an
    FFN), a regex on qualified module names, a module type, or ``(name, module) -> bool``.
    Matches nested inside another match are left alone. Returns an :class:`UpcycleReport`.
    """
    config = MoEConfig() if config is None else config
    layer_config = effective_config(config, init)
    match = _matcher(target)
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, MoEFeedForward) or any(name.startswith(c + ".") for c in chosen):
            continue
        if match(name, module):
            chosen.append(name)
    if not chosen:
        candidates = [n for n, m in model.named_modules() if n and _is_ffn(m)]
        raise ValueError(f"no module matched target={target!r}; modules that read as FFNs: {candidates}")

    report = UpcycleReport(init, layer_config)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = parent.get_submodule(child)
        weights = ffn_weights(dense)
        dense_params = _count(dense)
        layer = MoEFeedForward.from_dense(dense, dataclasses.replace(layer_config), generator)
        setattr(parent, child, layer)
        report.layers.append(
            ReplacedLayer(
                name=name,
                kind=weights.kind,
                activation=weights.activation,
                dim=weights.dim,
                hidden=weights.hidden,
                dense_params=dense_params,
                moe_params=_count(layer),
                active_params=_count(layer) - round(layer.inactive_parameters()),
            )
        )
    return report
