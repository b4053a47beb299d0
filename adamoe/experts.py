"""Expert feed-forward networks: reading a dense FFN, and E of them stacked for dispatch.

Two FFN kinds cover the policies here and most transformers:
- ``mlp``: ``down(act(up(x)))`` (GELU MLPs of ViT, GPT-2, pi0's early action experts);
- ``gated``: ``down(act(gate(x)) * up(x))`` (SwiGLU/GeGLU of Llama, Gemma, pi0).
Stacked weights are stored input-major, ``w_in (E, D, H)`` and ``w_out (E, H, D)``, the
layout ``torch.nn.functional.grouped_mm`` consumes; a gated expert fuses gate and up into
``w_in (E, D, 2H)`` so one matmul computes both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
FFN_KINDS = ("mlp", "gated")

# Child names of the FFN kinds we read, most specific first: (gate, up, down) and (up, down).
GATED_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("gate", "up", "down"))
MLP_NAMES = (
    ("fc1", "fc2"),
    ("up_proj", "down_proj"),
    ("linear1", "linear2"),
    ("w1", "w2"),
    ("fc_in", "fc_out"),
    ("c_fc", "c_proj"),  # GPT-2 and the Decision Transformer (Conv1D: input-major weights)
)
ACTIVATION_ATTRS = ("act_fn", "act", "activation", "activation_fn", "act_layer")


def activation_name(fn: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """Identify an activation callable by its values (module, function or HF activation)."""
    x = torch.linspace(-6.0, 6.0, 481, dtype=torch.float64)
    with torch.no_grad():
        y = fn(x)
    for name, ref in ACTIVATIONS.items():
        if torch.allclose(y, ref(x), atol=1e-7, rtol=0):
            return name
    raise ValueError(f"unsupported activation {fn!r}; supported activations are {sorted(ACTIVATIONS)}")


@dataclass
class FFNWeights:
    """A dense FFN's weights, input-major: ``w_in (D, H or 2H)``, ``w_out (H, D)``."""

    kind: str
    activation: str
    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None

    @property
    def dim(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_out.shape[0]


def _linear(module: nn.Module, name: str) -> nn.Module | None:
    """The projection ``name`` of ``module``: an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) or _is_conv1d(child) else None


def _is_conv1d(module: object) -> bool:
    """GPT-2's ``Conv1D``: a linear map with input-major ``weight (nx, nf)`` and ``bias (nf)``."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Module)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def _input_major(linear: nn.Module) -> torch.Tensor:
    """A projection's weight as ``(in, out)``."""
    return linear.weight.detach().clone() if _is_conv1d(linear) else linear.weight.detach().T.clone()


def _find_activation(module: nn.Module, skip: set[str]) -> str:
    for attr in ACTIVATION_ATTRS:
        fn = getattr(module, attr, None)
        if callable(fn) and not isinstance(fn, nn.Linear) and not _is_conv1d(fn):
            return activation_name(fn)
    for name, child in module.named_children():
        if name not in skip and not isinstance(child, (nn.Linear, nn.Dropout, nn.Identity)) and not _is_conv1d(child):
            return activation_name(child)
    raise ValueError(f"could not find the activation of {type(module).__name__}; expected one of {ACTIVATION_ATTRS}")


def _bias(linear: nn.Module) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


def ffn_weights(module: nn.Module) -> FFNWeights:
    """Read a dense FFN module (named children or an ``nn.Sequential``) into :class:`FFNWeights`."""
    for gate_name, up_name, down_name in GATED_NAMES:
        gate, up, down = (_linear(module, n) for n in (gate_name, up_name, down_name))
        if gate is not None and up is not None and down is not None:
            w_in = torch.cat([_input_major(gate), _input_major(up)], dim=1)
            biases = (_bias(gate), _bias(up))
            b_in = (
                None
                if biases[0] is None and biases[1] is None
                else torch.cat([b if b is not None else torch.zeros(gate.out_features) for b in biases])
            )
            act = _find_activation(module, {gate_name, up_name, down_name})
            return FFNWeights("gated", act, w_in, b_in, _input_major(down), _bias(down))
    for up_name, down_name in MLP_NAMES:
        up, down = _linear(module, up_name), _linear(module, down_name)
        if up is not None and down is not None:
            act = _find_activation(module, {up_name, down_name})
            return FFNWeights("mlp", act, _input_major(up), _bias(up), _input_major(down), _bias(down))
    if isinstance(module, nn.Sequential):
        layers = [m for m in module if not isinstance(m, (nn.Dropout, nn.Identity))]
        if len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[2], nn.Linear):
            up, down = layers[0], layers[2]
            act = activation_name(layers[1])
            return FFNWeights(
                "mlp", act, up.weight.detach().T.clone(), _bias(up), down.weight.detach().T.clone(), _bias(down)
            )
    raise ValueError(
        f"{type(module).__name__} is not a feed-forward network this library can read: expected children named "
        f"{[n for n in GATED_NAMES]} (gated) or {[n for n in MLP_NAMES]} (MLP), or Sequential(Linear, act, Linear)"
    )


