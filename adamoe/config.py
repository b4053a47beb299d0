"""The one home of every Mixture-of-Experts knob."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROUTERS = ("adamoe", "topk")
BALANCE_LOSSES = ("mean", "switch", "none")
BACKENDS = ("auto", "grouped_mm", "batched_mm", "loop", "dense")
INITS = ("paper", "preserve")


@dataclass
class MoEConfig:
    """A sparse MoE feed-forward layer, defaults as in AdaMoE (arXiv 2510.14300).

    The layer returns ``shared_coef * mean_j shared_j(x) + routed_coef * gate * y_routed``
    where ``y_routed = sum over the top_k selected experts of w_i * E_i(x)`` and
    - ``router="adamoe"``: ``w_i = p_i + s_i`` with ``p = softmax(W_r x)`` and the scale
      adapter ``s = W_s x`` (decoupled: which experts vs how much), not renormalised;
    - ``router="topk"``: ``w_i = p_i`` (vanilla top-k softmax gating), renormalised over
      the selected experts when ``renormalize`` (as Mixtral does).
    ``gate`` is a learnable scalar that exists only when ``routed_gate_init`` is set
    (``upcycle(init="preserve")`` sets it to 0 so the layer starts as the dense FFN).
    """

    num_experts: int = 4
    top_k: int = 1
    num_shared_experts: int = 1
    router: str = "adamoe"
    renormalize: bool = False
    shared_coef: float = 0.5
    routed_coef: float = 0.5
    routed_gate_init: float | None = None
    # Load balancing: loss = mean_i(f_i * P_i) ("mean", AdaMoE) or E * sum_i f_i * P_i
    # ("switch"), weighted by balance_coef for the first balance_coef_steps steps and by
    # balance_coef_after from then on (AdaMoE: 0.01, then 0.005 after 500 steps).
    balance_loss: str = "mean"
    balance_coef: float = 0.01
    balance_coef_after: float = 0.005
    balance_coef_steps: int = 500
    z_loss_coef: float = 0.0
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores used
    # for selection only, nudged by bias_update_rate towards equal load after each
    # training forward, outside the gradient.
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    router_init_std: float = 0.006
    expert_noise_std: float = 0.0
    backend: str = "auto"
    record_stats: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        for name, value, valid in (
            ("router", self.router, ROUTERS),
            ("balance_loss", self.balance_loss, BALANCE_LOSSES),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not one of {valid}")
        for name in ("balance_coef", "balance_coef_after", "z_loss_coef", "router_init_std", "expert_noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def balance_weight(self, step: int) -> float:
        """The balance-loss coefficient at a training step (0 when balance_loss="none")."""
        if self.balance_loss == "none":
            return 0.0
        return self.balance_coef if step < self.balance_coef_steps else self.balance_coef_after

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)
