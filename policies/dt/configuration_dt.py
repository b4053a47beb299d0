"""Decision Transformer configuration: the shared GPT-2 body and one entry per task.

Defaults are the reference hyper-parameters of the Decision Transformer (Chen et al.,
2021) as the merging paper (Lawson & Qureshi, arXiv 2303.07551) uses them: context
K = 20, 3 layers, 128 wide, 1 head, dropout 0.1, ReLU MLPs, tanh actions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adamoe.config import JSONConfig

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_tanh", "silu")
TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class DTTask:
    """One task of a (multi-task) Decision Transformer: its sizes and how returns are read.

    ``return_scale`` divides returns-to-go before they enter the model (1000 for MuJoCo
    locomotion in the DT paper); ``target_return`` is the (unscaled) return the policy is
    conditioned on at evaluation. ``env_id`` names the Gymnasium env the task runs in and
    ``dataset`` the Minari dataset it was trained on (both informational).
    """

    name: str
    state_dim: int
    act_dim: int
    return_scale: float = 1.0
    target_return: float = 0.0
    env_id: str = ""
    dataset: str = ""

    def validate(self) -> None:
        if not isinstance(self.name, str) or not TASK_NAME.match(self.name):
            raise ValueError(f"task name {self.name!r} must be letters, digits, '-' or '_' (it names modules)")
        for attr in ("state_dim", "act_dim"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"task {self.name!r}: {attr} must be an integer >= 1, got {value!r}")
        if not self.return_scale > 0:
            raise ValueError(f"task {self.name!r}: return_scale must be > 0, got {self.return_scale!r}")


@dataclass
class DecisionTransformerConfig(JSONConfig):
    """Every hyper-parameter of :class:`policies.DecisionTransformer`; ``type`` tags checkpoints.

    The body's fields keep the names of Hugging Face's ``DecisionTransformerConfig``
    (``hidden_size``, ``n_layer``, ``n_head``, ``n_inner``, ``activation_function``,
    ``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``, ``layer_norm_epsilon``, ``max_ep_len``,
    ``n_positions``, ``vocab_size``, ``action_tanh``), so :meth:`from_hf` is a field copy.
    ``moe`` is set when the body's MLPs are Mixture-of-Experts layers (a merge into MoE):
    ``{"config": MoEConfig dict, "layers": [block indices]}``.
    """

    tasks: list[DTTask] = field(default_factory=list)
    context_length: int = 20
    hidden_size: int = 128
    n_layer: int = 3
    n_head: int = 1
    n_inner: int | None = None  # 4 * hidden_size
    activation_function: str = "relu"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    max_ep_len: int = 1000
    n_positions: int = 1024
    vocab_size: int = 1
    action_tanh: bool = True
    moe: dict[str, Any] | None = None
    # What this checkpoint is: "common", "specialist:<task>", "merge:<method>"... (informational).
    role: str = ""
    type: str = "decision_transformer"

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, DTTask) else DTTask(**t) for t in self.tasks]
        self.validate()

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.hidden_size

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> DTTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"unknown task {name!r}; this model's tasks are {self.task_names}")

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("a Decision Transformer needs at least one task (DTTask(name, state_dim, act_dim))")
        for t in self.tasks:
            t.validate()
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for attr in ("context_length", "hidden_size", "n_layer", "n_head", "max_ep_len", "n_positions", "vocab_size"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{attr} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not one of {ACTIVATIONS}")
        for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, attr) < 1.0:
                raise ValueError(f"{attr} must be in [0, 1), got {getattr(self, attr)!r}")
        if self.type != "decision_transformer":
            raise ValueError(f"type={self.type!r}: a DecisionTransformerConfig is tagged 'decision_transformer'")

    @classmethod
    def from_hf(cls, hf_config: Any, task: str = "task", **overrides: Any) -> DecisionTransformerConfig:
        """The config of a Hugging Face ``DecisionTransformerConfig``, as a one-task model."""
        fields = (
            "hidden_size",
            "n_layer",
            "n_head",
            "n_inner",
            "activation_function",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "layer_norm_epsilon",
            "max_ep_len",
            "n_positions",
            "vocab_size",
            "action_tanh",
        )
        values = {f: getattr(hf_config, f) for f in fields}
        values["tasks"] = [DTTask(task, int(hf_config.state_dim), int(hf_config.act_dim))]
        values.update(overrides)
        return cls(**values)