class FeedForward(nn.Module):
    """A plain dense FFN of either kind, with the child names ``ffn_weights`` reads."""

    def __init__(self, dim: int, hidden: int, kind: str = "mlp", activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"FFN kind {kind!r} is not one of {FFN_KINDS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.kind, self.activation = kind, activation
        self.act_fn = ACTIVATIONS[activation]
        if kind == "gated":
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
            self.up_proj = nn.Linear(dim, hidden, bias=bias)
            self.down_proj = nn.Linear(hidden, dim, bias=bias)
        else:
            self.fc1 = nn.Linear(dim, hidden, bias=bias)
            self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act_fn(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, activation={self.activation}"


class ExpertBank(nn.Module):
    """What every bank of E expert FFNs shares: sizes, FFN kind and activation, biases,
    and ``forward_expert``, the plain reference every dispatch backend must match.
    Subclasses hold ``w_in (E, D, width)`` and ``w_out (E, hidden, D)``."""

    def __init__(self, num_experts: int, dim: int, hidden: int, kind: str, activation: str) -> None:
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"expert kind {kind!r} is not one of {FFN_KINDS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"num_experts, dim and hidden must be >= 1, got {num_experts}, {dim}, {hidden}")
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.kind, self.activation = kind, activation
        self.width = 2 * hidden if kind == "gated" else hidden  # gate and up stacked
        self._act = ACTIVATIONS[activation]

    def _add_biases(self, bias_in: bool, bias_out: bool) -> None:
        self.b_in = nn.Parameter(torch.zeros(self.num_experts, self.width)) if bias_in else None
        self.b_out = nn.Parameter(torch.zeros(self.num_experts, self.dim)) if bias_out else None

    def hidden_act(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            gate, up = h.split(self.hidden, dim=-1)
            return self._act(gate) * up
        return self._act(h)

    def forward_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` on tokens ``x (n, D)``: the plain reference every backend must match."""
        h = x @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = self.hidden_act(h) @ self.w_out[e]
        if self.b_out is not None:
            y = y + self.b_out[e]
        return y


class GroupedExperts(ExpertBank):
    """E expert FFNs of one kind with stacked weights."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        kind: str = "mlp",
        activation: str = "gelu",
        bias_in: bool = True,
        bias_out: bool = True,
    ) -> None:
        super().__init__(num_experts, dim, hidden, kind, activation)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, self.width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self._add_biases(bias_in, bias_out)
        nn.init.normal_(self.w_in, std=dim**-0.5)
        nn.init.normal_(self.w_out, std=hidden**-0.5)

    @classmethod
    def from_ffn(
        cls, weights: FFNWeights, num_experts: int, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> GroupedExperts:
        """E copies of a dense FFN (upcycling), each perturbed by N(0, noise_std^2) if asked."""
        experts = cls(
            num_experts,
            weights.dim,
            weights.hidden,
            weights.kind,
            weights.activation,
            bias_in=weights.b_in is not None,
            bias_out=weights.b_out is not None,
        ).to(device=weights.w_in.device, dtype=weights.w_in.dtype)
        with torch.no_grad():
            for name, value in (
                ("w_in", weights.w_in),
                ("w_out", weights.w_out),
                ("b_in", weights.b_in),
                ("b_out", weights.b_out),
            ):
                param = getattr(experts, name)
                if param is None:
                    continue
                param.copy_(value.unsqueeze(0).expand_as(param))
                if noise_std > 0:
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param)
                    param.add_(noise * noise_std)
        return experts

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"kind={self.kind}, activation={self.activation}"
        )


STRUCTURES = ("dense", "lowrank", "blockdiag")


class StructuredExperts(ExpertBank):
    """E experts whose weight matrices are structured: ``lowrank`` (``W = U V`` of rank
    ``rank``) or ``blockdiag`` (``blocks`` diagonal blocks). ``w_in`` / ``w_out`` are the
    full ``(E, rows, cols)`` matrices assembled from the factors, so every dispatch backend
    runs them unchanged; the parameters (and a checkpoint) hold the factors only. ``ffn``
    overrides ``kind``, ``activation``, ``bias_in`` and ``bias_out`` (as for
    :class:`GroupedExperts`; defaults ``mlp``, ``gelu``, both biases)."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        structure: str = "lowrank",
        rank: int = 16,
        blocks: int = 4,
        *,
        ffn: dict[str, Any] | None = None,
    ) -> None:
        ffn = {"kind": "mlp", "activation": "gelu", "bias_in": True, "bias_out": True, **(ffn or {})}
        if len(ffn) != 4:
            raise ValueError(f"ffn takes kind, activation, bias_in and bias_out, got {sorted(ffn)}")
        super().__init__(num_experts, dim, hidden, ffn["kind"], ffn["activation"])
        if structure not in STRUCTURES[1:]:
            raise ValueError(f"structure={structure!r} is not one of {STRUCTURES[1:]}")
        width = self.width
        self.structure = structure
        self.shapes = {"w_in": (dim, width), "w_out": (hidden, dim)}
        if structure == "lowrank":
            if rank < 1 or rank > min(dim, hidden):
                raise ValueError(f"rank must be in [1, {min(dim, hidden)}], got {rank}")
            self.rank = rank
            for name, (rows, cols) in self.shapes.items():
                self.register_parameter(f"{name}_u", nn.Parameter(torch.randn(num_experts, rows, rank) * rows**-0.5))
                self.register_parameter(f"{name}_v", nn.Parameter(torch.randn(num_experts, rank, cols) * rank**-0.5))
        else:
            if blocks < 1 or any(n % blocks for n in (dim, width, hidden)):
                raise ValueError(f"blocks={blocks} must divide dim={dim}, hidden={hidden} and width={width}")
            self.blocks = blocks
            for name, (rows, cols) in self.shapes.items():
                init = torch.randn(num_experts, blocks, rows // blocks, cols // blocks) * (rows // blocks) ** -0.5
                self.register_parameter(f"{name}_blocks", nn.Parameter(init))
        self._add_biases(ffn["bias_in"], ffn["bias_out"])

    def _full(self, name: str) -> torch.Tensor:
        if self.structure == "lowrank":
            return getattr(self, f"{name}_u") @ getattr(self, f"{name}_v")
        return torch.func.vmap(lambda b: torch.block_diag(*b))(getattr(self, f"{name}_blocks"))

    @property
    def w_in(self) -> torch.Tensor:
        return self._full("w_in")

    @property
    def w_out(self) -> torch.Tensor:
        return self._full("w_out")

    @torch.no_grad()
    def init_from(self, weights: FFNWeights) -> None:
        """Every expert from one dense FFN: its truncated SVD (``lowrank``, split as
        ``U S^1/2, S^1/2 V``) or its diagonal blocks (``blockdiag``)."""
        for name, full in (("w_in", weights.w_in), ("w_out", weights.w_out)):
            full = full.float()
            if self.structure == "lowrank":
                u, s, vh = torch.linalg.svd(full, full_matrices=False)
                root = s[: self.rank].sqrt()
                getattr(self, f"{name}_u").copy_((u[:, : self.rank] * root).expand_as(getattr(self, f"{name}_u")))
                getattr(self, f"{name}_v").copy_(
                    (root[:, None] * vh[: self.rank]).expand_as(getattr(self, f"{name}_v"))
                )
            else:
                rows, cols = full.shape
                rb, cb = rows // self.blocks, cols // self.blocks
                blocks = torch.stack([full[i * rb : (i + 1) * rb, i * cb : (i + 1) * cb] for i in range(self.blocks)])
                getattr(self, f"{name}_blocks").copy_(blocks.expand_as(getattr(self, f"{name}_blocks")))
        for name in ("b_in", "b_out"):
            value = getattr(weights, name)
            if getattr(self, name) is not None and value is not None:
                getattr(self, name).copy_(value.expand_as(getattr(self, name)))

    def extra_repr(self) -> str:
        detail = f"rank={self.rank}" if self.structure == "lowrank" else f"blocks={self.blocks}"
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, {self.structure}, {detail}"
