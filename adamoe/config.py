"""The one home of every Mixture-of-Experts knob."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C", bound="JSONConfig")

ROUTERS = ("adamoe", "topk", "topany", "thor", "smear", "soft")
BALANCE_LOSSES = ("mean", "switch", "none")
BACKENDS = ("auto", "grouped_mm", "batched_mm", "loop", "dense")
INITS = ("paper", "preserve")


class JSONConfig:
    """A dataclass config that round-trips through a JSON dict (``config.json``); an
    unknown field is an error that names it and the valid ones."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)


@dataclass
class MoEConfig(JSONConfig):
    """A sparse MoE feed-forward layer, defaults as in AdaMoE (arXiv 2510.14300).

    The layer returns ``shared_coef * mean_j shared_j(x) + routed_coef * gate * y_routed``
    where ``y_routed = sum over the top_k selected experts of w_i * E_i(x)`` and
    - ``router="adamoe"``: ``w_i = p_i + s_i`` with ``p = softmax(W_r x)`` and the scale
      adapter ``s = W_s x`` (decoupled: which experts vs how much), not renormalised;
    - ``router="topk"``: ``w_i = p_i`` (vanilla top-k softmax gating), renormalised over
      the selected experts when ``renormalize`` (as Mixtral does).
    ``gate`` is a learnable scalar that exists only when ``routed_gate_init`` is set
    (``upcycle(init="preserve")`` sets it to 0 so the layer starts as the dense FFN).

    Other families (``router=``): ``"topany"`` (DynMoE: every expert whose sigmoid
    cosine score clears its learned threshold, at least one; ``top_k`` is ignored),
    ``"thor"`` (THOR: no learned router; each token goes to a uniformly random expert with
    weight 1, in training and inference; train with the consistency regulariser,
    ``consistency_coef`` times the mean squared difference of two forward passes' outputs,
    see ``adamoe.consistency_coef``),
    ``"smear"`` (SMEAR: one expert per sequence whose parameters are the routing-weighted
    average of the experts', run once) and ``"soft"`` (Soft MoE: ``slots_per_expert``
    slots per expert, each a softmax-weighted mix of the sequence's tokens; every token a
    softmax-weighted mix of the slots' outputs). ``smear`` and ``soft`` read the input as
    ``(..., T, D)`` sequences (a 2-d input is one sequence).
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
    # Switch Transformer capacity: expert e takes at most ceil(capacity_factor * N * k / E)
    # token-expert pairs per forward, first choices first and tokens in order; the rest are
    # dropped (their routed output is 0; the residual and shared experts still carry them).
    # None: dropless.
    capacity_factor: float | None = None
    slots_per_expert: int = 1  # router="soft"
    consistency_coef: float = 1.0  # router="thor": weight of the two-pass consistency loss
    # Structured experts: "lowrank" (W = U V, rank structure_rank, from the dense FFN's SVD)
    # or "blockdiag" (structure_blocks diagonal blocks of it). With self_guided_steps > 0 the
    # layer's output blends in the dense FFN: alpha * dense + (1 - alpha) * MoE, alpha
    # decaying linearly from 1 to 0 over that many training forwards (self-guided training).
    expert_structure: str = "dense"
    structure_rank: int = 16
    structure_blocks: int = 4
    self_guided_steps: int = 0
    # Gating dropout (Liu et al., ICML 2022): while training, with this probability per
    # forward, the router is skipped and every token goes to expert gating_dropout_expert
    # with weight 1.
    gating_dropout: float = 0.0
    gating_dropout_expert: int = 0
    router_init_std: float = 0.006
    expert_noise_std: float = 0.0
    backend: str = "auto"
    record_stats: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for field in dataclasses.fields(self):  # True is an int to Python, never a count or a size here
            value = getattr(self, field.name)
            if isinstance(value, bool) and field.type not in ("bool", bool):
                raise ValueError(f"{field.name} must be a number, got {value!r}")
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
        if self.expert_structure not in ("dense", "lowrank", "blockdiag"):
            raise ValueError(
                f"expert_structure={self.expert_structure!r} is not one of ('dense', 'lowrank', 'blockdiag')"
            )
        for name in ("structure_rank", "structure_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.self_guided_steps, int) or self.self_guided_steps < 0:
            raise ValueError(f"self_guided_steps must be an integer >= 0, got {self.self_guided_steps!r}")
        if self.router == "thor" and self.top_k != 1:
            raise ValueError(f"router='thor' sends each token to one random expert: top_k must be 1, got {self.top_k}")
        if self.aux_free_bias and self.router not in ("adamoe", "topk"):
            raise ValueError(f"aux_free_bias needs a top-k router ('adamoe' or 'topk'), not router={self.router!r}")
        if not isinstance(self.slots_per_expert, int) or self.slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be an integer >= 1, got {self.slots_per_expert!r}")
        if self.capacity_factor is not None and not (math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor!r}")
        if not (isinstance(self.gating_dropout, (int, float)) and 0.0 <= self.gating_dropout <= 1.0):
            raise ValueError(f"gating_dropout must be in [0, 1], got {self.gating_dropout!r}")
        if not isinstance(self.gating_dropout_expert, int) or not 0 <= self.gating_dropout_expert < self.num_experts:
            raise ValueError(
                f"gating_dropout_expert must be an expert index in [0, {self.num_experts}), "
                f"got {self.gating_dropout_expert!r}"
            )
        for name in (
            "balance_coef",
            "balance_coef_after",
            "z_loss_coef",
            "router_init_std",
            "expert_noise_std",
            "consistency_coef",
            "shared_coef",
            "routed_coef",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def balance_weight(self, step: int) -> float:
        """The balance-loss coefficient at a training step (0 when balance_loss="none")."""
        if self.balance_loss == "none":
            return 0.0
        return self.balance_coef if step < self.balance_coef_steps else self.balance_coef_after
